#!/usr/bin/env bash
# Runs every fuzz target for a bounded time on a scratch copy of its committed seed corpus, under
# ASan+UBSan, and prints per target: executions, rate, new inputs found, peak RSS, crashes.
# Exits non-zero when any target crashed, leaked, timed out on an input or exceeded the memory
# limit; the reproducer and the log stay under <build>/fuzz-artifacts/.
#   tests/fuzz/run_fuzzers.sh [seconds per target, default 60] [build dir, default build-asan]
# The build dir is configured (clang, -DNORMD_SANITIZE=address -DNORMD_FUZZ=ON) when it is not
# a fuzzing build yet; `make test` passes the build its ASan stage already made. FUZZ_JOBS
# targets run at a time (default 2, one per core of the CI machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-60}"
build="${2:-build-asan}"
jobs="${FUZZ_JOBS:-2}"
targets=(spec_fuzz tensor_fuzz sequence_fuzz checkpoint_fuzz)
declare -A corpus=([spec_fuzz]=spec [tensor_fuzz]=tensor [sequence_fuzz]=sequence
  [checkpoint_fuzz]=checkpoint)

if ! grep -qs '^NORMD_FUZZ:BOOL=ON' "$build/CMakeCache.txt"; then
  CC=clang CXX=clang++ cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g" -DNORMD_SANITIZE=address -DNORMD_FUZZ=ON \
    -DNORMD_BUILD_BENCH=OFF >"$build.configure.log" 2>&1 ||
    { cat "$build.configure.log"; exit 1; }
fi
cmake --build "$build" -j2 --target "${targets[@]}"

artifacts="$build/fuzz-artifacts"
rm -rf "$artifacts"
mkdir -p "$artifacts"
# Reports go to the fuzzer's log (not to files, as in the test stage); a leak fails the input.
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=0:symbolize=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"

# Runs one target; writes its log and a one-line result to the artifacts directory.
run_one() {
  local t="$1" work status=0
  work="$(mktemp -d)"
  cp -r "tests/fuzz/corpus/${corpus[$t]}/." "$work/"
  local dict=()
  [ -f "tests/fuzz/${corpus[$t]}.dict" ] && dict=(-dict="tests/fuzz/${corpus[$t]}.dict")
  # -entropic=0: with the whole tree instrumented, the entropic schedule's per-feature
  # bookkeeping dominated the run (1.5-3x fewer executions and less coverage in 15 s trials).
  "$build/tests/fuzz/$t" -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 \
    -malloc_limit_mb=1024 -timeout=10 -entropic=0 "${dict[@]}" \
    -artifact_prefix="$artifacts/$t-" "$work" >"$artifacts/$t.log" 2>&1 || status=$?
  rm -rf "$work"
  local execs rate added rss
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$artifacts/$t.log" | tail -1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$artifacts/$t.log" | tail -1)"
  added="$(sed -n 's/^stat::new_units_added: *//p' "$artifacts/$t.log" | tail -1)"
  rss="$(sed -n 's/^stat::peak_rss_mb: *//p' "$artifacts/$t.log" | tail -1)"
  if [ "$status" -eq 0 ]; then
    printf 'fuzz %-16s %9s executions in %s s (%s/s), %s new inputs, peak RSS %s MB, 0 crashes\n' \
      "$t" "${execs:-?}" "$secs" "${rate:-?}" "${added:-?}" "${rss:-?}" >"$artifacts/$t.result"
  else
    printf 'fuzz %-16s CRASHED (exit %s) after %s executions; log %s, reproducer %s\n' \
      "$t" "$status" "${execs:-?}" "$artifacts/$t.log" \
      "$(ls "$artifacts/$t-"* 2>/dev/null | head -1)" >"$artifacts/$t.result"
  fi
}

running=0
for t in "${targets[@]}"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

failed=0
for t in "${targets[@]}"; do
  cat "$artifacts/$t.result"
  if ! grep -q ' 0 crashes$' "$artifacts/$t.result"; then
    failed=1
    grep -v -E '^(#|\s+NEW_FUNC|INFO:)' "$artifacts/$t.log" | tail -40
  fi
done
echo "To replay a reproducer: $build/tests/fuzz/<target> <file>"
exit "$failed"

#!/usr/bin/env bash
# Builds the fuzz targets with clang's libFuzzer under ASan+UBSan and runs each for a bounded
# time on a scratch copy of its committed seed corpus. Prints executions and crashes per target;
# exits non-zero when any target crashed (the reproducer is kept under <build>/fuzz-artifacts/).
#   tests/fuzz/run_fuzzers.sh [seconds per target, default 60] [build dir, default build-fuzz]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-60}"
build="${2:-build-fuzz}"
targets=(checkpoint_fuzz)
declare -A corpus=([checkpoint_fuzz]=checkpoint)

CC=clang CXX=clang++ cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DNORMD_FUZZ=ON \
  -DNORMD_SANITIZE=address -DNORMD_BUILD_BENCH=OFF \
  -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION" \
  >"$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j2 --target "${targets[@]}"

artifacts="$build/fuzz-artifacts"
mkdir -p "$artifacts"
failed=0
for t in "${targets[@]}"; do
  work="$(mktemp -d)"
  cp -r "tests/fuzz/corpus/${corpus[$t]}/." "$work/"
  log="$artifacts/$t.log"
  status=0
  "$build/tests/fuzz/$t" -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 \
    -timeout=10 -artifact_prefix="$artifacts/$t-" "$work" >"$log" 2>&1 || status=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  rm -rf "$work"
  if [ "$status" -eq 0 ]; then
    echo "fuzz $t: ${execs:-?} executions in ${secs} s, 0 crashes"
  else
    echo "fuzz $t: CRASHED after ${execs:-?} executions (exit $status); see $log"
    tail -40 "$log"
    failed=1
  fi
done
exit "$failed"

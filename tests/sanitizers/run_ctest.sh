#!/usr/bin/env bash
# Runs ctest in a sanitizer build with the sanitizers' options set for every process the tests
# start (normd launched by Python tests included), then fails if any process wrote a report.
# Reports go to files (log_path) rather than stderr, so one from a server whose output a test
# does not read is still seen; they are printed here.
#   tests/sanitizers/run_ctest.sh <build dir> [ctest args...]
set -uo pipefail
build="$(cd "$1" && pwd)"
shift
reports="$build/sanitizer-reports"
rm -rf "$reports"
mkdir -p "$reports"
# ASan + LeakSanitizer + UBSan: stop at the first error; check the order of global initialisers;
# catch use of stack memory after return. A 32 MB quarantine of freed memory (default 256 MB):
# the stress and bad-input tests bound the server's RSS growth to 200 MB, which the default
# quarantine alone would use up (measured: growth 400 MB with it, 100 MB with 32 MB).
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=1:quarantine_size_mb=32:log_path=$reports/report"
# Leaks inside third-party libraries, never normd's: lsan.supp says which and why.
export LSAN_OPTIONS="suppressions=$(cd "$(dirname "$0")" && pwd)/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$reports/report"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:log_path=$reports/report"
status=0
ctest --test-dir "$build" --output-on-failure "$@" || status=$?
found=0
for f in "$reports"/*; do
  [ -e "$f" ] || continue
  found=$((found + 1))
  echo "---------------- sanitizer report $f ----------------"
  head -120 "$f"
done
if [ "$found" -gt 0 ]; then
  echo "$found sanitizer report(s) under $reports"
  exit 1
fi
echo "no sanitizer reports"
exit "$status"

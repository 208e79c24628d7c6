#!/usr/bin/env bash
# One stage of `make test`: prints a banner with the machine's load, runs the command, prints its
# wall time and result, and appends "name<TAB>seconds<TAB>result" to $NORMD_STAGE_LOG.
# Tests that ctest reports as not run (skipped by the test itself, or disabled) in the stage's
# output are listed in $NORMD_STAGE_LOG.skipped ("stage<TAB>test (reason)") and named in the
# result and the summary: a skip is never shown as a plain pass. The stage's exit status is the
# command's, skips or not.
#   tests/sanitizers/stage.sh <name> <command> [args...]
#   tests/sanitizers/stage.sh --reset          (empties the logs)
#   tests/sanitizers/stage.sh --summary        (prints the table of stages run so far, then the
#                                               skipped tests)
set -uo pipefail
log="${NORMD_STAGE_LOG:-build/stage-times.txt}"
skipped_log="$log.skipped"
mkdir -p "$(dirname "$log")"
case "${1:-}" in
  --reset)
    : >"$log"
    : >"$skipped_log"
    exit 0
    ;;
  --summary)
    echo "================ make test: stages ================"
    awk -F'\t' '{ printf "  %-36s %6d s  %s\n", $1, $2, $3; total += $2 }
                END { printf "  %-36s %6d s\n", "total", total }' "$log"
    if [ -s "$skipped_log" ]; then
      echo "  tests that did not run (skipped: neither passed nor failed):"
      awk -F'\t' '{ printf "    %-34s %s\n", $1, $2 }' "$skipped_log"
    fi
    exit 0
    ;;
esac
name="$1"
shift
load="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
echo
echo "================ stage: $name (load average $load) ================"
start="$(date +%s)"
# The output goes on to the terminal and, through tee, to a file read for ctest's list of tests
# that did not run: "The following tests did not run:" then one "<n> - <name> (<reason>)" a line.
out="$(mktemp)"
"$@" | tee "$out"
status=${PIPESTATUS[0]}
secs=$(($(date +%s) - start))
skips="$(awk '/^The following tests did not run:/ { on = 1; next }
              on && /^[ \t]+[0-9]+ - .* \([A-Za-z ]+\)$/ { sub(/^[ \t]+[0-9]+ - /, ""); print; next }
              { on = 0 }' "$out")"
rm -f "$out"
nskipped=0
if [ -n "$skips" ]; then
  nskipped=$(printf '%s\n' "$skips" | wc -l)
  printf '%s\n' "$skips" | while IFS= read -r test; do
    printf '%s\t%s\n' "$name" "$test" >>"$skipped_log"
  done
fi
if [ "$status" -eq 0 ]; then result="ok"; else result="FAILED (exit $status)"; fi
if [ "$nskipped" -gt 0 ]; then result="$result, $nskipped tests SKIPPED"; fi
echo "================ stage: $name: $result in $secs s ================"
printf '%s\t%s\t%s\n' "$name" "$secs" "$result" >>"$log"
exit "$status"

#!/usr/bin/env bash
# One stage of `make test`: prints a banner with the machine's load, runs the command, prints its
# wall time and result, and appends "name<TAB>seconds<TAB>result" to $NORMD_STAGE_LOG.
#   tests/sanitizers/stage.sh <name> <command> [args...]
#   tests/sanitizers/stage.sh --reset          (empties the log)
#   tests/sanitizers/stage.sh --summary        (prints the table of stages run so far)
set -uo pipefail
log="${NORMD_STAGE_LOG:-build/stage-times.txt}"
mkdir -p "$(dirname "$log")"
case "${1:-}" in
  --reset)
    : >"$log"
    exit 0
    ;;
  --summary)
    echo "================ make test: stages ================"
    awk -F'\t' '{ printf "  %-36s %6d s  %s\n", $1, $2, $3; total += $2 }
                END { printf "  %-36s %6d s\n", "total", total }' "$log"
    exit 0
    ;;
esac
name="$1"
shift
load="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
echo
echo "================ stage: $name (load average $load) ================"
start="$(date +%s)"
"$@"
status=$?
secs=$(($(date +%s) - start))
if [ "$status" -eq 0 ]; then result="ok"; else result="FAILED (exit $status)"; fi
echo "================ stage: $name: $result in $secs s ================"
printf '%s\t%s\t%s\n' "$name" "$secs" "$result" >>"$log"
exit "$status"

#!/usr/bin/env bash
# `make demo`: starts normd on free loopback ports with a data directory under the build tree,
# runs `normctl demo` against it, and stops the server whatever happens.
# Usage: client/demo.sh [BUILD_DIR]   (default: build)
set -euo pipefail

build=${1:-build}
normd=$build/server/normd
normctl=$build/client/normctl/normctl
for bin in "$normd" "$normctl"; do
  if [ ! -x "$bin" ]; then
    echo "demo: $bin is missing; run 'make build' first" >&2
    exit 1
  fi
done

work=$build/demo
rm -rf "$work/data"
mkdir -p "$work/data"

# Port 0: normd binds free loopback ports itself and writes them to the port file.
ports=$work/ports
rm -f "$ports"
"$normd" --listen 127.0.0.1:0 --metrics 127.0.0.1:0 --port-file "$ports" --data-dir "$work/data" \
  >"$work/normd.log" 2>&1 &
pid=$!
stop() {
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
  fi
}
trap stop EXIT
trap 'exit 130' INT TERM

fail() {
  echo "demo: $1; normd's log ($work/normd.log):" >&2
  cat "$work/normd.log" >&2
  exit 1
}
for _ in $(seq 1 300); do
  if grep -q '^metrics=' "$ports" 2>/dev/null && grep -q '^grpc=' "$ports"; then break; fi
  kill -0 "$pid" 2>/dev/null || fail "normd exited during start-up"
  sleep 0.1
done
grep -q '^grpc=' "$ports" 2>/dev/null || fail "normd reported no ports within 30 s"
server=127.0.0.1:$(sed -n 's/^grpc=//p' "$ports")
metrics_url=http://127.0.0.1:$(sed -n 's/^metrics=//p' "$ports")/metrics

for _ in $(seq 1 100); do
  if "$normctl" --server "$server" --timeout 1 health >/dev/null 2>&1; then break; fi
  kill -0 "$pid" 2>/dev/null || fail "normd exited during start-up"
  sleep 0.1
done

"$normctl" --server "$server" demo --metrics-url "$metrics_url" --out-dir "$work"

cat <<MSG

The demo's server stops now (its log: $work/normd.log). To keep exploring, start one yourself:
  $normd --data-dir $work/data &
  $normctl demo --metrics-url http://127.0.0.1:9464/metrics --out-dir $work
  $normctl --help
MSG

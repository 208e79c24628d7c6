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

# Two free loopback ports (the kernel picks them; a small race with other programs remains).
read -r port metrics_port < <(/usr/bin/python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
server=127.0.0.1:$port
metrics_url=http://127.0.0.1:$metrics_port/metrics

"$normd" --listen "$server" --metrics "127.0.0.1:$metrics_port" --data-dir "$work/data" \
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

for _ in $(seq 1 100); do
  if "$normctl" --server "$server" --timeout 1 health >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "demo: normd exited during start-up; its log ($work/normd.log):" >&2
    cat "$work/normd.log" >&2
    exit 1
  fi
  sleep 0.1
done

"$normctl" --server "$server" demo --metrics-url "$metrics_url" --out-dir "$work"

cat <<MSG

The demo's server stops now (its log: $work/normd.log). To keep exploring, start one yourself:
  $normd --data-dir $work/data &
  $normctl demo --metrics-url http://127.0.0.1:9464/metrics --out-dir $work
  $normctl --help
MSG

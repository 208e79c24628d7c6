"""Starting a normd for the Python benchmarks: a server on loopback ports that it picks itself,
found through its --port-file.

start_normd(build_dir, tmp, args) runs build_dir/server/normd with --listen 127.0.0.1:0,
--port-file tmp/ports and `args`, waits up to 30 s for the port file and returns
(process, "127.0.0.1:PORT"). speed_env() is the environment the speed benchmarks give normd:
without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (see BENCHMARKS.md) or NORMD_* settings.
"""

import os
import subprocess
import time


def speed_env():
    return {k: v for k, v in os.environ.items()
            if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") and not k.startswith("NORMD_")}


def start_normd(build_dir, tmp, args, env=None):
    port_file = os.path.join(tmp, "ports")
    proc = subprocess.Popen(
        [os.path.join(build_dir, "server", "normd"), "--listen", "127.0.0.1:0",
         "--port-file", port_file] + list(args),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"normd exited with {proc.returncode}")
        try:
            with open(port_file) as f:
                ports = dict(l.strip().split("=", 1) for l in f if "=" in l)
            if "grpc" in ports:
                return proc, f"127.0.0.1:{ports['grpc']}"
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("normd wrote no port file within 30 s")

"""A real normd for client tests: started on free loopback ports, stopped afterwards.

Environment (set by tests/client/CMakeLists.txt): NORMD_BIN, NORMCTL_BIN, NORMD_SOURCE_DIR and
PYTHONPATH with client/python and <build>/client/python.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import normd


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_path(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set; run the test through ctest")
    return value


class NormdServer:
    """Context manager: `with NormdServer() as server:` gives server.address, server.metrics_url,
    server.client (a normd.Client) and server.data_dir."""

    def __init__(self, extra_args=()):
        self.binary = env_path("NORMD_BIN")
        self.extra_args = list(extra_args)
        self.proc = None
        self.tmp = None

    def __enter__(self):
        self.tmp = tempfile.mkdtemp(prefix="normd-client-test-")
        self.data_dir = os.path.join(self.tmp, "data")
        os.makedirs(self.data_dir)
        self.log_path = os.path.join(self.tmp, "normd.log")
        last_error = None
        for _ in range(3):  # a port picked as free can be taken before normd binds it
            try:
                self._start()
                return self
            except RuntimeError as e:
                last_error = e
                self._stop()
        self._cleanup()
        raise last_error

    def _start(self):
        port, metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--listen", self.address, "--metrics", f"127.0.0.1:{metrics_port}",
             "--data-dir", self.data_dir] + self.extra_args,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.client = normd.Client(self.address, timeout=5.0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"normd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client.health() == "SERVING":
                    self.client.timeout = 60.0
                    return
            except normd.NormdError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"normd did not become SERVING within 30 s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-5000:]
        except OSError:
            return ""

    def _stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _cleanup(self):
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            sys.stderr.write(f"--- normd log ---\n{self.log()}\n")
        self.client.close()
        self._stop()
        self._cleanup()
        return False

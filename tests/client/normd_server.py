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
        self.client = None
        try:
            self._start()
        except BaseException:
            sys.stderr.write(f"--- normd log ---\n{self.log()}\n")
            self._stop()
            self._cleanup()
            raise
        return self

    def _start(self):
        # Port 0: normd binds free ports itself and reports them in the port file.
        port_file = os.path.join(self.tmp, "ports")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                 "--data-dir", self.data_dir, "--port-file", port_file] + self.extra_args,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        ports = {}
        while time.monotonic() < deadline and not {"grpc", "metrics"} <= ports.keys():
            if self.proc.poll() is not None:
                raise RuntimeError(f"normd exited with {self.proc.returncode}")
            try:
                with open(port_file) as f:
                    ports = dict(line.strip().split("=", 1) for line in f if "=" in line)
            except OSError:
                pass
            time.sleep(0.05)
        if not {"grpc", "metrics"} <= ports.keys():
            raise RuntimeError("normd wrote no port file within 30 s")
        self.address = f"127.0.0.1:{ports['grpc']}"
        self.metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
        self.client = normd.Client(self.address, timeout=5.0)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"normd exited with {self.proc.returncode}")
            try:
                if self.client.health() == "SERVING":
                    self.client.timeout = 60.0
                    return
            except normd.NormdError:
                pass
            time.sleep(0.05)
        raise RuntimeError("normd did not become SERVING within 30 s")

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
        if self.client is not None:
            self.client.close()
        self._stop()
        self._cleanup()
        return False

"""Shared pieces of the security tests: a throw-away PKI made with openssl, a real normd started
on a free loopback port with any flags, and small gRPC helpers.

Environment (set by tests/security/CMakeLists.txt): NORMD_BIN, NORMCTL_BIN and PYTHONPATH with
client/python and <build>/client/python.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

import grpc

from normd.health.v1 import health_pb2
from normd.v1 import normd_pb2 as pb

TRAINER = "/normd.v1.Trainer/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
HEALTH = "/grpc.health.v1.Health/Check"


def env_path(name):
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set; run the test through ctest")
    return value


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=30)


class Pki:
    """Two unrelated CAs in a temporary directory: `ca` signed a server certificate for
    127.0.0.1 and localhost (subjectAltName) and the client certificates `client` (CN=client),
    `team_a_client` (CN=team_a_client), `team_b_client` (CN=team_b_client, subjectAltName
    DNS:team-b.example) and `stranger` (CN=stranger); `other_ca` signed `other_client`. EC P-256
    keys, valid for one day. Attributes are file paths (`name` and `name_key`)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="normd-pki-")
        d = self.dir
        for ca in ("ca", "other_ca"):
            _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                     "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1",
                     "-subj", f"/CN=normd test {ca}", cwd=d)
        with open(os.path.join(d, "server.ext"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                    "extendedKeyUsage=serverAuth\n")
        with open(os.path.join(d, "client.ext"), "w") as f:
            f.write("extendedKeyUsage=clientAuth\n")
        with open(os.path.join(d, "client_san.ext"), "w") as f:
            f.write("extendedKeyUsage=clientAuth\nsubjectAltName=DNS:team-b.example\n")
        names = []
        for name, ca, ext in (("server", "ca", "server.ext"), ("client", "ca", "client.ext"),
                              ("other_client", "other_ca", "client.ext"),
                              ("team_a_client", "ca", "client.ext"),
                              ("team_b_client", "ca", "client_san.ext"),
                              ("stranger", "ca", "client.ext")):
            names.append(name)
            _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
                     cwd=d)
            _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
                     f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                     "-extfile", ext, cwd=d)
        for name in ["ca", "other_ca"] + names:
            setattr(self, name, os.path.join(d, f"{name}.pem"))
            setattr(self, name + "_key", os.path.join(d, f"{name}.key"))

    def read(self, path):
        with open(path, "rb") as f:
            return f.read()

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class Normd:
    """A real normd on a free loopback port (--listen 127.0.0.1:0, --port-file), in memory, no
    metrics endpoint unless asked. Context manager; `address` is "127.0.0.1:PORT"."""

    def __init__(self, *args, metrics=False, wrapper=(), data_dir=None):
        self.args = list(args)
        self.data_dir = data_dir  # None: --in-memory
        self.metrics = metrics
        self.wrapper = list(wrapper)  # a command that execs normd, e.g. prlimit

    def __enter__(self):
        self.tmp = tempfile.mkdtemp(prefix="normd-security-")
        port_file = os.path.join(self.tmp, "ports")
        self.log_path = os.path.join(self.tmp, "normd.log")
        storage = ["--in-memory"] if self.data_dir is None else ["--data-dir", self.data_dir]
        cmd = self.wrapper + [env_path("NORMD_BIN"), "--listen", "127.0.0.1:0", *storage,
               "--metrics", "127.0.0.1:0" if self.metrics else "", "--port-file", port_file,
               "--compute-threads", "1"] + self.args
        # The test's own NORMD_* variables (NORMD_BIN, ...) are not normd settings.
        env = {k: v for k, v in os.environ.items() if not k.startswith("NORMD_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 20
        ports = {}
        while "grpc" not in ports:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._stop()
                raise RuntimeError(f"normd did not start: {self.log()}")
            try:
                with open(port_file) as f:
                    ports = dict(line.strip().split("=", 1) for line in f if "=" in line)
            except OSError:
                time.sleep(0.02)
        self.port = int(ports["grpc"])
        self.metrics_port = int(ports.get("metrics", 0))
        self.address = f"127.0.0.1:{self.port}"
        return self

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def _stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc):
        self._stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def raw_unary(channel, method, payload, metadata=None, timeout=5.0):
    """Calls a method with bytes in and bytes out; `method` is a full path or a Trainer name."""
    path = method if method.startswith("/") else TRAINER + method
    return channel.unary_unary(path)(payload, timeout=timeout, metadata=metadata)


def code_of(fn):
    """(status code, details) of calling fn(); OK and "" when it returns."""
    try:
        fn()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def health(channel, timeout=5.0):
    raw = raw_unary(channel, HEALTH, health_pb2.HealthCheckRequest().SerializeToString(),
                    timeout=timeout)
    return health_pb2.HealthCheckResponse.FromString(raw).status


def list_services(channel, metadata=None, timeout=5.0):
    """Asks server reflection for its services (ServerReflectionRequest.list_services, field 7);
    returns the raw response bytes."""
    call = channel.stream_stream(REFLECTION)
    return list(call(iter([b"\x3a\x00"]), timeout=timeout, metadata=metadata))


MLP = pb.ModelSpec(
    input_shape=[4],
    layers=[pb.LayerSpec(linear=pb.LinearSpec(in_features=4, out_features=3))],
    optimizer=pb.OptimizerSpec(sgd=pb.SGDSpec(lr=0.1)),
    loss=pb.LOSS_CROSS_ENTROPY)


def train_step_request(model, batch=2):
    return pb.TrainStepRequest(
        model=model, input=pb.Tensor(shape=[batch, 4], values=[0.5] * (batch * 4)),
        labels=[i % 3 for i in range(batch)])

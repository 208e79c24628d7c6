"""Shared pieces of the reliability tests: a real normd (reusing tests/client/normd_server.py),
raw gRPC calls with identity serializers, RSS readings and model state snapshots.

Environment (set by tests/reliability/CMakeLists.txt): NORMD_BIN, NORMD_SOURCE_DIR and
PYTHONPATH with client/python and <build>/client/python.
"""

import os
import sys

import grpc

sys.path.insert(0, os.path.join(os.environ.get("NORMD_SOURCE_DIR", ""), "tests", "client"))

from normd_server import NormdServer  # noqa: E402,F401  (re-exported)
from normd.health.v1 import health_pb2  # noqa: E402
from normd.v1 import normd_pb2 as pb  # noqa: E402

SERVICE = "/normd.v1.Trainer/"


def check(condition, message="check failed"):
    """Raises AssertionError(message) unless `condition`: a test's verdict that, unlike a bare
    `assert`, `python -O` and PYTHONOPTIMIZE cannot remove."""
    if not condition:
        raise AssertionError(message)


def rss_kib(pid: int) -> int:
    """The process's resident set size in KiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RawTrainer:
    """Calls Trainer methods with bytes in and bytes out, so malformed payloads can be sent."""

    def __init__(self, address: str, timeout: float = 30.0):
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 256 << 20),
                              ("grpc.max_send_message_length", 256 << 20)])
        self.timeout = timeout

    def close(self):
        self.channel.close()

    def unary(self, method: str, payload: bytes) -> bytes:
        call = self.channel.unary_unary(SERVICE + method)  # no serializers: bytes as they are
        return call(payload, timeout=self.timeout)

    def stream(self, method: str, payloads):
        call = self.channel.stream_stream(SERVICE + method)
        return list(call(iter(payloads), timeout=self.timeout))

    def call(self, method: str, request, response_cls):
        """A well-formed request; returns the parsed response."""
        return response_cls.FromString(self.unary(method, request.SerializeToString()))

    def health(self, service: str = "") -> int:
        call = self.channel.unary_unary("/grpc.health.v1.Health/Check")
        raw = call(health_pb2.HealthCheckRequest(service=service).SerializeToString(),
                   timeout=self.timeout)
        return health_pb2.HealthCheckResponse.FromString(raw).status


def snapshot(raw: RawTrainer, model: str):
    """(serialized full state with optimizer, step, mode) of a model: compared byte for byte."""
    state = raw.call("GetState", pb.GetStateRequest(model=model, include_optimizer=True),
                     pb.ModelState)
    info = raw.call("GetModel", pb.GetModelRequest(model=model), pb.Model)
    tensors = sorted((t.name, t.tensor.SerializeToString(deterministic=True))
                     for t in state.tensors)
    return tensors, info.step, info.mode

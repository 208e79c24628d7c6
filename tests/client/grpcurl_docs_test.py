"""client/README.md's grpcurl section, checked without grpcurl (not packaged in Debian 12).

Every `grpcurl ... -d '<json>' ADDRESS service/Method` in the README is read from the file, its body
parsed with protobuf's JSON mapping (the one grpcurl uses; unknown fields refused) into the
method's request type, found from the service descriptor, and sent in that order to a real normd
over a plain channel: CreateModel creates the model, Forward answers in the `values` encoding with
the shape the model gives, the health check answers SERVING. (That reflection lists the services
and serves the contract is ReflectionTest in tests/server/ops_test.cc.)
"""

import os
import re
import sys
import unittest

import grpc
from google.protobuf import json_format

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from normd_server import NormdServer, env_path  # noqa: E402
from normd.health.v1 import health_pb2  # noqa: E402
from normd.v1 import normd_pb2  # noqa: E402

CALL = re.compile(r"grpcurl -plaintext -d '(?P<body>[^']*)' \\?\s*127\.0\.0\.1:50051 "
                  r"(?P<service>[\w.]+)/(?P<method>\w+)")
DESCRIBED = re.compile(r"grpcurl -plaintext 127\.0\.0\.1:50051 describe (?P<symbol>[\w.]+)")
MODULES = {"normd.v1": normd_pb2, "grpc.health.v1": health_pb2}


def request_response(service: str, method: str):
    """The generated request and response classes of service/method."""
    package, name = service.rsplit(".", 1)
    module = MODULES[package]
    m = module.DESCRIPTOR.services_by_name[name].methods_by_name[method]
    return getattr(module, m.input_type.name), getattr(module, m.output_type.name)


class GrpcurlDocsTest(unittest.TestCase):
    def setUp(self):
        with open(os.path.join(env_path("NORMD_SOURCE_DIR"), "client", "README.md")) as f:
            readme = f.read()
        self.section = readme[readme.index("## grpcurl"):readme.index("## Other languages")]
        self.calls = list(CALL.finditer(self.section))

    def test_described_symbols_exist(self):
        symbols = [m["symbol"] for m in DESCRIBED.finditer(self.section)]
        self.assertEqual(symbols, ["normd.v1.Trainer", "normd.v1.ForwardRequest"])
        self.assertIn("Trainer", normd_pb2.DESCRIPTOR.services_by_name)
        self.assertIn("ForwardRequest", normd_pb2.DESCRIPTOR.message_types_by_name)

    def test_bodies_run_against_normd(self):
        methods = [f"{m['service']}/{m['method']}" for m in self.calls]
        self.assertEqual(methods, ["normd.v1.Trainer/CreateModel", "normd.v1.Trainer/Forward",
                                   "grpc.health.v1.Health/Check"])
        with NormdServer() as server, grpc.insecure_channel(server.address) as channel:
            answers = {}
            for m in self.calls:
                request_cls, response_cls = request_response(m["service"], m["method"])
                request = json_format.Parse(m["body"], request_cls())  # unknown fields raise
                rpc = channel.unary_unary(f"/{m['service']}/{m['method']}",
                                          request_serializer=request_cls.SerializeToString,
                                          response_deserializer=response_cls.FromString)
                answers[m["method"]] = (request, rpc(request, timeout=30))

            request, model = answers["CreateModel"]
            self.assertEqual(model.id, "tiny")
            self.assertEqual(len(request.spec.layers), 2)
            self.assertEqual(request.spec.layers[1].WhichOneof("kind"), "batch_norm1d")
            self.assertEqual(model.parameter_count, 3 * 2 + 2 + 2 + 2)
            self.assertEqual(list(model.output_shape), [2])
            self.assertEqual(server.client.get_model("tiny").step, 0)

            request, forward = answers["Forward"]
            self.assertEqual(list(request.input.shape), [2, 3])
            self.assertEqual(len(request.input.values), 6)
            self.assertEqual(list(forward.output.shape), [2, 2])
            self.assertEqual(len(forward.output.values), 4)  # the request's encoding
            self.assertEqual(forward.output.raw, b"")

            self.assertEqual(answers["Check"][1].status, health_pb2.HealthCheckResponse.SERVING)


if __name__ == "__main__":
    unittest.main(verbosity=2)

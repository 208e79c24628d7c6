"""The clients' transport options — TLS, mutual TLS, bearer token — against a stand-in server.

A small gRPC Python server with the health service, a certificate from a CA generated here with
openssl, client-certificate checking and a bearer-token check, so normctl's and normd.Client's
options are proven on the wire whatever the real server supports at the moment.
"""

import os
import subprocess
import sys
import tempfile
import unittest
from concurrent import futures

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import normd  # noqa: E402
from normd.health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from normd_server import env_path  # noqa: E402

TOKEN = "s3cret-token"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    """ca.pem; server.{pem,key} for 127.0.0.1/localhost; client.{pem,key}; other-ca.pem."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1",
                "-subj", f"/CN={ca}", cwd=d)
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                 "extendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile",
                f"{name}.ext", cwd=d)


class Health(health_pb2_grpc.HealthServicer):
    def Check(self, request, context):
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class TlsOptionsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="normd-tls-test-")
        cls.d = cls.tmp.name
        make_pki(cls.d)
        read = lambda name: open(os.path.join(cls.d, name), "rb").read()  # noqa: E731
        cls.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        health_pb2_grpc.add_HealthServicer_to_server(Health(), cls.server)
        credentials = grpc.ssl_server_credentials(
            [(read("server.key"), read("server.pem"))], root_certificates=read("ca.pem"),
            require_client_auth=True)
        port = cls.server.add_secure_port("127.0.0.1:0", credentials)
        cls.server.start()
        cls.address = f"127.0.0.1:{port}"
        cls.token_file = cls.file("token")
        with open(cls.token_file, "w") as f:
            f.write(TOKEN + "\n")

    @classmethod
    def tearDownClass(cls):
        cls.server.stop(None)
        cls.tmp.cleanup()

    @classmethod
    def file(cls, name):
        return os.path.join(cls.d, name)

    def normctl(self, *args, env=None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("NORMCTL_TLS")}
        full_env.pop("NORMCTL_TOKEN_FILE", None)
        full_env.update(env or {})
        return subprocess.run([env_path("NORMCTL_BIN"), "--server", self.address, "--timeout",
                               "5", *args, "health"], capture_output=True, text=True,
                              env=full_env, timeout=60)

    def mtls_flags(self):
        return ["--tls-ca", self.file("ca.pem"), "--tls-cert", self.file("client.pem"),
                "--tls-key", self.file("client.key")]

    def test_normctl(self):
        p = self.normctl(*self.mtls_flags(), "--token-file", self.token_file)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("SERVING", p.stdout)

        p = self.normctl(env={"NORMCTL_TLS_CA": self.file("ca.pem"),
                              "NORMCTL_TLS_CERT": self.file("client.pem"),
                              "NORMCTL_TLS_KEY": self.file("client.key"),
                              "NORMCTL_TOKEN_FILE": self.token_file})
        self.assertEqual(p.returncode, 0, p.stderr)

        # The server's rotation file format: the first non-blank line is the token sent.
        rotation = self.file("token-rotation")
        with open(rotation, "w") as f:
            f.write(f"\n  {TOKEN}  \r\nold-token\n")
        p = self.normctl(*self.mtls_flags(), "--token-file", rotation)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("SERVING", p.stdout)
        # A token gRPC could not send as a header value is refused before any call.
        spaced = self.file("token-spaced")
        with open(spaced, "w") as f:
            f.write("two words\n")
        p = self.normctl(*self.mtls_flags(), "--token-file", spaced)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("printable ASCII", p.stderr)

        p = self.normctl(*self.mtls_flags())  # no token
        self.assertEqual(p.returncode, 1)
        self.assertIn("UNAUTHENTICATED", p.stderr)
        self.assertIn("bearer token", p.stderr)

        for flags in (["--tls-ca", self.file("ca.pem"), "--token-file", self.token_file],  # no cert
                      ["--tls-ca", self.file("other-ca.pem"), "--tls-cert",
                       self.file("client.pem"), "--tls-key", self.file("client.key")],
                      ["--token-file", self.token_file]):  # plaintext to a TLS port
            p = self.normctl(*flags)
            self.assertEqual(p.returncode, 1, flags)
            self.assertIn("UNAVAILABLE", p.stderr, flags)

        p = self.normctl("--tls-ca", self.file("missing.pem"))
        self.assertEqual(p.returncode, 1)
        self.assertIn("missing.pem", p.stderr)

    def test_python_client(self):
        c = normd.Client(self.address, timeout=5, root_certificates=self.file("ca.pem"),
                         certificate_chain=self.file("client.pem"),
                         private_key=self.file("client.key"), token=TOKEN)
        self.assertEqual(c.health(), "SERVING")
        c.close()
        c = normd.Client(self.address, timeout=5, root_certificates=self.file("ca.pem"),
                         certificate_chain=self.file("client.pem"),
                         private_key=self.file("client.key"), token="wrong")
        with self.assertRaises(normd.NormdError) as ctx:
            c.health()
        self.assertEqual(ctx.exception.code, grpc.StatusCode.UNAUTHENTICATED)
        c.close()
        c = normd.Client(self.address, timeout=5, root_certificates=self.file("other-ca.pem"),
                         certificate_chain=self.file("client.pem"),
                         private_key=self.file("client.key"), token=TOKEN)
        with self.assertRaises(normd.NormdError) as ctx:
            c.health()
        self.assertEqual(ctx.exception.code, grpc.StatusCode.UNAVAILABLE)
        c.close()
        with self.assertRaises(ValueError):
            normd.Client(self.address, certificate_chain=self.file("client.pem"))


if __name__ == "__main__":
    unittest.main(verbosity=2)

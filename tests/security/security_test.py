#!/usr/bin/python3
"""TLS, mutual TLS and bearer tokens against the real normd, with normctl and the Python client.

A throw-away PKI is made with openssl at start (security_common.Pki). Every server listens on a
free loopback port and keeps models in memory.
"""

import os
import subprocess
import sys
import unittest

import grpc

import normd
from normd.v1 import normd_pb2 as pb
from security_common import (MLP, Normd, Pki, code_of, env_path, health, list_services,
                             raw_unary, train_step_request)

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
OK = grpc.StatusCode.OK
PKI = None
TOKEN = "s3cret-Token_0123456789abcdef"
ROTATED = "next-token-after-rotation"


def setUpModule():
    global PKI
    PKI = Pki()


def tearDownModule():
    PKI.cleanup()


def normctl(server, *args, timeout=20):
    """Runs normctl with global flags `args` (before the subcommand); returns (rc, output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMD_")}
    p = subprocess.run([env_path("NORMCTL_BIN"), "--server", server, "--timeout", "5", *args],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout, env=env)
    return p.returncode, p.stdout


def client_error(fn):
    """The grpc.StatusCode of a normd.NormdError raised by fn(), OK when it returns."""
    try:
        fn()
        return OK, ""
    except normd.NormdError as e:
        return e.code, str(e)


def tls_channel(address, root=None, cert=None, key=None):
    creds = grpc.ssl_channel_credentials(PKI.read(root) if root else None,
                                         PKI.read(key) if key else None,
                                         PKI.read(cert) if cert else None)
    return grpc.secure_channel(address, creds)


class TlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Normd("--tls-cert", PKI.server, "--tls-key", PKI.server_key).__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)

    def test_python_client_with_the_ca_trains(self):
        with normd.Client(self.server.address, timeout=10, root_certificates=PKI.ca) as c:
            c.create_model(MLP, id="tls-model")
            r = c._call("TrainStep", train_step_request("tls-model"))
            self.assertEqual(r.step, 1)
            self.assertEqual(c.health(), "SERVING")

    def test_normctl_with_tls_ca_works_by_ip_and_by_name(self):
        rc, out = normctl(self.server.address, "--tls-ca", PKI.ca, "list")
        self.assertEqual(rc, 0, out)
        rc, out = normctl(f"localhost:{self.server.port}", "--tls-ca", PKI.ca, "health")
        self.assertEqual(rc, 0, out)

    def test_plaintext_clients_fail(self):
        code, msg = client_error(lambda: normd.Client(self.server.address, timeout=3).list_models())
        self.assertEqual(code, UNAVAILABLE, msg)
        rc, out = normctl(self.server.address, "list")
        self.assertNotEqual(rc, 0, out)
        self.assertIn("UNAVAILABLE", out)

    def test_client_trusting_another_ca_fails(self):
        code, msg = client_error(lambda: normd.Client(
            self.server.address, timeout=3, root_certificates=PKI.other_ca).list_models())
        self.assertEqual(code, UNAVAILABLE, msg)
        rc, out = normctl(self.server.address, "--tls-ca", PKI.other_ca, "list")
        self.assertNotEqual(rc, 0, out)

    def test_client_checking_another_name_fails(self):
        code, msg = client_error(lambda: normd.Client(
            self.server.address, timeout=3, root_certificates=PKI.ca,
            server_name="not-this-server.example").list_models())
        self.assertEqual(code, UNAVAILABLE, msg)


class MutualTlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Normd("--tls-cert", PKI.server, "--tls-key", PKI.server_key,
                           "--tls-client-ca", PKI.ca).__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)

    def test_right_client_certificate_works(self):
        with normd.Client(self.server.address, timeout=10, root_certificates=PKI.ca,
                          certificate_chain=PKI.client, private_key=PKI.client_key) as c:
            c.create_model(MLP, id="mtls-model")
            self.assertEqual([m.id for m in c.list_models()], ["mtls-model"])
        rc, out = normctl(self.server.address, "--tls-ca", PKI.ca, "--tls-cert", PKI.client,
                          "--tls-key", PKI.client_key, "list")
        self.assertEqual(rc, 0, out)
        self.assertIn("mtls-model", out)

    def test_no_client_certificate_is_refused(self):
        code, msg = client_error(lambda: normd.Client(
            self.server.address, timeout=3, root_certificates=PKI.ca).list_models())
        self.assertEqual(code, UNAVAILABLE, msg)
        rc, out = normctl(self.server.address, "--tls-ca", PKI.ca, "list")
        self.assertNotEqual(rc, 0, out)

    def test_certificate_from_another_ca_is_refused(self):
        code, msg = client_error(lambda: normd.Client(
            self.server.address, timeout=3, root_certificates=PKI.ca,
            certificate_chain=PKI.other_client, private_key=PKI.other_client_key).list_models())
        self.assertEqual(code, UNAVAILABLE, msg)
        rc, out = normctl(self.server.address, "--tls-ca", PKI.ca, "--tls-cert",
                          PKI.other_client, "--tls-key", PKI.other_client_key, "list")
        self.assertNotEqual(rc, 0, out)

    def test_health_needs_the_certificate_too(self):
        # mTLS guards the whole port: a probe needs a client certificate as well.
        ch = tls_channel(self.server.address, root=PKI.ca)
        self.assertEqual(code_of(lambda: health(ch, timeout=3))[0], UNAVAILABLE)
        ch = tls_channel(self.server.address, root=PKI.ca, cert=PKI.client, key=PKI.client_key)
        self.assertEqual(health(ch), 1)  # SERVING


class TokenTest(unittest.TestCase):
    """Plaintext with --auth-token-file holding two tokens (a rotation in progress)."""

    @classmethod
    def setUpClass(cls):
        cls.token_file = PKI.write("tokens", f"\n  {TOKEN}  \r\n\n{ROTATED}\n")
        cls.server = Normd("--auth-token-file", cls.token_file).__enter__()
        cls.channel = grpc.insecure_channel(cls.server.address)
        with cls.authorized() as c:
            c.create_model(MLP, id="kept")

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.server.__exit__(None, None, None)

    @classmethod
    def authorized(cls, token=TOKEN):
        return normd.Client(cls.server.address, timeout=10, token=token)

    def step_of(self, model="kept"):
        with self.authorized() as c:
            return c.get_model(model).step

    def test_missing_token(self):
        code, msg = client_error(lambda: normd.Client(self.server.address).list_models())
        self.assertEqual(code, UNAUTH)
        self.assertIn("missing bearer token", msg)

    def test_wrong_tokens(self):
        wrong = [TOKEN[:-1] + "X",              # same length, last byte differs
                 "X" + TOKEN[1:],               # same length, first byte differs
                 TOKEN[:-1], TOKEN + "0",       # one byte shorter / longer
                 "t", "x" * 600,                # short, and longer than any token may be
                 f"{TOKEN} {ROTATED}"]
        for token in wrong:
            code, msg = client_error(lambda: self.authorized(token).list_models())
            self.assertEqual(code, UNAUTH, token)
            self.assertIn("invalid bearer token", msg)
        for value in (TOKEN, f"Basic {TOKEN}", "Bearer", f"Bearer{TOKEN}"):
            code, msg = code_of(lambda: raw_unary(
                self.channel, "ListModels", b"", metadata=(("authorization", value),)))
            self.assertEqual(code, UNAUTH, value)
            self.assertEqual(msg, "invalid bearer token")

    def test_right_tokens_both_lines_of_the_file(self):
        for token in (TOKEN, ROTATED):
            with self.authorized(token) as c:
                self.assertIn("kept", [m.id for m in c.list_models()])
        # The scheme is case-insensitive, as HTTP auth schemes are.
        raw_unary(self.channel, "ListModels", b"",
                  metadata=(("authorization", f"bearer {ROTATED}"),))

    def test_refused_calls_run_nothing(self):
        before = self.step_of()
        bad = normd.Client(self.server.address, timeout=5, token="wrong")
        x, labels = [[0.5] * 4, [0.25] * 4], [0, 1]
        for fn in (lambda: bad.create_model(MLP, id="intruder"),
                   lambda: bad.train_step("kept", x, labels=labels),
                   lambda: list(bad.train_stream("kept", iter([(x, labels)] * 2))),
                   lambda: bad.set_mode("kept", "eval"),
                   lambda: bad.set_lr("kept", 5.0),
                   lambda: bad.delete_model("kept")):
            self.assertEqual(client_error(fn)[0], UNAUTH)
        # TrainStream without a token: refused before the first message is read.
        stream = self.channel.stream_stream(
            "/normd.v1.Trainer/TrainStream",
            request_serializer=pb.TrainStepRequest.SerializeToString,
            response_deserializer=pb.TrainStepResponse.FromString)
        code, msg = code_of(lambda: list(stream(iter([train_step_request("kept")] * 3),
                                                timeout=5)))
        self.assertEqual(code, UNAUTH, msg)
        with self.authorized() as c:
            self.assertEqual([m.id for m in c.list_models()], ["kept"])
        self.assertEqual(self.step_of(), before)
        # The same stream with the token trains.
        responses = list(stream(iter([train_step_request("kept")] * 3), timeout=10,
                                metadata=(("authorization", f"Bearer {TOKEN}"),)))
        self.assertEqual([r.step for r in responses], [before + 1, before + 2, before + 3])

    def test_health_needs_no_token(self):
        self.assertEqual(health(self.channel), 1)  # SERVING
        with normd.Client(self.server.address) as c:
            self.assertEqual(c.health(), "SERVING")
        rc, out = normctl(self.server.address, "health")
        self.assertEqual(rc, 0, out)

    def test_reflection_is_off_with_auth(self):
        for md in (None, (("authorization", f"Bearer {TOKEN}"),)):
            code, msg = code_of(lambda: list_services(self.channel, metadata=md))
            self.assertEqual(code, grpc.StatusCode.UNIMPLEMENTED, msg)

    def test_reflection_is_on_without_auth(self):
        # The other half of the test above: the same request against a server without tokens.
        with Normd() as plain:
            with grpc.insecure_channel(plain.address) as ch:
                replies = list_services(ch)
        self.assertEqual(len(replies), 1)
        self.assertIn(b"normd.v1.Trainer", replies[0])

    def test_normctl_token_file(self):
        # normctl's --token-file holds the one token it sends (the server's file may hold more).
        client_file = PKI.write("client-token", ROTATED + "\n")
        rc, out = normctl(self.server.address, "--token-file", client_file, "list")
        self.assertEqual(rc, 0, out)
        self.assertIn("kept", out)
        rc, out = normctl(self.server.address, "list")
        self.assertNotEqual(rc, 0, out)
        self.assertIn("UNAUTHENTICATED", out)
        self.assertIn("missing bearer token", out)

    def test_undecodable_request_still_needs_the_token(self):
        junk = b"\x12\x10\x0a\x02"
        code, msg = code_of(lambda: raw_unary(self.channel, "Forward", junk))
        self.assertEqual(code, UNAUTH, msg)
        code, msg = code_of(lambda: raw_unary(
            self.channel, "Forward", junk, metadata=(("authorization", f"Bearer {TOKEN}"),)))
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, msg)
        self.assertIn("normd.v1.ForwardRequest", msg)

    def test_the_log_never_holds_a_token(self):
        log = self.server.log()
        self.assertIn("event=security tls=off mtls=off auth=bearer tokens=2 reflection=off", log)
        self.assertNotIn(TOKEN, log)
        self.assertNotIn(ROTATED, log)


class TokenAndMutualTlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        token_file = PKI.write("one-token", TOKEN + "\n")
        cls.server = Normd("--tls-cert", PKI.server, "--tls-key", PKI.server_key,
                           "--tls-client-ca", PKI.ca, "--auth-token-file", token_file).__enter__()
        cls.token_file = token_file

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)

    def client(self, token=None, cert=True):
        kw = dict(certificate_chain=PKI.client, private_key=PKI.client_key) if cert else {}
        return normd.Client(self.server.address, timeout=5, root_certificates=PKI.ca,
                            token=token, **kw)

    def test_both_are_needed(self):
        self.assertEqual(client_error(lambda: self.client(TOKEN).list_models())[0], OK)
        self.assertEqual(client_error(lambda: self.client(None).list_models())[0], UNAUTH)
        self.assertEqual(client_error(lambda: self.client("nope").list_models())[0], UNAUTH)
        self.assertEqual(client_error(lambda: self.client(TOKEN, cert=False).list_models())[0],
                         UNAVAILABLE)
        rc, out = normctl(self.server.address, "--tls-ca", PKI.ca, "--tls-cert", PKI.client,
                          "--tls-key", PKI.client_key, "--token-file", self.token_file, "list")
        self.assertEqual(rc, 0, out)
        self.assertIn("event=security tls=on mtls=on auth=bearer tokens=1", self.server.log())


class FileLimitTest(unittest.TestCase):
    def test_normd_raises_its_open_file_limit_to_the_hard_limit(self):
        # gRPC 1.51 stops accepting for good once accept() runs out of descriptors
        # (CVE-2023-4785); normd takes all the descriptors it is allowed.
        with Normd(wrapper=["prlimit", "--nofile=256:4096", "--"]) as server:
            with open(f"/proc/{server.proc.pid}/limits") as f:
                line = next(l for l in f if l.startswith("Max open files"))
            self.assertEqual(line.split()[3:5], ["4096", "4096"], line)
            self.assertIn("open_files=4096", server.log())


class FlagsTest(unittest.TestCase):
    """Invalid security and limit flags stop normd with exit code 2 and a message naming the flag;
    --check-config shows every new setting."""

    def run_normd(self, *args, env=None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("NORMD_")}
        full_env.update(env or {})
        p = subprocess.run([env_path("NORMD_BIN"), "--in-memory", "--listen", "127.0.0.1:0",
                            "--metrics", "", *args], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=20, env=full_env)
        return p.returncode, p.stdout

    def test_invalid_combinations_exit_2(self):
        empty = PKI.write("empty-tokens", "")
        blank = PKI.write("blank-tokens", " \n\r\n\t\n")
        garbage = PKI.write("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n")
        cases = [
            (["--tls-cert", PKI.server], "--tls-cert needs --tls-key"),
            (["--tls-key", PKI.server_key], "--tls-key needs --tls-cert"),
            (["--tls-client-ca", PKI.ca], "--tls-client-ca (mutual TLS) needs --tls-cert"),
            (["--tls-cert", "/nonexistent.pem", "--tls-key", PKI.server_key],
             "--tls-cert '/nonexistent.pem' does not exist"),
            (["--tls-cert", PKI.server, "--tls-key", "/nonexistent.key"],
             "--tls-key '/nonexistent.key' does not exist"),
            (["--tls-cert", garbage, "--tls-key", PKI.server_key], "holds no PEM certificate"),
            (["--tls-cert", PKI.server, "--tls-key", PKI.client_key],
             "is not the private key of the first certificate"),
            (["--tls-cert", PKI.server, "--tls-key", PKI.server, ], "no unencrypted PEM private"),
            (["--tls-cert", PKI.server, "--tls-key", PKI.server_key, "--tls-client-ca", garbage],
             "--tls-client-ca"),
            (["--auth-token-file", empty], "--auth-token-file"),
            (["--auth-token-file", blank], "holds no token"),
            (["--auth-token-file", "/nonexistent/tokens"], "--auth-token-file"),
            (["--max-concurrent-streams", "0"], "--max-concurrent-streams"),
            (["--max-metadata-bytes", "100"], "--max-metadata-bytes"),
            (["--keepalive-min-time", "0"], "--keepalive-min-time"),
            (["--keepalive-timeout", "-1"], "--keepalive-timeout"),
            (["--keepalive-time", "nan"], "--keepalive-time"),
            (["--max-connection-idle", "-5"], "--max-connection-idle"),
            (["--max-connection-age", "1e12"], "--max-connection-age"),
            (["--max-connection-age-grace", "-1"], "--max-connection-age-grace"),
        ]
        for args, needle in cases:
            for check in ([], ["--check-config"]):
                rc, out = self.run_normd(*args, *check)
                self.assertEqual(rc, 2, f"{args} {check}: {out}")
                self.assertIn(needle, out, args)
                self.assertIn("invalid configuration", out, args)
        # The environment fallbacks are checked the same way.
        rc, out = self.run_normd(env={"NORMD_AUTH_TOKEN_FILE": empty})
        self.assertEqual(rc, 2, out)
        self.assertIn("--auth-token-file", out)

    def test_check_config_shows_every_new_setting(self):
        tokens = PKI.write("cfg-tokens", "alpha-token\nbeta-token\n")
        rc, out = self.run_normd(
            "--check-config", "--tls-cert", PKI.server, "--tls-key", PKI.server_key,
            "--tls-client-ca", PKI.ca, "--max-concurrent-streams", "7",
            "--max-metadata-bytes", "4096", "--keepalive-min-time", "2.5",
            "--keepalive-time", "0", "--keepalive-timeout", "3", "--max-connection-idle", "0",
            "--max-connection-age", "90", "--max-connection-age-grace", "4",
            env={"NORMD_AUTH_TOKEN_FILE": tokens})
        self.assertEqual(rc, 0, out)
        for line in [f"tls=on cert={PKI.server} key={PKI.server_key}",
                     f"mtls=on (client certificates required, CA {PKI.ca})",
                     f"auth=bearer token_file={tokens} tokens=2", "reflection=off (auth is on)",
                     "max_concurrent_streams=7", "max_metadata_bytes=4096",
                     "keepalive_min_time=2.5s", "keepalive_time=off", "keepalive_timeout=3s",
                     "max_connection_idle=unlimited", "max_connection_age=90s",
                     "max_connection_age_grace=4s"]:
            self.assertIn(line + "\n", out)
        self.assertNotIn("alpha-token", out)
        self.assertNotIn("beta-token", out)
        rc, out = self.run_normd("--check-config")
        self.assertEqual(rc, 0, out)
        for line in ["tls=off (plaintext)", "mtls=off", "auth=off", "reflection=on",
                     "max_concurrent_streams=100", "max_metadata_bytes=8192",
                     "keepalive_min_time=30s", "keepalive_time=120s", "keepalive_timeout=20s",
                     "max_connection_idle=600s", "max_connection_age=3600s",
                     "max_connection_age_grace=unlimited"]:
            self.assertIn(line + "\n", out)

    def test_help_documents_every_new_flag(self):
        rc, out = self.run_normd("--help")
        self.assertEqual(rc, 0)
        for flag in ["--tls-cert", "--tls-key", "--tls-client-ca", "--auth-token-file",
                     "--max-concurrent-streams", "--max-metadata-bytes", "--keepalive-min-time",
                     "--keepalive-time", "--keepalive-timeout", "--max-connection-idle",
                     "--max-connection-age", "--max-connection-age-grace"]:
            self.assertIn(flag + " ", out)
            env = "NORMD_" + flag[2:].upper().replace("-", "_")
            self.assertIn(f"Env:{env}", out)


if __name__ == "__main__":
    unittest.main(verbosity=2, argv=[sys.argv[0]])

"""Tenants against a real normd: namespaces from the token file, a tenant that tries every RPC
on another tenant's model and changes nothing, admins, quotas, per-tenant metrics, restart with
both tenants' models, the old token-file format, normctl's tenant column, and tenants named by
mutual-TLS client certificates (--tls-client-tenants, by CN and by SAN, alone and beside tokens).

Run through ctest (security.tenants); see security_common.py for the environment.
"""

import os
import shutil
import subprocess
import tempfile
import unittest
import urllib.request

import grpc

from normd.v1 import normd_pb2 as pb
from normd.v1 import normd_pb2_grpc as pb_grpc
from security_common import MLP, Normd, Pki, code_of, env_path, train_step_request

TOKENS = ("admin-tok\n"             # the old format: tenant default, admin
          "a-tok team-a\n"
          "b-tok team-b\n"
          "ops-tok team-ops admin\n")


def md(token):
    return [("authorization", f"Bearer {token}")]


def big_mlp(hidden):
    return pb.ModelSpec(
        input_shape=[4],
        layers=[pb.LayerSpec(linear=pb.LinearSpec(in_features=4, out_features=hidden)),
                pb.LayerSpec(batch_norm1d=pb.BatchNormSpec(num_features=hidden)),
                pb.LayerSpec(relu=pb.Empty()),
                pb.LayerSpec(linear=pb.LinearSpec(in_features=hidden, out_features=3))],
        optimizer=pb.OptimizerSpec(sgd=pb.SGDSpec(lr=0.1, momentum=0.9)),
        loss=pb.LOSS_CROSS_ENTROPY)


def tensor(rows, cols, value=0.5):
    return pb.Tensor(shape=[rows, cols], values=[value + 0.01 * i for i in range(rows * cols)])


def state_bytes(stub, token, model):
    r = stub.GetState(pb.GetStateRequest(model=model, include_optimizer=True), metadata=md(token),
                      timeout=10)
    return r.SerializeToString(deterministic=True)


class TenantServer:
    """A normd with the tenant token file, persistence in a temporary directory and small
    quotas; restartable on the same data directory."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="normd-tenants-")
        self.tokens = os.path.join(self.dir, "tokens")
        with open(self.tokens, "w") as f:
            f.write(TOKENS)
        self.data = os.path.join(self.dir, "data")
        os.mkdir(self.data)
        self.server = None

    def start(self):
        self.server = Normd("--auth-token-file", self.tokens, "--tenant-max-models", "3",
                            "--tenant-max-parameters", "20000", metrics=True,
                            data_dir=self.data).__enter__()
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pb_grpc.TrainerStub(self.channel)
        return self

    def stop(self):
        self.channel.close()
        self.server.__exit__(None, None, None)

    def metrics(self):
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def metric(text, name, *labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(l in line for l in labels):
            return float(line.split()[-1])
    return None


class TenantsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.t = TenantServer().start()

    @classmethod
    def tearDownClass(cls):
        cls.t.stop()
        cls.t.cleanup()

    def create(self, token, model_id, spec=MLP):
        return self.t.stub.CreateModel(pb.CreateModelRequest(id=model_id, spec=spec),
                                       metadata=md(token), timeout=20)

    def test_namespaces_keep_two_mlps_apart(self):
        a = self.create("a-tok", "ns", big_mlp(8))
        b = self.create("b-tok", "ns", big_mlp(16))
        self.assertEqual((a.tenant, a.id), ("team-a", "ns"))
        self.assertEqual((b.tenant, b.id), ("team-b", "ns"))
        s = self.t.stub
        s.TrainStep(pb.TrainStepRequest(model="ns", input=tensor(4, 4), labels=[0, 1, 2, 0]),
                    metadata=md("a-tok"), timeout=10)
        ga = s.GetModel(pb.GetModelRequest(model="ns"), metadata=md("a-tok"), timeout=10)
        gb = s.GetModel(pb.GetModelRequest(model="ns"), metadata=md("b-tok"), timeout=10)
        self.assertEqual((ga.step, ga.parameter_count, ga.tenant), (1, a.parameter_count, "team-a"))
        self.assertEqual((gb.step, gb.parameter_count, gb.tenant), (0, b.parameter_count, "team-b"))
        # A tenant lists only its own models.
        listed_a = s.ListModels(pb.ListModelsRequest(), metadata=md("a-tok"), timeout=10).models
        self.assertTrue(listed_a)
        self.assertEqual({m.tenant for m in listed_a}, {"team-a"})
        # Naming its own tenant explicitly is the same model.
        self.assertEqual(s.GetModel(pb.GetModelRequest(model="team-a/ns"), metadata=md("a-tok"),
                                    timeout=10).step, 1)
        # Admins list everything with its tenant and reach any model by TENANT/ID.
        for admin in ("admin-tok", "ops-tok"):
            listed = s.ListModels(pb.ListModelsRequest(), metadata=md(admin), timeout=10).models
            names = {(m.tenant, m.id) for m in listed}
            self.assertIn(("team-a", "ns"), names)
            self.assertIn(("team-b", "ns"), names)
            self.assertEqual(s.GetModel(pb.GetModelRequest(model="team-b/ns"), metadata=md(admin),
                                        timeout=10).parameter_count, b.parameter_count)
        # The admin's plain id is its own tenant's: default has no "ns".
        self.assertEqual(code_of(lambda: s.GetModel(pb.GetModelRequest(model="ns"),
                                                    metadata=md("admin-tok"), timeout=10))[0],
                         grpc.StatusCode.NOT_FOUND)

    def test_another_tenants_model_is_not_found_by_every_rpc_and_unchanged(self):
        s = self.t.stub
        self.create("a-tok", "secret", big_mlp(8))
        s.TrainStep(pb.TrainStepRequest(model="secret", input=tensor(4, 4), labels=[0, 1, 2, 0]),
                    metadata=md("a-tok"), timeout=10)
        before = state_bytes(s, "a-tok", "secret")
        model_before = s.GetModel(pb.GetModelRequest(model="secret"), metadata=md("a-tok"),
                                  timeout=10)
        x = tensor(4, 4)
        for name in ("secret", "team-a/secret"):
            calls = {
                "GetModel": lambda n: s.GetModel(pb.GetModelRequest(model=n), metadata=md("b-tok"),
                                                 timeout=10),
                "DeleteModel": lambda n: s.DeleteModel(pb.DeleteModelRequest(model=n),
                                                       metadata=md("b-tok"), timeout=10),
                "SetMode": lambda n: s.SetMode(pb.SetModeRequest(model=n, mode=pb.MODE_EVAL),
                                               metadata=md("b-tok"), timeout=10),
                "Forward": lambda n: s.Forward(pb.ForwardRequest(model=n, input=x),
                                               metadata=md("b-tok"), timeout=10),
                "Backward": lambda n: s.Backward(
                    pb.BackwardRequest(model=n, forward_id=1, grad_output=tensor(4, 3)),
                    metadata=md("b-tok"), timeout=10),
                "ApplyGradients": lambda n: s.ApplyGradients(
                    pb.ApplyGradientsRequest(model=n), metadata=md("b-tok"), timeout=10),
                "TrainStep": lambda n: s.TrainStep(
                    pb.TrainStepRequest(model=n, input=x, labels=[0, 1, 2, 0]),
                    metadata=md("b-tok"), timeout=10),
                "TrainStream": lambda n: list(s.TrainStream(
                    iter([pb.TrainStepRequest(model=n, input=x, labels=[0, 1, 2, 0])]),
                    metadata=md("b-tok"), timeout=10)),
                "Evaluate": lambda n: s.Evaluate(
                    pb.EvaluateRequest(model=n, input=x, labels=[0, 1, 2, 0]),
                    metadata=md("b-tok"), timeout=10),
                "GetState": lambda n: s.GetState(pb.GetStateRequest(model=n),
                                                 metadata=md("b-tok"), timeout=10),
                "SetState": lambda n: s.SetState(
                    pb.SetStateRequest(model=n, state=pb.ModelState()), metadata=md("b-tok"),
                    timeout=10),
                "ResetRunningStats": lambda n: s.ResetRunningStats(
                    pb.ResetRunningStatsRequest(model=n), metadata=md("b-tok"), timeout=10),
                "UpdateOptimizer": lambda n: s.UpdateOptimizer(
                    pb.UpdateOptimizerRequest(
                        model=n, optimizer=pb.OptimizerSpec(sgd=pb.SGDSpec(lr=5.0))),
                    metadata=md("b-tok"), timeout=10),
                "SaveModel": lambda n: s.SaveModel(pb.SaveModelRequest(model=n),
                                                   metadata=md("b-tok"), timeout=10),
                "SetLayerOptions": lambda n: s.SetLayerOptions(
                    pb.SetLayerOptionsRequest(model=n, layers=[pb.LayerOptions(layer="1",
                                                                               frozen=True)]),
                    metadata=md("b-tok"), timeout=10),
                "FoldBatchNorm": lambda n: s.FoldBatchNorm(
                    pb.FoldBatchNormRequest(model=n, new_model="stolen"), metadata=md("b-tok"),
                    timeout=10),
                "AdaptStatistics": lambda n: s.AdaptStatistics(
                    iter([pb.AdaptStatisticsRequest(model=n, input=x)]), metadata=md("b-tok"),
                    timeout=10),
            }
            self.assertEqual(len(calls) + 3, len(pb.DESCRIPTOR.services_by_name["Trainer"].methods),
                             "every model RPC (all but ListModels, CreateModel and CheckReplicas) "
                             "is tried")
            # CheckReplicas digests every tenant's models: admins only.
            code, details = code_of(lambda: s.CheckReplicas(pb.CheckReplicasRequest(),
                                                            metadata=md("b-tok"), timeout=10))
            self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED, details)
            for rpc, fn in calls.items():
                code, details = code_of(lambda: fn(name))
                self.assertEqual(code, grpc.StatusCode.NOT_FOUND, f"{rpc} {name}: {details}")
                # The answer for a model that does not exist at all (AdaptStatistics prefixes the
                # message number): nothing leaks.
                self.assertTrue(details.endswith(f"model '{name}' not found"), f"{rpc}: {details}")
                self.assertNotIn("team-a'", details.replace(f"'{name}'", ""), rpc)
        # Creating in another tenant's namespace is refused, for a plain member.
        code, details = code_of(lambda: self.create("b-tok", "team-a/secret"))
        self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED, details)
        # Nothing changed: state, step, mode; no folded copy appeared anywhere.
        self.assertEqual(state_bytes(s, "a-tok", "secret"), before)
        after = s.GetModel(pb.GetModelRequest(model="secret"), metadata=md("a-tok"), timeout=10)
        self.assertEqual(after, model_before)
        listed = s.ListModels(pb.ListModelsRequest(), metadata=md("admin-tok"), timeout=10).models
        self.assertNotIn("stolen", {m.id for m in listed})

    def test_quotas_refuse_one_tenant_and_not_the_other(self):
        s = self.t.stub
        for i in range(3):
            self.create("ops-tok", f"q{i}")
        code, details = code_of(lambda: self.create("ops-tok", "q3"))
        self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED, details)
        self.assertIn("--tenant-max-models", details)
        self.assertIn("team-ops", details)
        # Another tenant still creates.
        self.create("admin-tok", "other-tenant-works")
        # Parameters: 20000 per tenant; a model of 4*300+300*2+300*3+... > 20000 is refused.
        code, details = code_of(lambda: self.create("admin-tok", "too-big", big_mlp(3000)))
        self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED, details)
        self.assertIn("--tenant-max-parameters", details)
        # Deleting frees the quota.
        s.DeleteModel(pb.DeleteModelRequest(model="q0"), metadata=md("ops-tok"), timeout=10)
        self.create("ops-tok", "q3")
        text = self.t.metrics()
        self.assertGreaterEqual(metric(text, "normd_tenant_refused_total", 'tenant="team-ops"'), 1)
        self.assertGreaterEqual(metric(text, "normd_tenant_refused_total", 'tenant="default"'), 1)
        self.assertGreaterEqual(metric(text, "normd_tenant_requests_total", 'tenant="team-ops"'),
                                5)

    def test_per_tenant_metrics_and_labels(self):
        s = self.t.stub
        self.create("b-tok", "metered")
        base = metric(self.t.metrics(), "normd_tenant_samples_total", 'tenant="team-b"') or 0
        s.TrainStep(train_step_request("metered", batch=6), metadata=md("b-tok"), timeout=10)
        text = self.t.metrics()
        self.assertEqual(metric(text, "normd_tenant_samples_total", 'tenant="team-b"'), base + 6)
        self.assertEqual(metric(text, "normd_train_steps_total", 'model="metered"',
                                'tenant="team-b"'), 1)
        # The training recipe's gauges carry the tenant like every per-model series.
        self.assertGreater(metric(text, "normd_grad_norm", 'model="metered"',
                                  'tenant="team-b"') or 0, 0)
        self.assertGreater(metric(text, "normd_learning_rate", 'model="metered"',
                                  'tenant="team-b"') or 0, 0)

    def test_python_client_works_in_a_tenant(self):
        import normd
        import numpy as np
        address = self.t.server.address
        x, labels = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4), [0, 1, 2, 0]
        # An admin working in tenant team-c (named by no token): plain names are team-c's.
        with normd.Client(address, token="ops-tok", tenant="team-c", timeout=20) as ops:
            m = ops.create_model(big_mlp(8), "py")
            self.assertEqual((m.tenant, m.id), ("team-c", "py"))
            ops.train_step("py", x, labels)
            self.assertEqual(ops.get_model("py").step, 1)
            picked = ops.create_model(big_mlp(8))  # "team-c/": the server picks the id there
            self.assertEqual(picked.tenant, "team-c")
            self.assertEqual(sorted(m.id for m in ops.list_models()), sorted(["py", picked.id]))
            ops.delete_model(picked.id)
            self.assertEqual([m.id for m in ops.list_models()], ["py"])
            # A qualified name is sent as written.
            self.assertEqual(ops.get_model("team-c/py").step, 1)
        with normd.Client(address, token="ops-tok", timeout=20) as ops:
            self.assertEqual(ops.get_model("team-c/py").tenant, "team-c")
            self.assertIn("team-c", {m.tenant for m in ops.list_models()})
        # from_torch with a qualified id and no tenant= option: the state lands in team-c's
        # model, and the admin's own tenant gets nothing.
        import torch
        torch.manual_seed(0)
        seq = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                  torch.nn.Linear(8, 3))
        with normd.Client(address, token="ops-tok", timeout=20) as ops:
            made = normd.from_torch(ops, seq, input_shape=[4], id="team-c/from-torch")
            self.assertEqual((made.tenant, made.id), ("team-c", "from-torch"))
            got = ops.get_state("team-c/from-torch")
            for key, value in seq.state_dict().items():
                np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)
            self.assertNotIn("from-torch", [m.id for m in ops.list_models()
                                            if m.tenant == "team-ops"])
            ops.delete_model("team-c/from-torch")
        # A member cannot reach into team-c through the option either.
        with normd.Client(address, token="b-tok", tenant="team-c", timeout=20) as b:
            with self.assertRaises(normd.NormdError) as e:
                b.get_model("py")
            self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)
            self.assertEqual(b.list_models(), [])

    def test_nested_batch_norm_series_carry_tenant_and_layer_path(self):
        """A residual model's BatchNorm inside a branch: its drift and running-statistics series
        carry the tenant label beside the nested layer's path."""
        s = self.t.stub
        spec = pb.ModelSpec(
            input_shape=[4],
            layers=[pb.LayerSpec(linear=pb.LinearSpec(in_features=4, out_features=8)),
                    pb.LayerSpec(residual=pb.ResidualSpec(body=[
                        pb.LayerSpec(linear=pb.LinearSpec(in_features=8, out_features=8)),
                        pb.LayerSpec(batch_norm1d=pb.BatchNormSpec(num_features=8))])),
                    pb.LayerSpec(relu=pb.Empty()),
                    pb.LayerSpec(linear=pb.LinearSpec(in_features=8, out_features=3))],
            optimizer=pb.OptimizerSpec(sgd=pb.SGDSpec(lr=0.1)),
            loss=pb.LOSS_CROSS_ENTROPY)
        self.create("b-tok", "res", spec)
        for _ in range(2):
            s.TrainStep(pb.TrainStepRequest(model="res", input=tensor(4, 4), labels=[0, 1, 2, 0]),
                        metadata=md("b-tok"), timeout=10)
        text = self.t.metrics()
        labels = ('tenant="team-b"', 'model="res"', 'layer="1.body.1"')
        self.assertEqual(metric(text, "normd_bn_batches_tracked", *labels), 2)
        self.assertGreaterEqual(metric(text, "normd_bn_mean_shift_count", *labels, 'mode="train"'),
                                1)
        self.assertGreaterEqual(
            metric(text, "normd_bn_var_log_ratio_count", *labels, 'mode="train"'), 1)
        # Team-b's model quota (3) is shared with the other tests of this server.
        s.DeleteModel(pb.DeleteModelRequest(model="res"), metadata=md("b-tok"), timeout=10)
        self.assertIsNone(metric(self.t.metrics(), "normd_bn_batches_tracked", *labels))

    def test_normctl_shows_and_reaches_tenants(self):
        self.create("a-tok", "ctl")
        tok_a = os.path.join(self.t.dir, "a.tok")
        tok_admin = os.path.join(self.t.dir, "admin.tok")
        with open(tok_a, "w") as f:
            f.write("a-tok\n")
        with open(tok_admin, "w") as f:
            f.write("admin-tok\n")

        def normctl(token, *args):
            p = subprocess.run([env_path("NORMCTL_BIN"), "--server", self.t.server.address,
                                "--token-file", token, *args], capture_output=True, text=True,
                               timeout=30)
            return p.returncode, p.stdout + p.stderr

        rc, out = normctl(tok_a, "list")
        self.assertEqual(rc, 0, out)
        self.assertIn("tenant", out.splitlines()[0])
        self.assertNotIn("team-b", out)
        rc, out = normctl(tok_admin, "--tenant", "team-a", "get", "ctl")
        self.assertEqual(rc, 0, out)
        self.assertIn("team-a", out)
        rc, out = normctl(tok_admin, "--tenant", "team-a", "list")
        self.assertEqual(rc, 0, out)
        self.assertNotIn("team-b", out)
        self.assertIn("ctl", out)
        # Every command that acts on the model reaches team-a's, not the admin's own tenant's.
        data = os.path.join(self.t.dir, "ctl.csv")
        with open(data, "w") as f:
            f.write("".join(f"{0.1 * i},{0.2},{-0.1 * i},{0.3},{i % 3}\n" for i in range(6)))
        s = self.t.stub
        before = s.GetModel(pb.GetModelRequest(model="ctl"), metadata=md("a-tok"), timeout=10)
        rc, out = normctl(tok_admin, "--tenant", "team-a", "lr", "ctl", "0.025")
        self.assertEqual(rc, 0, out)
        rc, out = normctl(tok_admin, "--tenant", "team-a", "train", "ctl", "--data", data,
                          "--epochs", "1", "--batch", "3", "--progress", "off")
        self.assertEqual(rc, 0, out)
        rc, out = normctl(tok_admin, "--tenant", "team-a", "eval", "ctl", "--data", data)
        self.assertEqual(rc, 0, out)
        self.assertIn("samples   6", out)
        rc, out = normctl(tok_admin, "--tenant", "team-a", "predict", "ctl", "--data", data,
                          "--label-column", "4")
        self.assertEqual(rc, 0, out)
        # A header line, then one line per sample (stderr notes aside).
        rows = [l for l in out.splitlines() if l.count(",") == 2]
        self.assertEqual(rows[0], "output_0,output_1,output_2", out)
        self.assertEqual(len(rows), 7, out)
        after = s.GetModel(pb.GetModelRequest(model="ctl"), metadata=md("a-tok"), timeout=10)
        self.assertAlmostEqual(after.spec.optimizer.sgd.lr, 0.025, places=6)
        self.assertEqual(after.step, before.step + 2)
        # recipe reads and updates the optimizer of team-a's model, not one in the admin's own
        # tenant.
        rc, out = normctl(tok_admin, "--tenant", "team-a", "recipe", "ctl", "--clip-grad-norm",
                          "2")
        self.assertEqual(rc, 0, out)
        self.assertIn("clip grad norm 2", out)
        rc, out = normctl(tok_a, "get", "ctl")
        self.assertEqual(rc, 0, out)
        self.assertIn("clip grad norm 2", out)


class RestartTest(unittest.TestCase):
    def test_both_tenants_models_come_back_with_their_own_state(self):
        t = TenantServer().start()
        try:
            s = t.stub
            states = {}
            for token, steps in (("a-tok", 3), ("b-tok", 5), ("admin-tok", 1)):
                s.CreateModel(pb.CreateModelRequest(id="mlp", spec=big_mlp(8)), metadata=md(token),
                              timeout=20)
                for _ in range(steps):
                    s.TrainStep(pb.TrainStepRequest(model="mlp", input=tensor(4, 4),
                                                    labels=[0, 1, 2, 0]),
                                metadata=md(token), timeout=10)
                states[token] = (steps, state_bytes(s, token, "mlp"))
            t.stop()
            # The default tenant's model sits where models always did; the others under @tenant.
            self.assertTrue(os.path.isdir(os.path.join(t.data, "mlp")))
            self.assertTrue(os.path.isdir(os.path.join(t.data, "@team-a", "mlp")))
            self.assertTrue(os.path.isdir(os.path.join(t.data, "@team-b", "mlp")))
            t.start()
            s = t.stub
            for token, (steps, state) in states.items():
                m = s.GetModel(pb.GetModelRequest(model="mlp"), metadata=md(token), timeout=10)
                self.assertEqual(m.step, steps, token)
                self.assertEqual(state_bytes(s, token, "mlp"), state, token)
        finally:
            t.stop()
            t.cleanup()


class OldTokenFileTest(unittest.TestCase):
    def test_bare_tokens_are_the_default_tenant_with_every_right(self):
        d = tempfile.mkdtemp(prefix="normd-oldtokens-")
        try:
            path = os.path.join(d, "tokens")
            with open(path, "w") as f:
                f.write("first-token\nsecond-token\n")
            with Normd("--auth-token-file", path) as server:
                with grpc.insecure_channel(server.address) as ch:
                    s = pb_grpc.TrainerStub(ch)
                    m = s.CreateModel(pb.CreateModelRequest(id="old", spec=MLP),
                                      metadata=md("first-token"), timeout=20)
                    self.assertEqual(m.tenant, "default")
                    # Both tokens are the same tenant: one sees the other's model.
                    self.assertEqual(s.GetModel(pb.GetModelRequest(model="old"),
                                                metadata=md("second-token"), timeout=10).id, "old")
                    self.assertEqual(code_of(lambda: s.ListModels(pb.ListModelsRequest(),
                                                                  timeout=10))[0],
                                     grpc.StatusCode.UNAUTHENTICATED)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def test_bad_tenant_line_stops_the_server_with_exit_2(self):
        d = tempfile.mkdtemp(prefix="normd-badtokens-")
        try:
            path = os.path.join(d, "tokens")
            with open(path, "w") as f:
                f.write("fine\ntok bad.tenant\n")
            p = subprocess.run([env_path("NORMD_BIN"), "--in-memory", "--auth-token-file", path,
                                "--listen", "127.0.0.1:0", "--metrics", ""],
                               capture_output=True, text=True, timeout=30)
            self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
            self.assertIn("line 2", p.stdout + p.stderr)
        finally:
            shutil.rmtree(d, ignore_errors=True)


CLIENT_TENANTS = ("# mutual-TLS identities (tenants_test.py)\n"
                  "CN=team_a_client team-a\n"
                  "SAN=team-b.example team-b\n"
                  "CN=client team-ops admin\n")


class MutualTlsTenantsTest(unittest.TestCase):
    """Client certificates name the tenant: `team_a_client` by its CN, `team_b_client` by its
    SAN (its CN is unmapped), `client` is an admin, `stranger` (signed by the same CA) maps to
    nothing."""

    @classmethod
    def setUpClass(cls):
        cls.pki = Pki()
        cls.mapping = cls.pki.write("client-tenants", CLIENT_TENANTS)
        cls.tls = ["--tls-cert", cls.pki.server, "--tls-key", cls.pki.server_key,
                   "--tls-client-ca", cls.pki.ca, "--tls-client-tenants", cls.mapping]

    @classmethod
    def tearDownClass(cls):
        cls.pki.cleanup()

    def stub(self, server, who):
        creds = grpc.ssl_channel_credentials(self.pki.read(self.pki.ca),
                                             self.pki.read(getattr(self.pki, who + "_key")),
                                             self.pki.read(getattr(self.pki, who)))
        channel = grpc.secure_channel(server.address, creds)
        self.addCleanup(channel.close)
        return pb_grpc.TrainerStub(channel)

    def test_certificates_name_tenants_without_tokens(self):
        with Normd(*self.tls) as server:
            a, b = self.stub(server, "team_a_client"), self.stub(server, "team_b_client")
            admin, stranger = self.stub(server, "client"), self.stub(server, "stranger")
            ma = a.CreateModel(pb.CreateModelRequest(id="mlp", spec=big_mlp(8)), timeout=20)
            mb = b.CreateModel(pb.CreateModelRequest(id="mlp", spec=big_mlp(16)), timeout=20)
            self.assertEqual((ma.tenant, mb.tenant), ("team-a", "team-b"))
            a.TrainStep(pb.TrainStepRequest(model="mlp", input=tensor(4, 4), labels=[0, 1, 2, 0]),
                        timeout=10)
            self.assertEqual(a.GetModel(pb.GetModelRequest(model="mlp"), timeout=10).step, 1)
            self.assertEqual(b.GetModel(pb.GetModelRequest(model="mlp"), timeout=10).step, 0)
            self.assertEqual({m.tenant for m in b.ListModels(pb.ListModelsRequest(),
                                                              timeout=10).models}, {"team-b"})
            # b cannot see a's model by name, and cannot create in a's namespace.
            err = code_of(lambda: b.GetModel(pb.GetModelRequest(model="team-a/mlp"), timeout=10))
            self.assertEqual(err[0], grpc.StatusCode.NOT_FOUND)
            self.assertEqual(err[1], "model 'team-a/mlp' not found")
            self.assertEqual(code_of(lambda: b.DeleteModel(pb.DeleteModelRequest(model="team-a/mlp"),
                                                           timeout=10))[0],
                             grpc.StatusCode.NOT_FOUND)
            self.assertEqual(code_of(lambda: b.CreateModel(
                pb.CreateModelRequest(id="team-a/x", spec=MLP), timeout=10))[0],
                grpc.StatusCode.PERMISSION_DENIED)
            self.assertEqual(a.GetModel(pb.GetModelRequest(model="mlp"), timeout=10).step, 1)
            # The admin certificate sees both and reaches either.
            listed = {(m.tenant, m.id) for m in admin.ListModels(pb.ListModelsRequest(),
                                                                  timeout=10).models}
            self.assertLessEqual({("team-a", "mlp"), ("team-b", "mlp")}, listed)
            self.assertEqual(admin.GetModel(pb.GetModelRequest(model="team-a/mlp"),
                                            timeout=10).step, 1)
            # A certificate the CA signed but the mapping does not name gets nothing.
            code, message = code_of(lambda: stranger.ListModels(pb.ListModelsRequest(), timeout=10))
            self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED)
            self.assertIn("CN=stranger", message)
            self.assertIn("maps to no tenant", message)
            self.assertIn("mtls=on auth=off tokens=0 reflection=on client_tenants=on", server.log())

    def test_check_config_lists_the_tenants_both_files_name(self):
        tokens = self.pki.write("config-tokens", "a-tok team-a\nz-tok team-z admin\n")
        p = subprocess.run([env_path("NORMD_BIN"), "--check-config", "--in-memory", *self.tls,
                            "--auth-token-file", tokens], capture_output=True, text=True,
                           timeout=30)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("tokens=2\n", p.stdout)
        self.assertIn("tenants=team-a,team-b,team-ops,team-z\n", p.stdout)
        self.assertIn(f"client_tenants={self.mapping} mappings=3\n", p.stdout)

    def test_a_token_beside_a_certificate_must_name_the_same_tenant(self):
        tokens = self.pki.write("tls-tokens", "a-tok team-a\nb-tok team-b\n")
        with Normd(*self.tls, "--auth-token-file", tokens) as server:
            a = self.stub(server, "team_a_client")
            stranger = self.stub(server, "stranger")
            # The certificate alone names team-a; with a's token too it is the same tenant.
            m = a.CreateModel(pb.CreateModelRequest(id="both", spec=MLP), timeout=20)
            self.assertEqual(m.tenant, "team-a")
            self.assertEqual(a.GetModel(pb.GetModelRequest(model="both"), metadata=md("a-tok"),
                                        timeout=10).tenant, "team-a")
            # b's token on a's certificate: refused, and nothing is created.
            code, message = code_of(lambda: a.CreateModel(
                pb.CreateModelRequest(id="mixed", spec=MLP), metadata=md("b-tok"), timeout=10))
            self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED)
            self.assertIn("team-b", message)
            self.assertIn("team-a", message)
            self.assertEqual([x.id for x in a.ListModels(pb.ListModelsRequest(),
                                                          timeout=10).models], ["both"])
            # An unknown token on a mapped certificate is not a valid identity either.
            self.assertEqual(code_of(lambda: a.ListModels(pb.ListModelsRequest(),
                                                          metadata=md("nope"), timeout=10))[0],
                             grpc.StatusCode.UNAUTHENTICATED)
            # An unmapped certificate needs a token, which then names the tenant.
            self.assertEqual(code_of(lambda: stranger.ListModels(pb.ListModelsRequest(),
                                                                 timeout=10))[0],
                             grpc.StatusCode.UNAUTHENTICATED)
            self.assertEqual([x.id for x in stranger.ListModels(
                pb.ListModelsRequest(), metadata=md("b-tok"), timeout=10).models], [])


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""Per-layer options (SetLayerOptions) and BatchNorm folding (FoldBatchNorm) over gRPC, against a
real normd: options shown by GetModel and kept by checkpoints, bad requests refused without
changing anything, the folded copy's outputs equal to the unfolded eval model, and the
inference-only copy refusing training.

Run by ctest (server.layer_options) with NORMD_BIN and PYTHONPATH set.
"""

import json
import os
import sys
import unittest

import grpc
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "client"))
import normd  # noqa: E402
from normd_server import NormdServer  # noqa: E402

SOURCE = os.environ.get("NORMD_SOURCE_DIR", os.path.join(HERE, "..", ".."))
SERVER = None


def setUpModule():
    global SERVER
    SERVER = NormdServer().__enter__()


def tearDownModule():
    SERVER.__exit__(None, None, None)


def restart(server):
    """SIGTERM (normd saves every model) and a new normd on the same data directory."""
    server.client.close()
    server._stop()
    os.remove(os.path.join(server.tmp, "ports"))  # the new process reports new ports
    server._start()


def example_spec(name):
    with open(os.path.join(SOURCE, "client", "examples", name)) as f:
        return json.load(f)


def options_of(model):
    return {o.layer: (o.frozen, o.trainable) for o in model.layer_options}


class LayerOptionsTest(unittest.TestCase):
    def setUp(self):
        self.c = SERVER.client
        self.rng = np.random.default_rng(7)

    def batch(self, n=32, shape=(16,), classes=4):
        x = self.rng.normal(0.5, 2.0, size=(n,) + shape).astype(np.float32)
        return x, self.rng.integers(0, classes, size=n)

    def create(self, mid, spec_name="mlp_bn.json"):
        try:
            self.c.delete_model(mid)
        except normd.NormdError:
            pass
        self.addCleanup(self._delete, mid)
        return self.c.create_model(example_spec(spec_name), id=mid)

    def _delete(self, mid):
        try:
            self.c.delete_model(mid)
        except normd.NormdError:
            pass

    def assertCode(self, code, fn, *args, contains=None, **kw):
        with self.assertRaises(normd.NormdError) as cm:
            fn(*args, **kw)
        self.assertEqual(cm.exception.code, code, cm.exception.message)
        if contains:
            self.assertIn(contains, cm.exception.message)
        return cm.exception

    def test_defaults_listed_for_layers_with_parameters_or_statistics(self):
        m = self.create("lo-defaults")
        self.assertEqual(options_of(m), {name: (False, True) for name in
                                         ("fc1", "bn1", "fc2", "bn2", "out")})

    def test_frozen_and_untrainable_layers_in_training(self):
        self.create("lo-train")
        m = self.c.set_layer_options("lo-train", {"bn1": {"frozen": True},
                                                  "0": {"trainable": False}})
        opts = options_of(m)
        self.assertEqual(opts["bn1"], (True, True))
        self.assertEqual(opts["fc1"], (False, False))
        self.assertEqual(opts["bn2"], (False, True))
        self.assertEqual(options_of(self.c.get_model("lo-train")), opts)
        before = self.c.get_state("lo-train", include_optimizer=True)
        for _ in range(3):
            x, y = self.batch()
            self.c.train_step("lo-train", x, labels=y)
        after = self.c.get_state("lo-train", include_optimizer=True)
        unchanged = ["0.weight", "0.bias", "1.running_mean", "1.running_var",
                     "1.num_batches_tracked", "optimizer.0.weight.exp_avg",
                     "optimizer.0.weight.exp_avg_sq", "optimizer.0.weight.step"]
        for name in unchanged:
            np.testing.assert_array_equal(before[name], after[name], err_msg=name)
        # bn1 is frozen but trainable: its gamma/beta move; bn2 keeps tracking.
        for name in ("1.weight", "3.weight", "4.running_mean", "7.weight"):
            self.assertFalse(np.array_equal(before[name], after[name]), name)
        self.assertEqual(float(after["4.num_batches_tracked"]), 3.0)
        # Unset fields keep their value; setting back restores training.
        m = self.c.set_layer_options("lo-train", {"fc1": {"trainable": True}})
        self.assertEqual(options_of(m)["fc1"], (False, True))
        self.assertEqual(options_of(m)["bn1"], (True, True))
        x, y = self.batch()
        self.c.train_step("lo-train", x, labels=y)
        self.assertFalse(np.array_equal(after["0.weight"],
                                        self.c.get_state("lo-train")["0.weight"]))

    def test_frozen_batch_norm_accepts_one_sample_in_train_mode(self):
        self.create("lo-one")
        x, y = self.batch(n=1)
        self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.c.train_step, "lo-one", x, labels=y)
        self.c.set_layer_options("lo-one", {"bn1": {"frozen": True}, "bn2": {"frozen": True}})
        self.c.train_step("lo-one", x, labels=y)

    def test_bad_requests_change_nothing(self):
        self.create("lo-bad")
        self.c.set_layer_options("lo-bad", {"bn2": {"frozen": True}})
        before = self.c.get_model("lo-bad")
        e = self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.c.set_layer_options, "lo-bad",
                            {"bn1": {"frozen": True}, "nope": {"trainable": False}},
                            contains="'nope'")
        self.assertIn("layers[1]", e.message)
        self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.c.set_layer_options, "lo-bad",
                        {"fc2": {"trainable": False}, "fc1": {"frozen": True}},
                        contains="'fc1' (Linear) cannot be frozen")
        self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.c.set_layer_options, "lo-bad",
                        {"relu1": {"trainable": False}}, contains="'relu1' (ReLU)")
        self.assertCode(grpc.StatusCode.INVALID_ARGUMENT, self.c.set_layer_options, "lo-bad",
                        {"8": {"trainable": False}})
        self.assertCode(grpc.StatusCode.NOT_FOUND, self.c.set_layer_options, "no-such-model",
                        {"bn1": {"frozen": True}})
        self.assertEqual(self.c.get_model("lo-bad"), before)

    def test_freezing_makes_retained_forwards_stale(self):
        self.create("lo-stale")
        x, _ = self.batch()
        fid = self.c.forward("lo-stale", x, retain_for_backward=True).forward_id
        self.c.set_layer_options("lo-stale", {"bn1": {"frozen": True}})
        self.assertCode(grpc.StatusCode.FAILED_PRECONDITION, self.c.backward, "lo-stale", fid,
                        np.ones((32, 4), np.float32), contains="SetLayerOptions")
        # Trainability alone does not invalidate a retained forward.
        fid = self.c.forward("lo-stale", x, retain_for_backward=True).forward_id
        self.c.set_layer_options("lo-stale", {"out": {"trainable": False}})
        self.c.backward("lo-stale", fid, np.ones((32, 4), np.float32))
        w = self.c.get_state("lo-stale")["7.weight"]
        self.c.apply_gradients("lo-stale")
        np.testing.assert_array_equal(w, self.c.get_state("lo-stale")["7.weight"])

    def test_checkpoint_keeps_options_and_inference_only(self):
        self.create("lo-ckpt")
        self.c.set_layer_options("lo-ckpt", {"bn2": {"frozen": True},
                                             "out": {"trainable": False}})
        x, y = self.batch()
        self.c.train_step("lo-ckpt", x, labels=y)
        self.c.set_mode("lo-ckpt", "eval")
        self.c.fold_batch_norm("lo-ckpt", new_model="lo-ckpt-folded")
        self.addCleanup(self._delete, "lo-ckpt-folded")
        self.c.save_model("lo-ckpt")
        self.c.save_model("lo-ckpt-folded")
        want = options_of(self.c.get_model("lo-ckpt"))
        folded_out = self.c.predict("lo-ckpt-folded", x)
        restart(SERVER)
        self.c = SERVER.client
        m = self.c.get_model("lo-ckpt")
        self.assertEqual(options_of(m), want)
        self.assertEqual(want["bn2"], (True, True))
        self.assertEqual(want["out"], (False, False))
        f = self.c.get_model("lo-ckpt-folded")
        self.assertTrue(f.inference_only)
        self.assertEqual(f.mode, normd.pb.MODE_EVAL)
        np.testing.assert_array_equal(self.c.predict("lo-ckpt-folded", x), folded_out)
        self.assertCode(grpc.StatusCode.FAILED_PRECONDITION, self.c.set_mode, "lo-ckpt-folded",
                        "train")
        # The restored options still act.
        self.c.set_mode("lo-ckpt", "train")
        before = self.c.get_state("lo-ckpt")
        self.c.train_step("lo-ckpt", x, labels=y)
        after = self.c.get_state("lo-ckpt")
        for name in ("7.weight", "4.running_mean", "4.num_batches_tracked"):
            np.testing.assert_array_equal(before[name], after[name], err_msg=name)


class FoldTest(unittest.TestCase):
    def setUp(self):
        self.c = SERVER.client
        self.rng = np.random.default_rng(11)

    def trained(self, mid, spec, shape, classes):
        try:
            self.c.delete_model(mid)
        except normd.NormdError:
            pass
        self.addCleanup(lambda: self._delete(mid))
        self.c.create_model(spec, id=mid)
        for i in range(5):
            x = self.rng.normal(0.3 * i, 1.5, size=(32,) + shape).astype(np.float32)
            self.c.train_step(mid, x, labels=self.rng.integers(0, classes, 32))
        self.c.set_mode(mid, "eval")

    def _delete(self, mid):
        try:
            self.c.delete_model(mid)
        except normd.NormdError:
            pass

    def check_fold(self, mid, spec, shape, classes, expect_layers):
        self.trained(mid, spec, shape, classes)
        r = self.c.fold_batch_norm(mid, new_model=mid + "-f")
        self.addCleanup(lambda: self._delete(mid + "-f"))
        kinds = [l.WhichOneof("kind") for l in r.spec.layers]
        self.assertEqual(kinds, expect_layers)
        self.assertEqual(list(r.spec.input_shape), list(shape))
        self.assertTrue(r.model.inference_only)
        self.assertEqual(r.model.id, mid + "-f")
        self.assertEqual(r.model.mode, normd.pb.MODE_EVAL)
        self.assertEqual(r.model.spec, r.spec)
        self.assertEqual(len(r.model.batch_norms), kinds.count("batch_norm1d") +
                         kinds.count("batch_norm2d"))
        served = self.c.get_state(mid + "-f")
        self.assertEqual(list(served), list(r.state))
        for name in served:
            np.testing.assert_array_equal(served[name], r.state[name], err_msg=name)
        x = self.rng.normal(1.0, 2.0, size=(64,) + shape).astype(np.float32)
        ref = self.c.predict(mid, x)
        out = self.c.predict(mid + "-f", x)
        err = np.max(np.abs(out - ref))
        print(f"{mid}: folded vs unfolded eval max abs diff {err:.2e} "
              f"(outputs up to {np.max(np.abs(ref)):.2f})")
        self.assertLessEqual(err, 1e-5)
        # Without new_model: the same answer, nothing created.
        r2 = self.c.fold_batch_norm(mid)
        self.assertFalse(r2.model.id if r2.model is not None else "")
        self.assertEqual(r2.spec, r.spec)
        return r

    def test_mlp_fold(self):
        r = self.check_fold("fold-mlp", example_spec("mlp_bn.json"), (16,), 4,
                            ["linear", "relu", "linear", "relu", "dropout", "linear"])
        self.assertEqual([l.name for l in r.spec.layers],
                         ["fc1", "relu1", "fc2", "relu2", "dropout", "out"])
        self.assertTrue(r.spec.layers[0].linear.bias)

    def test_cnn_fold(self):
        self.check_fold("fold-cnn", example_spec("cnn_bn.json"), (1, 8, 8), 10,
                        ["conv2d", "relu", "max_pool2d", "conv2d", "relu", "avg_pool2d",
                         "flatten", "linear"])

    def test_unfoldable_batch_norms_stay(self):
        spec = {
            "input_shape": [6],
            "layers": [
                {"linear": {"in_features": 6, "out_features": 8, "bias": False}},
                {"batch_norm1d": {"num_features": 8, "affine": False}},
                {"relu": {}},
                {"batch_norm1d": {"num_features": 8}},  # follows a ReLU
                {"linear": {"in_features": 8, "out_features": 5}},
                {"batch_norm1d": {"num_features": 5, "track_running_stats": False}},
                {"linear": {"in_features": 5, "out_features": 3}},
            ],
            "loss": "LOSS_CROSS_ENTROPY", "optimizer": {"sgd": {"lr": 0.1}}, "seed": 3}
        r = self.check_fold("fold-mixed", spec, (6,), 3,
                            ["linear", "relu", "batch_norm1d", "linear", "batch_norm1d",
                             "linear"])
        self.assertTrue(r.spec.layers[0].linear.bias)  # gained a bias from the fold
        self.assertIn("2.running_mean", r.state)
        self.assertIn("4.weight", r.state)  # the untracked BatchNorm's gamma

    def test_inference_only_refusals(self):
        self.trained("fold-ro", example_spec("mlp_bn.json"), (16,), 4)
        self.c.fold_batch_norm("fold-ro", new_model="fold-ro-f")
        self.addCleanup(lambda: self._delete("fold-ro-f"))
        x = self.rng.normal(size=(8, 16)).astype(np.float32)
        y = self.rng.integers(0, 4, 8)
        fp = grpc.StatusCode.FAILED_PRECONDITION
        calls = [
            (self.c.set_mode, ("fold-ro-f", "train")),
            (self.c.train_step, ("fold-ro-f", x), {"labels": y}),
            (lambda: list(self.c.train_stream("fold-ro-f", [(x, y)])), ()),
            (self.c.forward, ("fold-ro-f", x), {"retain_for_backward": True}),
            (self.c.backward, ("fold-ro-f", 1, np.ones((8, 4), np.float32))),
            (self.c.apply_gradients, ("fold-ro-f",)),
            (self.c.set_layer_options, ("fold-ro-f", {"fc1": {"trainable": False}})),
        ]
        for entry in calls:
            fn, args = entry[0], entry[1]
            kw = entry[2] if len(entry) > 2 else {}
            with self.assertRaises(normd.NormdError) as cm:
                fn(*args, **kw)
            self.assertEqual(cm.exception.code, fp, cm.exception.message)
            self.assertIn("inference-only", cm.exception.message)
        # Eval-mode calls still work and nothing moved; the refusals are not counted as
        # refused non-finite steps.
        self.assertEqual(self.c.get_model("fold-ro-f").step, 0)
        import urllib.request
        with urllib.request.urlopen(SERVER.metrics_url, timeout=10) as r:
            metrics = r.read().decode()
        line = [l for l in metrics.splitlines()
                if l.startswith('normd_nonfinite_steps_total{model="fold-ro-f",')]
        self.assertEqual(len(line), 1, metrics[-2000:])
        self.assertEqual(float(line[0].split()[-1]), 0.0)
        self.c.evaluate("fold-ro-f", x, labels=y)
        self.c.set_mode("fold-ro-f", "eval")

    def test_fold_errors(self):
        self.trained("fold-err", example_spec("mlp_bn.json"), (16,), 4)
        for bad, code in (("fold-err", grpc.StatusCode.ALREADY_EXISTS),
                          ("bad id!", grpc.StatusCode.INVALID_ARGUMENT)):
            with self.assertRaises(normd.NormdError) as cm:
                self.c.fold_batch_norm("fold-err", new_model=bad)
            self.assertEqual(cm.exception.code, code, cm.exception.message)
        with self.assertRaises(normd.NormdError) as cm:
            self.c.fold_batch_norm("no-such-model")
        self.assertEqual(cm.exception.code, grpc.StatusCode.NOT_FOUND)
        ids = {m.id for m in self.c.list_models()}
        self.assertNotIn("bad id!", ids)


if __name__ == "__main__":
    unittest.main(verbosity=2)

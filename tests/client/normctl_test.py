"""normctl run for real against a real normd: every subcommand, exit codes and error messages."""

import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

import numpy as np
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import normd  # noqa: E402
from normd_server import NormdServer, env_path, free_port  # noqa: E402

SERVER = None
NORMCTL = None
EXAMPLES = None
TMP = None


def setUpModule():
    global SERVER, NORMCTL, EXAMPLES, TMP
    NORMCTL = env_path("NORMCTL_BIN")
    EXAMPLES = os.path.join(env_path("NORMD_SOURCE_DIR"), "client", "examples")
    TMP = tempfile.TemporaryDirectory(prefix="normctl-test-")
    SERVER = NormdServer().__enter__()


def tearDownModule():
    SERVER.__exit__(None, None, None)
    TMP.cleanup()


def path(name):
    return os.path.join(TMP.name, name)


def write_csv(name, x, y=None, header=True):
    with open(path(name), "w", newline="") as f:
        w = csv.writer(f)
        cols = [f"f{i}" for i in range(x.shape[1])] + (["label"] if y is not None else [])
        if header:
            w.writerow(cols)
        for i in range(len(x)):
            w.writerow([f"{v:.6g}" for v in x[i]] + ([int(y[i])] if y is not None else []))
    return path(name)


def blobs(n, seed):
    """16 features, 4 classes: the shape client/examples/mlp_bn.json takes."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(0, 2.5, size=(4, 16))
    y = rng.integers(0, 4, n)
    return (centers[y] + rng.normal(size=(n, 16))).astype(np.float32), y


def run(*args, check=True, server=True, env=None):
    cmd = [NORMCTL] + (["--server", SERVER.address] if server else []) + list(args)
    full_env = dict(os.environ)
    full_env.pop("NORMCTL_SERVER", None)
    full_env.update(env or {})
    p = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout}\n"
                             f"stderr:\n{p.stderr}")
    return p


def get_json(mid):
    return json.loads(run("get", mid, "--json").stdout)


class NormctlTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.x_train, cls.y_train = blobs(600, 1)
        cls.x_test, cls.y_test = blobs(200, 2)
        cls.train_csv = write_csv("train.csv", cls.x_train, cls.y_train)
        cls.test_csv = write_csv("test.csv", cls.x_test, cls.y_test, header=False)
        cls.features_csv = write_csv("features.csv", cls.x_test[:50])

    def setUp(self):
        self.client = SERVER.client
        for m in self.client.list_models():
            self.client.delete_model(m.id)

    def create(self, spec_file, mid):
        p = run("create", "--spec", os.path.join(EXAMPLES, spec_file), "--id", mid)
        self.assertIn(f"created model {mid}", p.stdout)
        return p

    def test_mlp_workflow(self):
        self.create("mlp_bn.json", "mlp")
        p = run("train", "mlp", "--data", self.train_csv, "--label-column", "16", "--epochs", "3",
                "--batch", "32", "--shuffle", "--val", self.test_csv, "--progress", "lines")
        self.assertIn("epoch 3/3", p.stdout)
        self.assertIn("val accuracy", p.stdout)
        self.assertIn("samples/s", p.stdout)
        model = get_json("mlp")
        self.assertEqual(int(model["step"]), 3 * ((600 + 31) // 32))

        p = run("eval", "mlp", "--data", self.test_csv)
        accuracy = float(re.search(r"accuracy\s+([\d.]+)%", p.stdout).group(1))
        self.assertGreaterEqual(accuracy, 85.0, p.stdout)
        self.assertIn("samples   200", p.stdout)
        self.assertEqual(int(get_json("mlp")["step"]), 3 * ((600 + 31) // 32))  # unchanged

        run("mode", "mlp", "eval")
        self.assertEqual(get_json("mlp")["mode"], "MODE_EVAL")
        out = path("pred.csv")
        p = run("predict", "mlp", "--data", self.test_csv, "--label-column", "16", "--out", out)
        with open(out) as f:
            rows = list(csv.reader(f))
        self.assertEqual(rows[0], ["output_0", "output_1", "output_2", "output_3"])
        self.assertEqual(len(rows), 201)
        self.assertTrue(all(len(r) == 4 for r in rows))
        served = np.array(rows[1:], dtype=np.float32)
        # The same inputs as the CSV holds (6 significant digits), through the Python client.
        x_csv = np.loadtxt(self.test_csv, delimiter=",", dtype=np.float32)[:, :16]
        np.testing.assert_allclose(served, self.client.predict("mlp", x_csv), rtol=1e-6,
                                   atol=1e-6)
        p = run("predict", "mlp", "--data", self.features_csv, "--argmax")
        lines = p.stdout.strip().splitlines()
        self.assertEqual(lines[0], "class")
        self.assertEqual(len(lines), 51)
        np.testing.assert_array_equal(np.array(lines[1:], dtype=int), served[:50].argmax(1))

        p = run("lr", "mlp", "0.0005")
        self.assertIn("0.003 -> 0.0005", p.stdout)
        self.assertAlmostEqual(get_json("mlp")["spec"]["optimizer"]["adam"]["lr"], 0.0005)

        p = run("get", "mlp")
        for text in ("mode        eval", "bn1", "bn2", "batch_norm1d", "LOSS_CROSS_ENTROPY"):
            self.assertIn(text, p.stdout)
        bn_rows = [l.split() for l in p.stdout.splitlines() if l.strip().startswith("bn")]
        self.assertIn(["bn1", "57"], [r[:2] for r in bn_rows])

        p = run("reset-stats", "mlp")
        self.assertIn("2 BatchNorm layer", p.stdout)
        model = get_json("mlp")
        self.assertTrue(all(int(bn.get("num_batches_tracked", 0)) == 0
                            for bn in model["batch_norms"]))
        np.testing.assert_array_equal(self.client.get_state("mlp")["1.running_mean"], 0)

        run("mode", "mlp", "train", "--freeze-running-stats")
        self.assertTrue(get_json("mlp")["running_stats_frozen"])
        run("train", "mlp", "--data", self.train_csv, "--epochs", "1", "--batch", "64")
        np.testing.assert_array_equal(self.client.get_state("mlp")["1.running_mean"], 0)
        run("mode", "mlp", "train", "--no-freeze-running-stats")
        self.assertFalse(get_json("mlp").get("running_stats_frozen", False))

    def test_recipe(self):
        """client/examples/mlp_recipe.json: AdamW with a warm-up then cosine schedule, clipping,
        no decay on norm/bias and label smoothing; the epoch lines show the schedule's lr; the
        recipe subcommand changes it."""
        self.create("mlp_recipe.json", "rec")
        p = run("get", "rec")
        for text in ("label smoothing 0.1", "warm-up 10 steps from 0.1x then cosine t_max=28",
                     "clip grad norm 1", "no weight decay on norm/bias"):
            self.assertIn(text, p.stdout)
        self.assertAlmostEqual(float(re.search(r"next lr\s+(\S+)", p.stdout).group(1)),
                               0.1 * 0.003, places=6)

        def lr(t):  # the schedule of mlp_recipe.json at step t
            if t < 10:
                return 0.003 * (0.1 + 0.9 * t / 10)
            return 1e-4 + (0.003 - 1e-4) * (1 + np.cos(np.pi * (t - 10) / 28)) / 2

        p = run("train", "rec", "--data", self.train_csv, "--label-column", "16", "--epochs", "2",
                "--batch", "32", "--progress", "off")
        epochs = re.findall(r"epoch (\d)/2 .* step (\d+)  lr (\S+)  grad norm (\S+)", p.stdout)
        self.assertEqual(len(epochs), 2, p.stdout)
        for _, step, last_lr, grad_norm in epochs:
            self.assertAlmostEqual(float(last_lr) / lr(int(step) - 1), 1.0, places=3)
            self.assertGreater(float(grad_norm), 0.0)
        self.assertAlmostEqual(get_json("rec")["learning_rate"], lr(38), places=9)
        accuracy = float(re.search(r"accuracy\s+([\d.]+)%",
                                   run("eval", "rec", "--data", self.test_csv).stdout).group(1))
        self.assertGreaterEqual(accuracy, 85.0)

        # A new schedule starts at its step 0; clipping off; every parameter decays again.
        p = run("recipe", "rec", "--step-lr", "5", "--gamma", "0.5", "--no-clip", "--decay-all")
        self.assertIn("step decay every 5 steps by gamma=0.5", p.stdout)
        self.assertIn("learning rate of the next step: 0.003", p.stdout)
        optimizer = get_json("rec")["spec"]["optimizer"]
        self.assertEqual(optimizer["lr_schedule"], {"step": {"step_size": "5", "gamma": 0.5}})
        self.assertNotIn("clip_grad_norm", optimizer)
        self.assertNotIn("no_weight_decay_on_norm_and_bias", optimizer)
        run("recipe", "rec", "--clip-grad-norm", "0.5", "--no-decay-norm-bias")
        optimizer = get_json("rec")["spec"]["optimizer"]
        self.assertEqual(optimizer["clip_grad_norm"], {"max_norm": 0.5})
        self.assertEqual(optimizer["lr_schedule"], {"step": {"step_size": "5", "gamma": 0.5}})
        run("recipe", "rec", "--no-schedule")
        self.assertNotIn("lr_schedule", get_json("rec")["spec"]["optimizer"])

        # Refusals: nothing to change and flag misuse are usage errors (2), bad values the
        # server's INVALID_ARGUMENT (1), and none of them changes the model.
        before = get_json("rec")
        p = run("recipe", "rec", check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("nothing to change", p.stderr)
        p = run("recipe", "rec", "--gamma", "0.5", check=False)
        self.assertEqual(p.returncode, 2)
        p = run("recipe", "rec", "--cosine", "0", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("INVALID_ARGUMENT", p.stderr)
        self.assertIn("lr_schedule.cosine.t_max must be >= 1", p.stderr)
        p = run("recipe", "rec", "--clip-grad-norm", "-1", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("clip_grad_norm.max_norm must be > 0", p.stderr)
        self.assertEqual(get_json("rec"), before)

    def test_inspect_shows_batchnorm_normalising(self):
        self.create("mlp_bn.json", "fresh")
        # A fresh model in train mode: BatchNorm (gamma 1, beta 0) outputs mean 0, std 1.
        p = run("inspect", "fresh", "--data", self.train_csv, "--label-column", "label",
                "--rows", "128")
        rows = {}
        for line in p.stdout.splitlines():
            parts = line.split()
            if len(parts) == 7 and parts[0].isdigit():
                rows[parts[1]] = (parts[2], [float(v) for v in parts[3:]])
        self.assertEqual(len(rows), 8, p.stdout)
        kind, (in_mean, in_std, out_mean, out_std) = rows["bn1"]
        self.assertEqual(kind, "BatchNorm1d")
        self.assertLess(abs(out_mean), 1e-3)
        self.assertLess(abs(out_std - 1), 1e-2)
        self.assertGreater(abs(in_std - 1) + abs(in_mean), 0.05)  # what BatchNorm fixes

    def test_cnn_on_digits(self):
        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        y = digits.target
        train = write_csv("digits_train.csv", x[:1400], y[:1400])
        test = write_csv("digits_test.csv", x[1400:], y[1400:], header=False)
        self.create("cnn_bn.json", "cnn")
        self.assertEqual(get_json("cnn")["output_shape"], ["10"])
        run("train", "cnn", "--data", train, "--label-column", "-1", "--epochs", "3",
            "--batch", "64", "--shuffle")
        p = run("eval", "cnn", "--data", test)
        accuracy = float(re.search(r"accuracy\s+([\d.]+)%", p.stdout).group(1))
        self.assertGreaterEqual(accuracy, 85.0, p.stdout)

    def test_resnet_example(self):
        """client/examples/resnet_bn.json: residual blocks (identity, stride-2 projection,
        depthwise-separable), global average pooling; nested layers in get, layer and fold."""
        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        y = digits.target
        train = write_csv("resnet_train.csv", x[:1400], y[:1400])
        test = write_csv("resnet_test.csv", x[1400:], y[1400:], header=False)
        p = self.create("resnet_bn.json", "resnet")
        self.assertIn("12 layers (29 with the residual blocks' layers)", p.stdout)
        self.assertEqual(get_json("resnet")["output_shape"], ["10"])
        rows = [l.split() for l in run("get", "resnet").stdout.splitlines()]
        self.assertIn(["5", "block2", "residual", "-", "-"], rows)
        self.assertIn(["5.shortcut.1", "5.shortcut.1", "batch_norm2d", "no", "yes"], rows)
        self.assertIn(["7.body.0", "7.body.0", "conv2d", "no", "yes"], rows)
        self.assertIn("5.shortcut.1", run("get", "resnet").stdout.split("BatchNorm")[-1])
        run("train", "resnet", "--data", train, "--label-column", "-1", "--epochs", "3",
            "--batch", "64", "--shuffle")
        p = run("eval", "resnet", "--data", test)
        accuracy = float(re.search(r"accuracy\s+([\d.]+)%", p.stdout).group(1))
        self.assertGreaterEqual(accuracy, 85.0, p.stdout)
        # A whole block and a nested layer by path.
        p = run("layer", "resnet", "block1", "5.shortcut.1", "--freeze")
        rows = {r.split()[0]: r.split()[1:] for r in p.stdout.splitlines()[1:]}
        self.assertEqual(rows["3.body.1"], ["yes", "yes"])
        self.assertEqual(rows["3.body.4"], ["yes", "yes"])
        self.assertEqual(rows["3.body.0"], ["no", "yes"])
        self.assertEqual(rows["5.shortcut.1"], ["yes", "yes"])
        self.assertEqual(rows["5.body.1"], ["no", "yes"])
        p = run("inspect", "resnet", "--data", test, "--label-column", "-1", "--rows", "32")
        self.assertIn("5.shortcut.1", p.stdout)
        run("mode", "resnet", "eval")
        p = run("fold", "resnet", "--as", "resnet-folded")
        self.assertIn("folded 8 BatchNorm layer(s) of resnet: 29 -> 21 layers", p.stdout)
        np.testing.assert_allclose(self.client.predict("resnet-folded", x[1400:1464].reshape(
            -1, 1, 8, 8)), self.client.predict("resnet", x[1400:1464].reshape(-1, 1, 8, 8)),
            rtol=0, atol=1e-4)

    def test_regression(self):
        spec = {"input_shape": [3],
                "layers": [{"linear": {"in_features": 3, "out_features": 16}},
                           {"batch_norm1d": {"num_features": 16}}, {"tanh": {}},
                           {"linear": {"in_features": 16, "out_features": 1}}],
                "loss": "LOSS_MSE", "optimizer": {"sgd": {"lr": 0.05, "momentum": 0.9}}}
        with open(path("reg.json"), "w") as f:
            json.dump(spec, f)
        rng = np.random.default_rng(4)
        x = rng.normal(size=(400, 3)).astype(np.float32)
        target = x @ np.array([1.5, -2.0, 0.5], np.float32) + 0.3
        data = np.column_stack([target, x])  # the target first: --label-column 0
        csv_path = path("reg.csv")
        np.savetxt(csv_path, data, delimiter=",", header="y,a,b,c", comments="", fmt="%.6g")
        run("create", "--spec", path("reg.json"), "--id", "reg")
        before = float(re.search(r"loss\s+([\d.]+)", run("eval", "reg", "--data", csv_path,
                                                           "--label-column", "y").stdout).group(1))
        run("train", "reg", "--data", csv_path, "--label-column", "y", "--epochs", "5",
            "--batch", "40")
        p = run("eval", "reg", "--data", csv_path, "--label-column", "0")
        after = float(re.search(r"loss\s+([\d.]+)", p.stdout).group(1))
        self.assertNotIn("accuracy", p.stdout)
        self.assertLess(after, 0.25 * before, p.stdout)
        lines = run("predict", "reg", "--data", csv_path, "--label-column", "y").stdout.split()
        self.assertEqual(lines[0], "output_0")
        self.assertEqual(len(lines), 401)

    def test_create_list_delete(self):
        p = run("create", "--spec", os.path.join(EXAMPLES, "mlp_bn.json"))
        picked = re.search(r"created model (\S+):", p.stdout).group(1)
        request = path("request.json")
        with open(os.path.join(EXAMPLES, "cnn_bn.json")) as f:
            spec = json.load(f)
        with open(request, "w") as f:
            json.dump({"id": "from-request", "spec": spec}, f)
        run("create", "--spec", request)
        p = run("list")
        self.assertIn(picked, p.stdout)
        self.assertIn("from-request", p.stdout)
        ids = [m["id"] for m in json.loads(run("list", "--json").stdout)["models"]]
        self.assertEqual(sorted(ids), sorted([picked, "from-request"]))
        p = run("delete", picked)
        self.assertIn(f"deleted model {picked}", p.stdout)
        self.assertNotIn(picked, run("list").stdout)
        run("delete", "from-request")
        self.assertIn("no models", run("list").stdout)

    def test_layer_options_and_fold(self):
        self.create("mlp_bn.json", "lo")
        p = run("layer", "lo", "bn1", "4", "--freeze")  # by name and by index
        self.assertIn("layer options of lo", p.stdout)
        rows = {r.split()[0]: r.split()[1:] for r in p.stdout.splitlines()[2:]}
        self.assertEqual(rows["bn1"], ["yes", "yes"])
        self.assertEqual(rows["bn2"], ["yes", "yes"])
        self.assertEqual(rows["fc2"], ["no", "yes"])
        run("layer", "lo", "fc1", "--no-trainable")
        options = {o["layer"]: o for o in get_json("lo")["layer_options"]}
        self.assertTrue(options["bn1"]["frozen"])
        self.assertFalse(options["fc1"]["trainable"])
        rows = [l.split() for l in run("get", "lo").stdout.splitlines()]
        self.assertIn(["0", "fc1", "linear", "no", "no"], rows)
        self.assertIn(["1", "bn1", "batch_norm1d", "yes", "yes"], rows)
        self.assertIn(["2", "relu1", "relu", "-", "-"], rows)
        # Freezing a Linear is refused, naming it; nothing changes.
        p = run("layer", "lo", "bn2", "fc2", "--freeze", "--no-trainable", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("INVALID_ARGUMENT", p.stderr)
        self.assertIn("'fc2'", p.stderr)
        self.assertTrue({o["layer"]: o for o in get_json("lo")["layer_options"]}["bn2"]
                        .get("trainable", False))
        self.assertEqual(run("layer", "lo", "bn1", check=False).returncode, 2)  # no flag

        run("train", "lo", "--data", self.train_csv, "--epochs", "1", "--batch", "64")
        run("mode", "lo", "eval")
        p = run("fold", "lo", "--as", "lo-folded")
        self.assertIn("folded 2 BatchNorm layer(s) of lo: 8 -> 6 layers", p.stdout)
        self.assertIn("created inference-only model lo-folded", p.stdout)
        p = run("get", "lo-folded")
        self.assertIn("(inference only", p.stdout)
        x = self.x_test[:64]
        np.testing.assert_allclose(self.client.predict("lo-folded", x),
                                   self.client.predict("lo", x), rtol=0, atol=1e-5)
        spec = json.loads(run("fold", "lo", "--json").stdout)
        self.assertEqual(len(spec["layers"]), 6)
        p = run("mode", "lo-folded", "train", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("FAILED_PRECONDITION", p.stderr)

    def test_adapt(self):
        self.create("mlp_bn.json", "ad")
        run("train", "ad", "--data", self.train_csv, "--epochs", "1", "--batch", "64")
        run("mode", "ad", "eval")
        shifted = write_csv("shifted.csv", self.x_test * 1.7 + 2.0)
        before = self.client.get_state("ad", include_optimizer=True)
        p = run("adapt", "ad", "--data", shifted, "--batch", "48")
        self.assertIn("adapted the BatchNorm statistics of ad to 200 samples", p.stdout)
        after = self.client.get_state("ad", include_optimizer=True)
        # The first BatchNorm's inputs are fc1(x); its running mean is now their mean.
        w, b = before["0.weight"].astype(np.float64), before["0.bias"].astype(np.float64)
        h = (self.x_test * 1.7 + 2.0).astype(np.float32).astype(np.float64) @ w.T + b
        np.testing.assert_allclose(after["1.running_mean"], h.mean(axis=0), rtol=1e-4,
                                   atol=1e-4)
        np.testing.assert_allclose(after["1.running_var"], h.var(axis=0, ddof=1), rtol=1e-4,
                                   atol=1e-4)
        self.assertEqual(int(after["1.num_batches_tracked"]),
                         int(before["1.num_batches_tracked"]) + 5)  # 48*4 + 8: 5 batches
        for k in before:
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                self.assertTrue(np.array_equal(before[k], after[k]), k)
        self.assertEqual(self.client.get_model("ad").mode, normd.pb.MODE_EVAL)
        p = run("adapt", "ad", "--data", os.path.join(EXAMPLES, "mlp_bn.json"), check=False)
        self.assertNotEqual(p.returncode, 0)

    def test_health_and_env(self):
        p = run("health")
        self.assertEqual(p.returncode, 0)
        self.assertIn("SERVING", p.stdout)
        p = run("list", server=False, env={"NORMCTL_SERVER": SERVER.address})
        self.assertEqual(p.returncode, 0)

    def test_errors(self):
        p = run("get", "nosuch", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("NOT_FOUND", p.stderr)
        self.assertIn("nosuch", p.stderr)
        self.assertEqual(p.stdout, "")

        for args in (["delete", "nosuch"], ["mode", "nosuch", "eval"], ["reset-stats", "nosuch"],
                     ["lr", "nosuch", "0.1"], ["eval", "nosuch", "--data", self.test_csv]):
            p = run(*args, check=False)
            self.assertEqual(p.returncode, 1, args)
            self.assertIn("NOT_FOUND", p.stderr, args)

        bad_json = path("bad.json")
        with open(bad_json, "w") as f:
            f.write('{"input_shape": [4], "layers": [{"linear": ')
        p = run("create", "--spec", bad_json, check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("bad.json", p.stderr)

        p = run("create", "--spec", path("missing.json"), check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("missing.json", p.stderr)

        with open(os.path.join(EXAMPLES, "mlp_bn.json")) as f:
            spec = json.load(f)
        spec["layers"][1]["batch_norm1d"]["num_features"] = 63
        wrong = path("wrong.json")
        with open(wrong, "w") as f:
            json.dump(spec, f)
        p = run("create", "--spec", wrong, "--id", "wrong", check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("INVALID_ARGUMENT", p.stderr)
        self.assertIn("63", p.stderr)

        self.create("mlp_bn.json", "m")
        p = run("create", "--spec", os.path.join(EXAMPLES, "mlp_bn.json"), "--id", "m",
                check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("ALREADY_EXISTS", p.stderr)

        few = write_csv("few.csv", self.x_train[:10, :12], self.y_train[:10])
        p = run("train", "m", "--data", few, check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("12 feature columns", p.stderr)

        broken = path("broken.csv")
        with open(broken, "w") as f:
            f.write(",".join(["1"] * 17) + "\n" + ",".join(["2"] * 17) + "\n"
                    + ",".join(["x"] + ["3"] * 16) + "\n")
        p = run("train", "m", "--data", broken, check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("broken.csv:3", p.stderr)

        ragged = path("ragged.csv")
        with open(ragged, "w") as f:
            f.write(",".join(["1"] * 17) + "\n" + ",".join(["2"] * 16) + "\n")
        p = run("eval", "m", "--data", ragged, check=False)
        self.assertEqual(p.returncode, 2)
        self.assertIn("ragged.csv:2", p.stderr)

        labels_out_of_range = write_csv("labels.csv", self.x_train[:40], self.y_train[:40] + 10)
        p = run("train", "m", "--data", labels_out_of_range, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("INVALID_ARGUMENT", p.stderr)

        p = run("mode", "m", "sideways", check=False)
        self.assertEqual(p.returncode, 2)
        p = run("frobnicate", check=False)
        self.assertEqual(p.returncode, 2)

        closed = f"127.0.0.1:{free_port()}"
        p = run("--server", closed, "--timeout", "2", "list", server=False, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("UNAVAILABLE", p.stderr)
        p = run("--server", closed, "--timeout", "2", "health", server=False, check=False)
        self.assertEqual(p.returncode, 1)

    def test_demo(self):
        out_dir = path("demo")
        os.makedirs(out_dir)
        p = run("demo", "--metrics-url", SERVER.metrics_url, "--samples", "3000", "--epochs",
                "2", "--serve-seconds", "2", "--out-dir", out_dir, "--progress", "lines")
        print(p.stdout)
        self.assertIn("DRIFT DETECTED at bn1", p.stdout)
        table = [l.split() for l in p.stdout.splitlines() if l.strip().startswith("bn1")]
        metrics_rows = [r for r in table if r[1:4] == ["mean", "shift", "/metrics"]]
        self.assertEqual(len(metrics_rows), 1, p.stdout)
        before, after = float(metrics_rows[0][4]), float(metrics_rows[0][5])
        self.assertGreater(after, 3 * before)
        # Step 8: AdaptStatistics brings the eval-mode drift back down and (the shift is
        # affine in the inputs) the accuracy back up.
        adapt_rows = [r for r in table if len(r) == 5]
        self.assertEqual(len(adapt_rows), 1, p.stdout)
        shifted_shift, adapted_shift = float(adapt_rows[0][1]), float(adapt_rows[0][2])
        self.assertLess(adapted_shift, shifted_shift / 3, p.stdout)
        m = re.search(r"Accuracy on shifted traffic: ([0-9.]+)% before, ([0-9.]+)% after "
                      r"adapting \(in-distribution: ([0-9.]+)%\)", p.stdout)
        self.assertIsNotNone(m, p.stdout)
        shifted_acc, adapted_acc, base_acc = (float(g) for g in m.groups())
        self.assertGreater(adapted_acc, shifted_acc, p.stdout)
        self.assertGreater(adapted_acc, base_acc - 10.0, p.stdout)
        for name in ("train.csv", "test.csv", "shifted.csv"):
            self.assertTrue(os.path.exists(os.path.join(out_dir, name)), name)
        self.assertEqual(self.client.get_model("demo").mode, normd.pb.MODE_EVAL)
        # A second run replaces the model it left behind.
        p = run("demo", "--samples", "1000", "--epochs", "1", "--serve-seconds", "1",
                "--progress", "off")
        self.assertIn("replacing it", p.stdout)


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""Run by wheel_test.py with the python of a venv the wheel was installed into (argv[1]), from
outside the source tree and without PYTHONPATH: the installed normd against a real normd.

- normd (stubs included) is imported from the venv, ships py.typed, and its version is the
  installed distribution's.
- fit() trains scikit-learn digits (tests/client/digits_test.py's split) to >= 95 % test
  accuracy with validation data, per-epoch learning rates and early stopping, and returns
  per-epoch records; the same seed gives the same history and another seed another one; early
  stopping stops when told; a torch DataLoader trains too; progress=False prints nothing.
- predict()/evaluate() batch an array too large for one request under the server's
  --max-batch-elements; every call takes a timeout, a tiny one ends DEADLINE_EXCEEDED.
"""

import contextlib
import io
import json
import os
import pydoc
import socket
import sys
import time
import unittest

import grpc
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import normd
from normd_server import NormdServer

VENV = os.path.realpath(sys.argv.pop(1))
# The server's limit on a request's input and activations: the default 1024-row requests of
# predict/evaluate pass (1024 x 128 hidden units = 131072), a 5400-row array in one does not.
MAX_BATCH_ELEMENTS = 140000


def spec(seed=0):
    return {
        "input_shape": [64],
        "layers": [
            {"name": "fc1", "linear": {"in_features": 64, "out_features": 128}},
            {"name": "bn1", "batch_norm1d": {"num_features": 128}},
            {"name": "relu1", "relu": {}},
            {"name": "out", "linear": {"in_features": 128, "out_features": 10}},
        ],
        "loss": "LOSS_CROSS_ENTROPY",
        "optimizer": {"adam": {"lr": 0.001}},
        "seed": seed,
    }


def digits():
    """digits_test.py's split and scaling; the training part split again for validation."""
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data.astype(np.float32), data.target.astype(np.int64), test_size=0.2,
        random_state=0, stratify=data.target)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    x_fit, x_val, y_fit, y_val = train_test_split(x_train, y_train, test_size=0.15,
                                                  random_state=0, stratify=y_train)
    return x_fit, y_fit, x_val, y_val, x_test, y_test


def schedule(epoch):
    return 2e-3 if epoch < 4 else 1e-3 * 0.8 ** (epoch - 4)


class InstalledWheelTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.x, cls.y, cls.x_val, cls.y_val, cls.x_test, cls.y_test = digits()
        cls.server = NormdServer(["--max-batch-elements", str(MAX_BATCH_ELEMENTS)]).__enter__()
        cls.c = cls.server.client
        cls.count = 0

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)

    def new_model(self, seed=0):
        type(self).count += 1
        return self.c.create_model(spec(seed), id=f"m{self.count}").id

    def test_imports_the_installed_wheel(self):
        for module in (normd, normd.client, normd.training, normd.v1.normd_pb2,
                       normd.health.v1.health_pb2):
            path = os.path.realpath(module.__file__)
            self.assertTrue(path.startswith(VENV + os.sep), f"{module.__name__} from {path}")
        source = os.path.realpath(os.environ["NORMD_SOURCE_DIR"])
        self.assertFalse(any(p and os.path.realpath(p).startswith(source) for p in sys.path),
                         f"the source tree is on sys.path: {sys.path}")
        self.assertTrue(os.path.isfile(os.path.join(os.path.dirname(normd.__file__), "py.typed")))
        import importlib.metadata
        self.assertEqual(normd.__version__, importlib.metadata.version("normd"))
        doc = pydoc.render_doc(normd.Client, renderer=pydoc.plaintext)
        for name in ("fit(", "predict(", "evaluate(", "timeout", "batch_size"):
            self.assertIn(name, doc)

    def test_fit_digits(self):
        mid = self.new_model()
        history = self.c.fit(
            mid, self.x, self.y, epochs=20, batch_size=32, shuffle=True, seed=0,
            validation_data=(self.x_val, self.y_val), lr=schedule,
            early_stopping=normd.EarlyStopping("val_loss", patience=5))
        for record in history:
            print({k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()})
        print(f"stopped_early={history.stopped_early} best_epoch={history.best_epoch}")
        self.assertGreaterEqual(len(history), 6)
        self.assertEqual([r["epoch"] for r in history], list(range(1, len(history) + 1)))
        for i, record in enumerate(history):
            self.assertAlmostEqual(record["lr"], schedule(i), places=12)
            self.assertEqual(record["samples"], len(self.x))
            self.assertEqual(set(record), {"epoch", "lr", "last_lr", "grad_norm", "loss",
                                           "samples", "step", "seconds", "samples_per_s",
                                           "val_loss", "val_accuracy"})
            # No schedule on the model: every step used fit's rate (sent as float32).
            self.assertAlmostEqual(record["last_lr"], schedule(i), delta=1e-7 * schedule(i))
            self.assertGreater(record["grad_norm"], 0.0)
        steps_per_epoch = -(-len(self.x) // 32)
        self.assertEqual(history[-1]["step"], steps_per_epoch * len(history))
        self.assertLess(history[-1]["loss"], history[0]["loss"])
        json.dumps(history)  # plain records (pandas.DataFrame(history) takes them as they are)
        # The model's optimizer holds the last epoch's rate.
        self.assertAlmostEqual(self.c.get_model(mid).spec.optimizer.adam.lr,
                               schedule(len(history) - 1), places=6)
        # The validation figures are Evaluate's on the final model.
        v = self.c.evaluate(mid, self.x_val, labels=self.y_val)
        self.assertAlmostEqual(v.accuracy, history[-1]["val_accuracy"], places=9)
        if history.stopped_early:
            best = min(r["val_loss"] for r in history)
            self.assertEqual(history.best, best)
            self.assertEqual(len(history) - history.best_epoch, 5)

        self.c.set_mode(mid, "eval")
        predicted = self.c.predict(mid, self.x_test).argmax(axis=1)
        accuracy = float((predicted == self.y_test).mean())
        print(f"fit() digits: {len(self.x)} train / {len(self.x_val)} validation / "
              f"{len(self.x_test)} test, {len(history)} epochs, test accuracy "
              f"{100 * accuracy:.2f}%, {history[-1]['samples_per_s']:.0f} samples/s last epoch")
        self.assertGreaterEqual(accuracy, 0.95)

        # predict/evaluate of an array larger than one request may be: batched by themselves.
        x_big = np.tile(self.x_test, (15, 1))
        y_big = np.tile(self.y_test, 15)
        self.assertGreater(x_big.size, MAX_BATCH_ELEMENTS)
        with self.assertRaises(normd.NormdError) as e:
            self.c.predict(mid, x_big, batch_size=None)
        self.assertIn(f"limit of {MAX_BATCH_ELEMENTS} elements", e.exception.message)
        with self.assertRaises(normd.NormdError):
            self.c.evaluate(mid, x_big, labels=y_big, batch_size=None)
        small = self.c.predict(mid, self.x_test)
        big = self.c.predict(mid, x_big)
        self.assertEqual(big.shape, (len(x_big), 10))
        np.testing.assert_allclose(big, np.tile(small, (15, 1)), rtol=0, atol=1e-5)
        whole = self.c.evaluate(mid, self.x_test, labels=self.y_test)
        batched = self.c.evaluate(mid, x_big, labels=y_big, batch_size=500)
        self.assertEqual(batched.samples, len(x_big))
        self.assertAlmostEqual(batched.accuracy, whole.accuracy, places=9)
        self.assertAlmostEqual(batched.loss, whole.loss, delta=1e-5 * abs(whole.loss) + 1e-7)
        self.assertAlmostEqual(whole.accuracy, accuracy, places=6)

    def fit_quiet(self, mid, **options):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            history = self.c.fit(mid, self.x, self.y, **options)
        return history, out.getvalue(), err.getvalue()

    def test_same_seed_same_history(self):
        options = dict(epochs=2, batch_size=64, seed=7,
                       validation_data=(self.x_val, self.y_val), progress=False)
        runs = [self.fit_quiet(self.new_model(), **options)[0] for _ in range(2)]
        other = self.fit_quiet(self.new_model(), **dict(options, seed=8))[0]
        figures = lambda h: [(r["loss"], r["val_loss"], r["val_accuracy"]) for r in h]  # noqa
        self.assertEqual(figures(runs[0]), figures(runs[1]))
        self.assertNotEqual(figures(runs[0]), figures(other))
        unshuffled = [self.fit_quiet(self.new_model(), epochs=1, shuffle=False,
                                     progress=False, seed=s)[0] for s in (1, 2)]
        self.assertEqual(unshuffled[0][0]["loss"], unshuffled[1][0]["loss"])

    def test_early_stopping(self):
        # No epoch can beat the first by a whole 1.0 of accuracy: epochs 2 and 3 are the two
        # without improvement that patience=2 allows, then fit stops.
        history, _, _ = self.fit_quiet(
            self.new_model(), epochs=10, validation_data=(self.x_val, self.y_val),
            early_stopping=normd.EarlyStopping("val_accuracy", patience=2, min_delta=1.0),
            progress=False)
        self.assertEqual(len(history), 3)
        self.assertTrue(history.stopped_early)
        self.assertEqual(history.best_epoch, 1)
        self.assertEqual(history.best, history[0]["val_accuracy"])
        self.assertFalse(history.restored)
        # restore_best puts the first epoch's parameters and buffers back: Evaluate gives its
        # figures again, though two more epochs ran.
        mid = self.new_model()
        history, _, _ = self.fit_quiet(
            mid, epochs=10, validation_data=(self.x_val, self.y_val),
            early_stopping=normd.EarlyStopping("val_accuracy", patience=2, min_delta=1.0,
                                               restore_best=True), progress=False)
        self.assertEqual((len(history), history.restored), (3, True))
        v = self.c.evaluate(mid, self.x_val, labels=self.y_val)
        self.assertEqual((v.loss, v.accuracy),
                         (history[0]["val_loss"], history[0]["val_accuracy"]))
        self.assertNotEqual(v.loss, history[-1]["val_loss"])
        with self.assertRaises(ValueError):  # nothing to monitor without validation data
            self.c.fit(self.new_model(), self.x, self.y,
                       early_stopping=normd.EarlyStopping("val_loss"), progress=False)

    def test_dataloader(self):
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        dataset = TensorDataset(torch.from_numpy(self.x), torch.from_numpy(self.y))
        loader = DataLoader(dataset, batch_size=50, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        self.assertNotEqual(len(dataset) % 50, 1)
        mid = self.new_model()
        history = self.c.fit(mid, loader, epochs=3, lr=[2e-3, 1e-3], progress=False,
                             validation_data=(self.x_val, self.y_val))
        self.assertEqual([r["samples"] for r in history], [len(dataset)] * 3)
        self.assertEqual([r["lr"] for r in history], [2e-3, 1e-3, 1e-3])
        self.assertLess(history[-1]["loss"], history[0]["loss"])
        self.assertGreater(history[-1]["val_accuracy"], 0.9)
        with self.assertRaises(ValueError):  # one pass only: cannot run two epochs
            self.c.fit(mid, iter(loader), epochs=2, progress=False)

    def test_progress_and_silence(self):
        _, out, err = self.fit_quiet(self.new_model(), epochs=1, progress=False,
                                     validation_data=(self.x_val, self.y_val))
        self.assertEqual((out, err), ("", ""))
        _, out, err = self.fit_quiet(self.new_model(), epochs=2, progress=True,
                                     validation_data=(self.x_val, self.y_val))
        self.assertIn("epoch 2/2", err)
        self.assertIn("samples/s", err)
        self.assertIn("val_accuracy=", err)

    def test_timeouts_and_errors(self):
        # A listener that never answers: every call waits for its deadline. (gRPC 1.51 may still
        # complete a call given 1 us on a connected channel, as its timers count milliseconds,
        # so the deadline is proven where nothing can answer in time.) The Client's default is
        # 600 s: a call that ends well before it ended on its own timeout=.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)
            address = f"127.0.0.1:{silent.getsockname()[1]}"
            with normd.Client(address, timeout=600, stream_timeout=600) as c:
                mid = "m"
                calls = {
                    "predict": lambda: c.predict(mid, self.x_test, timeout=0.3),
                    "evaluate": lambda: c.evaluate(mid, self.x_test, labels=self.y_test,
                                                   timeout=0.3),
                    "get_model": lambda: c.get_model(mid, timeout=0.3),
                    "list_models": lambda: c.list_models(timeout=0.3),
                    "train_step": lambda: c.train_step(mid, self.x[:32], labels=self.y[:32],
                                                       timeout=0.3),
                    "set_lr": lambda: c.set_lr(mid, 0.1, timeout=0.3),
                    "get_state": lambda: c.get_state(mid, timeout=0.3),
                    "fit": lambda: c.fit(mid, self.x, self.y, progress=False,
                                         stream_timeout=0.3),
                    "fit lr": lambda: c.fit(mid, self.x, self.y, progress=False, lr=0.1,
                                            timeout=0.3),
                    "health": lambda: c.health(timeout=0.3),
                }
                for name, call in calls.items():
                    start = time.monotonic()
                    with self.assertRaises(normd.NormdError, msg=name) as e:
                        call()
                    self.assertEqual(e.exception.code, grpc.StatusCode.DEADLINE_EXCEEDED, name)
                    self.assertLess(time.monotonic() - start, 300, name)
            with normd.Client(address, timeout=0.3) as c:  # the Client's default deadline
                with self.assertRaises(normd.NormdError) as e:
                    c.list_models()
                self.assertEqual(e.exception.code, grpc.StatusCode.DEADLINE_EXCEEDED)
        # A deadline on a real normd passes through as well.
        mid = self.new_model()
        self.assertEqual(self.c.get_model(mid, timeout=30).id, mid)
        # Input that cannot be split by rows goes to the server whole and gets its answer.
        with self.assertRaises(normd.NormdError) as e:
            self.c.evaluate(mid, self.x_test, labels=self.y_test[:-1], batch_size=100)
        self.assertEqual(e.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        with self.assertRaises(normd.NormdError) as e:
            self.c.predict(mid, np.float32(1.0))
        self.assertEqual(e.exception.code, grpc.StatusCode.INVALID_ARGUMENT)
        for bad in (0, -5, 2.5):
            with self.assertRaises(ValueError):
                self.c.predict(mid, self.x_test, batch_size=bad)
        with self.assertRaises(normd.NormdError) as e:
            self.c.predict("no-such-model", self.x_test)
        self.assertEqual(e.exception.code, grpc.StatusCode.NOT_FOUND)
        self.assertIn("no-such-model", e.exception.message)


if __name__ == "__main__":
    unittest.main(verbosity=2)

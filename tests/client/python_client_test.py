"""Every normd.Client wrapper against a real normd on loopback."""

import json
import math
import os
import sys
import threading
import time
import unittest
from concurrent import futures

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import normd  # noqa: E402
from normd import pb  # noqa: E402
from normd_server import NormdServer  # noqa: E402

SERVER = None


def setUpModule():
    global SERVER
    SERVER = NormdServer().__enter__()


def tearDownModule():
    SERVER.__exit__(None, None, None)


def mlp_spec(seed=1, lr=0.1):
    return {
        "input_shape": [6],
        "layers": [
            {"name": "fc1", "linear": {"in_features": 6, "out_features": 12}},
            {"name": "bn1", "batch_norm1d": {"num_features": 12}},
            {"name": "relu1", "relu": {}},
            {"name": "out", "linear": {"in_features": 12, "out_features": 3}},
        ],
        "loss": "LOSS_CROSS_ENTROPY",
        "optimizer": {"sgd": {"lr": lr, "momentum": 0.9}},
        "seed": seed,
    }


def linear_spec():
    return {"input_shape": [3], "layers": [{"linear": {"in_features": 3, "out_features": 2}}],
            "loss": "LOSS_MSE", "optimizer": {"sgd": {"lr": 0.05}}}


def batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    return x, labels


class ClientTest(unittest.TestCase):
    def setUp(self):
        self.c = SERVER.client
        self.mid = self._testMethodName.split(".")[-1].replace("_", "-")
        self.c.create_model(mlp_spec(), id=self.mid)

    def tearDown(self):
        try:
            self.c.delete_model(self.mid)
        except normd.NormdError:
            pass

    def expect_error(self, code, fn, *args, **kwargs):
        with self.assertRaises(normd.NormdError) as ctx:
            fn(*args, **kwargs)
        self.assertEqual(ctx.exception.code, code, str(ctx.exception))
        self.assertTrue(ctx.exception.message)
        return ctx.exception

    # -- tensors ----------------------------------------------------------------------------

    def test_tensor_encoding_round_trip(self):
        a = np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7
        t = normd.to_tensor(a)
        self.assertEqual(list(t.shape), [2, 3, 4])
        self.assertEqual(len(t.raw), 24 * 4)
        self.assertEqual(len(t.values), 0)
        np.testing.assert_array_equal(normd.from_tensor(t), a.astype(np.float32))
        v = pb.Tensor(shape=[2, 2], values=[1, 2, 3, 4])
        np.testing.assert_array_equal(normd.from_tensor(v), [[1, 2], [3, 4]])
        with self.assertRaises(normd.NormdError):
            normd.from_tensor(pb.Tensor(shape=[3], raw=b"\0" * 8))

    # -- lifecycle --------------------------------------------------------------------------

    def test_health(self):
        self.assertEqual(self.c.health(), "SERVING")

    def test_create_get_list_delete(self):
        m = self.c.get_model(self.mid)
        self.assertEqual(m.id, self.mid)
        self.assertEqual(m.mode, pb.MODE_TRAIN)
        self.assertEqual(list(m.output_shape), [3])
        self.assertEqual(m.parameter_count, 6 * 12 + 12 + 2 * 12 + 12 * 3 + 3)
        self.assertEqual([bn.layer for bn in m.batch_norms], ["bn1"])
        # The spec as a protobuf message and as a JSON string work as well as a dict.
        spec = pb.ModelSpec()
        spec.CopyFrom(m.spec)
        m2 = self.c.create_model(spec, id=self.mid + "-2")
        m3 = self.c.create_model(json.dumps(mlp_spec()), id=self.mid + "-3")
        ids = {x.id for x in self.c.list_models()}
        self.assertTrue({self.mid, m2.id, m3.id} <= ids)
        self.c.delete_model(m2.id)
        self.c.delete_model(m3.id)
        ids = {x.id for x in self.c.list_models()}
        self.assertNotIn(m2.id, ids)
        err = self.expect_error(grpc.StatusCode.NOT_FOUND, self.c.get_model, m2.id)
        self.assertIn(m2.id, err.message)

    def test_server_picks_an_id(self):
        m = self.c.create_model(mlp_spec())
        self.assertTrue(m.id)
        self.c.delete_model(m.id)

    def test_create_errors(self):
        self.expect_error(grpc.StatusCode.ALREADY_EXISTS, self.c.create_model, mlp_spec(),
                          id=self.mid)
        bad = mlp_spec()
        bad["layers"][1]["batch_norm1d"]["num_features"] = 11
        self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, self.c.create_model, bad,
                          id=self.mid + "-bad")
        self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, self.c.create_model, mlp_spec(),
                          id="../escape")

    def test_set_mode(self):
        m = self.c.set_mode(self.mid, "eval")
        self.assertEqual(m.mode, pb.MODE_EVAL)
        m = self.c.set_mode(self.mid, "train", freeze_running_stats=True)
        self.assertEqual(m.mode, pb.MODE_TRAIN)
        self.assertTrue(m.running_stats_frozen)
        m = self.c.set_mode(self.mid, pb.MODE_TRAIN, freeze_running_stats=False)
        self.assertFalse(m.running_stats_frozen)
        self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, self.c.set_mode, self.mid,
                          pb.MODE_UNSPECIFIED)

    # -- compute ----------------------------------------------------------------------------

    def test_forward_matches_numpy_for_known_weights(self):
        self.c.create_model(linear_spec(), id=self.mid + "-lin")
        w = np.array([[1.0, -2.0, 0.5], [0.25, 0.0, 3.0]], dtype=np.float32)
        b = np.array([0.1, -0.2], dtype=np.float32)
        self.c.set_state(self.mid + "-lin", {"0.weight": w, "0.bias": b})
        x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
        y = self.c.predict(self.mid + "-lin", x)
        self.assertEqual(y.dtype, np.float32)
        np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-6, atol=1e-6)
        self.c.delete_model(self.mid + "-lin")

    def test_forward_eval_is_repeatable_and_layer_stats(self):
        x, labels = batch()
        self.c.train_step(self.mid, x, labels=labels)
        self.c.set_mode(self.mid, "eval")
        before = self.c.get_state(self.mid)
        r1 = self.c.forward(self.mid, x, layer_stats=True)
        r2 = self.c.forward(self.mid, x)
        self.assertEqual(r1.output.shape, (16, 3))
        np.testing.assert_array_equal(r1.output, r2.output)
        after = self.c.get_state(self.mid)
        for name in before:
            np.testing.assert_array_equal(before[name], after[name], name)
        self.assertEqual([s.kind for s in r1.layer_stats],
                         ["Linear", "BatchNorm1d", "ReLU", "Linear"])
        self.assertEqual(r1.layer_stats[1].name, "bn1")
        self.assertAlmostEqual(r1.layer_stats[1].input_mean, float(
            (x @ before["0.weight"].T + before["0.bias"]).mean()), places=4)
        self.assertEqual(r2.layer_stats, [])

    def test_forward_backward_apply(self):
        x, _ = batch()
        step0 = self.c.get_model(self.mid).step
        r = self.c.forward(self.mid, x, retain_for_backward=True)
        self.assertNotEqual(r.forward_id, 0)
        grad_in = self.c.backward(self.mid, r.forward_id, np.ones_like(r.output),
                                  return_grad_input=True)
        self.assertEqual(grad_in.shape, x.shape)
        self.assertTrue(np.isfinite(grad_in).all())
        self.assertEqual(self.c.apply_gradients(self.mid), step0 + 1)
        r = self.c.forward(self.mid, x, retain_for_backward=True)
        self.assertIsNone(self.c.backward(self.mid, r.forward_id, np.ones_like(r.output)))
        self.expect_error(grpc.StatusCode.FAILED_PRECONDITION, self.c.backward, self.mid,
                          r.forward_id + 1000, np.ones_like(r.output))

    def test_train_step_learns(self):
        x, labels = batch(64, seed=3)
        first = self.c.train_step(self.mid, x, labels=labels)
        self.assertEqual(first.samples, 64)
        for _ in range(30):
            last = self.c.train_step(self.mid, x, labels=labels)
        self.assertEqual(last.step, first.step + 30)
        self.assertLess(last.loss, first.loss)
        self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, self.c.train_step, self.mid, x,
                          labels=np.full(64, 7))
        self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, self.c.train_step, self.mid,
                          np.ones((4, 5), np.float32), labels=np.zeros(4, np.int64))

    def test_train_step_with_target(self):
        mid = self.mid + "-reg"
        self.c.create_model(linear_spec(), id=mid)
        x = np.random.default_rng(2).normal(size=(32, 3)).astype(np.float32)
        target = x @ np.array([[1, 2], [0, -1], [3, 0]], np.float32)
        first = self.c.train_step(mid, x, target=target)
        for _ in range(20):
            last = self.c.train_step(mid, x, target=target)
        self.assertLess(last.loss, first.loss)
        e = self.c.evaluate(mid, x, target=target)
        self.assertEqual(e.samples, 32)
        self.assertGreater(e.loss, 0)
        with self.assertRaises(ValueError):
            self.c.train_step(mid, x)
        self.c.delete_model(mid)

    def test_train_stream(self):
        data = [batch(32, seed=s) for s in range(6)]
        responses = list(self.c.train_stream(self.mid, data))
        self.assertEqual(len(responses), 6)
        steps = [r.step for r in responses]
        self.assertEqual(steps, list(range(steps[0], steps[0] + 6)))
        self.assertTrue(all(r.samples == 32 for r in responses))
        self.assertEqual(self.c.get_model(self.mid).step, steps[-1])
        bad = data[:2] + [(data[2][0], np.full(32, 9))]
        with self.assertRaises(normd.NormdError) as ctx:
            list(self.c.train_stream(self.mid, bad))
        self.assertEqual(ctx.exception.code, grpc.StatusCode.INVALID_ARGUMENT)

    def test_evaluate_changes_nothing(self):
        x, labels = batch(40, seed=5)
        self.c.train_step(self.mid, x, labels=labels)
        before_model = self.c.get_model(self.mid)
        before = self.c.get_state(self.mid)
        e = self.c.evaluate(self.mid, x, labels=labels)
        self.assertEqual(e.samples, 40)
        self.assertGreaterEqual(e.accuracy, 0.0)
        self.assertLessEqual(e.accuracy, 1.0)
        self.c.set_mode(self.mid, "eval")
        logits = self.c.predict(self.mid, x)
        self.assertAlmostEqual(e.accuracy, float((logits.argmax(1) == labels).mean()), places=6)
        self.assertEqual(self.c.get_model(self.mid).step, before_model.step)
        after = self.c.get_state(self.mid)
        for name in before:
            np.testing.assert_array_equal(before[name], after[name], name)

    # -- state ------------------------------------------------------------------------------

    def test_get_set_state_and_reset(self):
        x, labels = batch(32)
        for _ in range(3):
            self.c.train_step(self.mid, x, labels=labels)
        state = self.c.get_state(self.mid)
        self.assertEqual(list(state), ["0.weight", "0.bias", "1.weight", "1.bias",
                                       "1.running_mean", "1.running_var",
                                       "1.num_batches_tracked", "3.weight", "3.bias"])
        self.assertEqual(state["0.weight"].shape, (12, 6))
        self.assertEqual(state["1.num_batches_tracked"].shape, ())
        self.assertEqual(float(state["1.num_batches_tracked"]), 3.0)
        self.assertFalse(np.allclose(state["1.running_mean"], 0))

        new = {k: v.copy() for k, v in state.items()}
        new["3.bias"] = np.array([1.0, 2.0, 3.0], np.float32)
        self.c.set_state(self.mid, new)
        np.testing.assert_array_equal(self.c.get_state(self.mid)["3.bias"], [1, 2, 3])
        self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, self.c.set_state, self.mid,
                          {"3.bias": np.zeros(4, np.float32)}, strict=False)
        self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, self.c.set_state, self.mid,
                          {"3.bias": np.zeros(3, np.float32)}, strict=True)

        m = self.c.reset_running_stats(self.mid)
        self.assertEqual(m.id, self.mid)
        reset = self.c.get_state(self.mid)
        np.testing.assert_array_equal(reset["1.running_mean"], np.zeros(12))
        np.testing.assert_array_equal(reset["1.running_var"], np.ones(12))
        self.assertEqual(float(reset["1.num_batches_tracked"]), 0.0)
        np.testing.assert_array_equal(reset["0.weight"], state["0.weight"])

        with_opt = self.c.get_state(self.mid, include_optimizer=True)
        self.assertGreater(len(with_opt), len(state))

    def test_update_optimizer(self):
        m = self.c.update_optimizer(self.mid, {"sgd": {"lr": 0.02, "momentum": 0.5}})
        self.assertAlmostEqual(m.spec.optimizer.sgd.lr, 0.02, places=6)
        self.assertAlmostEqual(m.spec.optimizer.sgd.momentum, 0.5, places=6)
        m = self.c.set_lr(self.mid, 0.005)
        self.assertAlmostEqual(m.spec.optimizer.sgd.lr, 0.005, places=7)
        self.assertAlmostEqual(m.spec.optimizer.sgd.momentum, 0.5, places=6)
        self.assertAlmostEqual(self.c.get_model(self.mid).spec.optimizer.sgd.lr, 0.005, places=7)
        self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, self.c.update_optimizer, self.mid,
                          {"adam": {"lr": 0.01}})

    def test_recipe(self):
        """Schedule, clipping, no-decay groups and label smoothing through the client: set at
        creation and by update_recipe; the figures every step reports."""
        spec = mlp_spec(seed=2, lr=0.1)
        spec["optimizer"]["lr_schedule"] = {"warmup": {"steps": 2, "start_factor": 0.5},
                                            "step": {"step_size": 3, "gamma": 0.5}}
        spec["optimizer"]["clip_grad_norm"] = {"max_norm": 0.25}
        spec["optimizer"]["no_weight_decay_on_norm_and_bias"] = True
        spec["loss_options"] = {"label_smoothing": 0.1}
        mid = self.mid + "-r"
        m = self.c.create_model(spec, id=mid)
        try:
            base = float(np.float32(0.1))
            want = [0.5 * base, 0.75 * base, base, base, base, 0.5 * base, 0.5 * base]
            self.assertAlmostEqual(m.learning_rate, want[0], places=15)
            clipped = 0
            for t in range(6):
                x, labels = batch(seed=10 + t)
                r = self.c.train_step(mid, x, labels=labels)
                self.assertAlmostEqual(r.learning_rate, want[t], places=15)
                self.assertGreater(r.grad_norm, 0.0)
                clipped += r.grad_norm > 0.25
            self.assertGreater(clipped, 0)
            self.assertAlmostEqual(self.c.get_model(mid).learning_rate, want[6], places=15)
            self.assertEqual(float(self.c.get_state(mid, include_optimizer=True)[
                "optimizer.lr_scheduler.last_epoch"]), 6.0)

            # update_recipe changes only what it is given; a new schedule starts at step 0.
            m = self.c.update_recipe(mid, lr_schedule={"cosine": {"t_max": 4}})
            self.assertEqual(m.spec.optimizer.lr_schedule.cosine.t_max, 4)
            self.assertEqual(m.spec.optimizer.clip_grad_norm.max_norm, 0.25)
            self.assertTrue(m.spec.optimizer.no_weight_decay_on_norm_and_bias)
            self.assertAlmostEqual(m.learning_rate, base, places=15)
            self.assertEqual(m.spec.loss_options.label_smoothing, 0.1)
            m = self.c.update_recipe(mid, max_grad_norm=None, no_weight_decay_on_norm_and_bias=False)
            self.assertFalse(m.spec.optimizer.HasField("clip_grad_norm"))
            self.assertFalse(m.spec.optimizer.no_weight_decay_on_norm_and_bias)
            self.assertTrue(m.spec.optimizer.HasField("lr_schedule"))
            # One step under the cosine, then set_lr: the schedule and its progress stay, and
            # the factor of step 1 applies to the new base rate (a reset would give 0.2).
            x, labels = batch(seed=20)
            self.c.train_step(mid, x, labels=labels)
            m = self.c.set_lr(mid, 0.2)
            self.assertEqual(m.spec.optimizer.lr_schedule.cosine.t_max, 4)
            lr1 = float(np.float32(0.2)) * (1 + math.cos(math.pi / 4)) / 2
            self.assertAlmostEqual(m.learning_rate, lr1, places=15)

            # ApplyGradients reports the same figures.
            f = self.c.forward(mid, batch(seed=30)[0], retain_for_backward=True)
            self.c.backward(mid, f.forward_id, np.full(f.output.shape, 0.1, np.float32))
            a = self.c.apply_gradients_response(mid)
            self.assertEqual(a.step, 8)
            self.assertAlmostEqual(a.learning_rate, lr1, places=15)
            self.assertTrue(np.isfinite(a.grad_norm))
            self.assertGreater(a.grad_norm, 0.0)

            # Bad values: INVALID_ARGUMENT, nothing changed.
            before = self.c.get_model(mid)
            e = self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, self.c.update_recipe, mid,
                                  max_grad_norm=-1.0)
            self.assertIn("clip_grad_norm.max_norm must be > 0", e.message)
            e = self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, self.c.update_recipe, mid,
                                  lr_schedule={"cosine": {"t_max": 0}})
            self.assertIn("cosine.t_max must be >= 1", e.message)
            self.assertEqual(self.c.get_model(mid), before)
            bad = mlp_spec()
            bad["loss_options"] = {"label_smoothing": 1.5}
            e = self.expect_error(grpc.StatusCode.INVALID_ARGUMENT, self.c.create_model, bad,
                                  id=mid + "-bad")
            self.assertIn("label_smoothing must be in [0, 1)", e.message)

            # fit's history follows the model's schedule.
            self.c.update_recipe(mid, lr_schedule={"step": {"step_size": 2, "gamma": 0.1}})
            x = np.concatenate([batch(seed=40 + i)[0] for i in range(4)])
            y = np.concatenate([batch(seed=40 + i)[1] for i in range(4)])
            history = self.c.fit(mid, x, y, epochs=2, batch_size=32, progress=False)
            # Two steps per epoch: the first epoch ends at t = 1, the second at t = 3.
            lr = float(np.float32(0.2))
            self.assertAlmostEqual(history[0]["last_lr"], lr, places=12)
            self.assertAlmostEqual(history[1]["last_lr"], lr * 0.1, places=12)
            self.assertGreater(history[1]["grad_norm"], 0.0)
        finally:
            self.c.delete_model(mid)

    def test_save_model(self):
        x, labels = batch()
        r = self.c.train_step(self.mid, x, labels=labels)
        step = self.c.save_model(self.mid)  # the test server has a --data-dir
        self.assertEqual(step, r.step)

    def test_unknown_model_everywhere(self):
        x, labels = batch(4)
        calls = [
            (self.c.get_model,), (self.c.delete_model,), (self.c.set_mode, "eval"),
            (self.c.forward, x), (self.c.apply_gradients,), (self.c.reset_running_stats,),
            (self.c.get_state,), (self.c.set_state, {}), (self.c.save_model,),
            (self.c.update_optimizer, {"sgd": {"lr": 0.1}}),
        ]
        for fn, *rest in calls:
            err = self.expect_error(grpc.StatusCode.NOT_FOUND, fn, "no-such-model", *rest)
            self.assertIn("no-such-model", err.message, fn.__name__)
        self.expect_error(grpc.StatusCode.NOT_FOUND, self.c.train_step, "no-such-model", x,
                          labels=labels)
        self.expect_error(grpc.StatusCode.NOT_FOUND, self.c.evaluate, "no-such-model", x,
                          labels=labels)

    def test_deadline(self):
        # Every call carries the client's deadline: one already past fails without running.
        # (A tiny positive timeout is not enough: gRPC rounds deadlines up to the millisecond,
        # and a loopback call can finish within it.)
        late = normd.Client(SERVER.address, timeout=-1.0)
        self.expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, late.create_model, mlp_spec(),
                          id=self.mid + "-late")
        late.close()
        self.expect_error(grpc.StatusCode.NOT_FOUND, self.c.get_model, self.mid + "-late")


class ServerGoneTest(unittest.TestCase):
    """A client whose server has just stopped: train_stream must fail promptly.

    With gRPC Python 1.51's retry filter on (the channel default), a stream opened while the
    channel reconnects got its UNAVAILABLE status but its iterator waited forever for operations
    the core never completed: 16 of 600 such streams hung before normd.Client turned retries
    off. A stand-in Trainer answers TrainStream so the client connects first; no normd is needed.
    """

    CYCLES = 40
    STREAMS_PER_CYCLE = 6

    @staticmethod
    def start_stand_in():
        def train_stream(requests, context):
            for step, _ in enumerate(requests, 1):
                yield pb.TrainStepResponse(step=step).SerializeToString()
        handler = grpc.method_handlers_generic_handler(
            "normd.v1.Trainer", {"TrainStream": grpc.stream_stream_rpc_method_handler(
                train_stream)})
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return server, f"127.0.0.1:{port}"

    def test_train_stream_after_the_server_stopped_fails_promptly(self):
        x, labels = batch(4)
        outcomes = []  # per stream: a status code name, or "HUNG"
        for _ in range(self.CYCLES):
            server, address = self.start_stand_in()
            client = normd.Client(address, timeout=5, stream_timeout=20)
            first = next(client.train_stream("m", [(x, labels)]))
            self.assertEqual(first.step, 1)
            server.stop(0)
            readers = []
            for i in range(self.STREAMS_PER_CYCLE):
                stop = threading.Event()

                def batches(stop=stop):
                    while not stop.is_set():
                        yield x, labels

                result = {}

                def read(result=result):
                    try:
                        for _ in client.train_stream("m", batches()):
                            pass
                        result["code"] = "OK"
                    except normd.NormdError as e:
                        result["code"] = e.code.name
                reader = threading.Thread(target=read, daemon=True)  # left behind if it hangs
                reader.start()
                readers.append((reader, stop, result))
                time.sleep(0.002 * i)
            for reader, stop, result in readers:
                reader.join(timeout=5)
                stop.set()
                outcomes.append(result.get("code", "HUNG"))
            client.close()
        counts = {code: outcomes.count(code) for code in set(outcomes)}
        self.assertEqual(len(outcomes), self.CYCLES * self.STREAMS_PER_CYCLE)
        self.assertEqual(set(counts) - {"UNAVAILABLE", "CANCELLED"}, set(), counts)


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""AdaptStatistics (AdaBN / "precise BN") against PyTorch, over gRPC to a real normd.

After streaming batches of different sizes, every tracked BatchNorm layer's running_mean /
running_var must equal (to 1e-5) the mean and unbiased variance of all the values that reached
that layer, collected in PyTorch with forward hooks over the same batches in train mode (Dropout
off). Weights, optimizer state, step and mode must not change; num_batches_tracked grows by the
number of batches. Every failure (bad batch, empty stream, unknown model, NaN, a cancelled
call) leaves the model bit-identical, and concurrent eval Forwards see the old or the new
statistics, never a mix. Also prints how far torch.optim.swa_utils.update_bn (an average of
per-batch statistics) is from the pooled figures on the same batches.
"""

import copy
import os
import sys
import threading
import time
import unittest

import grpc
import numpy as np
import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import normd  # noqa: E402
from normd import pb  # noqa: E402
from normd_server import NormdServer  # noqa: E402

SERVER = None
BATCH_SIZES = (7, 32, 13, 50, 2)


def setUpModule():
    global SERVER
    SERVER = NormdServer().__enter__()


def tearDownModule():
    SERVER.__exit__(None, None, None)


def torch_model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(),
        nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(), nn.Linear(8, 3),
        nn.BatchNorm1d(3, track_running_stats=False))


def shifted_batches(seed):
    rng = np.random.RandomState(seed)
    # A shift unlike the training data: scaled and offset per channel.
    scale = np.array([2.0, 0.5], np.float32).reshape(1, 2, 1, 1)
    return [(rng.randn(n, 2, 5, 5).astype(np.float32) * scale + 1.5) for n in BATCH_SIZES]


def pooled_inputs(seq, batches):
    """Per tracked BatchNorm index: (mean, unbiased var) in float64 of all its inputs over the
    batches, collected with forward hooks in train mode (Dropout off)."""
    seq = copy.deepcopy(seq).double()
    seq.train()
    for m in seq.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    seen = {}

    def hook(idx):
        def f(_m, inputs):
            x = inputs[0].detach()
            x = x.transpose(0, 1).reshape(x.shape[1], -1)  # (C, N*H*W)
            seen.setdefault(idx, []).append(x)
        return f

    for idx, m in seq.named_children():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.register_forward_pre_hook(hook(idx))
    with torch.no_grad():
        for x in batches:
            seq(torch.from_numpy(x).double())
    out = {}
    for idx, xs in seen.items():
        allx = torch.cat(xs, dim=1)
        out[idx] = (allx.mean(dim=1).numpy(), allx.var(dim=1, unbiased=True).numpy())
    return out


class AdaptStatisticsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.c = SERVER.client
        seq = torch_model()
        cls.mid = normd.from_torch(cls.c, seq, [2, 5, 5], loss="cross_entropy",
                                   optimizer=torch.optim.SGD(seq.parameters(), lr=0.05,
                                                             momentum=0.9),
                                   id="adapt").id
        rng = np.random.RandomState(0)
        for _ in range(5):  # weights, running statistics and momentum buffers away from init
            x = rng.randn(16, 2, 5, 5).astype(np.float32)
            cls.c.train_step(cls.mid, x, labels=rng.randint(0, 3, 16))

    def snapshot(self):
        m = self.c.get_model(self.mid)
        state = self.c.get_state(self.mid, include_optimizer=True)
        return m.step, m.mode, {k: v.copy() for k, v in state.items()}

    def assert_unchanged(self, before, what):
        step, mode, state = self.snapshot()
        self.assertEqual(step, before[0], what)
        self.assertEqual(mode, before[1], what)
        self.assertEqual(list(state), list(before[2]), what)
        for k, v in state.items():
            self.assertTrue(np.array_equal(v, before[2][k]), f"{what}: {k} changed")

    def test_1_pooled_statistics_match_torch_hooks(self):
        before = self.snapshot()
        seq = normd.to_torch(self.c, self.mid)
        batches = shifted_batches(1)
        expected = pooled_inputs(seq, batches)
        self.assertEqual(sorted(expected), ["1", "6", "9"])
        model = self.c.adapt_statistics(self.mid, iter(batches))
        self.assertEqual(model.step, before[0])
        self.assertEqual(model.mode, before[1])
        _, _, after = self.snapshot()
        worst = 0.0
        for idx, (mean, var) in expected.items():
            for name, want in (("running_mean", mean), ("running_var", var)):
                got = after[f"{idx}.{name}"].astype(np.float64)
                err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)
                worst = max(worst, err)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{idx}.{name}")
            self.assertEqual(int(after[f"{idx}.num_batches_tracked"]),
                             int(before[2][f"{idx}.num_batches_tracked"]) + len(BATCH_SIZES))
        print(f"pooled statistics vs torch hooks: worst relative error {worst:.2e} over "
              f"{len(BATCH_SIZES)} batches of sizes {BATCH_SIZES}")
        for k, v in after.items():  # everything but the adapted buffers is bit-identical
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                self.assertTrue(np.array_equal(v, before[2][k]), k)

        # torch.optim.swa_utils.update_bn averages per-batch statistics (momentum=None): it
        # misses the spread between batch means, so its variance is off the pooled one.
        swa = copy.deepcopy(seq)
        swa[12] = nn.Identity()  # torch 1.13's update_bn trips over an untracked BatchNorm
        update_bn([torch.from_numpy(x) for x in batches], swa)
        for idx, (mean, var) in expected.items():
            m = swa[int(idx)]
            dm = np.abs(m.running_mean.double().numpy() - mean).max() / np.abs(mean).max()
            dv = np.abs(m.running_var.double().numpy() - var).max() / np.abs(var).max()
            print(f"update_bn vs pooled, layer {idx}: mean {dm:.2e}, var {dv:.2e} (relative, "
                  f"max over channels)")

    def test_2_failures_change_nothing(self):
        before = self.snapshot()
        good = shifted_batches(2)
        C = grpc.StatusCode
        cases = [
            ("a bad batch (wrong shape) in the middle", good[:2] + [np.zeros((4, 3), np.float32)],
             C.INVALID_ARGUMENT, "message 3"),
            ("a NaN batch", good[:1] + [np.full((3, 2, 5, 5), np.nan, np.float32)],
             C.INVALID_ARGUMENT, "finite"),
            ("a batch of one sample (BatchNorm1d needs more than one value)",
             good[:1] + [good[0][:1]], C.INVALID_ARGUMENT, "more than 1 value"),
            ("an empty stream", [], C.INVALID_ARGUMENT, "no batch"),
        ]
        for what, batches, code, words in cases:
            with self.assertRaises(normd.NormdError, msg=what) as cm:
                self.c.adapt_statistics(self.mid, iter(batches))
            self.assertEqual(cm.exception.code, code, what)
            self.assertIn(words, cm.exception.message, what)
            self.assert_unchanged(before, what)
        with self.assertRaises(normd.NormdError) as cm:
            self.c.adapt_statistics("no-such-model", iter(good))
        self.assertEqual(cm.exception.code, C.NOT_FOUND)
        # A first message without the model's name, and a later one naming another model.
        stub = self.c._stub
        for reqs, words in (
                ([pb.AdaptStatisticsRequest(input=normd.to_tensor(good[0]))], "must name"),
                ([pb.AdaptStatisticsRequest(model=self.mid, input=normd.to_tensor(good[0])),
                  pb.AdaptStatisticsRequest(model="other", input=normd.to_tensor(good[1]))],
                 "names model 'other'")):
            with self.assertRaises(grpc.RpcError) as cm:
                stub.AdaptStatistics(iter(reqs), timeout=30)
            self.assertEqual(cm.exception.code(), C.INVALID_ARGUMENT)
            self.assertIn(words, cm.exception.details())
            self.assert_unchanged(before, words)

        # A client that cancels mid-stream: nothing is committed.
        release = threading.Event()

        def stalled():
            yield pb.AdaptStatisticsRequest(model=self.mid, input=normd.to_tensor(good[0]))
            yield pb.AdaptStatisticsRequest(input=normd.to_tensor(good[1]))
            release.wait(30)

        future = stub.AdaptStatistics.future(stalled(), timeout=30)
        time.sleep(0.5)  # the two batches reach the server (the check below holds either way)
        future.cancel()
        release.set()
        with self.assertRaises(grpc.FutureCancelledError):
            future.result()
        self.assert_unchanged(before, "a cancelled stream")

    def test_3_concurrent_eval_forwards_see_old_or_new(self):
        self.c.set_mode(self.mid, "eval")
        x = shifted_batches(3)[1]
        old = self.c.predict(self.mid, x)
        outputs, stop = [], threading.Event()

        def reader():
            client = normd.Client(SERVER.address)
            while not stop.is_set():
                outputs.append(client.predict(self.mid, x))
            client.close()

        t = threading.Thread(target=reader)
        t.start()
        try:
            batches = [b for _ in range(20) for b in shifted_batches(4)]
            self.c.adapt_statistics(self.mid, iter(batches))
            for _ in range(3):  # a few answers after the commit too
                outputs.append(self.c.predict(self.mid, x))
        finally:
            stop.set()
            t.join()
        new = self.c.predict(self.mid, x)
        self.assertFalse(np.array_equal(old, new))
        n_old = sum(np.array_equal(o, old) for o in outputs)
        n_new = sum(np.array_equal(o, new) for o in outputs)
        print(f"concurrent eval Forwards: {n_old} saw the old statistics, {n_new} the new, "
              f"{len(outputs) - n_old - n_new} a mix")
        self.assertEqual(n_old + n_new, len(outputs))
        self.assertGreater(n_new, 0)
        self.c.set_mode(self.mid, "train")

    def test_4_frozen_layers_and_inference_only(self):
        before = self.snapshot()
        self.c.set_layer_options(self.mid, {"1": {"frozen": True}})
        try:
            self.c.adapt_statistics(self.mid, iter(shifted_batches(5)))
            _, _, after = self.snapshot()
            self.assertTrue(np.array_equal(after["1.running_mean"], before[2]["1.running_mean"]))
            self.assertFalse(np.array_equal(after["6.running_mean"], before[2]["6.running_mean"]))
        finally:
            self.c.set_layer_options(self.mid, {"1": {"frozen": False}})
        folded = self.c.fold_batch_norm(self.mid, new_model="adapt-folded")
        with self.assertRaises(normd.NormdError) as cm:
            self.c.adapt_statistics("adapt-folded", iter(shifted_batches(5)))
        self.assertEqual(cm.exception.code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIsNotNone(folded)
        self.c.delete_model("adapt-folded")


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""Small-batch warnings over gRPC: a BatchNorm layer that normalises a training batch over fewer
values per channel than --small-batch-threshold is named in the TrainStep / TrainStream /
train-mode Forward response with the count, and counted in normd_bn_small_batch_total; larger
batches, eval mode and --small-batch-threshold 0 give none."""

import os
import re
import sys
import unittest
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import normd  # noqa: E402
from normd_server import NormdServer  # noqa: E402

SPEC = {"input_shape": [2, 3, 3],
        "layers": [{"conv2d": {"in_channels": 2, "out_channels": 4, "kernel_size": 3,
                               "padding": 1}},
                   {"name": "bn2d", "batch_norm2d": {"num_features": 4}},
                   {"flatten": {}},
                   {"linear": {"in_features": 36, "out_features": 6}},
                   {"name": "bn1d", "batch_norm1d": {"num_features": 6}},
                   {"linear": {"in_features": 6, "out_features": 3}}],
        "loss": "LOSS_CROSS_ENTROPY", "optimizer": {"sgd": {"lr": 0.05}}}


def batch(n, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, 2, 3, 3).astype(np.float32), rng.randint(0, 3, n)


def small_batch_counts(metrics_url):
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("normd_bn_small_batch_total{") and 'model="sb"' in line:
            layer = re.search(r'layer="([^"]+)"', line).group(1)
            out[layer] = float(line.rsplit(" ", 1)[1])
    return out


class SmallBatchWarningTest(unittest.TestCase):
    def test_default_threshold(self):
        with NormdServer() as server:
            c = server.client
            c.create_model(SPEC, id="sb")
            self.assertEqual(small_batch_counts(server.metrics_url), {"bn2d": 0.0, "bn1d": 0.0})
            x, y = batch(4)
            r = c.train_step("sb", x, labels=y)
            # BatchNorm1d on (4, 6): 4 values per channel; BatchNorm2d: 4 * 3 * 3 = 36 >= 16.
            self.assertEqual([(w.layer, w.values_per_channel) for w in r.warnings], [("bn1d", 4)])
            self.assertIn("GroupNorm", r.warnings[0].message)
            self.assertIn("--small-batch-threshold", r.warnings[0].message)
            r = c.train_step("sb", x[:2], labels=y[:2])  # BatchNorm2d: 2 * 9 = 18 >= 16
            self.assertEqual([(w.layer, w.values_per_channel) for w in r.warnings], [("bn1d", 2)])
            x64, y64 = batch(64, 1)
            self.assertEqual(len(c.train_step("sb", x64, labels=y64).warnings), 0)
            streamed = list(c.train_stream("sb", [(x, y), (x64, y64), (x, y)]))
            self.assertEqual([len(s.warnings) for s in streamed], [1, 0, 1])
            fwd = c.forward("sb", x)  # train mode: batch statistics
            self.assertEqual([w.layer for w in fwd.warnings], ["bn1d"])
            c.set_mode("sb", "eval")
            self.assertEqual(len(c.forward("sb", x).warnings), 0)  # running statistics
            # 1 TrainStep at 4, 1 at 2, 2 streamed, 1 Forward: 5 small batches for bn1d.
            self.assertEqual(small_batch_counts(server.metrics_url), {"bn2d": 0.0, "bn1d": 5.0})

    def test_threshold_flag(self):
        with NormdServer(["--small-batch-threshold", "40"]) as server:
            server.client.create_model(SPEC, id="sb")
            x, y = batch(4)
            r = server.client.train_step("sb", x, labels=y)
            self.assertEqual(sorted((w.layer, w.values_per_channel) for w in r.warnings),
                             [("bn1d", 4), ("bn2d", 36)])
        with NormdServer(["--small-batch-threshold", "0"]) as server:
            server.client.create_model(SPEC, id="sb")
            x, y = batch(2)
            self.assertEqual(len(server.client.train_step("sb", x, labels=y).warnings), 0)
            self.assertEqual(small_batch_counts(server.metrics_url), {"bn2d": 0.0, "bn1d": 0.0})


if __name__ == "__main__":
    unittest.main(verbosity=2)

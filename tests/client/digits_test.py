"""Real data through normd: scikit-learn's handwritten digits (the 80/20 stratified split,
random_state 0). An MLP with BatchNorm reaches >= 95 % test accuracy; a small ResNet on the
8x8 images, trained with the usual recipe (SGD Nesterov, warm-up then cosine, clipping, label
smoothing, no weight decay on BatchNorm and biases), reaches >= 97 %."""

import os
import sys
import time
import unittest

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import normd  # noqa: E402
from normd_server import NormdServer  # noqa: E402

EPOCHS = 15
BATCH = 32


def digits_split():
    """(x_train, x_test, y_train, y_test): 1437 / 360 samples of 64 pixels (0..16)."""
    digits = load_digits()
    return train_test_split(
        digits.data.astype(np.float32), digits.target.astype(np.int64), test_size=0.2,
        random_state=0, stratify=digits.target)


def epoch_batches(rng, x, y, batch):
    order = rng.permutation(len(x))
    return [(x[order[i:i + batch]], y[order[i:i + batch]]) for i in range(0, len(order), batch)]


def spec():
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
        "seed": 0,
    }


# The ResNet: stem Conv3x3(1->16)-BN-ReLU, an identity BasicBlock at 16 channels, a stride-2
# BasicBlock to 32 channels with a Conv1x1-BN projection shortcut (8x8 -> 4x4), global average
# pooling, Linear(32 -> 10). 8 epochs: measured 99.2-99.7 % over seeds 0-4 (weights and data
# order); about 2.5 s of training in a Release build.
RESNET_EPOCHS = 8
RESNET_BATCH = 32
RESNET_LR = 0.1
WARMUP_START = 0.1
MAX_GRAD_NORM = 1.0


def conv(cin, cout, k, stride=1, padding=0):
    return {"conv2d": {"in_channels": cin, "out_channels": cout, "kernel_size": k,
                       "stride": stride, "padding": padding, "bias": False}}


def bn2d(c):
    return {"batch_norm2d": {"num_features": c}}


def basic_block(cin, cout, stride):
    block = {"body": [conv(cin, cout, 3, stride, 1), bn2d(cout), {"relu": {}},
                      conv(cout, cout, 3, 1, 1), bn2d(cout)]}
    if stride != 1 or cin != cout:
        block["shortcut"] = [conv(cin, cout, 1, stride), bn2d(cout)]
    return {"residual": block}


def resnet_spec(steps_per_epoch):
    warmup = steps_per_epoch  # one epoch of linear warm-up, then cosine to 0 at the last step
    return {
        "input_shape": [1, 8, 8],
        "layers": [
            dict(name="stem", **conv(1, 16, 3, 1, 1)),
            dict(name="stem_bn", **bn2d(16)),
            {"name": "stem_relu", "relu": {}},
            dict(name="block1", **basic_block(16, 16, 1)),
            {"name": "block1_relu", "relu": {}},
            dict(name="block2", **basic_block(16, 32, 2)),
            {"name": "block2_relu", "relu": {}},
            {"name": "pool", "adaptive_avg_pool2d": {}},
            {"name": "flatten", "flatten": {}},
            {"name": "out", "linear": {"in_features": 32, "out_features": 10}},
        ],
        "loss": "LOSS_CROSS_ENTROPY",
        "loss_options": {"label_smoothing": 0.1},
        "optimizer": {
            "sgd": {"lr": RESNET_LR, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
            "lr_schedule": {
                "warmup": {"steps": warmup, "start_factor": WARMUP_START},
                "cosine": {"t_max": RESNET_EPOCHS * steps_per_epoch - warmup},
            },
            "clip_grad_norm": {"max_norm": MAX_GRAD_NORM},
            "no_weight_decay_on_norm_and_bias": True,
        },
        "seed": 0,
    }


class DigitsTest(unittest.TestCase):
    def test_digits_accuracy(self):
        x_train, x_test, y_train, y_test = digits_split()
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0  # constant border pixels
        x_train = ((x_train - mean) / std).astype(np.float32)
        x_test = ((x_test - mean) / std).astype(np.float32)

        with NormdServer() as server:
            c = server.client
            mid = c.create_model(spec(), id="digits").id
            rng = np.random.default_rng(0)
            for epoch in range(EPOCHS):
                losses = [r.loss for r in c.train_stream(
                    mid, epoch_batches(rng, x_train, y_train, BATCH))]
                print(f"epoch {epoch + 1}: mean loss {np.mean(losses):.4f}")
            c.set_mode(mid, "eval")
            result = c.evaluate(mid, x_test, labels=y_test)
            predicted = c.predict(mid, x_test).argmax(axis=1)
            accuracy = float((predicted == y_test).mean())
            print(f"digits: {len(x_train)} train / {len(x_test)} test samples, "
                  f"test accuracy {100 * accuracy:.2f}% (Evaluate: {100 * result.accuracy:.2f}%, "
                  f"loss {result.loss:.4f})")
            self.assertEqual(result.samples, len(x_test))
            self.assertAlmostEqual(result.accuracy, accuracy, places=6)
            self.assertGreaterEqual(accuracy, 0.95)

    def test_resnet_accuracy(self):
        x_train, x_test, y_train, y_test = digits_split()
        # One scale for all pixels keeps the images' spatial structure (the MLP's per-pixel
        # standardisation would blow up the near-constant border pixels).
        mean, std = x_train.mean(), x_train.std()
        x_train = ((x_train - mean) / std).reshape(-1, 1, 8, 8).astype(np.float32)
        x_test = ((x_test - mean) / std).reshape(-1, 1, 8, 8).astype(np.float32)
        steps_per_epoch = -(-len(x_train) // RESNET_BATCH)

        with NormdServer() as server:
            c = server.client
            mid = c.create_model(resnet_spec(steps_per_epoch), id="digits-resnet").id
            rng = np.random.default_rng(0)
            responses = []
            start = time.monotonic()
            for epoch in range(RESNET_EPOCHS):
                epoch_responses = list(c.train_stream(
                    mid, epoch_batches(rng, x_train, y_train, RESNET_BATCH)))
                self.assertEqual(len(epoch_responses), steps_per_epoch)
                responses += epoch_responses
                print(f"epoch {epoch + 1}: mean loss "
                      f"{np.mean([r.loss for r in epoch_responses]):.4f}, lr at its end "
                      f"{epoch_responses[-1].learning_rate:.5f}, grad norm max "
                      f"{max(r.grad_norm for r in epoch_responses):.3f}")
            elapsed = time.monotonic() - start
            c.set_mode(mid, "eval")
            result = c.evaluate(mid, x_test, labels=y_test)
            predicted = c.predict(mid, x_test).argmax(axis=1)
            accuracy = float((predicted == y_test).mean())
            clipped = sum(r.grad_norm > MAX_GRAD_NORM for r in responses)
            print(f"digits ResNet: {len(x_train)} train / {len(x_test)} test samples, "
                  f"{RESNET_EPOCHS} epochs ({len(responses)} steps, {clipped} clipped) in "
                  f"{elapsed:.1f} s, test accuracy {100 * accuracy:.2f}% (Evaluate: "
                  f"{100 * result.accuracy:.2f}%, loss {result.loss:.4f})")

            # The schedule the responses report: warm-up from lr * start_factor to lr over the
            # first epoch, then cosine annealing down to (nearly) 0 at the last step.
            rates = [r.learning_rate for r in responses]
            self.assertAlmostEqual(rates[0], RESNET_LR * WARMUP_START, places=6)
            self.assertAlmostEqual(rates[steps_per_epoch], RESNET_LR, places=6)
            self.assertAlmostEqual(max(rates), RESNET_LR, places=6)
            self.assertLess(rates[-1], RESNET_LR * 1e-3)
            self.assertTrue(all(np.isfinite(r.grad_norm) and r.grad_norm > 0
                                for r in responses))
            self.assertEqual(result.samples, len(x_test))
            self.assertAlmostEqual(result.accuracy, accuracy, places=6)
            self.assertGreaterEqual(accuracy, 0.97)


if __name__ == "__main__":
    unittest.main(verbosity=2)

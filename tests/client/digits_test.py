"""Real data through normd: scikit-learn's handwritten digits, MLP with BatchNorm, >= 95 %."""

import os
import sys
import unittest

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import normd  # noqa: E402
from normd_server import NormdServer  # noqa: E402

EPOCHS = 15
BATCH = 32


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


class DigitsTest(unittest.TestCase):
    def test_digits_accuracy(self):
        digits = load_digits()
        x_train, x_test, y_train, y_test = train_test_split(
            digits.data.astype(np.float32), digits.target.astype(np.int64), test_size=0.2,
            random_state=0, stratify=digits.target)
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
                order = rng.permutation(len(x_train))
                batches = [(x_train[order[i:i + BATCH]], y_train[order[i:i + BATCH]])
                           for i in range(0, len(order), BATCH)]
                losses = [r.loss for r in c.train_stream(mid, batches)]
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


if __name__ == "__main__":
    unittest.main(verbosity=2)

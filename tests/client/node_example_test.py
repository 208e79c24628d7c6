"""The Node example (client/node) against a real normd: npm ci from the lock file, then run it."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from normd_server import NormdServer, env_path  # noqa: E402


class NodeExampleTest(unittest.TestCase):
    def test_example(self):
        source = env_path("NORMD_SOURCE_DIR")
        npm, node = shutil.which("npm"), shutil.which("node")
        self.assertIsNotNone(npm, "npm is missing (make deps installs it)")
        self.assertIsNotNone(node, "node is missing (make deps installs it)")
        with tempfile.TemporaryDirectory(prefix="normd-node-test-") as work:
            # A copy, so the test never writes into the source tree.
            for name in ("package.json", "package-lock.json", "example.js"):
                shutil.copy(os.path.join(source, "client", "node", name), work)
            subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=work,
                           check=True, timeout=600)
            with NormdServer() as server:
                p = subprocess.run(
                    [node, "example.js", "--server", server.address, "--id", "node-test",
                     "--proto", os.path.join(source, "proto", "normd", "v1", "normd.proto")],
                    cwd=work, capture_output=True, text=True, timeout=120)
                print(p.stdout, p.stderr)
                self.assertEqual(p.returncode, 0, p.stderr)
                summary = json.loads(p.stdout.strip().splitlines()[-1])
                self.assertEqual(summary["model"], "node-test")
                self.assertEqual(summary["steps"], 40)
                self.assertLess(summary["last_loss"], summary["first_loss"])
                self.assertGreaterEqual(summary["accuracy"], 0.9)
                self.assertEqual(summary["output_shape"], [200, 3])
                self.assertIn("MODE_EVAL", p.stdout)
                # The example cleans up after itself.
                self.assertEqual([m.id for m in server.client.list_models()], [])
                # Errors surface with the gRPC code and the server's message, exit status 1.
                server.client.create_model(
                    {"input_shape": [1], "layers": [{"relu": {}}], "loss": "LOSS_MSE",
                     "optimizer": {"sgd": {"lr": 0.1}}}, id="node-test")
                p = subprocess.run(
                    [node, "example.js", "--server", server.address, "--id", "node-test",
                     "--proto", os.path.join(source, "proto", "normd", "v1", "normd.proto")],
                    cwd=work, capture_output=True, text=True, timeout=120)
                self.assertEqual(p.returncode, 1)
                self.assertIn("ALREADY_EXISTS", p.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)

"""The normd npm package (client/node) built and used from scratch against a real normd.

In a copy of the package (laid out as in the repository, so its prepack finds the protos): npm ci
from the lock file, npm test (node's test runner against a real normd, TLS and token options
included), npm pack. The tarball is then installed into an empty directory with nothing else
around it, where a CommonJS script and an ESM script train a model against a real normd, and a
TypeScript file using the package's declarations type-checks (and a wrong one does not).
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from normd_server import NormdServer, env_path  # noqa: E402

NPM_FLAGS = ["--no-audit", "--no-fund"]

TRAIN_CJS = r"""
const { Client } = require('normd');
const [address] = process.argv.slice(2);
function rng(seed) { let s = seed >>> 0; return () => { s = (s * 1664525 + 1013904223) >>> 0; return s / 4294967296; }; }
async function main() {
  const client = new Client(address);
  const spec = {
    input_shape: [2],
    layers: [{ linear: { in_features: 2, out_features: 8 } }, { batch_norm1d: { num_features: 8 } },
             { relu: {} }, { linear: { in_features: 8, out_features: 2 } }],
    loss: 'LOSS_CROSS_ENTROPY', optimizer: { adam: { lr: 0.05 } }, seed: 4,
  };
  await client.createModel(spec, 'packaged');
  const random = rng(9);
  const make = (n) => {
    const data = new Float32Array(2 * n); const labels = [];
    for (let i = 0; i < n; i++) {
      data[2 * i] = random() * 2 - 1; data[2 * i + 1] = random() * 2 - 1;
      labels.push(data[2 * i] + data[2 * i + 1] > 0 ? 1 : 0);
    }
    return { x: { data, shape: [n, 2] }, labels };
  };
  const losses = [];
  async function* batches() { for (let i = 0; i < 60; i++) yield make(32); }
  for await (const r of client.trainStream('packaged', batches())) losses.push(r.loss);
  await client.setMode('packaged', 'eval');
  const test = make(100);
  const out = (await client.forward('packaged', test.x)).output;
  const ev = await client.evaluate('packaged', test.x, { labels: test.labels });
  await client.deleteModel('packaged');
  client.close();
  const mean = (a) => a.reduce((x, y) => x + y, 0) / a.length;
  console.log(JSON.stringify({ first: mean(losses.slice(0, 5)), last: mean(losses.slice(-10)), steps: losses.length,
    shape: out.shape, isFloat32: out.data instanceof Float32Array, length: out.data.length, accuracy: ev.accuracy }));
}
main().catch((e) => { console.error(e.message); process.exit(1); });
"""

HEALTH_MJS = r"""
import { Client, NormdError } from 'normd';
const client = new Client(process.argv[2]);
const health = await client.health();
let code = '';
try { await client.getModel('missing'); } catch (e) { code = e instanceof NormdError ? e.code : String(e); }
client.close();
console.log(JSON.stringify({ health, code }));
"""

CHECK_TS = r"""
import { Client, ModelSpec, Tensor, TrainStepResponse } from 'normd';
async function run(client: Client): Promise<number> {
  const spec: ModelSpec = { input_shape: [3], layers: [{ linear: { in_features: 3, out_features: 1 } }],
    loss: 'LOSS_MSE', optimizer: { sgd: { lr: 0.1 } } };
  const model = await client.createModel(spec, 'ts');
  const x: Tensor = { data: new Float32Array(6), shape: [2, 3] };
  const r: TrainStepResponse = await client.trainStep(model.id, x, { target: [[1], [2]] });
  for await (const s of client.trainStream(model.id, [{ x, labels: [0, 1] }])) console.log(s.step);
  const state: Map<string, Tensor> = await client.getState(model.id);
  return r.loss + model.parameter_count + state.size;
}
run(new Client('127.0.0.1:1', { token: 't', ca: 'ca.pem', timeoutMs: 100 })).catch(() => undefined);
"""

BAD_TS = r"""
import { Client } from 'normd';
const client = new Client('127.0.0.1:1');
client.trainStep('m', { data: new Float32Array(2), shape: [1, 2] }, { labels: 'not numbers' });
client.setMode('m', 'sideways');
"""


class NodePackageTest(unittest.TestCase):
    def run_cmd(self, args, cwd, env=None, timeout=600):
        p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        print(f"$ {' '.join(args)}\n{p.stdout[-4000:]}{p.stderr[-4000:]}")
        return p

    def test_package(self):
        source = env_path("NORMD_SOURCE_DIR")
        npm, node = shutil.which("npm"), shutil.which("node")
        self.assertIsNotNone(npm, "npm is missing (make deps installs it)")
        self.assertIsNotNone(node, "node is missing (make deps installs it)")
        with tempfile.TemporaryDirectory(prefix="normd-npm-test-") as work:
            # The package and the protos it copies at pack time, in the repository's layout; a
            # copy, so the test never writes into the source tree.
            pkg = os.path.join(work, "repo", "client", "node")
            shutil.copytree(os.path.join(source, "client", "node"), pkg,
                            ignore=shutil.ignore_patterns("node_modules", "proto", "*.tgz"))
            shutil.copytree(os.path.join(source, "proto"), os.path.join(work, "repo", "proto"))
            shutil.copytree(os.path.join(source, "client", "proto"),
                            os.path.join(work, "repo", "client", "proto"))

            p = self.run_cmd([npm, "ci", *NPM_FLAGS], pkg)
            self.assertEqual(p.returncode, 0)
            p = self.run_cmd([npm, "test"], pkg)
            self.assertEqual(p.returncode, 0, "npm test failed")
            self.assertRegex(p.stdout, r"# fail 0")
            self.assertNotRegex(p.stdout, r"# pass 0\b")

            p = self.run_cmd([npm, "pack", "--pack-destination", work, *NPM_FLAGS], pkg)
            self.assertEqual(p.returncode, 0)
            tarballs = [f for f in os.listdir(work) if f.endswith(".tgz")]
            self.assertEqual(len(tarballs), 1, tarballs)
            tarball = os.path.join(work, tarballs[0])
            self.assertRegex(tarballs[0], r"^normd-\d+\.\d+\.\d+\.tgz$")
            with tarfile.open(tarball) as tar:
                names = set(tar.getnames())
                for name in ("package.json", "index.js", "index.mjs", "index.d.ts",
                             "proto/normd/v1/normd.proto", "proto/grpc/health/v1/health.proto"):
                    self.assertIn(f"package/{name}", names)
                self.assertFalse(any("/test/" in n or "node_modules" in n for n in names), names)
                packed = tar.extractfile("package/proto/normd/v1/normd.proto").read()
            with open(os.path.join(source, "proto", "normd", "v1", "normd.proto"), "rb") as f:
                self.assertEqual(packed, f.read(), "the packed proto differs from the source")
            # postpack removed the copy again.
            self.assertFalse(os.path.exists(os.path.join(pkg, "proto")))

            # An empty directory: nothing but the tarball's install.
            app = os.path.join(work, "app")
            os.makedirs(app)
            p = self.run_cmd([npm, "init", "-y"], app)
            self.assertEqual(p.returncode, 0)
            p = self.run_cmd([npm, "install", tarball, *NPM_FLAGS], app)
            self.assertEqual(p.returncode, 0)
            with open(os.path.join(app, "train.js"), "w") as f:
                f.write(TRAIN_CJS)
            with open(os.path.join(app, "health.mjs"), "w") as f:
                f.write(HEALTH_MJS)
            with NormdServer() as server:
                p = self.run_cmd([node, "train.js", server.address], app, timeout=300)
                self.assertEqual(p.returncode, 0, p.stderr)
                r = json.loads(p.stdout.strip().splitlines()[-1])
                self.assertEqual(r["steps"], 60)
                # Mean loss of the first 5 and the last 10 batches (one batch alone is noisy).
                self.assertLess(r["last"], 0.7 * r["first"])
                self.assertEqual(r["shape"], [100, 2])
                self.assertTrue(r["isFloat32"])
                self.assertEqual(r["length"], 200)
                self.assertGreaterEqual(r["accuracy"], 0.9)
                self.assertEqual([m.id for m in server.client.list_models()], [])

                # The packaged example finds the packaged proto.
                p = self.run_cmd([node, os.path.join("node_modules", "normd", "example.js"),
                                  "--server", server.address, "--steps", "5"], app, timeout=300)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertEqual(json.loads(p.stdout.strip().splitlines()[-1])["steps"], 5)

                p = self.run_cmd([node, "health.mjs", server.address], app, timeout=120)
                self.assertEqual(p.returncode, 0, p.stderr)
                self.assertEqual(json.loads(p.stdout.strip().splitlines()[-1]),
                                 {"health": "SERVING", "code": "NOT_FOUND"})

            # The declarations type-check a correct use and reject a wrong one (typescript is the
            # package's devDependency, installed by npm ci above).
            tsc = os.path.join(pkg, "node_modules", "typescript", "bin", "tsc")
            tsc_flags = ["--noEmit", "--strict", "--target", "es2020", "--module", "nodenext",
                         "--moduleResolution", "nodenext"]
            for name, text in (("check.ts", CHECK_TS), ("bad.ts", BAD_TS)):
                with open(os.path.join(app, name), "w") as f:
                    f.write(text)
            p = self.run_cmd([node, tsc, *tsc_flags, "check.ts"], app)
            self.assertEqual(p.returncode, 0, "check.ts does not type-check")
            p = self.run_cmd([node, tsc, *tsc_flags, "bad.ts"], app)
            self.assertNotEqual(p.returncode, 0)
            self.assertRegex(p.stdout, r"bad\.ts\(4,\d+\): error TS\d+: .*ArrayLike<number>")
            self.assertRegex(p.stdout, r"bad\.ts\(5,\d+\): error TS\d+: .*\"sideways\"")


if __name__ == "__main__":
    unittest.main(verbosity=2)

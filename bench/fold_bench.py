#!/usr/bin/python3
"""Eval Forward of a model against its FoldBatchNorm copy (issue 14): what folding buys.

1. In-process (bench/fold_bench.cc, normd_fold_bench): Model::Predict of the reference MLP
   (784-512-BN-ReLU-512-BN-ReLU-10) and a Conv-BN CNN (3x32x32, two Conv-BN-ReLU-MaxPool
   blocks) against their folded copies, at 1 and 2 compute threads; medians of repeated runs.
2. Over gRPC: a real normd on loopback, the reference MLP created, trained a few steps, set to
   eval and folded with FoldBatchNorm(new_model); eval Forward latency (median of --calls
   calls, raw encoding, one client) of each.

Usage: /usr/bin/python3 bench/fold_bench.py --build-dir build [--quick]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def in_process(build, quick):
    binary = os.path.join(build, "bench", "normd_fold_bench")
    for threads in (1, 2):
        args = [binary, "--threads", str(threads)] + (["--quick"] if quick else [])
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            if not line.startswith("{"):
                print(line)


def over_grpc(build, calls):
    sys.path[:0] = [os.path.join(HERE, "..", "client", "python"),
                    os.path.join(build, "client", "python")]
    import numpy as np
    import normd

    tmp = tempfile.mkdtemp(prefix="normd-fold-bench-")
    port_file = os.path.join(tmp, "ports")
    proc = subprocess.Popen([os.path.join(build, "server", "normd"), "--listen", "127.0.0.1:0",
                             "--metrics", "", "--in-memory", "--port-file", port_file,
                             "--log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline:
            try:
                with open(port_file) as f:
                    ports = dict(l.strip().split("=", 1) for l in f if "=" in l)
                port = ports.get("grpc")
            except OSError:
                time.sleep(0.05)
        c = normd.Client(f"127.0.0.1:{port}")
        while c.health() != "SERVING":
            time.sleep(0.05)
        layers = []
        prev = 784
        for h in (512, 512):
            layers += [{"linear": {"in_features": prev, "out_features": h}},
                       {"batch_norm1d": {"num_features": h}}, {"relu": {}}]
            prev = h
        layers.append({"linear": {"in_features": prev, "out_features": 10}})
        spec = {"input_shape": [784], "layers": layers, "loss": "LOSS_CROSS_ENTROPY",
                "optimizer": {"sgd": {"lr": 0.01, "momentum": 0.9}}, "seed": 1}
        c.create_model(spec, id="mlp")
        rng = np.random.default_rng(0)
        for _ in range(5):
            c.train_step("mlp", rng.normal(size=(64, 784)).astype(np.float32),
                         labels=rng.integers(0, 10, 64))
        c.set_mode("mlp", "eval")
        c.fold_batch_norm("mlp", new_model="mlp-folded")
        print(f"eval Forward over gRPC (loopback, one client, median of {calls} calls)")
        for batch in (1, 32, 256):
            x = rng.normal(size=(batch, 784)).astype(np.float32)
            diff = np.abs(c.predict("mlp", x) - c.predict("mlp-folded", x)).max()
            for mid in ("mlp", "mlp-folded"):
                for _ in range(5):
                    c.predict(mid, x)
            t = {"mlp": [], "mlp-folded": []}
            for _ in range(calls):  # interleaved, so a burst of load hits both alike
                for mid in t:
                    start = time.perf_counter()
                    c.predict(mid, x)
                    t[mid].append(time.perf_counter() - start)
            times = {mid: statistics.median(v) for mid, v in t.items()}
            print(f"mlp  batch {batch:5d}  unfolded {times['mlp'] * 1e6:9.1f} us  folded "
                  f"{times['mlp-folded'] * 1e6:9.1f} us  speed-up "
                  f"{times['mlp'] / times['mlp-folded']:.2f}x  max |diff| {diff:.1e}")
        c.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    with open("/proc/loadavg") as f:
        print(f"load average {f.read().split()[0]}")
    in_process(args.build_dir, args.quick)
    over_grpc(args.build_dir, 30 if args.quick else args.calls)


if __name__ == "__main__":
    main()

"""Fair compute between tenants: tenant A floods normd with TrainStreams of the reference MLP at
batch 1024 while tenant B sends eval-mode Forwards of a small model one after another.

Prints B's Forward latency (p50, p99) alone and under A's flood, and A's training throughput,
in two configurations of the same binary:
  - one tenant: A and B present tokens of the same tenant, so the compute pool serves their work
    first come, first served, as normd did before tenants (the "before" figures);
  - two tenants: A and B are tenants team-a and team-b, served round-robin with a thread kept
    free while both are active (the "after" figures).
Target (issue 16): B's p99 under the flood within 5x of its unloaded p99.

Usage: /usr/bin/python3 bench/tenant_fairness.py --build-dir build [--seconds 8] [--streams 4]
Like the other benchmarks it unsets OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for normd.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "client", "python"))


def reference_mlp(seed):
    return {"input_shape": [784],
            "layers": [{"linear": {"in_features": 784, "out_features": 512}},
                       {"batch_norm1d": {"num_features": 512}}, {"relu": {}},
                       {"linear": {"in_features": 512, "out_features": 512}},
                       {"batch_norm1d": {"num_features": 512}}, {"relu": {}},
                       {"linear": {"in_features": 512, "out_features": 10}}],
            "loss": "LOSS_CROSS_ENTROPY", "optimizer": {"sgd": {"lr": 0.01, "momentum": 0.9}},
            "seed": seed}


SMALL = {"input_shape": [16],
         "layers": [{"linear": {"in_features": 16, "out_features": 32}},
                    {"batch_norm1d": {"num_features": 32}}, {"relu": {}},
                    {"linear": {"in_features": 32, "out_features": 4}}],
         "loss": "LOSS_CROSS_ENTROPY", "optimizer": {"sgd": {"lr": 0.1}}, "seed": 1}


def start_normd(build_dir, tmp, tokens):
    port_file = os.path.join(tmp, "ports")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") and not k.startswith("NORMD_")}
    proc = subprocess.Popen(
        [os.path.join(build_dir, "server", "normd"), "--listen", "127.0.0.1:0", "--metrics", "",
         "--in-memory", "--port-file", port_file, "--log-level", "warn",
         "--auth-token-file", tokens],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"normd exited with {proc.returncode}")
        try:
            with open(port_file) as f:
                ports = dict(l.strip().split("=", 1) for l in f if "=" in l)
            if "grpc" in ports:
                return proc, f"127.0.0.1:{ports['grpc']}"
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("normd wrote no port file within 30 s")


def b_latencies(client, seconds, x):
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        client.forward("small", x)
        out.append(time.perf_counter() - t)
    return np.array(out) * 1000.0


def run(build_dir, two_tenants, seconds, streams, batch):
    import normd
    tmp = tempfile.mkdtemp(prefix="normd-fairness-")
    try:
        tokens = os.path.join(tmp, "tokens")
        with open(tokens, "w") as f:
            f.write("a-tok team-a\nb-tok team-b\n" if two_tenants else "a-tok shared\nb-tok shared\n")
        proc, address = start_normd(build_dir, tmp, tokens)
        try:
            a = normd.Client(address, token="a-tok", timeout=120)
            b = normd.Client(address, token="b-tok", timeout=120)
            b.create_model(SMALL, "small")
            b.set_mode("small", "eval")
            for i in range(streams):
                a.create_model(reference_mlp(i), f"mlp{i}")
            rng = np.random.default_rng(0)
            xb = rng.normal(size=(8, 16)).astype(np.float32)
            xa = rng.normal(size=(batch, 784)).astype(np.float32)
            ya = rng.integers(0, 10, size=batch)
            b_latencies(b, 1.0, xb)  # warm-up
            alone = b_latencies(b, seconds, xb)
            stop = threading.Event()
            steps = [0] * streams

            def flood(i):
                def batches():
                    while not stop.is_set():
                        yield xa, ya
                for _ in a.train_stream(f"mlp{i}", batches()):
                    steps[i] += 1

            threads = [threading.Thread(target=flood, args=(i,)) for i in range(streams)]
            for t in threads:
                t.start()
            time.sleep(1.0)  # the flood reaches steady state
            s0 = sum(steps)
            t0 = time.monotonic()
            loaded = b_latencies(b, seconds, xb)
            rate = (sum(steps) - s0) * batch / (time.monotonic() - t0)
            stop.set()
            for t in threads:
                t.join(timeout=120)
            a.close()
            b.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return alone, loaded, rate


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.abspath(args.build_dir), "client", "python"))
    print(f"tenant fairness: A = {args.streams} TrainStreams of the reference MLP at batch "
          f"{args.batch}, B = eval Forward of a 16-32-4 MLP at batch 8, {args.seconds:g} s each")
    print(f"{'configuration':<42} {'B p50 ms':>9} {'B p99 ms':>9} {'B n':>6} "
          f"{'A samples/s':>12} {'p99 ratio':>10}")
    for two, label in ((False, "one tenant (FIFO, as before)"), (True, "two tenants (round-robin)")):
        alone, loaded, rate = run(args.build_dir, two, args.seconds, args.streams, args.batch)
        p99a = np.percentile(alone, 99)
        for name, lat, r in (("alone", alone, None), ("under flood", loaded, rate)):
            p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
            ratio = f"{p99 / p99a:10.1f}" if r is not None else f"{'':>10}"
            rate_s = f"{r:12.0f}" if r is not None else f"{'':>12}"
            print(f"{label + ', ' + name:<42} {p50:9.3f} {p99:9.3f} {len(lat):6d} {rate_s} {ratio}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

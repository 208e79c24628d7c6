"""Fair compute between tenants: tenant A floods normd with TrainStreams of the reference MLP at
batch 1024 while tenant B sends eval-mode Forwards of a small model one after another.

Prints B's Forward latency (p50, p99) alone and under A's flood, and A's training throughput,
in two configurations of the same binary:
  - one tenant: A and B present tokens of the same tenant, so the compute pool serves their work
    first come, first served, as normd did before tenants (the "before" figures);
  - two tenants: A and B are tenants team-a and team-b, served round-robin with a thread kept
    free while both are active (the "after" figures).
Target (issue 16): B's p99 under the flood within 5x of its unloaded p99.

A and B are two client processes, as two teams' programs would be: in one Python process B's
calls would wait for the interpreter lock behind A's threads (up to its 5 ms switch interval),
which is the client's latency, not the server's.

A third configuration measures the floor that no scheduling inside normd can go below when the
clients share the server's cores: B's latency while as many CPU-bound processes as there are
cores run beside it and normd has nothing else to do. The flood keeps every core busy too (A's
compute, A's client, both sides' gRPC), so B then waits for the operating system's scheduler.

Usage: /usr/bin/python3 bench/tenant_fairness.py --build-dir build [--seconds 8] [--streams 4]
Like the other speed benchmarks it unsets OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE for normd.
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

from normd_process import speed_env, start_normd

HERE = os.path.dirname(os.path.abspath(__file__))


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


def flood(address, streams, batch):
    """Tenant A's process: one TrainStream per model mlp0..mlpN-1 until stdin closes. Prints
    'ready' once every stream has stepped; after a 'start' line on stdin, counts steps until a
    'stop' line, then prints the samples per second in between."""
    import normd
    a = normd.Client(address, token="a-tok", timeout=120)
    rng = np.random.default_rng(0)
    xa = rng.normal(size=(batch, 784)).astype(np.float32)
    ya = rng.integers(0, 10, size=batch)
    stop = threading.Event()
    steps = [0] * streams

    def stream(i):
        def batches():
            while not stop.is_set():
                yield xa, ya
        for _ in a.train_stream(f"mlp{i}", batches()):
            steps[i] += 1

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    while min(steps) == 0:
        time.sleep(0.01)
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "start"
    s0, t0 = sum(steps), time.monotonic()
    assert sys.stdin.readline().strip() == "stop"
    rate = (sum(steps) - s0) * batch / (time.monotonic() - t0)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    print(f"rate {rate}", flush=True)
    a.close()


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
        proc, address = start_normd(
            build_dir, tmp, ["--metrics", "", "--in-memory", "--log-level", "warn",
                             "--auth-token-file", tokens], env=speed_env())
        try:
            a = normd.Client(address, token="a-tok", timeout=120)
            for i in range(streams):
                a.create_model(reference_mlp(i), f"mlp{i}")
            a.close()
            b = normd.Client(address, token="b-tok", timeout=120)
            b.create_model(SMALL, "small")
            b.set_mode("small", "eval")
            xb = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
            b_latencies(b, 1.0, xb)  # warm-up
            alone = b_latencies(b, seconds, xb)
            a_proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--flood", address,
                 "--build-dir", build_dir, "--streams", str(streams), "--batch", str(batch)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                if a_proc.stdout.readline().strip() != "ready":
                    raise RuntimeError("tenant A's flood did not start")
                time.sleep(1.0)  # the flood reaches steady state
                a_proc.stdin.write("start\n")
                a_proc.stdin.flush()
                loaded = b_latencies(b, seconds, xb)
                a_proc.stdin.write("stop\n")
                a_proc.stdin.flush()
                line = a_proc.stdout.readline().split()
                if len(line) != 2 or line[0] != "rate":
                    raise RuntimeError("tenant A's flood reported no rate")
                rate = float(line[1])
                a_proc.wait(timeout=120)
            finally:
                if a_proc.poll() is None:
                    a_proc.kill()
            b.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return alone, loaded, rate


def os_floor(build_dir, seconds):
    """B's latency with an idle normd, alone and beside one busy process per core."""
    import normd
    tmp = tempfile.mkdtemp(prefix="normd-fairness-")
    try:
        proc, address = start_normd(build_dir, tmp, ["--metrics", "", "--in-memory",
                                                      "--log-level", "warn"], env=speed_env())
        try:
            b = normd.Client(address, timeout=120)
            b.create_model(SMALL, "small")
            b.set_mode("small", "eval")
            xb = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
            b_latencies(b, 1.0, xb)  # warm-up
            alone = b_latencies(b, seconds, xb)
            burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                       for _ in range(os.cpu_count() or 1)]
            try:
                time.sleep(0.5)
                busy = b_latencies(b, seconds, xb)
            finally:
                for p in burners:
                    p.kill()
                    p.wait()
            b.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return alone, busy


def row(label, lat, p99_alone=None, rate=None):
    p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
    ratio = f"{p99 / p99_alone:10.1f}" if p99_alone is not None else f"{'':>10}"
    rate_s = f"{rate:12.0f}" if rate is not None else f"{'':>12}"
    print(f"{label:<50} {p50:9.3f} {p99:9.3f} {len(lat):6d} {rate_s} {ratio}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--flood", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path[:0] = [os.path.join(HERE, "..", "client", "python"),
                    os.path.join(os.path.abspath(args.build_dir), "client", "python")]
    if args.flood:
        flood(args.flood, args.streams, args.batch)
        return
    print(f"tenant fairness: A = {args.streams} TrainStreams of the reference MLP at batch "
          f"{args.batch}, B = eval Forward of a 16-32-4 MLP at batch 8, {args.seconds:g} s each")
    print(f"{'configuration':<50} {'B p50 ms':>9} {'B p99 ms':>9} {'B n':>6} "
          f"{'A samples/s':>12} {'p99 ratio':>10}")
    for two, label in ((False, "one tenant (FIFO, as before)"), (True, "two tenants (round-robin)")):
        alone, loaded, rate = run(args.build_dir, two, args.seconds, args.streams, args.batch)
        row(label + ", alone", alone)
        row(label + ", under flood", loaded, np.percentile(alone, 99), rate)
    alone, busy = os_floor(args.build_dir, args.seconds)
    row("no flood, alone", alone)
    row(f"no flood, {os.cpu_count()} CPU-bound processes (OS floor)", busy,
        np.percentile(alone, 99))


if __name__ == "__main__":
    main()

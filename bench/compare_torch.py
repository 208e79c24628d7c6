#!/usr/bin/python3
"""normd against PyTorch, side by side in one run (issue 7).

Measures, on the same random data and the same machine, in one run:
  1. the reference MLP 784-512-BatchNorm1d-ReLU-512-BatchNorm1d-ReLU-10 (cross-entropy,
     SGD lr=0.01 momentum=0.9) training at batch 32, 256 and 1024:
       (a) PyTorch in-process at 1 and 2 threads (the faster counts),
       (b) normd's core in-process (bench/core_trainer.cc) at 1 and 2 compute threads,
       (c) normd over gRPC on loopback (the real `normd` binary, driven by the C++ client in
           bench/normd_load.cc), TrainStream and unary TrainStep;
  2. BatchNorm forward and forward+backward kernels: torch.nn.functional.batch_norm against
     normd's (bench/kernels_bench.cc, BatchNorm benchmarks only);
  3. with --load, the RPC load scenarios of normd_load (eval Forward of the small model with
     concurrent clients, TrainStep batch 256) against the same server.

Every figure is the median of repeated timed runs after a warm-up. PyTorch runs in child
processes so each thread setting is set before torch is imported (OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS, torch.set_num_threads). OpenBLAS picks its own kernels (the environment's
OPENBLAS_CORETYPE, if any, is removed so PyTorch gets the CPU's best path, as on a fresh
machine); the chosen core is printed.

Usage: /usr/bin/python3 bench/compare_torch.py --build-dir build [--load] [--quick]
       [--json results.json] [--skip-grpc]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BATCHES = (32, 256, 1024)
THREADS = (1, 2)
IN_FEATURES, HIDDEN, CLASSES = 784, 512, 10
DATASET_ROWS = 8192
BN_SHAPES = ((256, 4096), (32, 512), (64, 64, 32, 32))


def steps_for(batch, quick):
    """Steps per timed repeat: about 0.1-0.3 s of work each on this class of machine."""
    steps = {32: 120, 256: 30, 1024: 10}[batch]
    return max(2, steps // 3) if quick else steps


# ---------------------------------------------------------------------------------------------
# PyTorch side (runs in a child process: --torch-worker)

def torch_worker(args):
    import ctypes
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    try:
        ob = ctypes.CDLL("libopenblas.so.0")
        ob.openblas_get_corename.restype = ctypes.c_char_p
        corename = ob.openblas_get_corename().decode()
    except OSError:
        corename = "unknown"
    out = {"threads": args.threads, "torch": torch.__version__, "openblas_core": corename,
           "torch_threads": torch.get_num_threads(), "mlp": {}, "bn": {}}

    x_all = torch.from_numpy(np.fromfile(args.data, dtype=np.float32).reshape(-1, IN_FEATURES))
    y_all = torch.from_numpy(np.fromfile(args.labels, dtype=np.int64))
    rows = x_all.shape[0]

    for batch in BATCHES:
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, CLASSES))
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        pos = [0]

        def step():
            if pos[0] + batch > rows:
                pos[0] = 0
            xb = x_all[pos[0]:pos[0] + batch]
            yb = y_all[pos[0]:pos[0] + batch]
            pos[0] += batch
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            return loss

        steps = steps_for(batch, args.quick)
        for _ in range(max(3, steps // 3)):
            step()
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = step()
            rates.append(steps * batch / (time.perf_counter() - t0))
        out["mlp"][str(batch)] = {"samples_per_s": rates, "median": statistics.median(rates),
                                  "final_loss": float(loss)}

    for shape in BN_SHAPES:
        g = torch.Generator().manual_seed(5)
        x = (torch.rand(shape, generator=g) * 4 - 1.5).requires_grad_(True)
        dy = torch.rand(shape, generator=g) * 4 - 1.5
        c = shape[1]
        weight = torch.ones(c, requires_grad=True)
        bias = torch.zeros(c, requires_grad=True)
        rm, rv = torch.zeros(c), torch.ones(c)
        fn = torch.nn.functional.batch_norm

        def fwd():
            with torch.no_grad():
                return fn(x, rm, rv, weight, bias, training=True, momentum=0.1, eps=1e-5)

        def fwd_bwd():
            y = fn(x, rm, rv, weight, bias, training=True, momentum=0.1, eps=1e-5)
            y.backward(dy)
            x.grad = None  # normd overwrites dx; weight/bias grads accumulate on both sides

        key = "x".join(str(d) for d in shape)
        out["bn"][key] = {"fwd": time_call(fwd, args.repeats),
                          "fwd_bwd": time_call(fwd_bwd, args.repeats)}
    json.dump(out, sys.stdout)


def time_call(fn, repeats, min_time=0.05):
    """Median over repeats of the mean seconds per call, each repeat lasting >= min_time."""
    for _ in range(3):
        fn()
    n = 1
    while True:  # calibrate the call count of one repeat
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time / 4:
            n = max(1, int(n * min_time / dt))
            break
        n *= 4
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Driver

def run_json(cmd, env=None, timeout=300):
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
    return json.loads(res.stdout)


def run_torch(threads, data, labels, repeats, quick):
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--threads", str(threads),
           "--data", data, "--labels", labels, "--repeats", str(repeats)]
    if quick:
        cmd.append("--quick")
    return run_json(cmd, env=env)


def run_core(binary, batch, threads, data, labels, repeats, quick):
    steps = steps_for(batch, quick)
    return run_json([binary, "--batch", str(batch), "--threads", str(threads), "--steps", str(steps),
                     "--warmup", str(max(3, steps // 3)), "--repeats", str(repeats),
                     "--data", data, "--labels", labels])


def run_kernels_bn(binary, quick):
    res = run_json([binary, "--benchmark_filter=BatchNorm|Memcpy", "--benchmark_format=json",
                    f"--benchmark_min_time={0.05 if quick else 0.3}"])
    out = {}
    for b in res["benchmarks"]:
        out[b["name"]] = b
    return out


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The real normd binary on a free loopback port, stopped on exit."""

    def __init__(self, binary, threads, workdir):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = open(os.path.join(workdir, f"normd-{threads}.log"), "w")
        data_dir = os.path.join(workdir, f"data-{threads}")
        os.makedirs(data_dir, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--listen", self.address, "--metrics", f"127.0.0.1:{free_port()}",
             "--data-dir", data_dir, "--compute-threads", str(threads)],
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, load_binary, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"normd exited early (code {self.proc.returncode}); "
                                   f"see {self.log.name}")
            res = subprocess.run([load_binary, "--address", self.address, "--scenario", "ping"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if res.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("normd did not become ready")

    def rss_bytes(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_grpc_train(load_binary, address, rpc, batch, data, labels, repeats, quick):
    steps = steps_for(batch, quick)
    return run_json([load_binary, "--address", address, "--scenario", "train", "--rpc", rpc,
                     "--batch", str(batch), "--steps", str(steps),
                     "--warmup", str(max(3, steps // 3)), "--repeats", str(repeats),
                     "--data", data, "--labels", labels])


def best(*entries):
    """The entry with the highest median (entries are dicts with 'median')."""
    return max(entries, key=lambda e: e["median"])


def fmt_rate(v):
    return f"{v:10.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke runs)")
    ap.add_argument("--skip-grpc", action="store_true")
    ap.add_argument("--load", action="store_true", help="also run the normd_load scenarios")
    ap.add_argument("--load-duration", type=float, default=5.0)
    ap.add_argument("--json", help="write every figure to this file")
    # Worker mode (internal).
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--labels", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        torch_worker(args)
        return 0

    import numpy as np

    build = os.path.abspath(args.build_dir)
    core_bin = os.path.join(build, "bench", "normd_core_trainer")
    kernels_bin = os.path.join(build, "bench", "normd_kernels_bench")
    load_bin = os.path.join(build, "bench", "normd_load")
    normd_bin = os.path.join(build, "server", "normd")
    for b in (core_bin, kernels_bin):
        if not os.path.exists(b):
            sys.exit(f"compare_torch: {b} is missing; build first (make build)")
    do_grpc = not args.skip_grpc
    if do_grpc and not (os.path.exists(load_bin) and os.path.exists(normd_bin)):
        print(f"compare_torch: {normd_bin} or {load_bin} missing: skipping the gRPC figures",
              file=sys.stderr)
        do_grpc = False

    t_start = time.time()
    workdir = tempfile.mkdtemp(prefix="normd-bench-")
    results = {"machine": machine_summary(), "mlp": {}, "bn": {}, "load": {}}
    server = None
    try:
        rng = np.random.default_rng(2024)
        data = os.path.join(workdir, "x.f32")
        labels = os.path.join(workdir, "y.i64")
        rng.standard_normal((DATASET_ROWS, IN_FEATURES), dtype=np.float32).tofile(data)
        rng.integers(0, CLASSES, DATASET_ROWS, dtype=np.int64).tofile(labels)

        torch_res = {t: run_torch(t, data, labels, args.repeats, args.quick) for t in THREADS}
        results["torch_info"] = {t: {k: torch_res[t][k] for k in
                                     ("torch", "openblas_core", "torch_threads")}
                                 for t in THREADS}
        for batch in BATCHES:
            key = str(batch)
            row = {f"torch_t{t}": torch_res[t]["mlp"][key] for t in THREADS}
            for t in THREADS:
                row[f"core_t{t}"] = run_core(core_bin, batch, t, data, labels, args.repeats,
                                             args.quick)
            results["mlp"][key] = row

        if do_grpc:
            server = Server(normd_bin, max(THREADS), workdir)
            server.wait_ready(load_bin)
            for batch in BATCHES:
                for rpc in ("stream", "unary"):
                    results["mlp"][str(batch)][f"grpc_{rpc}"] = run_grpc_train(
                        load_bin, server.address, rpc, batch, data, labels, args.repeats,
                        args.quick)
            results["server_rss_after_train"] = server.rss_bytes()
            if args.load:
                results["load"] = run_load(load_bin, server, args.load_duration)

        kernels = run_kernels_bn(kernels_bin, args.quick)
        for shape in BN_SHAPES:
            key = "x".join(str(d) for d in shape)
            kind = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
            suffix = "/".join(str(d) for d in shape)
            entry = {}
            for op in ("fwd", "fwd_bwd"):
                b = kernels.get(f"{kind}/{op}/{suffix}/real_time")
                torch_s = min(torch_res[t]["bn"][key][op] for t in THREADS)
                entry[op] = {"normd_s": b["real_time"] * 1e-9 if b else None,
                             "torch_s": torch_s,
                             "torch_t1_s": torch_res[1]["bn"][key][op],
                             "torch_t2_s": torch_res[2]["bn"][key][op],
                             "gbps": b.get("GB/s") if b else None,
                             "frac_memcpy": b.get("frac_memcpy") if b else None}
            results["bn"][key] = entry
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    results["duration_s"] = time.time() - t_start
    print_tables(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def run_load(load_bin, server, duration):
    out = {}
    for name, extra in (
            ("forward_c1", ["--scenario", "forward", "--clients", "1"]),
            ("forward_c8", ["--scenario", "forward", "--clients", "8"]),
            ("train256_c2", ["--scenario", "trainload", "--clients", "2", "--batch", "256"])):
        out[name] = run_json([load_bin, "--address", server.address, "--duration",
                              str(duration)] + extra)
    out["server_rss_after_load"] = server.rss_bytes()
    return out


def machine_summary():
    info = {}
    try:
        res = subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True)
        for line in res.stdout.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "L2 cache", "L3 cache"):
                info[k.strip()] = v.strip()
    except OSError:
        pass
    try:
        with open("/proc/loadavg") as f:
            info["loadavg"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def print_tables(r):
    m = r["machine"]
    print(f"\nnormd vs PyTorch — {m.get('Model name', '?')}, {m.get('CPU(s)', '?')} CPUs, "
          f"load average at start {' '.join(m.get('loadavg', []))}")
    ti = r.get("torch_info", {})
    if ti:
        any_t = next(iter(ti.values()))
        print(f"PyTorch {any_t['torch']}, OpenBLAS core {any_t['openblas_core']}")
    print("\nReference MLP training, samples/s (median of repeats; ratio = normd / PyTorch's "
          "faster thread setting)")
    hdr = (f"{'batch':>6} {'torch 1t':>10} {'torch 2t':>10} {'core 1t':>10} {'core 2t':>10} "
           f"{'grpc strm':>10} {'grpc unary':>10} {'core/torch':>10} {'grpc/torch':>10} "
           f"{'grpc/core':>10}")
    print(hdr)
    for batch, row in r["mlp"].items():
        torch_best = best(row["torch_t1"], row["torch_t2"])["median"]
        core_best = best(row["core_t1"], row["core_t2"])["median"]
        grpc = [row[k]["median"] for k in ("grpc_stream", "grpc_unary") if k in row]
        grpc_best = max(grpc) if grpc else None
        cells = [fmt_rate(row["torch_t1"]["median"]), fmt_rate(row["torch_t2"]["median"]),
                 fmt_rate(row["core_t1"]["median"]), fmt_rate(row["core_t2"]["median"])]
        cells += [fmt_rate(row[k]["median"]) if k in row else f"{'-':>10}"
                  for k in ("grpc_stream", "grpc_unary")]
        cells.append(f"{core_best / torch_best:9.2f}x")
        cells.append(f"{grpc_best / torch_best:9.2f}x" if grpc_best else f"{'-':>10}")
        cells.append(f"{grpc_best / core_best:9.2f}x" if grpc_best else f"{'-':>10}")
        print(f"{batch:>6} " + " ".join(cells))

    print("\nBatchNorm kernels (training mode), time per call; speed-up = PyTorch time / normd "
          "time (PyTorch's faster thread setting)")
    print(f"{'shape':>16} {'op':>8} {'torch 1t':>10} {'torch 2t':>10} {'normd':>10} "
          f"{'speed-up':>9} {'GB/s':>7} {'of memcpy':>9}")
    for shape, entry in r["bn"].items():
        for op, e in entry.items():
            n = e["normd_s"]
            print(f"{shape:>16} {op:>8} {e['torch_t1_s'] * 1e6:8.1f}us {e['torch_t2_s'] * 1e6:8.1f}us "
                  f"{n * 1e6 if n else float('nan'):8.1f}us "
                  f"{e['torch_s'] / n if n else float('nan'):8.2f}x "
                  f"{e['gbps'] or float('nan'):7.1f} {100 * (e['frac_memcpy'] or float('nan')):8.0f}%")

    if r.get("load"):
        print("\nRPC load (normd_load against the same server)")
        for name, v in r["load"].items():
            if isinstance(v, dict):
                print(f"  {name:>14}: {v['qps']:9.0f} req/s  p50 {v['p50_us']:8.1f}us  "
                      f"p99 {v['p99_us']:8.1f}us  errors {v['errors']}")
        print(f"  server RSS after load: {r['load']['server_rss_after_load'] / 2**20:.1f} MiB")
    if r.get("server_rss_after_train"):
        print(f"\nserver RSS after the training runs: {r['server_rss_after_train'] / 2**20:.1f} MiB")
    print(f"\ntotal benchmark time {r['duration_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""normd against PyTorch, side by side in one run (issue 7).

Measures, on the same random data and the same machine, in one run:
  1. the reference MLP 784-512-BatchNorm1d-ReLU-512-BatchNorm1d-ReLU-10 (cross-entropy,
     SGD lr=0.01 momentum=0.9) training at batch 32, 256 and 1024:
       (a) PyTorch in-process at 1 and 2 threads (the faster counts),
       (b) normd's core in-process (bench/core_trainer.cc) at 1 and 2 compute threads,
       (c) normd over gRPC on loopback (the real `normd` binary, driven by the C++ client in
           bench/normd_load.cc), TrainStream and unary TrainStep, at the same two budgets:
           budget 2 is the server as deployed (`--compute-threads 2`), sharing both cores with
           the client; budget 1 pins the whole server (compute and gRPC threads) to core 0 and
           the client to core 1 (`taskset`), as the in-process run at 1 thread has one core;
  2. BatchNorm forward and forward+backward kernels: torch.nn.functional.batch_norm against
     normd's (bench/kernels_bench.cc, BatchNorm benchmarks only);
  3. with --load, the RPC load scenarios of normd_load (eval Forward of the small model with
     concurrent clients, TrainStep batch 256) against the same server.

Every figure is the median of repeated timed runs after a warm-up. PyTorch runs in child
processes so each thread setting is set before torch is imported (OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS, torch.set_num_threads). OpenBLAS picks its own kernels (the environment's
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, if any, are removed for PyTorch and normd alike so both
get the CPU's best path, as on a fresh machine); the chosen core is printed.

Usage: /usr/bin/python3 bench/compare_torch.py --build-dir build [--load] [--quick]
       [--json results.json] [--skip-grpc]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_common import (Server, Targets, child_env, finish, machine_summary, pinned, run_json,
                          torch_env, torch_train_step)

BATCHES = (32, 256, 1024)
THREADS = (1, 2)
IN_FEATURES, HIDDEN, CLASSES = 784, 512, 10
DATASET_ROWS = 8192
BN_SHAPES = ((256, 4096), (32, 512), (64, 64, 32, 32))
REPEAT_CAP_S = 1.0


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

    for batch in BATCHES:
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, CLASSES))
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        step = torch_train_step(model, opt, loss_fn, x_all, y_all, batch)

        steps = steps_for(batch, args.quick)
        for _ in range(max(3, steps // 3)):
            step()
        rates, cpu_rates = [], []
        for _ in range(args.repeats):
            # A repeat ends after `steps` steps or REPEAT_CAP_S seconds, whichever comes first,
            # so a pathological setting (threads fighting over busy cores) stays bounded.
            t0, c0 = time.perf_counter(), time.process_time()
            done = 0
            while done < steps and (done < 2 or time.perf_counter() - t0 < REPEAT_CAP_S):
                loss = step()
                done += 1
            rates.append(done * batch / (time.perf_counter() - t0))
            cpu_rates.append(done * batch / max(1e-9, time.process_time() - c0))
        out["mlp"][str(batch)] = {"samples_per_s": rates, "cpu_samples_per_s": cpu_rates,
                                  "median": statistics.median(rates),
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
    """Median over repeats of the mean seconds per call (wall clock and process CPU time),
    each repeat lasting >= min_time."""
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
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
        cpu.append((time.process_time() - c0) / n)
    return {"wall": statistics.median(times), "cpu": statistics.median(cpu)}


# ---------------------------------------------------------------------------------------------
# Driver

def run_torch(threads, data, labels, repeats, quick):
    env = torch_env(threads)
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


# The kernel benchmarks this script reports (cnn_bench.py runs the ConvLayer and BnRelu ones).
KERNELS_FILTER = "^(FmaPeak|Memcpy/|BatchNorm|Linear/|Conv2d/|TrainStep/)"


def run_kernels(binary, quick):
    res = run_json([binary, "--benchmark_format=json", f"--benchmark_filter={KERNELS_FILTER}",
                    f"--benchmark_min_time={0.02 if quick else 0.1}"])
    out = {}
    for b in res["benchmarks"]:
        out[b["name"]] = b
    return out


def run_grpc_train(load_binary, address, rpc, batch, data, labels, repeats, quick, cpus=None):
    steps = steps_for(batch, quick)
    return run_json(pinned(cpus) + [
        load_binary, "--address", address, "--scenario", "train", "--rpc", rpc,
        "--batch", str(batch), "--steps", str(steps), "--warmup", str(max(3, steps // 3)),
        "--repeats", str(repeats), "--data", data, "--labels", labels])


# The budget-1 gRPC runs: the server on core 0, the client on core 1. None when the machine
# has fewer than two CPUs or no taskset.
PIN_SERVER, PIN_CLIENT = "0", "1"


def can_pin():
    return (shutil.which("taskset") is not None and hasattr(os, "sched_getaffinity")
            and {0, 1} <= os.sched_getaffinity(0))


def grpc_rate(row, prefix):
    """The faster of TrainStream and unary TrainStep for one server (key prefix), or None."""
    rates = [row[prefix + rpc]["median"] for rpc in ("stream", "unary") if prefix + rpc in row]
    return max(rates) if rates else None


def grpc_best(row):
    """The faster gRPC rate over both budgets, or None."""
    rates = [g for g in (grpc_rate(row, "grpc1_"), grpc_rate(row, "grpc_")) if g]
    return max(rates) if rates else None


def best(*entries):
    """The entry with the highest median (entries are dicts with 'median')."""
    return max(entries, key=lambda e: e["median"])


def fmt_rate(v):
    return f"{v:10.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--rounds", type=int, default=3,
                    help="times every configuration runs, interleaved (default 3)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed repeats per configuration and round (default 3)")
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke runs)")
    ap.add_argument("--skip-grpc", action="store_true")
    ap.add_argument("--load", action="store_true", help="also run the normd_load scenarios")
    ap.add_argument("--load-duration", type=float, default=3.0)
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
    results = {"machine": machine_summary(), "rounds": args.rounds, "mlp": {}, "bn": {},
               "kernels": {}, "load": {}}
    server = server1 = None
    try:
        rng = np.random.default_rng(2024)
        data = os.path.join(workdir, "x.f32")
        labels = os.path.join(workdir, "y.i64")
        rng.standard_normal((DATASET_ROWS, IN_FEATURES), dtype=np.float32).tofile(data)
        rng.integers(0, CLASSES, DATASET_ROWS, dtype=np.int64).tofile(labels)
        if do_grpc:
            server = Server(normd_bin, max(THREADS), workdir)
            server.wait_ready(load_bin)
            if can_pin():
                server1 = Server(normd_bin, 1, workdir, cpus=PIN_SERVER)
                server1.wait_ready(load_bin)
            else:
                print("compare_torch: cannot pin to CPUs 0 and 1: no budget-1 gRPC figures",
                      file=sys.stderr)

        # Rounds: every configuration runs once per round, in the same order, so load from
        # other processes on the machine spreads over all of them instead of hitting one.
        mlp = {str(b): {} for b in BATCHES}
        torch_bn, kernel_runs = [], []
        for _ in range(args.rounds):
            for t in THREADS:
                res = run_torch(t, data, labels, args.repeats, args.quick)
                results["torch_info"] = {k: res[k] for k in ("torch", "openblas_core")}
                for batch in BATCHES:
                    add_rates(mlp[str(batch)], f"torch_t{t}", res["mlp"][str(batch)])
                torch_bn.append((t, res["bn"]))
            for batch in BATCHES:
                for t in THREADS:
                    add_rates(mlp[str(batch)], f"core_t{t}",
                              run_core(core_bin, batch, t, data, labels, args.repeats,
                                       args.quick))
                if server1 is not None:
                    for rpc in ("stream", "unary"):
                        add_rates(mlp[str(batch)], f"grpc1_{rpc}",
                                  run_grpc_train(load_bin, server1.address, rpc, batch, data,
                                                 labels, args.repeats, args.quick,
                                                 cpus=PIN_CLIENT))
                if server is not None:
                    for rpc in ("stream", "unary"):
                        cpu0 = server.cpu_seconds()
                        run = run_grpc_train(load_bin, server.address, rpc, batch, data, labels,
                                             args.repeats, args.quick)
                        server_cpu = server.cpu_seconds() - cpu0
                        add_rates(mlp[str(batch)], f"grpc_{rpc}", run)
                        # CPU per sample of the server and the client together (the server's
                        # share includes the untimed warm-up steps: a slight overestimate).
                        steps = steps_for(batch, args.quick)
                        samples = batch * (steps * args.repeats + max(3, steps // 3))
                        client_cpu = sum(steps * batch / r for r in
                                         run["client_cpu_samples_per_s"])
                        mlp[str(batch)].setdefault(f"grpc_{rpc}_cpu", []).append(
                            samples / max(1e-9, server_cpu + client_cpu))
            kernel_runs.append(run_kernels(kernels_bin, args.quick))
        for batch, row in mlp.items():
            results["mlp"][batch] = {k: {"samples_per_s": v,
                                         "median": statistics.median(v)}
                                     for k, v in row.items()}
        if server is not None:
            results["server_rss_after_train"] = server.rss_bytes()
            if args.load:
                results["load"] = run_load(load_bin, server, args.load_duration)

        # Kernel figures: the median over rounds of each benchmark's time and counters.
        kernels = {}
        for name in kernel_runs[0]:
            runs = [derived(k[name]) for k in kernel_runs if name in k]
            kernels[name] = {f: statistics.median(r[f] for r in runs)
                             for f in runs[0] if isinstance(runs[0][f], (int, float))}
        results["kernels"] = kernels
        for shape in BN_SHAPES:
            key = "x".join(str(d) for d in shape)
            kind = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
            suffix = "/".join(str(d) for d in shape)
            entry = {}
            for op in ("fwd", "fwd_bwd"):
                b = kernels.get(f"{kind}/{op}/{suffix}/real_time")
                b2 = kernels.get(f"{kind}/{op}_2t/{suffix}/real_time")
                per_t = {t: statistics.median(bn[key][op]["wall"] for tt, bn in torch_bn
                                              if tt == t) for t in THREADS}
                per_t_cpu = {t: statistics.median(bn[key][op]["cpu"] for tt, bn in torch_bn
                                                  if tt == t) for t in THREADS}
                entry[op] = {"normd_s": b["real_time"] * 1e-9 if b else None,
                             "normd_2t_s": b2["real_time"] * 1e-9 if b2 else None,
                             "frac_memcpy_2t": b2.get("frac_memcpy") if b2 else None,
                             "normd_cpu_s": b["cpu_time"] * 1e-9 if b else None,
                             "torch_s": min(per_t.values()),
                             "torch_t1_s": per_t[1],
                             "torch_t2_s": per_t[2],
                             "torch_t1_cpu_s": per_t_cpu[1],
                             "gbps": b.get("GB/s") if b else None,
                             "frac_memcpy": b.get("frac_memcpy") if b else None,
                             "frac_memcpy_cpu": b.get("frac_memcpy_cpu") if b else None}
            results["bn"][key] = entry
    finally:
        for srv in (server, server1):
            if srv is not None:
                srv.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    return finish(results, t_start, args.json, print_tables)


def derived(b):
    """A benchmark's figures plus their CPU-time versions, from one run (so ratios between
    figures of the same run stay consistent before medians are taken over rounds)."""
    out = dict(b)
    scale = b["real_time"] / b["cpu_time"] if b.get("cpu_time") else float("nan")
    for f in ("frac_peak", "frac_memcpy", "GB/s", "GFLOP/s"):
        if f in b:
            out[f + "_cpu"] = b[f] * scale
    return out


def add_rates(row, key, run):
    row.setdefault(key, []).extend(run["samples_per_s"])
    if "cpu_samples_per_s" in run:
        row.setdefault(key + "_cpu", []).extend(run["cpu_samples_per_s"])


def run_load(load_bin, server, duration):
    out = {}
    for name, extra in (
            ("forward_c1", ["--scenario", "forward", "--clients", "1"]),
            ("forward_c8", ["--scenario", "forward", "--clients", "8"]),
            ("train256_c1", ["--scenario", "trainload", "--clients", "1", "--batch", "256"]),
            ("train256_c2", ["--scenario", "trainload", "--clients", "2", "--batch", "256"])):
        out[name] = run_json([load_bin, "--address", server.address, "--duration",
                              str(duration)] + extra)
    # Memory: RSS once a model has been warmed up with the traffic measured next (a stream at
    # the largest batch, then one of 1,000 steps at batch 32: the gRPC threads' heaps reach
    # their working size in the first seconds of such a stream), then sampled every 20 ms
    # through 10,000 more steps of the same model on one stream (batch 32), then after a last
    # 1024 run so the largest buffers are in use again; the model stays on the server
    # throughout and is deleted at the end. Growth is the median of the last quarter of the
    # samples minus that of the first: single samples move by megabytes as glibc hands pages
    # back and takes them again, a leak moves the whole series.
    model = ["--model", f"rss-check-{os.getpid()}"]

    def train(batch, steps, warmup=0, samples=None):
        cmd = [load_bin, "--address", server.address, "--scenario", "train", "--batch",
               str(batch), "--steps", str(steps), "--warmup", str(warmup), "--repeats", "1",
               "--window", "4"] + model
        if samples is None:
            run_json(cmd)
            return
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=child_env())
        while proc.poll() is None:
            samples.append(server.rss_bytes())
            time.sleep(0.02)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stderr.read()}")

    train(1024, 5, warmup=2)
    train(32, 1000)
    rss_warm = server.rss_bytes()
    steps, series = 10000, []
    train(32, steps, samples=series)
    train(1024, 5)
    quarter = max(1, len(series) // 4)
    out["rss"] = {"warm": rss_warm, "after": server.rss_bytes(), "steps": steps,
                  "bound": rss_bound_bytes(), "samples": len(series),
                  "min": min(series, default=0), "max": max(series, default=0),
                  "growth": (statistics.median(series[-quarter:]) -
                             statistics.median(series[:quarter])) if series else None}
    subprocess.run([load_bin, "--address", server.address, "--scenario", "delete"] + model,
                   env=child_env(), check=False)
    return out


def rss_bound_bytes():
    """Issue 7's RSS bound for the reference MLP: 2 x (parameters + SGD momentum + the
    activations of a batch of 1024) + 64 MiB, in bytes (float32)."""
    params = (IN_FEATURES * HIDDEN + HIDDEN) + (HIDDEN * HIDDEN + HIDDEN) + \
        (HIDDEN * CLASSES + CLASSES) + 2 * 2 * HIDDEN
    # Every layer's output per sample: Linear, BatchNorm, ReLU twice, then the logits.
    activations = 1024 * (6 * HIDDEN + CLASSES)
    return 2 * 4 * (2 * params + activations) + 64 * 2**20


def print_tables(r):
    m = r["machine"]
    print(f"\nnormd vs PyTorch: {m.get('Model name', '?')}, {m.get('CPU(s)', '?')} CPUs, "
          f"load average {' '.join(m.get('loadavg', []))} at start; {r['rounds']} interleaved "
          f"rounds")
    ti = r.get("torch_info", {})
    if ti:
        print(f"PyTorch {ti['torch']}, OpenBLAS core {ti['openblas_core']}")

    k = r.get("kernels", {})
    peak = k.get("FmaPeak/iterations:1", {}).get("GFLOP/s")
    print("\nCeilings measured in the kernel benchmark process")
    if peak:
        print(f"  single-core FMA peak      {peak:8.1f} GFLOP/s")
    for name, v in k.items():
        if name.startswith("Memcpy/"):
            size = int(name.split("/")[1])
            print(f"  memcpy {size / 2**20:6.2f} MiB         {v['GB/s']:8.1f} GB/s (read + write)")

    print("\nReference MLP training, samples/s (median of all repeats; ratio = normd / "
          "PyTorch's faster thread setting)")
    print("gRPC Nt: the faster of TrainStream and unary TrainStep with the server at compute "
          "budget N (1: server pinned to one core, client to the other)")
    print(f"{'batch':>6} {'torch 1t':>10} {'torch 2t':>10} {'core 1t':>10} {'core 2t':>10} "
          f"{'grpc 1t':>10} {'grpc 2t':>10} {'core/torch':>10} {'grpc/torch':>10} "
          f"{'g/c 1t':>10} {'g/c 2t':>10}")

    def ratio(a, b):
        return f"{a / b:9.2f}x" if a and b else f"{'-':>10}"

    for batch, row in r["mlp"].items():
        torch_best = best(row["torch_t1"], row["torch_t2"])["median"]
        core_best = best(row["core_t1"], row["core_t2"])["median"]
        g1, g2 = grpc_rate(row, "grpc1_"), grpc_rate(row, "grpc_")
        cells = [fmt_rate(row[key]["median"]) for key in
                 ("torch_t1", "torch_t2", "core_t1", "core_t2")]
        cells += [fmt_rate(g) if g else f"{'-':>10}" for g in (g1, g2)]
        cells.append(ratio(core_best, torch_best))
        cells.append(ratio(grpc_best(row), torch_best))
        cells.append(ratio(g1, row["core_t1"]["median"]))
        cells.append(ratio(g2, row["core_t2"]["median"]))
        print(f"{batch:>6} " + " ".join(cells))
    print(f"\n{'batch':>6} {'strm 1t':>10} {'unary 1t':>10} {'strm 2t':>10} {'unary 2t':>10}   "
          "(gRPC samples/s by RPC)")
    for batch, row in r["mlp"].items():
        print(f"{batch:>6} " + " ".join(
            fmt_rate(row[key]["median"]) if key in row else f"{'-':>10}"
            for key in ("grpc1_stream", "grpc1_unary", "grpc_stream", "grpc_unary")))

    print("\nThe same per CPU-second (samples / CPU time of the processes doing the work; "
          "independent of other jobs' share of the cores)")
    print(f"{'batch':>6} {'torch 1t':>10} {'torch 2t':>10} {'core 1t':>10} {'core 2t':>10} "
          f"{'strm 2t':>10} {'unary 2t':>10} {'core1/t1':>10} {'grpc/t1':>10}")
    for batch, row in r["mlp"].items():
        keys = ("torch_t1_cpu", "torch_t2_cpu", "core_t1_cpu", "core_t2_cpu", "grpc_stream_cpu",
                "grpc_unary_cpu")
        cells = [fmt_rate(row[key]["median"]) if key in row else f"{'-':>10}" for key in keys]
        t1 = row.get("torch_t1_cpu", {}).get("median")
        c1 = row.get("core_t1_cpu", {}).get("median")
        g = max((row[key]["median"] for key in ("grpc_stream_cpu", "grpc_unary_cpu")
                 if key in row), default=None)
        cells.append(f"{c1 / t1:9.2f}x" if t1 and c1 else f"{'-':>10}")
        cells.append(f"{g / t1:9.2f}x" if t1 and g else f"{'-':>10}")
        print(f"{batch:>6} " + " ".join(cells))

    print("\nBatchNorm kernels (training mode), time per call; speed-up = PyTorch time / normd "
          "time, each at its faster thread setting; bytes: fwd 3, fwd+bwd 8 tensors; 'of memcpy' "
          "against a one-thread memcpy of the same size")
    print(f"{'shape':>16} {'op':>8} {'torch 1t':>10} {'torch 2t':>10} {'normd 1t':>10} "
          f"{'normd 2t':>10} {'speed-up':>9} {'GB/s 1t':>7} {'of memcpy':>9} {'2t':>5} | "
          f"CPU time: {'torch 1t':>10} {'normd 1t':>10} {'speed-up':>9} {'of memcpy':>9}")
    nan = float("nan")
    for shape, entry in r["bn"].items():
        for op, e in entry.items():
            n, nc = e["normd_s"], e.get("normd_cpu_s")
            n2 = e.get("normd_2t_s")
            fastest = min(v for v in (n, n2) if v) if (n or n2) else None
            frac = e["frac_memcpy"] or nan
            print(f"{shape:>16} {op:>8} {e['torch_t1_s'] * 1e6:8.1f}us "
                  f"{e['torch_t2_s'] * 1e6:8.1f}us {n * 1e6 if n else nan:8.1f}us "
                  f"{n2 * 1e6 if n2 else nan:8.1f}us "
                  f"{e['torch_s'] / fastest if fastest else nan:8.2f}x {e['gbps'] or nan:7.1f} "
                  f"{100 * frac:8.0f}% {100 * (e.get('frac_memcpy_2t') or nan):4.0f}% | "
                  f"          {e['torch_t1_cpu_s'] * 1e6:8.1f}us "
                  f"{nc * 1e6 if nc else nan:8.1f}us "
                  f"{e['torch_t1_cpu_s'] / nc if nc else nan:8.2f}x "
                  f"{100 * (e.get('frac_memcpy_cpu') or nan):8.0f}%")

    print("\nOther kernels (normd, one thread)")
    for name, v in k.items():
        if name.startswith(("Linear/", "Conv2d/")):
            print(f"  {name:42} {v['real_time'] / 1e3:9.1f}us {v.get('GFLOP/s', nan):7.1f} GFLOP/s "
                  f"{100 * v.get('frac_peak', nan):5.1f}% of FMA peak; per CPU time "
                  f"{v['cpu_time'] / 1e3:9.1f}us {v.get('GFLOP/s_cpu', nan):7.1f} GFLOP/s "
                  f"{100 * v.get('frac_peak_cpu', nan):5.1f}%")
        elif name.startswith("TrainStep/"):
            print(f"  {name:42} {v['real_time'] / 1e3:9.1f}us "
                  f"{v.get('items_per_second', nan):9.0f} samples/s")

    load = r.get("load") or {}
    if load:
        print("\nRPC load (normd_load against the same server, loopback)")
        for name, v in load.items():
            if isinstance(v, dict) and "qps" in v:
                print(f"  {name:>14}: {v['qps']:9.0f} req/s  p50 {v['p50_us']:8.1f}us  "
                      f"p90 {v['p90_us']:8.1f}us  p99 {v['p99_us']:8.1f}us  errors {v['errors']}")
        rss = load.get("rss", {})
        if rss:
            print(f"  server RSS: after warm-up {rss['warm'] / 2**20:.1f} MiB, after "
                  f"{rss['steps']} more steps {rss['after'] / 2**20:.1f} MiB (bound "
                  f"{rss['bound'] / 2**20:.1f} MiB: 2 x (parameters + optimizer state + "
                  f"activations at batch 1024) + 64 MiB)")
            if rss.get("samples"):
                print(f"  during the {rss['steps']} steps: {rss['samples']} samples, "
                      f"{rss['min'] / 2**20:.1f}-{rss['max'] / 2**20:.1f} MiB, last quarter "
                      f"minus first quarter (medians) {rss['growth'] / 2**20:+.2f} MiB")
    print_targets(r)
    print(f"\ntotal benchmark time {r['duration_s']:.0f} s; load average at the end "
          f"{' '.join(r['machine'].get('loadavg_end', []))}")


def print_targets(r):
    """Issue 7's targets against this run's figures (wall clock, as the issue states them)."""
    t = Targets()
    check = t.check
    for batch, goal in (("256", 2.0), ("32", 3.0), ("1024", 1.5)):
        row = r["mlp"].get(batch, {})
        grpc = grpc_best(row)
        torch_best = max(row[k]["median"] for k in ("torch_t1", "torch_t2"))
        check(f"TrainStep over gRPC, batch {batch} / PyTorch", grpc / torch_best
              if grpc else None, f">= {goal}x", lambda v, g=goal: v >= g)
    row = r["mlp"].get("256", {})
    for budget, prefix in ((1, "grpc1_"), (2, "grpc_")):
        g = grpc_rate(row, prefix)
        check(f"gRPC / in-process core, batch 256, both at budget {budget}",
              g / row[f"core_t{budget}"]["median"] if g else None, ">= 0.90x",
              lambda v: v >= 0.9)
    grpc = grpc_best(row)
    core = max(row[k]["median"] for k in ("core_t1", "core_t2"))
    check("gRPC / in-process core, batch 256, each at its best", grpc / core
          if grpc else None, ">= 0.90x", lambda v: v >= 0.9)
    for shape in ("256x4096", "32x512"):
        e = r["bn"].get(shape, {}).get("fwd_bwd")
        times = [v for v in ((e or {}).get("normd_s"), (e or {}).get("normd_2t_s")) if v]
        check(f"BatchNorm1d fwd+bwd {shape}, PyTorch time / normd time",
              e["torch_s"] / min(times) if times else None, ">= 4x", lambda v: v >= 4.0)
    e = r["bn"].get("256x4096", {}).get("fwd_bwd")
    check("BatchNorm1d fwd+bwd 256x4096, of memcpy bandwidth (1t)",
          e["frac_memcpy"] if e else None, ">= 50%", lambda v: v >= 0.5, "{:.0%}")
    lin = r["kernels"].get("Linear/fwd/256/784/512/real_time")
    check("Linear 256x784->512, fraction of FMA peak", lin["frac_peak"] if lin else None,
          ">= 70%", lambda v: v >= 0.7, "{:.0%}")
    load = r.get("load") or {}
    c1, c8 = load.get("forward_c1"), load.get("forward_c8")
    check("eval Forward p50, 1 client", c1["p50_us"] if c1 else None, "<= 100 us",
          lambda v: v <= 100, "{:.0f} us")
    check("eval Forward QPS, 8 clients", c8["qps"] if c8 else None, ">= 15000",
          lambda v: v >= 15000, "{:.0f}")
    rss = load.get("rss")
    check("server RSS after warm-up / bound", rss["warm"] / rss["bound"] if rss else None,
          "<= 1", lambda v: v <= 1.0, "{:.2f}")
    check(f"server RSS growth through {rss['steps'] if rss else 0} steps",
          rss["growth"] / 2**20 if rss and rss.get("growth") is not None else None,
          "flat (<= 1 MiB)", lambda v: v <= 1.0, "{:+.2f} MiB")
    t.print("Issue 7 targets (this run, wall clock)")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/python3
"""Convolutional networks: normd over gRPC against PyTorch, per-layer kernels, server memory
(issue 13, part 4). One run measures, on this machine:

  1. Training steps (forward, backward, SGD lr=0.01 momentum=0.9, cross-entropy; random data of
     a fixed seed: N(0,1) images 3x32x32, labels uniform in 0..9) of
       - "the CNN": 4 x (Conv3x3 pad 1, BatchNorm2d, ReLU) at 32, 32, 64, 64 channels, a 2x2
         max-pool after the 2nd and the 4th block, Flatten, Linear(64*8*8, 10); batch 64, 256;
       - ResNet-20: Conv3x3(3, 16, no bias), BatchNorm2d, ReLU, 3 stages of 3 BasicBlocks at
         16, 32, 64 channels (the first block of stages 2 and 3 with stride 2 and a 1x1
         stride-2 conv + BatchNorm2d projection shortcut; block = conv3x3, BN, ReLU, conv3x3,
         BN, add, ReLU), AdaptiveAvgPool2d((1, 1)), Flatten, Linear(64, 10); batch 128;
     in samples/s, for PyTorch in-process at 1 and 2 threads (child processes, the thread
     count set before torch is imported) and for the real normd server
     (`--compute-threads 2`, loopback) driven by the C++ client bench/normd_load (--spec) over
     TrainStream and unary TrainStep. Both sides build the model from the same ModelSpec JSON
     (PyTorch through the Python client's sequential_from_spec), so they cannot drift apart.
  2. Each Conv2d layer of those networks at its network's batch (bench/kernels_bench.cc,
     ConvLayer/...): forward, input gradient alone, weight gradient alone, in GFLOP/s and as a
     fraction of the FMA peak of the cores the budget uses (budget 1: one core's calibrated
     peak; budget 2: twice that); and the BatchNorm2d + ReLU after each 3x3 convolution
     (BnRelu/...), forward and forward+backward in training mode, in GB/s and as a fraction
     of a one-thread memcpy of the same tensor size.
  3. The server's RSS while it trains ResNet-20 at batch 128 (a fresh server; sampled every
     20 ms through the steps after a warm-up, and once after them), against
     2 x (parameters + optimizer state + the activations the backward pass reads) + 64 MiB,
     computed from the spec (saved_activation_bytes explains the count).
  4. With --profile, a perf profile of that server while it trains ResNet-20 (perf record on
     its pid; the top symbols are printed and the perf.data path kept).

Every figure is the median over repeats after warm-up steps: networks run --rounds times
interleaved (PyTorch 1t, PyTorch 2t, normd; every configuration once per round), each run
--repeats timed repeats; the kernels run --repeats repetitions (Google Benchmark's median
aggregate). OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from the environment of normd
and PyTorch alike (bench_common.child_env).

Usage: /usr/bin/python3 bench/cnn_bench.py --build-dir build [--quick] [--json out.json]
       [--profile [--profile-dir DIR]] [--skip-kernels] [--skip-grpc] [--rounds R] [--repeats N]
       /usr/bin/python3 bench/cnn_bench.py --build-dir build --check-counts   (ctest
       bench_cnn_counts: the memory bound's counts against PyTorch's; measures nothing)
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_common import (Server, Targets, child_env, finish, machine_summary,  # noqa: E402
                          run_json, torch_env, torch_train_step)

CLASSES = 10
IMAGE = (3, 32, 32)
DATASET_ROWS = 1024
THREADS = (1, 2)
# (network, batch) pairs, in the order they run and print.
CONFIGS = (("cnn", 64), ("cnn", 256), ("resnet20", 128))
MEMORY_NET, MEMORY_BATCH = "resnet20", 128
# Issue 13's goals.
GRPC_GOAL = 3.0          # normd over gRPC / PyTorch's faster thread setting, samples/s
CONV_GOAL = 0.60         # each 3x3 convolution pass, fraction of the FMA peak of its cores
# "At or near memory bandwidth" for BatchNorm2d + ReLU, read here as >= 80 % of memcpy's.
BN_GOAL = 0.80


def steps_for(batch, quick):
    """(warm-up steps, steps per timed repeat) for one network run."""
    steps = {64: 8, 128: 3, 256: 3}[batch]
    return (1, max(2, steps // 2)) if quick else (2, steps)


# ---------------------------------------------------------------------------------------------
# The networks, as ModelSpec JSON (proto/normd/v1/normd.proto)

def conv(cin, cout, k=3, stride=1, padding=1, bias=True):
    spec = {"in_channels": cin, "out_channels": cout, "kernel_size": k, "padding": padding}
    if stride != 1:
        spec["stride"] = stride
    if not bias:
        spec["bias"] = False
    return {"conv2d": spec}


def bn2d(c):
    return {"batch_norm2d": {"num_features": c}}


RELU = {"relu": {}}


def model_spec(layers):
    return {"input_shape": list(IMAGE), "layers": layers, "loss": "LOSS_CROSS_ENTROPY",
            "optimizer": {"sgd": {"lr": 0.01, "momentum": 0.9}}, "seed": 1}


def cnn_spec():
    layers = []
    cin = IMAGE[0]
    for i, cout in enumerate((32, 32, 64, 64)):
        layers += [conv(cin, cout), bn2d(cout), RELU]
        if i in (1, 3):
            layers.append({"max_pool2d": {"kernel_size": 2}})
        cin = cout
    layers += [{"flatten": {}}, {"linear": {"in_features": 64 * 8 * 8, "out_features": CLASSES}}]
    return model_spec(layers)


def resnet20_spec():
    layers = [conv(3, 16, bias=False), bn2d(16), RELU]
    cin = 16
    for cout in (16, 32, 64):
        for block in range(3):
            stride = 2 if block == 0 and cout != 16 else 1
            body = [conv(cin, cout, stride=stride, bias=False), bn2d(cout), RELU,
                    conv(cout, cout, bias=False), bn2d(cout)]
            residual = {"body": body}
            if stride != 1 or cin != cout:
                residual["shortcut"] = [conv(cin, cout, k=1, stride=stride, padding=0,
                                             bias=False), bn2d(cout)]
            layers += [{"residual": residual}, RELU]
            cin = cout
    layers += [{"adaptive_avg_pool2d": {}}, {"flatten": {}},
               {"linear": {"in_features": 64, "out_features": CLASSES}}]
    return model_spec(layers)


SPECS = {"cnn": cnn_spec, "resnet20": resnet20_spec}


# ---------------------------------------------------------------------------------------------
# Counting from a spec: parameters, convolution FLOP, the activations a backward pass reads

class _Walk:
    """Walks a spec's layer tree with per-sample shapes, counting parameters, buffers and the
    multiply-adds of the convolutions, and the activations the backward pass reads.

    Activations are counted by tensor: every tensor has an id, and a tensor some layer's
    backward reads is counted once however many layers read it (the ReLU of a block and the
    next block's first convolution and projection shortcut all read the same tensor). What
    each layer's backward reads, as normd's layers do it (core/*.cc) and no more:
      Conv2d, Linear   their input (for the weight gradient; dx needs only the weight)
      BatchNorm        its input (normd recomputes x-hat from x) and 2 floats per channel
                       (the batch mean and inverse standard deviation)
      ReLU             its output (the mask; it is the next layer's input, counted once)
      MaxPool2d        the index of each output's maximum (int32, the output's size)
      AvgPool2d, AdaptiveAvgPool2d, Flatten, the residual add: nothing but shapes (Flatten's
                       output is its input's data: a view would do, so it keeps the input's id)
      cross-entropy    the softmax of the logits (the last layer's output size) and the labels
                       (int64)
    Not counted: the gradients, the backward pass's two gradient buffers, the request's and
    response's copies, im2col scratch: the bound's factor 2 is for those.
    --check-counts (a test) holds this against what PyTorch's autograd saves for the same
    networks (torch.autograd.graph.saved_tensors_hooks): equal, but for PyTorch's int64
    max-pool indices."""

    def __init__(self, batch):
        self.batch = batch
        self.params = 0            # trainable elements
        self.buffers = 0           # running statistics (num_batches_tracked as one element)
        self.conv_flop_fwd = 0.0   # per sample, forward
        self.first_conv_flop = 0.0 # per sample, of the layer whose input is the request's data
        self.saved = {}            # tensor id -> bytes, the tensors some backward reads
        self.extra = 0             # bytes saved besides whole tensors (stats, pool indices)
        self._next_id = 0

    def new_id(self):
        self._next_id += 1
        return self._next_id

    def read(self, tensor_id, shape):
        n = self.batch
        for d in shape:
            n *= d
        self.saved[tensor_id] = 4 * n

    def layers(self, layers, shape, tid):
        for layer in layers:
            shape, tid = self.layer(layer, shape, tid)
        return shape, tid

    def layer(self, layer, shape, tid):
        kind = next(k for k in layer if k != "name")
        s = layer[kind]
        if kind == "residual":
            out_body, _ = self.layers(s["body"], shape, tid)
            self.layers(s.get("shortcut", []), shape, tid)
            return out_body, self.new_id()
        if kind == "conv2d":
            cin, h, w = shape
            k, st, p, g = (s["kernel_size"], s.get("stride", 1), s.get("padding", 0),
                           s.get("groups", 1))
            cout = s["out_channels"]
            ho, wo = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
            self.params += cout * (cin // g) * k * k + (cout if s.get("bias", True) else 0)
            flop = 2.0 * cout * (cin // g) * k * k * ho * wo
            if tid == 0:
                self.first_conv_flop += flop
            self.conv_flop_fwd += flop
            self.read(tid, shape)
            return (cout, ho, wo), self.new_id()
        if kind == "linear":
            self.params += s["in_features"] * s["out_features"] + s["out_features"]
            self.read(tid, shape)
            return (s["out_features"],), self.new_id()
        if kind in ("batch_norm2d", "batch_norm1d"):
            c = s["num_features"]
            self.params += 2 * c
            self.buffers += 2 * c + 1
            self.read(tid, shape)
            self.extra += 2 * 4 * c
            return shape, self.new_id()
        if kind == "relu":
            out = self.new_id()
            self.read(out, shape)
            return shape, out
        if kind in ("max_pool2d", "avg_pool2d"):
            c, h, w = shape
            k, p = s["kernel_size"], s.get("padding", 0)
            st = s.get("stride", k)
            out = (c, (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1)
            if kind == "max_pool2d":
                self.extra += 4 * self.batch * out[0] * out[1] * out[2]
            return out, self.new_id()
        if kind == "adaptive_avg_pool2d":
            return (shape[0], 1, 1), self.new_id()
        if kind == "flatten":
            n = 1
            for d in shape:
                n *= d
            return (n,), tid
        raise ValueError(f"cnn_bench: no count for layer kind {kind}")


def count_model(spec, batch):
    """Parameters, buffers, convolution FLOP and saved activations of `spec` at `batch`."""
    walk = _Walk(batch)
    out_shape, out_id = walk.layers(spec["layers"], tuple(spec["input_shape"]), 0)
    walk.read(-1, out_shape)  # the loss's softmax, the size of the logits
    walk.extra += 8 * batch   # and its labels
    # Convolution FLOP of one training step per sample: forward, weight gradient, and the input
    # gradient of every convolution but one reading the request's data (nothing needs that).
    train_flop = 3 * walk.conv_flop_fwd - walk.first_conv_flop
    return {"params": walk.params, "buffers": walk.buffers,
            "activation_bytes": sum(walk.saved.values()) + walk.extra,
            "conv_flop_per_sample": train_flop}


def memory_bound_bytes(counts):
    """Issue 13's bound: 2 x (parameters + optimizer state + activations the backward pass
    needs) + 64 MiB. Parameters include the running-statistics buffers; SGD with momentum
    keeps one momentum buffer per parameter element."""
    params = 4 * (counts["params"] + counts["buffers"])
    optimizer = 4 * counts["params"]
    return 2 * (params + optimizer + counts["activation_bytes"]) + 64 * 2**20


# ---------------------------------------------------------------------------------------------
# PyTorch side (a child process per thread setting: --torch-worker)

def torch_worker(args):
    sys.path[:0] = [os.path.join(HERE, "..", "client", "python"),
                    os.path.join(os.path.abspath(args.build_dir), "client", "python")]
    import numpy as np
    import torch
    from google.protobuf import json_format
    from normd.torch_interop import sequential_from_spec
    from normd.v1 import normd_pb2 as pb

    torch.set_num_threads(args.threads)
    x_all = torch.from_numpy(np.fromfile(args.data, dtype=np.float32).reshape(-1, *IMAGE))
    y_all = torch.from_numpy(np.fromfile(args.labels, dtype=np.int64))
    out = {"threads": args.threads, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "runs": {}}
    with open(args.jobs) as f:
        jobs = json.load(f)
    for job in jobs:
        spec = json_format.Parse(json.dumps(job["spec"]), pb.ModelSpec())
        batch = job["batch"]
        torch.manual_seed(1)
        model = sequential_from_spec(spec)
        model.train()
        sgd = job["spec"]["optimizer"]["sgd"]
        opt = torch.optim.SGD(model.parameters(), lr=sgd["lr"], momentum=sgd["momentum"])
        loss_fn = torch.nn.CrossEntropyLoss()
        step = torch_train_step(model, opt, loss_fn, x_all, y_all, batch)

        for _ in range(job["warmup"]):
            step()
        rates, cpu_rates = [], []
        for _ in range(job["repeats"]):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(job["steps"]):
                loss = step()
            rates.append(job["steps"] * batch / (time.perf_counter() - t0))
            cpu_rates.append(job["steps"] * batch / max(1e-9, time.process_time() - c0))
        out["runs"][job["key"]] = {"samples_per_s": rates, "cpu_samples_per_s": cpu_rates,
                                   "final_loss": float(loss)}
    json.dump(out, sys.stdout)


def check_counts(build):
    """--check-counts: count_model's parameters, buffers and saved activations against
    PyTorch's for every configuration (the saved tensors through autograd's pack hook; PyTorch
    stores max-pool indices as int64 where the count takes normd's int32). Returns the
    mismatches."""
    sys.path[:0] = [os.path.join(HERE, "..", "client", "python"),
                    os.path.join(os.path.abspath(build), "client", "python")]
    import torch
    from google.protobuf import json_format
    from normd.torch_interop import sequential_from_spec
    from normd.v1 import normd_pb2 as pb

    errors = []
    for net, batch in CONFIGS:
        spec = SPECS[net]()
        counts = count_model(spec, batch)
        torch.manual_seed(1)
        model = sequential_from_spec(json_format.Parse(json.dumps(spec), pb.ModelSpec()))
        x = torch.randn((batch,) + IMAGE)
        y = torch.randint(0, CLASSES, (batch,))
        # Not activations: the parameters and running statistics (counted apart) and 0-d
        # scalars (the loss's total weight).
        state = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        saved = {}

        def pack(t):
            if t.data_ptr() not in state and t.dim() > 0:
                saved[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.nn.functional.cross_entropy(model(x), y)
        # Max-pool indices: int64 in PyTorch, int32 (half the bytes) in the count.
        index_bytes = sum(v for (ptr, _, dtype), v in saved.items()
                          if dtype == torch.int64 and ptr != y.data_ptr())
        expected = counts["activation_bytes"] + index_bytes // 2
        got = sum(saved.values())
        pairs = (("parameters", counts["params"], sum(p.numel() for p in model.parameters())),
                 ("buffers", counts["buffers"], sum(b.numel() for b in model.buffers())),
                 ("saved activation bytes", expected, got))
        for what, ours, theirs in pairs:
            print(f"{net} batch {batch}: {what}: counted {ours}, PyTorch {theirs}")
            if ours != theirs:
                errors.append(f"{net} batch {batch}: {what} {ours} != PyTorch's {theirs}")
    return errors


# ---------------------------------------------------------------------------------------------
# Driver

def config_key(net, batch):
    return f"{net}_b{batch}"


def run_torch(build, threads, jobs_file, data, labels):
    return run_json([sys.executable, os.path.abspath(__file__), "--torch-worker",
                     "--build-dir", build, "--threads", str(threads), "--jobs", jobs_file,
                     "--data", data, "--labels", labels], env=torch_env(threads), timeout=1800)


def load_train_cmd(load_bin, address, spec_file, batch, data, labels, warmup, steps, repeats,
                   rpc="stream", model=None):
    cmd = [load_bin, "--address", address, "--scenario", "train", "--spec", spec_file,
           "--rpc", rpc, "--batch", str(batch), "--warmup", str(warmup), "--steps", str(steps),
           "--repeats", str(repeats), "--data", data, "--labels", labels]
    return cmd + (["--model", model] if model else [])


def run_kernels(binary, quick, repeats):
    """The ConvLayer and BnRelu benchmarks (the CNN at batch 256 left out with quick): the
    median aggregate of `repeats` repetitions of each, by name."""
    nets = "(cnn_b64|resnet20_b128)" if quick else "(cnn_b64|cnn_b256|resnet20_b128)"
    res = run_json([binary, "--benchmark_format=json",
                    f"--benchmark_filter=^(FmaPeak|MemcpyPeak/|(ConvLayer|BnRelu)/{nets}/)",
                    f"--benchmark_min_time={0.03 if quick else 0.1}",
                    f"--benchmark_repetitions={max(1, repeats)}",
                    "--benchmark_report_aggregates_only=true"], timeout=3600)
    out = {}
    for b in res["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        out[b.get("run_name", b["name"])] = b
    return out


def sample_rss(server, cmd, samples):
    """Runs cmd (a normd_load train) while sampling the server's RSS every 20 ms."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    while proc.poll() is None:
        samples.append(server.rss_bytes())
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return json.loads(out)


def perf_top(perf_data, limit=20):
    """The top symbols of a perf.data (self time), as report lines."""
    res = subprocess.run(["perf", "report", "-i", perf_data, "--stdio", "--no-children",
                          "-g", "none", "--sort", "dso,symbol", "--percent-limit", "0.5", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # One line per symbol, runs of blanks squeezed; some perf versions end each line with
    # empty ("-") columns.
    lines = [re.sub(r"( -)+$", "", " ".join(l.split()))[:120] for l in res.stdout.splitlines()
             if l.strip() and not l.startswith("#")]
    return lines[:limit]


def measure_memory(normd_bin, load_bin, workdir, spec_file, data, labels, quick, profile_dir):
    """RSS of a fresh server training ResNet-20 at batch 128 (and, with profile_dir, a perf
    profile of it training more steps)."""
    server = Server(normd_bin, 2, workdir, name="memory")
    model = f"cnn-bench-memory-{os.getpid()}"
    out = {}
    try:
        server.wait_ready(load_bin)
        out["rss_idle"] = server.rss_bytes()
        warmup, steps = (2, 3) if quick else (3, 6)
        cmd = load_train_cmd(load_bin, server.address, spec_file, MEMORY_BATCH, data, labels,
                             warmup, steps, 1, model=model)
        samples = []
        sample_rss(server, cmd, samples)
        out["rss_after"] = server.rss_bytes()
        # The samples after the warm-up steps: the last steps/(warmup+steps) of the series.
        tail = samples[len(samples) * warmup // (warmup + steps):] or samples
        out["rss_peak"] = max(tail, default=0)
        out["rss_samples"] = len(samples)
        if profile_dir is not None:
            perf_data = os.path.join(profile_dir, "normd-resnet20.perf.data")
            rec = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-o", perf_data, "-p",
                                    str(server.proc.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                run_json(load_train_cmd(load_bin, server.address, spec_file, MEMORY_BATCH,
                                        data, labels, 0, 4 if quick else 10, 1, model=model))
            finally:
                rec.send_signal(signal.SIGINT)
                rec.wait(timeout=60)
            out["profile"] = {"perf_data": perf_data, "top": perf_top(perf_data)}
        subprocess.run([load_bin, "--address", server.address, "--scenario", "delete",
                        "--model", model], env=child_env(), check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        server.stop()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--rounds", type=int, default=None,
                    help="times every network configuration runs, interleaved (default 3; "
                         "1 with --quick)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed repeats per run, and kernel repetitions (default 3)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer steps, one round, no kernels of the CNN at batch 256")
    ap.add_argument("--skip-grpc", action="store_true", help="no network or memory figures")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="perf-record the server training ResNet-20 and print the top symbols "
                         "(the perf.data is kept in --profile-dir)")
    ap.add_argument("--profile-dir", default=".",
                    help="where --profile leaves normd-resnet20.perf.data (default: .)")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--check-counts", action="store_true",
                    help="only compare the memory bound's counts with PyTorch's (a test)")
    # Worker mode (internal).
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--jobs", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--labels", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        torch_worker(args)
        return 0
    if args.check_counts:
        errors = check_counts(args.build_dir)
        for e in errors:
            print(f"FAILED: {e}")
        if not errors:
            print("cnn_bench counts: ok")
        return 1 if errors else 0
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)

    import numpy as np

    build = os.path.abspath(args.build_dir)
    kernels_bin = os.path.join(build, "bench", "normd_kernels_bench")
    load_bin = os.path.join(build, "bench", "normd_load")
    normd_bin = os.path.join(build, "server", "normd")
    needed = ([] if args.skip_kernels else [kernels_bin]) + \
        ([] if args.skip_grpc else [load_bin, normd_bin])
    for b in needed:
        if not os.path.exists(b):
            sys.exit(f"cnn_bench: {b} is missing; build first (make build)")
    if args.profile and shutil.which("perf") is None:
        sys.exit("cnn_bench: --profile needs perf (Debian package linux-perf)")

    t_start = time.time()
    workdir = tempfile.mkdtemp(prefix="normd-cnn-bench-")
    results = {"machine": machine_summary(), "rounds": rounds, "repeats": args.repeats,
               "quick": args.quick, "networks": {}, "kernels": {}, "memory": {}, "models": {}}
    server = None
    try:
        rng = np.random.default_rng(2024)
        data = os.path.join(workdir, "x.f32")
        labels = os.path.join(workdir, "y.i64")
        rng.standard_normal((DATASET_ROWS,) + IMAGE, dtype=np.float32).tofile(data)
        rng.integers(0, CLASSES, DATASET_ROWS, dtype=np.int64).tofile(labels)
        spec_files = {}
        for net, make in SPECS.items():
            spec_files[net] = os.path.join(workdir, f"{net}.json")
            with open(spec_files[net], "w") as f:
                json.dump(make(), f)
        for net, batch in CONFIGS:
            results["models"][config_key(net, batch)] = count_model(SPECS[net](), batch)
        jobs = []
        for net, batch in CONFIGS:
            warmup, steps = steps_for(batch, args.quick)
            jobs.append({"key": config_key(net, batch), "spec": SPECS[net](), "batch": batch,
                         "warmup": warmup, "steps": steps, "repeats": args.repeats})
        jobs_file = os.path.join(workdir, "jobs.json")
        with open(jobs_file, "w") as f:
            json.dump(jobs, f)

        if not args.skip_grpc:
            server = Server(normd_bin, 2, workdir, name="throughput")
            server.wait_ready(load_bin)
        rates = {config_key(n, b): {} for n, b in CONFIGS}
        for r in range(rounds):
            print(f"cnn_bench: round {r + 1}/{rounds}", file=sys.stderr)
            for t in THREADS:
                res = run_torch(build, t, jobs_file, data, labels)
                results["torch_info"] = {"torch": res["torch"]}
                for key, run in res["runs"].items():
                    rates[key].setdefault(f"torch_t{t}", []).extend(run["samples_per_s"])
                    rates[key].setdefault(f"torch_t{t}_cpu", []).extend(
                        run["cpu_samples_per_s"])
            if server is None:
                continue
            for net, batch in CONFIGS:
                warmup, steps = steps_for(batch, args.quick)
                for rpc in ("stream", "unary"):
                    cpu0 = server.cpu_seconds()
                    run = run_json(load_train_cmd(load_bin, server.address, spec_files[net],
                                                  batch, data, labels, warmup, steps,
                                                  args.repeats, rpc=rpc), timeout=1800)
                    row = rates[config_key(net, batch)]
                    row.setdefault(f"grpc_{rpc}", []).extend(run["samples_per_s"])
                    # Samples per CPU-second of the server and the client together (the
                    # server's share includes the warm-up steps: a slight underestimate).
                    server_cpu = server.cpu_seconds() - cpu0
                    client_cpu = sum(steps * batch / r for r in run["client_cpu_samples_per_s"])
                    samples = batch * (steps * args.repeats + warmup)
                    row.setdefault(f"grpc_{rpc}_cpu", []).append(
                        samples / max(1e-9, server_cpu + client_cpu))
        if server is not None:
            server.stop()
            server = None
        for key, row in rates.items():
            results["networks"][key] = {k: {"samples_per_s": v, "median": statistics.median(v)}
                                        for k, v in row.items()}

        if not args.skip_kernels:
            print("cnn_bench: kernels", file=sys.stderr)
            results["kernels"] = run_kernels(kernels_bin, args.quick, args.repeats)

        if not args.skip_grpc:
            print("cnn_bench: memory" + (" and profile" if args.profile else ""),
                  file=sys.stderr)
            profile_dir = None
            if args.profile:
                profile_dir = os.path.abspath(args.profile_dir)
                os.makedirs(profile_dir, exist_ok=True)
            mem = measure_memory(normd_bin, load_bin, workdir, spec_files[MEMORY_NET], data,
                                 labels, args.quick, profile_dir)
            mem["bound"] = memory_bound_bytes(
                results["models"][config_key(MEMORY_NET, MEMORY_BATCH)])
            results["memory"] = mem
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    return finish(results, t_start, args.json, print_tables)


# ---------------------------------------------------------------------------------------------
# Report

def fma_peak(r):
    """One core's calibrated FMA peak in GFLOP/s, or None."""
    for name, b in r["kernels"].items():
        if name.startswith("FmaPeak"):
            return b.get("GFLOP/s")
    return None


def torch_best(row):
    rates = [row[k]["median"] for k in ("torch_t1", "torch_t2") if k in row]
    return max(rates) if rates else None


def grpc_best(row):
    rates = [row[k]["median"] for k in ("grpc_stream", "grpc_unary") if k in row]
    return max(rates) if rates else None


def conv_rows(r):
    """{(net, shape): {(pass, threads): benchmark}} of the ConvLayer benchmarks."""
    out = {}
    for name, b in r["kernels"].items():
        parts = name.split("/")
        if parts[0] != "ConvLayer":
            continue
        _, net, shape, p, t = parts[:5]
        out.setdefault((net, shape), {})[(p, int(t.rstrip("t")))] = b
    return out


def bn_rows(r):
    out = {}
    for name, b in r["kernels"].items():
        parts = name.split("/")
        if parts[0] != "BnRelu":
            continue
        _, net, shape, op, t = parts[:5]
        out.setdefault((net, shape), {})[(op, int(t.rstrip("t")))] = b
    return out


def print_tables(r):
    m = r["machine"]
    print(f"\nCNNs, normd vs PyTorch: {m.get('Model name', '?')}, {m.get('CPU(s)', '?')} CPUs, "
          f"load average {' '.join(m.get('loadavg', []))} at start; {r['rounds']} round(s) x "
          f"{r['repeats']} repeats{' (quick)' if r['quick'] else ''}")
    if r.get("torch_info"):
        print(f"PyTorch {r['torch_info']['torch']}")
    peak = fma_peak(r)
    if peak:
        print(f"single-core FMA peak {peak:.1f} GFLOP/s (calibrated in the kernel benchmark)")
    nan = float("nan")

    print("\nTraining steps, samples/s (median of all repeats); normd: the real server "
          "(--compute-threads 2) over loopback gRPC; ratio = normd's faster RPC / PyTorch's "
          "faster thread setting; conv %: the convolutions' FLOP per step at that rate, of "
          "two cores' FMA peak")
    print(f"{'network':>14} {'batch':>6} {'torch 1t':>9} {'torch 2t':>9} {'grpc strm':>9} "
          f"{'grpc unary':>10} {'ratio':>7} {'conv % normd':>12} {'conv % torch':>12}")
    for net, batch in CONFIGS:
        key = config_key(net, batch)
        row = r["networks"].get(key, {})
        cells = [f"{row[k]['median']:9.1f}" if k in row else f"{'-':>9}"
                 for k in ("torch_t1", "torch_t2", "grpc_stream")]
        cells.append(f"{row['grpc_unary']['median']:10.1f}" if "grpc_unary" in row
                     else f"{'-':>10}")
        g, t = grpc_best(row), torch_best(row)
        cells.append(f"{g / t:6.2f}x" if g and t else f"{'-':>7}")
        flop = r["models"][key]["conv_flop_per_sample"]
        for rate in (g, t):
            cells.append(f"{100 * rate * flop / (2e9 * peak):11.1f}%" if rate and peak
                         else f"{'-':>12}")
        print(f"{net:>14} {batch:>6} " + " ".join(cells))

    print("\nThe same per CPU-second (samples / CPU time of the processes doing the work: "
          "PyTorch's; normd's server and client together, warm-up included; independent of "
          "other jobs' share of the cores)")
    print(f"{'network':>14} {'batch':>6} {'torch 1t':>9} {'torch 2t':>9} {'grpc strm':>9} "
          f"{'grpc unary':>10}")
    for net, batch in CONFIGS:
        row = r["networks"].get(config_key(net, batch), {})
        print(f"{net:>14} {batch:>6} " + " ".join(
            f"{row[k]['median']:{w}.1f}" if k in row else f"{'-':>{w}}"
            for k, w in (("torch_t1_cpu", 9), ("torch_t2_cpu", 9), ("grpc_stream_cpu", 9),
                         ("grpc_unary_cpu", 10))))

    convs = conv_rows(r)
    if convs:
        print("\nConv2d layers at their network's batch: GFLOP/s (% of the FMA peak of the "
              "cores used: budget 1 one core, budget 2 two); dx: input gradient alone, dW: "
              "weight gradient alone (the first layers' dx, which no training step computes, "
              "is shown but not held to the target)")
        head = " ".join(f"{p + ' ' + str(t) + 't':>15}" for t in THREADS
                        for p in ("fwd", "dx", "dW"))
        print(f"{'network':>14} {'layer (CinxHxW-Cout-kKsS)':>26} {head}")
        for (net, shape), passes in convs.items():
            cells = []
            for t in THREADS:
                for p in ("fwd", "bwd_dx", "bwd_dw"):
                    b = passes.get((p, t))
                    cells.append(f"{b['GFLOP/s']:7.1f} ({100 * b['frac_peak']:3.0f}%)"
                                 if b else f"{'-':>15}")
            print(f"{net:>14} {shape:>26} " + " ".join(f"{c:>15}" for c in cells))
        print("The same at budget 1 per CPU time (the layer's thread's; other jobs' share of "
              "the core removed): % of one core's peak")
        print(f"{'network':>14} {'layer':>26} {'fwd':>7} {'dx':>7} {'dW':>7}")
        for (net, shape), passes in convs.items():
            cells = []
            for p in ("fwd", "bwd_dx", "bwd_dw"):
                b = passes.get((p, 1))
                cells.append(f"{100 * b['frac_peak'] * b['real_time'] / b['cpu_time']:6.0f}%"
                             if b and b.get("cpu_time") else f"{'-':>7}")
            print(f"{net:>14} {shape:>26} " + " ".join(cells))
        splits = [b.get("splits", 0) for passes in convs.values()
                  for (p, t), b in passes.items() if t == 2]
        if splits:
            print(f"Budget 2: {sum(1 for v in splits if v > 0)} of {len(splits)} layer passes "
                  "ran split across two cores (kernels_bench's `splits`: the second core's "
                  "helper declines while other processes keep that core busy)")

    bns = bn_rows(r)
    if bns:
        print("\nBatchNorm2d + ReLU (training) after each 3x3 convolution, on its output: GB/s "
              "(% of a one-thread memcpy of one tensor); bytes counted: fwd 3 and fwd+bwd 8 "
              "tensors (kernels_bench.cc)")
        for k, b in r["kernels"].items():
            if k.startswith("MemcpyPeak/"):
                size = int(k.split("/")[1])
                print(f"  memcpy of {size / 2**20:6.2f} MiB: {b['GB/s']:6.1f} GB/s")
        head = " ".join(f"{op + ' ' + str(t) + 't':>16}" for t in THREADS
                        for op in ("fwd", "fwd_bwd"))
        print(f"{'network':>14} {'CxHxW':>10} {head}")
        for (net, shape), ops in bns.items():
            cells = []
            for t in THREADS:
                for op in ("fwd", "fwd_bwd"):
                    b = ops.get((op, t))
                    cells.append(f"{b['GB/s']:7.1f} ({100 * b.get('frac_memcpy', nan):3.0f}%)"
                                 if b else "-")
            print(f"{net:>14} {shape:>10} " + " ".join(f"{c:>16}" for c in cells))

    mem = r.get("memory") or {}
    counts = r["models"].get(config_key(MEMORY_NET, MEMORY_BATCH))
    if counts:
        print(f"\nServer memory, {MEMORY_NET} at batch {MEMORY_BATCH}: parameters "
              f"{counts['params']} (+ {counts['buffers']} buffer elements), SGD momentum "
              f"{counts['params']}, activations the backward pass reads "
              f"{counts['activation_bytes'] / 2**20:.1f} MiB")
    if mem:
        print(f"  RSS idle {mem['rss_idle'] / 2**20:.1f} MiB, peak while training (after the "
              f"warm-up, {mem['rss_samples']} samples) {mem['rss_peak'] / 2**20:.1f} MiB, "
              f"after {mem['rss_after'] / 2**20:.1f} MiB; bound {mem['bound'] / 2**20:.1f} MiB "
              "= 2 x (parameters + optimizer state + saved activations) + 64 MiB")
    prof = mem.get("profile")
    if prof:
        print(f"\nperf profile of the server training {MEMORY_NET} (self time; "
              f"{prof['perf_data']}):")
        for line in prof["top"]:
            print(f"  {line}")

    print_targets(r)
    print(f"\ntotal benchmark time {r['duration_s']:.0f} s; load average at the end "
          f"{' '.join(r['machine'].get('loadavg_end', []))}")


def print_targets(r):
    """Issue 13's targets against this run's figures (wall clock)."""
    t = Targets()
    for net, batch in CONFIGS:
        row = r["networks"].get(config_key(net, batch), {})
        g, tb = grpc_best(row), torch_best(row)
        t.check(f"normd over gRPC >= 3x PyTorch: {net}, batch {batch}",
                g / tb if g and tb else None, f">= {GRPC_GOAL:.0f}x",
                lambda v: v >= GRPC_GOAL)
    convs = conv_rows(r)
    for threads in THREADS:
        for p in ("fwd", "bwd_dx", "bwd_dw"):
            worst = None
            for (net, shape), passes in convs.items():
                b = passes.get((p, threads))
                if b is None or "-k3" not in shape:
                    continue
                if p == "bwd_dx" and shape.startswith(f"{IMAGE[0]}x"):
                    continue  # a network's first layer: no training step computes its dx
                if worst is None or b["frac_peak"] < worst[0]:
                    worst = (b["frac_peak"], f"{net} {shape}")
            t.check(f"3x3 conv {p}, budget {threads}, worst layer"
                    + (f" ({worst[1]})" if worst else ""),
                    worst[0] if worst else None, f">= {CONV_GOAL:.0%} of peak",
                    lambda v: v >= CONV_GOAL, "{:.0%}")
    bns = bn_rows(r)
    for threads in THREADS:
        for op in ("fwd", "fwd_bwd"):
            worst = None
            for (net, shape), ops in bns.items():
                b = ops.get((op, threads))
                if b is None or "frac_memcpy" not in b:
                    continue
                if worst is None or b["frac_memcpy"] < worst[0]:
                    worst = (b["frac_memcpy"], f"{net} {shape}")
            t.check(f"BN2d+ReLU {op}, budget {threads}, worst"
                    + (f" ({worst[1]})" if worst else ""),
                    worst[0] if worst else None, f">= {BN_GOAL:.0%} of memcpy",
                    lambda v: v >= BN_GOAL, "{:.0%}")
    mem = r.get("memory") or {}
    t.check(f"server RSS, {MEMORY_NET} batch {MEMORY_BATCH}, peak / bound",
            mem["rss_peak"] / mem["bound"] if mem.get("bound") else None, "<= 1",
            lambda v: v <= 1.0, "{:.2f}")
    t.print("Issue 13 targets (this run, wall clock)", width=72)


if __name__ == "__main__":
    sys.exit(main())

"""PyTorch parity of per-layer options and BatchNorm folding (normd's core through parity_driver
against Debian's PyTorch, run in float64 as the reference).

Frozen BatchNorm: PyTorch's `bn.eval()` inside a model in train mode. Untrainable layer:
`requires_grad_(False)` on its parameters (their grad stays None, so torch.optim skips them:
no update, no weight decay, no optimizer state). Folding: torch.nn.utils.fusion's
fuse_linear_bn_eval / fuse_conv_bn_eval on every BatchNorm that directly follows a Linear or
Conv2d, and the unfolded model's eval output.

Usage: /usr/bin/python3 freeze_fold_parity.py --driver build/tests/parity/parity_driver
"""

import argparse
import io
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# The layer specs, driver lines and exchange format of the main parity suite.
from torch_parity import (ResidualBlock, bn, conv, driver_layer_line, linear,  # noqa: E402
                          parse_driver_output, residual, simple, tensor_record, torch_module)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval  # noqa: E402

TOL = {"out": 1e-5, "grad": 1e-5, "param": 1e-4, "opt": 1e-4, "stats": 1e-5, "fold": 1e-5}


class Case:
    def __init__(self, name, input_shape, layers, optimizer, loss="ce", classes=3, seed=0):
        self.name, self.input_shape, self.layers = name, tuple(input_shape), layers
        self.optimizer, self.loss, self.classes = optimizer, loss, classes
        self.rng = np.random.RandomState(seed)
        torch.manual_seed(seed)
        model = nn.Sequential(*[torch_module(s) for s in layers])
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # BatchNorm parameters and statistics away from their defaults
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    if m.affine:
                        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                    if m.track_running_stats:
                        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        self.state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        self.ops = []

    def x(self, n):
        c = self.input_shape[0]
        shape = (1, c) + (1,) * (len(self.input_shape) - 1)
        return (self.rng.randn(n, *self.input_shape) * self.rng.uniform(0.5, 2.0, shape)
                + self.rng.uniform(-1.0, 1.0, shape)).astype(np.float32)

    def labels(self, n):
        return self.rng.randint(0, self.classes, size=n).astype(np.float32)

    # Operations (see parity_driver.cc).
    def options(self, label, frozen=None, trainable=None):
        self.ops.append(("layer_options", label, frozen, trainable))

    def mode(self, train):
        self.ops.append(("mode", train))

    def fwd_bwd(self, tag, n):
        x = self.x(n)
        self.ops.append(("forward", tag, x))
        self.ops.append(("backward", tag + "b", self.rng.randn(n, self.classes).astype(np.float32)))

    def train(self, tag, steps, n=16):
        for i in range(steps):
            self.ops.append(("train_step", f"{tag}{i}", self.x(n), self.labels(n)))

    def get_state(self, tag):
        self.ops.append(("get_state", tag))

    def fold(self, tag, n=32):
        self.ops.append(("fold", tag, self.x(n)))


def case_bytes(case):
    out = io.BytesIO()

    def line(s):
        out.write((s + "\n").encode())

    line("input_shape " + " ".join(str(d) for d in case.input_shape))
    line("seed 0")
    for s in case.layers:
        line(driver_layer_line(s))
    line(f"loss {case.loss}")
    kind, o = case.optimizer
    line(" ".join([f"optimizer {kind}"] + [f"{k}={v!r}" for k, v in o.items()]))
    line("build")
    line(f"set_state {len(case.state)}")
    for k, v in case.state.items():
        out.write(tensor_record(k, v))
    for op in case.ops:
        if op[0] == "layer_options":
            opts = [f"frozen={int(op[2])}"] if op[2] is not None else []
            opts += [f"trainable={int(op[3])}"] if op[3] is not None else []
            line(" ".join(["layer_options", op[1]] + opts))
        elif op[0] == "mode":
            line("mode " + ("train" if op[1] else "eval"))
        elif op[0] in ("forward", "backward", "fold"):
            line(f"{op[0]} {op[1]}")
            out.write(tensor_record("x", op[2]))
        elif op[0] == "train_step":
            line(f"train_step {op[1]}")
            out.write(tensor_record("x", op[2]))
            out.write(tensor_record("target", op[3]))
        elif op[0] == "get_state":
            line(f"get_state {op[1]} optimizer")
    return out.getvalue()


def run_normd(driver, case, workdir):
    path, out_path = (os.path.join(workdir, case.name + e) for e in (".case", ".out"))
    with open(path, "wb") as f:
        f.write(case_bytes(case))
    proc = subprocess.run([driver, path, out_path], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"parity_driver exited with {proc.returncode}: {proc.stderr.strip()}")
    with open(out_path, "rb") as f:
        results, errors, _ = parse_driver_output(f.read())
    if errors:
        raise RuntimeError(f"normd refused: {errors}")
    return results


def make_optimizer(spec, params):
    kind, o = spec
    if kind == "sgd":
        return torch.optim.SGD(params, lr=o["lr"], momentum=o.get("momentum", 0.0),
                               weight_decay=o.get("weight_decay", 0.0))
    cls = torch.optim.AdamW if o.get("decoupled", 0) else torch.optim.Adam
    return cls(params, lr=o["lr"], weight_decay=o.get("weight_decay", 0.0))


def fuse_sequential(seq):
    """torch.nn.utils.fusion on every tracked BatchNorm that directly follows a Linear or
    Conv2d, inside residual blocks' branches too. REQUIRES: eval mode."""
    fused, layers, i = [], list(seq), 0
    while i < len(layers):
        m, nxt = layers[i], layers[i + 1] if i + 1 < len(layers) else None
        tracked = isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.track_running_stats
        if isinstance(m, nn.Linear) and isinstance(nxt, nn.BatchNorm1d) and tracked:
            fused.append(fuse_linear_bn_eval(m, nxt))
            i += 2
        elif isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d) and tracked:
            fused.append(fuse_conv_bn_eval(m, nxt))
            i += 2
        elif isinstance(m, ResidualBlock):
            fused.append(ResidualBlock(list(fuse_sequential(m.body)),
                                       list(fuse_sequential(m.shortcut))))
            i += 1
        else:
            fused.append(m)
            i += 1
    return nn.Sequential(*fused)


def run_torch(case):
    """The case in PyTorch (float64). Results named as the driver names them."""
    model = nn.Sequential(*[torch_module(s) for s in case.layers]).double()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in case.state.items()})
    model.train()
    frozen = set()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    opt = make_optimizer(case.optimizer, params)
    res, last = {}, None
    for op in case.ops:
        kind = op[0]
        if kind == "layer_options":
            m = model.get_submodule(op[1])  # a label is the module's path: "1", "3.body.1"
            if op[2] is not None:
                (frozen.add if op[2] else frozen.discard)(op[1])
                m.train(model.training and not op[2])
            if op[3] is not None:
                m.requires_grad_(op[3])
        elif kind == "mode":
            model.train(op[1])
            for label in frozen:  # model.train() resets children: frozen layers stay in eval
                model.get_submodule(label).eval()
        elif kind == "forward":
            x = torch.from_numpy(op[2]).double().requires_grad_()
            out = model(x)
            res[op[1] + ".out"] = out
            last = (x, out)
        elif kind == "backward":
            x, out = last
            for p in params:
                p.grad = None
            out.backward(torch.from_numpy(op[2]).double())
            res[op[1] + ".gx"] = x.grad
            for n, p in zip(names, params):
                res[f"{op[1]}.grad.{n}"] = p.grad if p.grad is not None else torch.zeros_like(p)
        elif kind == "train_step":
            opt.zero_grad(set_to_none=True)
            out = model(torch.from_numpy(op[2]).double())
            loss = F.cross_entropy(out, torch.from_numpy(op[3]).long())
            loss.backward()
            opt.step()
            res[op[1] + ".loss"] = loss
        elif kind == "get_state":
            for k, v in model.state_dict().items():
                res[f"{op[1]}.{k}"] = v.clone()
            for n, p in zip(names, params):
                for slot, v in opt.state.get(p, {}).items():
                    res[f"{op[1]}.optimizer.{n}.{slot}"] = torch.as_tensor(v).clone()
        elif kind == "fold":
            model_eval = model.training
            model.eval()
            folded = fuse_sequential(model).eval()
            x = torch.from_numpy(op[2]).double()
            with torch.no_grad():
                res[op[1] + ".out"] = model(x)  # the unfolded eval model: what folding keeps
                res[op[1] + ".fused_out"] = folded(x)
            for k, v in folded.state_dict().items():
                res[f"{op[1]}.{k}"] = v.clone()
            model.train(model_eval)
            for label in frozen:
                model.get_submodule(label).eval()
    return {k: v.detach().to(torch.float64).numpy() for k, v in res.items()}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def category(name):
    if ".grad." in name or name.endswith(".gx"):
        return "grad"
    if ".optimizer." in name:
        return "opt"
    if "running_" in name or "num_batches" in name:
        return "stats"
    if name.endswith(".out") or name.endswith(".loss"):
        return "out"
    return "param"


class Checker:
    def __init__(self):
        self.failures, self.checked = [], 0

    def close(self, case, name, got, want, tol):
        self.checked += 1
        err = rel(got, want)
        if not err <= tol:
            self.failures.append(f"{case}: {name}: relative error {err:.2e} > {tol:g}")
        return err

    def true(self, case, what, ok):
        self.checked += 1
        if not ok:
            self.failures.append(f"{case}: {what}")


def compare(chk, case, normd, ref, skip=()):
    """Every result torch produced must match normd's; returns the worst error per category."""
    worst = {}
    for name, want in ref.items():
        if any(s in name for s in skip):
            continue
        if name not in normd:
            chk.true(case.name, f"{name} missing from normd's results", False)
            continue
        cat = "fold" if name.startswith("fold") else category(name)
        err = chk.close(case.name, name, normd[name], want, TOL[cat])
        worst[cat] = max(worst.get(cat, 0.0), err)
    return worst


def mlp(bias_first=True):
    return [linear(6, 16, bias_first), bn("1d", 16), simple("relu"), linear(16, 12), bn("1d", 12),
            simple("relu"), linear(12, 3)]


def cnn(act="relu"):
    return [conv(2, 4, 3, pad=1, bias=False), bn("2d", 4), simple(act), conv(4, 4, 3, pad=1),
            bn("2d", 4, affine=False), simple(act), simple("flatten"), linear(4 * 5 * 5, 3)]


def resnet():
    """A stem, a stride-2 BasicBlock with a projection shortcut, a depthwise-separable block,
    global average pooling (tanh: see cnn_frozen_then_unfrozen)."""
    return [conv(2, 4, 3, pad=1, bias=False), bn("2d", 4), simple("tanh"),
            residual([conv(4, 6, 3, stride=2, pad=1, bias=False), bn("2d", 6), simple("tanh"),
                      conv(6, 6, 3, pad=1, bias=False), bn("2d", 6)],
                     [conv(4, 6, 1, stride=2, bias=False), bn("2d", 6)]),
            simple("tanh"),
            residual([conv(6, 6, 3, pad=1, bias=False, groups=6), bn("2d", 6), simple("tanh"),
                      conv(6, 6, 1, bias=False), bn("2d", 6, affine=False)]),
            simple("adaptiveavgpool2d"), simple("flatten"), linear(6, 3)]


def cases():
    out = []
    for opt in (("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
                ("adam", {"lr": 0.01, "weight_decay": 1e-2})):
        # Frozen BatchNorm 1 and untrainable Linear 3 in a train-mode model: outputs and grads
        # once, running statistics fixed over 20 steps, everything after 50.
        c = Case(f"mlp_frozen_{opt[0]}", [6], mlp(), opt, seed=3)
        c.options("1", frozen=True)
        c.options("3", trainable=False)
        c.fwd_bwd("fb", 16)
        c.train("s", 20)
        c.get_state("after20")
        c.train("t", 30)
        c.get_state("after50")
        out.append(c)
    # Conv-BN: frozen BatchNorm2d, untrainable first conv; then unfreeze and make it trainable
    # again (torch: bn.train(), requires_grad_(True): fresh optimizer state from that step).
    c = Case("cnn_frozen_then_unfrozen", [2, 5, 5], cnn("tanh"),
             ("sgd", {"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3}), seed=5)
    c.options("1", frozen=True)
    c.options("0", trainable=False)
    c.options("4", frozen=True)
    c.fwd_bwd("fb", 8)
    c.train("s", 20, n=8)
    c.get_state("after20")
    c.options("1", frozen=False)
    c.options("0", trainable=True)
    c.mode(True)
    c.train("t", 10, n=8)
    c.get_state("after30")
    out.append(c)
    # Frozen layers across a mode switch: eval and back to train keeps them frozen.
    # (Linear 0 without bias: before a batch-statistics BatchNorm its gradient is exactly zero
    # and Adam would scale the rounding noise up to full steps.)
    c = Case("mlp_frozen_mode_switch", [6], mlp(bias_first=False),
             ("adam", {"lr": 0.01, "decoupled": 1, "weight_decay": 1e-2}), seed=9)
    c.options("4", frozen=True)
    c.options("6", trainable=False)
    c.train("s", 5)
    c.mode(False)
    c.mode(True)
    c.train("t", 5)
    c.get_state("end")
    out.append(c)
    # Options on layers inside residual blocks: a frozen BatchNorm in a body, an untrainable
    # shortcut projection, a whole block frozen (its BatchNorms: torch's block.eval()).
    c = Case("resnet_nested_options", [2, 6, 6], resnet(),
             ("sgd", {"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3}), seed=13)
    c.options("3.body.1", frozen=True)
    c.options("3.shortcut.0", trainable=False)
    c.options("5", frozen=True)
    c.fwd_bwd("fb", 8)
    c.train("s", 20, n=8)
    c.get_state("after20")
    c.options("5", frozen=False)
    c.mode(True)
    c.train("t", 10, n=8)
    c.get_state("after30")
    out.append(c)
    # Folding after training moved the running statistics.
    for name, layers, shape in (("fold_mlp", mlp(bias_first=False), [6]),
                                ("fold_cnn", cnn(), [2, 5, 5]),
                                ("fold_resnet", resnet(), [2, 6, 6])):
        c = Case(name, shape, layers, ("sgd", {"lr": 0.05, "momentum": 0.9}), seed=11)
        c.train("s", 10, n=8)
        c.fold("fold")
        out.append(c)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--driver", required=True)
    args = ap.parse_args()
    chk = Checker()
    with tempfile.TemporaryDirectory(prefix="normd-freeze-parity-") as work:
        for case in cases():
            normd_res = run_normd(args.driver, case, work)
            ref = run_torch(case)
            before = len(chk.failures)
            worst = compare(chk, case, normd_res, ref, skip=(".fused_out",))
            if case.name.startswith("fold"):
                # The folded model's own output against the unfolded eval model (torch, f64) and
                # torch's fused model: equal to 1e-5.
                for want in ("fold.out", "fold.fused_out"):
                    err = chk.close(case.name, f"folded output vs {want}", normd_res["fold.out"],
                                    ref[want], TOL["fold"])
                    worst["fold"] = max(worst.get("fold", 0.0), err)
                absdiff = np.max(np.abs(normd_res["fold.out"] - ref["fold.out"]))
                chk.true(case.name, f"folded output differs by {absdiff:.2e} > 1e-5",
                         absdiff <= 1e-5)
            else:
                # Frozen statistics are never touched, untrainable parameters never move and keep
                # empty optimizer state, bit for bit.
                # A label may name a residual block: its layers' entries are checked.
                def under(label, suffixes):
                    return [k for k in case.state
                            if k.startswith(label + ".") and k.endswith(suffixes)]
                for tag in [op[1] for op in case.ops if op[0] == "get_state"][:1]:
                    for layer in sorted({op[1] for op in case.ops
                                         if op[0] == "layer_options" and op[2]}):
                        for key in under(layer, ("running_mean", "running_var")):
                            chk.true(case.name, f"{tag}: {key} moved while frozen",
                                     np.array_equal(normd_res[f"{tag}.{key}"],
                                                    case.state[key].astype(np.float64)))
                        for key in under(layer, "num_batches_tracked"):
                            chk.true(case.name, f"{tag}: {key} moved while frozen",
                                     float(normd_res[f"{tag}.{key}"]) == 0.0)
                    for layer in sorted({op[1] for op in case.ops
                                         if op[0] == "layer_options" and op[3] is False}):
                        for key in under(layer, (".weight", ".bias")):
                            chk.true(case.name, f"{tag}: untrainable {key} moved",
                                     np.array_equal(normd_res[f"{tag}.{key}"],
                                                    case.state[key].astype(np.float64)))
                            chk.true(case.name, f"{tag}: untrainable {key} has optimizer steps",
                                     float(normd_res[f"{tag}.optimizer.{key}.step"]) == 0.0)
            status = "ok" if len(chk.failures) == before else "FAIL"
            figures = "  ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items()))
            print(f"{status:4} {case.name:28} {figures}")
    print(f"{chk.checked} checks, {len(chk.failures)} failures")
    for f in chk.failures:
        print("FAIL", f)
    return 1 if chk.failures else 0


if __name__ == "__main__":
    sys.exit(main())

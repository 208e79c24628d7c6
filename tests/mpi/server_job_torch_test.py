"""A data-parallel normd job (issue 12) against PyTorch on the whole batch.

Usage (ctest, label mpi): server_job_torch_test.py RANKS TRANSPORT   (TRANSPORT: shm | tcp)

server_job_test.py shows that a job equals a single-process normd given the same calls; this
test compares the job with PyTorch directly. Each case creates a model in a job of RANKS ranks,
builds its torch twin from the job's own initial state (normd.torch_interop, in float64, the
reference), and gives both the same whole batches:
- Forward in train mode + Backward + ApplyGradients with plain SGD: the outputs, the input
  gradient, the parameter gradients (each parameter's change under that step, divided by the
  learning rate) and the whole batch's gradient norm against torch's autograd;
- TrainStep: the running statistics and num_batches_tracked after 20 steps, the parameters, the
  running statistics and the counters after 50, against torch's optimizer on the mean loss.
Cases: uneven shards (257 rows over 2 or 3 ranks; 2 rows over 3 ranks, a rank without rows),
BatchNorm1d and BatchNorm2d, momentum=None, affine=false, track_running_stats=false, SGD with
momentum and Adam. Dropout is left to server_job_test.py (the job's masks equal a single
process's, whose generator is normd's, not torch's). Tolerances: the parity suite's
(tests/parity/torch_parity.py). Prints the largest deviation of each kind.
"""

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_job_test import Job, batches, cnn_spec, mlp_spec  # noqa: E402

from normd.torch_interop import sequential_from_spec  # noqa: E402

TOL = {"outputs": 1e-5, "input grads": 1e-5, "param grads": 1e-5, "grad norm": 1e-5,
       "running stats": 1e-5, "params": 1e-4}
WORST = {}
FAILURES = []


def check(kind, what, got, want):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        FAILURES.append(f"{what}: shape {got.shape} vs torch's {want.shape}")
        return
    scale = np.linalg.norm(want)
    e = np.linalg.norm(got - want) / (scale if scale > 0 else 1.0)
    if e >= WORST.get(kind, (0.0, ""))[0]:
        WORST[kind] = (e, what)
    if not e <= TOL[kind]:
        FAILURES.append(f"{what}: relative error {e:.3g} > {TOL[kind]:g} ({kind})")


def torch_twin(client, model):
    """The job's model as a float64 nn.Sequential in train mode, from the job's own state."""
    m = client.get_model(model)
    return sequential_from_spec(m.spec, client.get_state(model)).double().train()


def compare_state(what, client, model, seq, kinds):
    """The job's state against the torch twin's state_dict, for the kinds asked."""
    mine = client.get_state(model)
    theirs = seq.state_dict()
    if list(mine) != list(theirs):
        FAILURES.append(f"{what}: state names {list(mine)} vs torch's {list(theirs)}")
        return
    for name, value in mine.items():
        if name.endswith("num_batches_tracked"):
            if int(round(float(value))) != int(theirs[name]):
                FAILURES.append(f"{what}: {name} is {value}, torch's {int(theirs[name])}")
            continue
        kind = "running stats" if "running_" in name else "params"
        if kind in kinds:
            check(kind, f"{what}: {name}", value, theirs[name].numpy())


def gradients_case(client, model, spec, x, what):
    """Forward (train) + Backward + ApplyGradients with plain SGD against torch's autograd."""
    # A large rate: the step dwarfs the parameter, so its float32 rounding stays far below the
    # tolerance when the gradient is read back as (before - after) / lr.
    lr = 1024.0
    spec = dict(spec, optimizer={"sgd": {"lr": lr}})
    client.create_model(spec, model)
    seq = torch_twin(client, model)
    before = client.get_state(model)
    f = client.forward(model, x, retain_for_backward=True)
    xt = torch.from_numpy(x).double().requires_grad_(True)
    out = seq(xt)
    check("outputs", f"{what}: forward output", f.output, out.detach().numpy())
    # dL/d(output) of a mean over the whole batch, the same on both sides.
    g = (np.cos(np.arange(out.numel())).reshape(out.shape) / len(x)).astype(np.float32)
    gx = client.backward(model, f.forward_id, g, return_grad_input=True)
    out.backward(torch.from_numpy(g).double())
    check("input grads", f"{what}: input gradient", gx, xt.grad.numpy())
    r = client.apply_gradients_response(model)
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in seq.parameters())).item()
    check("grad norm", f"{what}: ApplyGradients grad_norm", [r.grad_norm], [norm])
    after = client.get_state(model)
    for name, p in seq.named_parameters():
        # SGD without momentum: the parameter moved by minus lr times its gradient.
        moved = (before[name].astype(np.float64) - after[name].astype(np.float64)) / lr
        check("param grads", f"{what}: {name} gradient", moved, p.grad.numpy())
    client.delete_model(model)


def training_case(client, model, spec, data, what):
    """TrainStep on every batch against torch's optimizer on the mean cross-entropy."""
    client.create_model(spec, model)
    seq = torch_twin(client, model)
    opt = spec["optimizer"]
    if "adam" in opt:
        optimizer = torch.optim.Adam(seq.parameters(), lr=opt["adam"]["lr"])
    else:
        optimizer = torch.optim.SGD(seq.parameters(), lr=opt["sgd"]["lr"],
                                    momentum=opt["sgd"].get("momentum", 0.0))
    for i, (x, y) in enumerate(data):
        client.train_step(model, x, labels=y)
        optimizer.zero_grad()
        F.cross_entropy(seq(torch.from_numpy(x).double()), torch.from_numpy(y)).backward()
        optimizer.step()
        if i + 1 == 20:
            compare_state(f"{what} after 20 steps", client, model, seq, {"running stats"})
    compare_state(f"{what} after {len(data)} steps", client, model, seq,
                  {"running stats", "params"})
    client.delete_model(model)


def main():
    ranks, transport = int(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(21)
    job = Job(ranks, transport)
    try:
        c = job.client
        sgd = {"sgd": {"lr": 0.05, "momentum": 0.9}}
        untracked = {"affine": False, "track_running_stats": False}
        # Gradients of one step: uneven shards, and more ranks than rows.
        gradients_case(c, "g1", mlp_spec(dropout=0.0), batches(rng, [16], 4, 257, 1)[0][0],
                       "BatchNorm1d, batch 257")
        gradients_case(c, "g2", cnn_spec(), batches(rng, [2, 6, 6], 3, 2, 1)[0][0],
                       "BatchNorm2d momentum=None, batch 2")
        gradients_case(c, "g3", mlp_spec(untracked, dropout=0.0),
                       batches(rng, [16], 4, 37, 1)[0][0], "affine=false untracked, batch 37")
        # Training: Adam, SGD with momentum, BatchNorm1d/2d, momentum=None, untracked.
        training_case(c, "t1", mlp_spec(dropout=0.0), batches(rng, [16], 4, 257, 50),
                      "BatchNorm1d + Adam, batch 257")
        training_case(c, "t2", cnn_spec(), batches(rng, [2, 6, 6], 3, 37, 50),
                      "BatchNorm2d momentum=None + SGD momentum, batch 37")
        training_case(c, "t3", mlp_spec(untracked, dropout=0.0, optimizer=sgd),
                      batches(rng, [16], 4, 64, 50), "affine=false untracked + SGD, batch 64")
        training_case(c, "t4", cnn_spec(), batches(rng, [2, 6, 6], 3, 2, 50),
                      "BatchNorm2d momentum=None + SGD momentum, batch 2")
        code = job.stop()
        if code != 0:
            FAILURES.append(f"SIGTERM to normd-mpirun: the job exited {code}")
    finally:
        if job.proc.poll() is None:
            job.kill()
        if FAILURES:
            sys.stderr.write(f"--- job log ---\n{job.log()[-4000:]}\n")
    for kind in sorted(WORST):
        e, where = WORST[kind]
        print(f"largest relative error, {kind}: {e:.3g} (tolerance {TOL[kind]:g}) at {where}")
    if FAILURES:
        print("FAILED:\n  " + "\n  ".join(FAILURES))
        return 1
    print(f"OK: a job of {ranks} ranks over {transport} equals PyTorch on the whole batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())

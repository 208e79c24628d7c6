#!/usr/bin/python3
"""Bounded stress test (issue 6, Load): 16 client threads x mixed RPCs over several models.

For a fixed time (NORMD_STRESS_SECONDS, default 15) every thread loops over TrainStep,
Forward (train and eval), Evaluate, GetModel, ListModels and GetState on a random model.
Asserts: no RPC error at all (the server runs with --max-queued-per-model above the number of
clients, so RESOURCE_EXHAUSTED is not expected either; it is counted like any other error);
every eval-mode Forward/Evaluate of the model kept in eval mode is bit-identical to the
reference taken before the load; each training model's step equals the number of acknowledged
TrainSteps and the acknowledged step numbers are exactly 1..N; RSS growth < 200 MiB.
"""

import collections
import os
import random
import struct
import sys
import threading
import time

import grpc

from reliability_common import NormdServer, pb, rss_kib
from normd.v1 import normd_pb2_grpc as pb_grpc

CLIENTS = 16
SECONDS = float(os.environ.get("NORMD_STRESS_SECONDS", "15"))
RSS_GROWTH_LIMIT_KIB = 200 * 1024
TRAIN_MODELS = ["train-0", "train-1", "train-2", "train-3"]
EVAL_MODEL = "eval-only"
FEATURES, CLASSES, BATCH = 16, 4, 32


def spec(seed):
    def layer(**kw):
        return pb.LayerSpec(**kw)
    return pb.ModelSpec(
        input_shape=[FEATURES], seed=seed, loss=pb.LOSS_CROSS_ENTROPY,
        optimizer=pb.OptimizerSpec(sgd=pb.SGDSpec(lr=0.01, momentum=0.9)),
        layers=[layer(linear=pb.LinearSpec(in_features=FEATURES, out_features=32)),
                layer(batch_norm1d=pb.BatchNormSpec(num_features=32)),
                layer(relu=pb.Empty()),
                layer(linear=pb.LinearSpec(in_features=32, out_features=CLASSES))])


def batch(rng, n=BATCH):
    values = [rng.uniform(-2, 2) for _ in range(n * FEATURES)]
    return (pb.Tensor(shape=[n, FEATURES], raw=struct.pack(f"<{len(values)}f", *values)),
            [rng.randrange(CLASSES) for _ in range(n)])


class Worker(threading.Thread):
    def __init__(self, index, address, deadline, eval_input, eval_labels, ref_out, ref_eval):
        super().__init__(name=f"client-{index}")
        self.rng = random.Random(index)
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.TrainerStub(self.channel)
        self.deadline = deadline
        self.eval_input, self.eval_labels = eval_input, eval_labels
        self.ref_out, self.ref_eval = ref_out, ref_eval
        self.calls = collections.Counter()
        self.errors = collections.Counter()
        self.error_samples = []
        self.acked_steps = collections.defaultdict(list)
        self.eval_mismatches = 0
        self.eval_checks = 0

    def one(self):
        op = self.rng.choice(["train", "train", "train", "forward_train", "forward_eval",
                              "forward_eval", "evaluate", "evaluate_eval", "get", "list", "state"])
        model = self.rng.choice(TRAIN_MODELS)
        t = 60
        if op == "train":
            x, y = batch(self.rng)
            r = self.stub.TrainStep(pb.TrainStepRequest(model=model, input=x, labels=y), timeout=t)
            self.acked_steps[model].append(r.step)
        elif op == "forward_train":
            x, _ = batch(self.rng)
            self.stub.Forward(pb.ForwardRequest(model=model, input=x), timeout=t)
        elif op == "forward_eval":
            r = self.stub.Forward(pb.ForwardRequest(model=EVAL_MODEL, input=self.eval_input),
                                  timeout=t)
            self.eval_checks += 1
            self.eval_mismatches += r.output.SerializeToString(deterministic=True) != self.ref_out
        elif op == "evaluate":
            x, y = batch(self.rng)
            self.stub.Evaluate(pb.EvaluateRequest(model=model, input=x, labels=y), timeout=t)
        elif op == "evaluate_eval":
            r = self.stub.Evaluate(pb.EvaluateRequest(model=EVAL_MODEL, input=self.eval_input,
                                                      labels=self.eval_labels), timeout=t)
            self.eval_checks += 1
            self.eval_mismatches += (r.loss, r.accuracy) != self.ref_eval
        elif op == "get":
            self.stub.GetModel(pb.GetModelRequest(model=self.rng.choice(TRAIN_MODELS +
                                                                        [EVAL_MODEL])), timeout=t)
        elif op == "list":
            self.stub.ListModels(pb.ListModelsRequest(), timeout=t)
        else:
            self.stub.GetState(pb.GetStateRequest(model=model, include_optimizer=True), timeout=t)
        self.calls[op] += 1

    def run(self):
        while time.monotonic() < self.deadline:
            try:
                self.one()
            except grpc.RpcError as e:
                self.errors[e.code().name] += 1
                if len(self.error_samples) < 5:
                    self.error_samples.append(f"{e.code().name}: {e.details()}")
        self.channel.close()


def main():
    args = ["--in-memory", "--max-queued-per-model", str(4 * CLIENTS)]
    with NormdServer(args) as server:
        pid = server.proc.pid
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.TrainerStub(channel)
        for i, name in enumerate(TRAIN_MODELS + [EVAL_MODEL]):
            stub.CreateModel(pb.CreateModelRequest(id=name, spec=spec(i + 1)), timeout=30)
        rng = random.Random(1234)
        for _ in range(3):  # give the eval model real running statistics, then freeze it in eval
            x, y = batch(rng)
            stub.TrainStep(pb.TrainStepRequest(model=EVAL_MODEL, input=x, labels=y), timeout=30)
        stub.SetMode(pb.SetModeRequest(model=EVAL_MODEL, mode=pb.MODE_EVAL), timeout=30)
        eval_step = stub.GetModel(pb.GetModelRequest(model=EVAL_MODEL), timeout=30).step
        eval_input, eval_labels = batch(rng, 64)
        ref_out = stub.Forward(pb.ForwardRequest(model=EVAL_MODEL, input=eval_input),
                               timeout=30).output.SerializeToString(deterministic=True)
        r = stub.Evaluate(pb.EvaluateRequest(model=EVAL_MODEL, input=eval_input,
                                             labels=eval_labels), timeout=30)
        ref_eval = (r.loss, r.accuracy)

        rss_before = rss_kib(pid)
        start = time.monotonic()
        deadline = start + SECONDS
        workers = [Worker(i, server.address, deadline, eval_input, eval_labels, ref_out, ref_eval)
                   for i in range(CLIENTS)]
        for w in workers:
            w.start()
        rss_peak = rss_before
        while any(w.is_alive() for w in workers):
            rss_peak = max(rss_peak, rss_kib(pid))
            time.sleep(0.5)
        for w in workers:
            w.join()
        elapsed = time.monotonic() - start
        rss_after = rss_kib(pid)

        steps = {m: stub.GetModel(pb.GetModelRequest(model=m), timeout=30).step
                 for m in TRAIN_MODELS}
        eval_info = stub.GetModel(pb.GetModelRequest(model=EVAL_MODEL), timeout=30)
        healthy = server.client.health() == "SERVING"
        channel.close()

    calls = sum((w.calls for w in workers), collections.Counter())
    errors = sum((w.errors for w in workers), collections.Counter())
    total = sum(calls.values())
    problems = []
    print(f"{CLIENTS} clients for {elapsed:.1f} s: {total} successful RPCs, "
          f"{total / elapsed:.0f} QPS; by kind: {dict(sorted(calls.items()))}")
    print(f"errors: {sum(errors.values())} {dict(errors)}")
    for w in workers:
        for sample in w.error_samples:
            print(f"  {w.name}: {sample}")
    if errors:
        problems.append(f"{sum(errors.values())} RPC errors: {dict(errors)}")
    checks = sum(w.eval_checks for w in workers)
    mismatches = sum(w.eval_mismatches for w in workers)
    print(f"eval-mode checks of '{EVAL_MODEL}': {checks}, mismatches: {mismatches}")
    if mismatches or checks == 0:
        problems.append(f"{mismatches} of {checks} eval-mode results differ from the reference")
    if eval_info.mode != pb.MODE_EVAL or eval_info.step != eval_step:
        problems.append(f"'{EVAL_MODEL}' changed: mode {eval_info.mode}, step {eval_info.step}")
    for m in TRAIN_MODELS:
        acked = sorted(s for w in workers for s in w.acked_steps[m])
        print(f"{m}: step {steps[m]}, acknowledged TrainSteps {len(acked)}")
        if steps[m] != len(acked) or acked != list(range(1, len(acked) + 1)):
            problems.append(f"{m}: step {steps[m]} but {len(acked)} acknowledged steps "
                            f"(distinct step numbers {len(set(acked))})")
    growth = rss_after - rss_before
    print(f"RSS before {rss_before} KiB, peak {rss_peak} KiB, after {rss_after} KiB, "
          f"growth {growth} KiB (limit {RSS_GROWTH_LIMIT_KIB} KiB)")
    if growth > RSS_GROWTH_LIMIT_KIB:
        problems.append(f"RSS grew by {growth} KiB")
    if not healthy:
        problems.append("server not SERVING after the load")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())

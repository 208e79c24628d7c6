#!/usr/bin/python3
"""Bad input battery (issue 6): >= 60 distinct malformed requests across every RPC.

Each case must get its expected gRPC status code and a non-empty message naming something
useful (one of the case's keywords). Afterwards the server must still be SERVING, its RSS
bounded, and every pre-existing model's full state (GetState include_optimizer, raw bytes),
step and mode bit-identical to before the battery.

Run through ctest (label reliability); it prints the case count and a per-code tally.
"""

import collections
import math
import struct
import sys

import grpc

from reliability_common import NormdServer, RawTrainer, check, pb, rss_kib, snapshot

MAX_MESSAGE_BYTES = 1 << 20
MAX_BATCH_ELEMENTS = 100000
MAX_MODELS = 7
RSS_GROWTH_LIMIT_KIB = 100 * 1024

C = grpc.StatusCode
NAN = float("nan")
INF = float("inf")


def tensor(shape, values=None, raw=None):
    t = pb.Tensor(shape=shape)
    if values is not None:
        t.values.extend(values)
    if raw is not None:
        t.raw = raw
    return t


def ones(shape, value=0.5):
    return tensor(shape, [value] * math.prod(shape))


def f32(values):
    return struct.pack(f"<{len(values)}f", *values)


def linear(i, o):
    return pb.LayerSpec(linear=pb.LinearSpec(in_features=i, out_features=o))


def bn1d(n, **kw):
    return pb.LayerSpec(batch_norm1d=pb.BatchNormSpec(num_features=n, **kw))


def bn2d(n, **kw):
    return pb.LayerSpec(batch_norm2d=pb.BatchNormSpec(num_features=n, **kw))


def relu():
    return pb.LayerSpec(relu=pb.Empty())


def flatten():
    return pb.LayerSpec(flatten=pb.Empty())


def conv(i, o, k, **kw):
    return pb.LayerSpec(conv2d=pb.Conv2dSpec(in_channels=i, out_channels=o, kernel_size=k, **kw))


def sgd(lr=0.1, **kw):
    return pb.OptimizerSpec(sgd=pb.SGDSpec(lr=lr, **kw))


def adam(lr=0.01, **kw):
    return pb.OptimizerSpec(adam=pb.AdamSpec(lr=lr, **kw))


def spec(input_shape, layers, loss=pb.LOSS_CROSS_ENTROPY, optimizer=None, seed=1):
    return pb.ModelSpec(input_shape=input_shape, layers=layers, loss=loss,
                        optimizer=optimizer or sgd(), seed=seed)


MLP = spec([4], [linear(4, 8), bn1d(8), relu(), linear(8, 3)], optimizer=sgd(0.1, momentum=0.9))
CNN = spec([1, 6, 6], [conv(1, 2, 3), bn2d(2), relu(),
                       pb.LayerSpec(max_pool2d=pb.Pool2dSpec(kernel_size=2)), flatten(),
                       linear(8, 2)], optimizer=adam())
REG = spec([3], [linear(3, 4), bn1d(4), relu(), linear(4, 1)], loss=pb.LOSS_MSE,
           optimizer=sgd(0.05))
EVAL = spec([2], [linear(2, 4), bn1d(4), linear(4, 2)])
PRE_EXISTING = {"mlp": MLP, "cnn": CNN, "reg": REG, "frozen-eval": EVAL}


def create(id_, s):
    return pb.CreateModelRequest(id=id_, spec=s)


def fwd(model, t, retain=False):
    return pb.ForwardRequest(model=model, input=t, retain_for_backward=retain)


def train(model, t, labels=(), target=None):
    r = pb.TrainStepRequest(model=model, input=t, labels=list(labels))
    if target is not None:
        r.target.CopyFrom(target)
    return r


def evaluate(model, t, labels=(), target=None):
    r = pb.EvaluateRequest(model=model, input=t, labels=list(labels))
    if target is not None:
        r.target.CopyFrom(target)
    return r


def set_state(model, named, strict=True):
    return pb.SetStateRequest(model=model, strict=strict, state=pb.ModelState(
        tensors=[pb.NamedTensor(name=n, tensor=t) for n, t in named]))


class Battery:
    def __init__(self, raw: RawTrainer):
        self.raw = raw
        self.results = []  # (name, expected, got, message, ok, why)

    def expect(self, name, method, request, code, keywords, stream=False, allow_empty=False):
        payload = request if isinstance(request, (bytes, list)) else request.SerializeToString()
        try:
            if stream:
                self.raw.stream(method, payload if isinstance(payload, list) else [payload])
            else:
                self.raw.unary(method, payload)
            got, message = C.OK, ""
        except grpc.RpcError as e:
            got, message = e.code(), e.details() or ""
        codes = code if isinstance(code, tuple) else (code,)
        why = ""
        if got not in codes:
            why = f"expected {'/'.join(c.name for c in codes)}, got {got.name}"
        elif not message.strip() and not allow_empty:
            why = "empty message"
        elif keywords and not any(k.lower() in message.lower() for k in keywords):
            why = f"message mentions none of {keywords}"
        self.results.append((name, codes, got, message, not why, why))
        print(f"{'ok  ' if not why else 'FAIL'} {name}: {got.name} {message[:150]!r}"
              + (f"  <-- {why}" if why else ""))


def run_cases(b: Battery, raw: RawTrainer):
    IA, NF, AE, FP, RE = (C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS,
                          C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED)
    good_x = ones([4, 4])
    # ---- CreateModel: ids
    b.expect("create: id with '/' (in its id part)", "CreateModel", create("a/b/c", MLP), IA, ["id"])
    b.expect("create: id starting with '.'", "CreateModel", create(".hidden", MLP), IA, ["id"])
    b.expect("create: id of 65 chars", "CreateModel", create("x" * 65, MLP), IA, ["id"])
    b.expect("create: id with space", "CreateModel", create("a b", MLP), IA, ["id"])
    b.expect("create: id '..'", "CreateModel", create("..", MLP), IA, ["id"])
    b.expect("create: duplicate id", "CreateModel", create("mlp", MLP), AE, ["mlp"])
    # ---- CreateModel: absurd specs
    b.expect("create: empty input_shape", "CreateModel",
             create("s1", spec([], [linear(4, 3)])), IA, ["input_shape", "input shape"])
    b.expect("create: negative input dim", "CreateModel",
             create("s1", spec([-4], [linear(4, 3)])), IA, ["input_shape", "input shape"])
    b.expect("create: zero features", "CreateModel",
             create("s1", spec([0], [linear(0, 3)])), IA, ["input_shape", "input shape", "features"])
    b.expect("create: linear out_features 0", "CreateModel",
             create("s1", spec([4], [linear(4, 0)])), IA, ["out_features"])
    b.expect("create: linear in_features mismatch", "CreateModel",
             create("s1", spec([4], [linear(5, 3)])), IA, ["in_features"])
    b.expect("create: 10^9 features (parameters limit)", "CreateModel",
             create("s1", spec([4], [linear(4, 10**9), linear(10**9, 3)])), RE,
             ["parameter", "elements"])
    b.expect("create: 10^9-wide input", "CreateModel",
             create("s1", spec([10**9], [linear(10**9, 3)])), RE, ["parameter", "elements"])
    b.expect("create: no layers", "CreateModel", create("s1", spec([4], [])), IA, ["layer"])
    b.expect("create: missing layer kind", "CreateModel",
             create("s1", spec([4], [pb.LayerSpec(name="nothing"), linear(4, 3)])), IA,
             ["kind", "layer"])
    b.expect("create: batchnorm num_features mismatch", "CreateModel",
             create("s1", spec([4], [linear(4, 8), bn1d(7), linear(8, 3)])), IA, ["num_features"])
    b.expect("create: batchnorm eps = 0", "CreateModel",
             create("s1", spec([4], [bn1d(4, eps=0.0), linear(4, 3)])), IA, ["eps"])
    b.expect("create: batchnorm eps < 0", "CreateModel",
             create("s1", spec([4], [bn1d(4, eps=-1e-5), linear(4, 3)])), IA, ["eps"])
    b.expect("create: batchnorm eps NaN", "CreateModel",
             create("s1", spec([4], [bn1d(4, eps=NAN), linear(4, 3)])), IA, ["eps"])
    b.expect("create: batchnorm momentum 1.5", "CreateModel",
             create("s1", spec([4], [bn1d(4, momentum=1.5), linear(4, 3)])), IA, ["momentum"])
    b.expect("create: batchnorm momentum -0.1", "CreateModel",
             create("s1", spec([4], [bn1d(4, momentum=-0.1), linear(4, 3)])), IA, ["momentum"])
    b.expect("create: batchnorm2d after linear (rank)", "CreateModel",
             create("s1", spec([4], [linear(4, 4), bn2d(4), linear(4, 3)])), IA,
             ["batch", "shape", "rank", "dim"])
    b.expect("create: dropout p = 1", "CreateModel",
             create("s1", spec([4], [pb.LayerSpec(dropout=pb.DropoutSpec(p=1.0)), linear(4, 3)])),
             IA, ["p"])
    b.expect("create: dropout p < 0", "CreateModel",
             create("s1", spec([4], [pb.LayerSpec(dropout=pb.DropoutSpec(p=-0.5)), linear(4, 3)])),
             IA, ["p"])
    b.expect("create: conv kernel larger than input", "CreateModel",
             create("s1", spec([1, 6, 6], [conv(1, 2, 7), flatten()])), IA, ["kernel"])
    b.expect("create: max_pool kernel larger than input", "CreateModel",
             create("s1", spec([1, 6, 6], [pb.LayerSpec(
                 max_pool2d=pb.Pool2dSpec(kernel_size=9)), flatten()])), IA, ["kernel"])
    b.expect("create: conv stride 0", "CreateModel",
             create("s1", spec([1, 6, 6], [conv(1, 2, 3, stride=0), flatten()])), IA, ["stride"])
    b.expect("create: conv negative padding", "CreateModel",
             create("s1", spec([1, 6, 6], [conv(1, 2, 3, padding=-1), flatten()])), IA,
             ["padding"])
    b.expect("create: conv in_channels mismatch", "CreateModel",
             create("s1", spec([1, 6, 6], [conv(3, 2, 3), flatten()])), IA, ["in_channels"])
    b.expect("create: layer_norm shape mismatch", "CreateModel",
             create("s1", spec([4], [pb.LayerSpec(layer_norm=pb.LayerNormSpec(
                 normalized_shape=[5])), linear(4, 3)])), IA, ["normalized_shape"])
    b.expect("create: group_norm channels not divisible by groups", "CreateModel",
             create("s1", spec([6, 2], [pb.LayerSpec(group_norm=pb.GroupNormSpec(
                 num_groups=4, num_channels=6)), flatten(), linear(12, 3)])), IA,
             ["spec.layers[0].group_norm.num_channels (6) must be divisible"])
    b.expect("create: group_norm channels mismatch", "CreateModel",
             create("s1", spec([6, 2], [pb.LayerSpec(group_norm=pb.GroupNormSpec(
                 num_groups=2, num_channels=4)), flatten(), linear(12, 3)])), IA,
             ["layer 0 (GroupNorm): num_channels is 4 but the previous layer produces 6"])
    b.expect("create: instance_norm1d on flat samples", "CreateModel",
             create("s1", spec([4], [pb.LayerSpec(instance_norm1d=pb.InstanceNormSpec(
                 num_features=4)), linear(4, 3)])), IA, ["(C, L)"])
    b.expect("create: instance_norm2d momentum 2", "CreateModel",
             create("s1", spec([2, 3, 3], [pb.LayerSpec(instance_norm2d=pb.InstanceNormSpec(
                 num_features=2, momentum=2.0)), flatten(), linear(18, 3)])), IA, ["momentum"])
    b.expect("create: 300 layers (over --max-layers)", "CreateModel",
             create("s1", spec([4], [relu()] * 299 + [linear(4, 3)])), RE, ["layers"])
    b.expect("create: LOSS_UNSPECIFIED", "CreateModel",
             create("s1", spec([4], [linear(4, 3)], loss=pb.LOSS_UNSPECIFIED)), IA, ["loss"])
    b.expect("create: negative learning rate", "CreateModel",
             create("s1", spec([4], [linear(4, 3)], optimizer=sgd(-0.1))), IA, ["lr"])
    b.expect("create: adam beta1 = 1.5", "CreateModel",
             create("s1", spec([4], [linear(4, 3)], optimizer=adam(beta1=1.5))), IA, ["beta1"])
    # ---- GetModel / DeleteModel / SetMode
    b.expect("get: unknown model", "GetModel", pb.GetModelRequest(model="nope"), NF, ["nope"])
    b.expect("get: bad id '../etc'", "GetModel", pb.GetModelRequest(model="../etc"), IA, ["model"])
    b.expect("get: empty id", "GetModel", pb.GetModelRequest(model=""), IA, ["id", "model"])
    b.expect("delete: unknown model", "DeleteModel", pb.DeleteModelRequest(model="nope"), NF,
             ["nope"])
    b.expect("set_mode: MODE_UNSPECIFIED", "SetMode",
             pb.SetModeRequest(model="mlp", mode=pb.MODE_UNSPECIFIED), IA, ["mode"])
    b.expect("set_mode: mode 7 (not in the enum)", "SetMode",
             pb.SetModeRequest(model="mlp", mode=7), IA, ["mode"])
    b.expect("set_mode: unknown model", "SetMode",
             pb.SetModeRequest(model="nope", mode=pb.MODE_EVAL), NF, ["nope"])
    # ---- Forward: tensors (on pre-existing models: must be refused before touching them)
    b.expect("forward: wrong feature count", "Forward", fwd("mlp", ones([2, 5])), IA,
             ["shape", "input"])
    b.expect("forward: values fewer than shape", "Forward",
             fwd("mlp", tensor([2, 4], [0.1] * 7)), IA, ["shape", "values"])
    b.expect("forward: empty batch [0, 4]", "Forward", fwd("mlp", tensor([0, 4], [])), IA,
             ["shape", "batch", "empty"])
    b.expect("forward: no shape", "Forward", fwd("mlp", tensor([], [0.1] * 8)), IA, ["shape"])
    b.expect("forward: missing input", "Forward", pb.ForwardRequest(model="mlp"), IA,
             ["input", "shape"])
    b.expect("forward: values and raw both set", "Forward",
             fwd("mlp", tensor([2, 4], [0.1] * 8, f32([0.1] * 8))), IA, ["raw", "values"])
    b.expect("forward: raw length not a multiple of 4", "Forward",
             fwd("mlp", tensor([2, 4], raw=f32([0.1] * 8)[:-1])), IA, ["raw", "4", "bytes"])
    b.expect("forward: raw length mismatching shape", "Forward",
             fwd("mlp", tensor([2, 4], raw=f32([0.1] * 6))), IA, ["raw", "shape", "bytes"])
    b.expect("forward: NaN input", "Forward",
             fwd("mlp", tensor([2, 4], [0.1] * 7 + [NAN])), IA, ["finite", "nan"])
    b.expect("forward: Inf input (raw)", "Forward",
             fwd("mlp", tensor([2, 4], raw=f32([INF] + [0.1] * 7))), IA, ["finite", "inf"])
    b.expect("forward: negative dimension", "Forward", fwd("mlp", tensor([-2, 4], [0.1] * 8)), IA,
             ["shape", "negative", "dimension"])
    b.expect("forward: huge dimension 10^12", "Forward",
             fwd("mlp", tensor([10**12, 4], [0.1] * 8)), RE, ["element"])
    # A shape whose element count overflows int64 is malformed whatever the limits: every
    # tensor-carrying request answers INVALID_ARGUMENT naming the shape.
    huge = [2**62, 2**62]
    over = ["(4611686018427387904, 4611686018427387904)", "overflows"]
    b.expect("forward: dims overflowing int64 product", "Forward",
             fwd("mlp", tensor([2**40, 2**40, 4], [0.1] * 8)), IA,
             ["(1099511627776, 1099511627776, 4)"])
    b.expect("forward: shape (2^62, 2^62)", "Forward", fwd("mlp", tensor(huge, [0.1] * 8)), IA,
             over)
    b.expect("train: input shape (2^62, 2^62)", "TrainStep",
             train("mlp", tensor(huge, [0.1] * 8), [0, 1]), IA, over)
    b.expect("train: target shape (2^62, 2^62)", "TrainStep",
             train("reg", ones([4, 3]), target=tensor(huge, [0.1] * 8)), IA, over)
    b.expect("train stream: input shape (2^62, 2^62)", "TrainStream",
             train("mlp", tensor(huge, [0.1] * 8), [0, 1]), IA, over, stream=True)
    b.expect("evaluate: input shape (2^62, 2^62)", "Evaluate",
             evaluate("mlp", tensor(huge, [0.1] * 8), [0, 1]), IA, over)
    b.expect("set_state: tensor shape (2^62, 2^62)", "SetState",
             set_state("mlp", [("0.weight", tensor(huge, [0.1] * 8))], strict=False), IA, over)
    b.expect("adapt_statistics: input shape (2^62, 2^62)", "AdaptStatistics",
             [pb.AdaptStatisticsRequest(model="mlp", input=ones([4, 4])).SerializeToString(),
              pb.AdaptStatisticsRequest(input=tensor(huge, [0.1] * 8)).SerializeToString()],
             IA, over, stream=True)
    b.expect("forward: batchnorm one value per channel (batch 1, train)", "Forward",
             fwd("mlp", ones([1, 4])), IA, ["channel", "batch", "value"])
    b.expect("forward: cnn given a flat input", "Forward", fwd("cnn", ones([2, 36])), IA,
             ["shape", "input"])
    b.expect("forward: unknown model", "Forward", fwd("nope", good_x), NF, ["nope"])
    b.expect("forward: too many batch elements", "Forward", fwd("mlp", ones([30000, 4])), RE,
             ["element"])
    # ---- Backward: forward ids (set up on the scratch model, which is not compared)
    b.expect("backward: unknown forward_id", "Backward",
             pb.BackwardRequest(model="scratch", forward_id=987654321,
                                grad_output=ones([4, 3])), FP, ["forward"])
    b.expect("backward: forward_id 0", "Backward",
             pb.BackwardRequest(model="scratch", forward_id=0, grad_output=ones([4, 3])), FP,
             ["forward"])
    fid = raw.call("Forward", fwd("scratch", good_x, retain=True), pb.ForwardResponse).forward_id
    b.expect("backward: grad_output wrong shape", "Backward",
             pb.BackwardRequest(model="scratch", forward_id=fid, grad_output=ones([4, 2])), IA,
             ["grad_output", "shape"])
    b.expect("backward: grad_output shape (2^62, 2^62)", "Backward",
             pb.BackwardRequest(model="scratch", forward_id=fid,
                                grad_output=tensor([2**62, 2**62], [0.1] * 8)), IA,
             ["(4611686018427387904, 4611686018427387904)", "overflows"])
    b.expect("backward: grad_output NaN", "Backward",
             pb.BackwardRequest(model="scratch", forward_id=fid,
                                grad_output=tensor([4, 3], [NAN] + [0.1] * 11)), IA,
             ["finite", "nan", "grad_output"])
    fid = raw.call("Forward", fwd("scratch", good_x, retain=True), pb.ForwardResponse).forward_id
    raw.call("Backward", pb.BackwardRequest(model="scratch", forward_id=fid,
                                            grad_output=ones([4, 3])), pb.BackwardResponse)
    b.expect("backward: released forward_id (second Backward)", "Backward",
             pb.BackwardRequest(model="scratch", forward_id=fid, grad_output=ones([4, 3])), FP,
             ["forward"])
    raw.call("ApplyGradients", pb.ApplyGradientsRequest(model="scratch"),
             pb.ApplyGradientsResponse)
    fid = raw.call("Forward", fwd("scratch", good_x, retain=True), pb.ForwardResponse).forward_id
    raw.call("TrainStep", train("scratch", good_x, [0, 1, 2, 0]), pb.TrainStepResponse)
    b.expect("backward: stale forward_id (a step happened since)", "Backward",
             pb.BackwardRequest(model="scratch", forward_id=fid, grad_output=ones([4, 3])), FP,
             ["forward", "stale"])
    b.expect("backward: forward_id of another model", "Backward",
             pb.BackwardRequest(model="mlp", forward_id=raw.call(
                 "Forward", fwd("scratch", good_x, retain=True), pb.ForwardResponse).forward_id,
                 grad_output=ones([4, 3])), FP, ["forward"])
    b.expect("backward: unknown model", "Backward",
             pb.BackwardRequest(model="nope", forward_id=1, grad_output=ones([4, 3])), NF, ["nope"])
    # ---- ApplyGradients
    b.expect("apply_gradients: unknown model", "ApplyGradients",
             pb.ApplyGradientsRequest(model="nope"), NF, ["nope"])
    b.expect("apply_gradients: bad id", "ApplyGradients",
             pb.ApplyGradientsRequest(model="bad id!"), IA, ["id"])
    # ---- TrainStep
    b.expect("train: label out of range (== classes)", "TrainStep",
             train("mlp", good_x, [0, 1, 2, 3]), IA, ["label"])
    b.expect("train: negative label", "TrainStep", train("mlp", good_x, [0, -1, 2, 0]), IA,
             ["label"])
    b.expect("train: label count mismatch", "TrainStep", train("mlp", good_x, [0, 1]), IA,
             ["label"])
    b.expect("train: cross-entropy without labels", "TrainStep", train("mlp", good_x), IA,
             ["label"])
    b.expect("train: NaN input", "TrainStep",
             train("mlp", tensor([4, 4], [NAN] * 16), [0, 1, 2, 0]), IA, ["finite", "nan"])
    b.expect("train: batch of 1 (batchnorm one value per channel)", "TrainStep",
             train("mlp", ones([1, 4]), [0]), IA, ["channel", "batch", "value"])
    b.expect("train: MSE target wrong shape", "TrainStep",
             train("reg", ones([4, 3]), target=ones([4, 2])), IA, ["target"])
    b.expect("train: MSE target NaN", "TrainStep",
             train("reg", ones([4, 3]), target=tensor([4, 1], [0.1, NAN, 0.2, 0.3])), IA,
             ["finite", "nan", "target"])
    b.expect("train: MSE target Inf", "TrainStep",
             train("reg", ones([4, 3]), target=tensor([4, 1], raw=f32([0.1, -INF, 0.2, 0.3]))),
             IA, ["finite", "inf", "target"])
    b.expect("train: MSE without target", "TrainStep", train("reg", ones([4, 3])), IA,
             ["target"])
    b.expect("train: unknown model", "TrainStep", train("nope", good_x, [0, 1, 2, 0]), NF,
             ["nope"])
    b.expect("train_stream: label out of range", "TrainStream",
             train("mlp", good_x, [0, 1, 2, 9]), IA, ["label"], stream=True)
    # ---- Evaluate
    b.expect("evaluate: label out of range", "Evaluate", evaluate("mlp", good_x, [0, 1, 2, 3]),
             IA, ["label"])
    b.expect("evaluate: wrong shape", "Evaluate", evaluate("mlp", ones([4, 3]), [0, 1, 2, 0]), IA,
             ["shape", "input"])
    b.expect("evaluate: Inf input", "Evaluate",
             evaluate("mlp", tensor([4, 4], [INF] * 16), [0, 1, 2, 0]), IA, ["finite", "inf"])
    b.expect("evaluate: unknown model", "Evaluate", evaluate("nope", good_x, [0, 1, 2, 0]), NF,
             ["nope"])
    # ---- GetState / SetState (SetState on pre-existing models: must change nothing)
    b.expect("get_state: unknown model", "GetState", pb.GetStateRequest(model="nope"), NF,
             ["nope"])
    mlp_state = raw.call("GetState", pb.GetStateRequest(model="mlp"), pb.ModelState)
    first = mlp_state.tensors[0]
    n0 = math.prod(first.tensor.shape)
    b.expect("set_state: NaN tensor", "SetState",
             set_state("mlp", [(first.name, tensor(list(first.tensor.shape), [NAN] * n0))]), IA,
             ["finite", "nan"])
    b.expect("set_state: Inf tensor (raw)", "SetState",
             set_state("mlp", [(first.name, tensor(list(first.tensor.shape),
                                                   raw=f32([INF] * n0)))]), IA, ["finite", "inf"])
    b.expect("set_state: unknown name (strict)", "SetState",
             set_state("mlp", [("no.such.tensor", ones([2]))]), IA, ["no.such.tensor"])
    b.expect("set_state: mis-shaped tensor", "SetState",
             set_state("mlp", [(first.name, ones([n0 + 1]))]), IA, [first.name])
    # Valid new values for every float tensor but the last one sent, which holds a NaN.
    floats = [t for t in mlp_state.tensors if not t.name.endswith("num_batches_tracked")]
    b.expect("set_state: NaN in the last tensor (all-or-nothing)", "SetState",
             set_state("mlp", [(t.name, tensor(list(t.tensor.shape), [0.25] * math.prod(
                 t.tensor.shape))) for t in floats[:-1]] +
                 [(floats[-1].name, tensor(list(floats[-1].tensor.shape),
                   [NAN] * math.prod(floats[-1].tensor.shape)))], strict=False), IA,
             [floats[-1].name])
    b.expect("set_state: unknown model", "SetState", set_state("nope", []), NF, ["nope"])
    # ---- ResetRunningStats / UpdateOptimizer / SaveModel
    b.expect("reset_running_stats: unknown model", "ResetRunningStats",
             pb.ResetRunningStatsRequest(model="nope"), NF, ["nope"])
    b.expect("update_optimizer: unknown model", "UpdateOptimizer",
             pb.UpdateOptimizerRequest(model="nope", optimizer=sgd()), NF, ["nope"])
    b.expect("update_optimizer: negative lr", "UpdateOptimizer",
             pb.UpdateOptimizerRequest(model="mlp", optimizer=sgd(-1.0)), IA, ["lr"])
    b.expect("update_optimizer: NaN lr", "UpdateOptimizer",
             pb.UpdateOptimizerRequest(model="mlp", optimizer=adam(NAN)), IA, ["lr"])
    b.expect("save_model: unknown model", "SaveModel", pb.SaveModelRequest(model="nope"), NF,
             ["nope"])
    # ---- bytes that do not parse (a truncated varint, a bad wire type, a truncated field)
    garbage = {"CreateModel": b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
               "Forward": b"\x12\x10\x0a\x02",
               "TrainStep": b"\x0f\x01\x02\x03",
               "SetState": b"\xff" * 16}
    for method, junk in garbage.items():
        # gRPC 1.51's callback API refuses a request it cannot decode before normd's handler
        # runs (UNIMPLEMENTED, empty message); normd's interceptor (server/security.h) turns that
        # into INVALID_ARGUMENT naming the request type. That the server stays healthy and every
        # model unchanged is asserted after the battery as for all cases.
        b.expect(f"unparsable bytes: {method}", method, junk, IA,
                 [f"does not parse as normd.v1.{method}Request"])
    # A TrainStream message that does not parse ends the stream with INVALID_ARGUMENT (the
    # typed reader would take it for the client's half-close and end the stream OK). Those before
    # it are answered and run, those after it never run: checked on the scratch model.
    b.expect("unparsable bytes: TrainStream message", "TrainStream",
             [garbage["TrainStep"]], IA, ["does not parse as normd.v1.TrainStepRequest"],
             stream=True)
    step = raw.call("GetModel", pb.GetModelRequest(model="scratch"), pb.Model).step
    good = train("scratch", good_x, [0, 1, 2, 0]).SerializeToString()
    answers, got, msg = [], C.OK, ""
    try:
        answers = raw.stream("TrainStream", [good, garbage["TrainStep"], good])
    except grpc.RpcError as e:
        got, msg = e.code(), e.details() or ""
    ran = raw.call("GetModel", pb.GetModelRequest(model="scratch"), pb.Model).step - step
    why = "" if got == IA and "message 2 does not parse" in msg else \
        f"expected INVALID_ARGUMENT naming message 2, got {got.name} {msg!r}"
    if not why and ran != 1:
        why = f"{ran} steps ran (expected 1: the one before the bad message)"
    b.results.append(("unparsable bytes: TrainStream message between good ones", (IA,), got, msg,
                      not why, why))
    print(f"{'ok  ' if not why else 'FAIL'} unparsable bytes: TrainStream message between good "
          f"ones: {got.name} {msg!r}, {ran} step(s) ran" + (f"  <-- {why}" if why else ""))
    # ---- oversize messages (server started with --max-message-bytes 1 MiB)
    big = MAX_MESSAGE_BYTES // 4 + 1024
    b.expect("oversize: Forward over --max-message-bytes", "Forward",
             fwd("mlp", tensor([big // 4, 4], raw=f32([0.1] * (big // 4 * 4)))), RE,
             ["larger", "size", "message"])
    b.expect("oversize: SetState over --max-message-bytes", "SetState",
             set_state("mlp", [(first.name, tensor([big], raw=bytes(4 * big)))]), RE,
             ["larger", "size", "message"])
    # ---- health: unknown service
    try:
        raw.health("no.such.Service")
        got, msg = C.OK, ""
    except grpc.RpcError as e:
        got, msg = e.code(), e.details() or ""
    why = "" if got == NF else f"expected NOT_FOUND, got {got.name}"
    b.results.append(("health: unknown service", (NF,), got, msg, not why, why))
    print(f"{'ok  ' if not why else 'FAIL'} health: unknown service: {got.name} {msg!r}")
    # ---- the model limit: fill up to --max-models, then one more
    n = len(raw.call("ListModels", pb.ListModelsRequest(), pb.ListModelsResponse).models)
    fillers = [f"filler-{i}" for i in range(MAX_MODELS - n)]
    for f in fillers:
        raw.call("CreateModel", create(f, EVAL), pb.Model)
    b.expect("create: over --max-models", "CreateModel", create("one-too-many", EVAL), RE,
             ["model"])
    for f in fillers:
        raw.call("DeleteModel", pb.DeleteModelRequest(model=f), pb.DeleteModelResponse)


def main():
    args = ["--max-message-bytes", str(MAX_MESSAGE_BYTES),
            "--max-batch-elements", str(MAX_BATCH_ELEMENTS), "--max-models", str(MAX_MODELS),
            "--in-memory"]
    with NormdServer(args) as server:
        raw = RawTrainer(server.address)
        pid = server.proc.pid
        # Pre-existing models with real history: trained steps, momentum/Adam state, eval mode.
        for name, s in PRE_EXISTING.items():
            raw.call("CreateModel", create(name, s), pb.Model)
        for i in range(3):
            raw.call("TrainStep", train("mlp", tensor([4, 4], [0.1 * (i + j) for j in range(16)]),
                                        [0, 1, 2, 1]), pb.TrainStepResponse)
            raw.call("TrainStep", train("cnn", tensor([2, 1, 6, 6], [0.01 * j for j in range(72)]),
                                        [0, 1]), pb.TrainStepResponse)
            raw.call("TrainStep", train("reg", tensor([4, 3], [0.2 * j for j in range(12)]),
                                        target=tensor([4, 1], [1, 2, 3, 4])), pb.TrainStepResponse)
        raw.call("TrainStep", train("frozen-eval", ones([3, 2]), [0, 1, 1]), pb.TrainStepResponse)
        raw.call("SetMode", pb.SetModeRequest(model="frozen-eval", mode=pb.MODE_EVAL), pb.Model)
        raw.call("CreateModel", create("scratch", MLP), pb.Model)
        before = {m: snapshot(raw, m) for m in PRE_EXISTING}
        rss_before = rss_kib(pid)

        battery = Battery(raw)
        run_cases(battery, raw)

        rss_after = rss_kib(pid)
        healthy = raw.health() == 1  # SERVING
        after = {m: snapshot(raw, m) for m in PRE_EXISTING}
        raw.close()

    names = [r[0] for r in battery.results]
    check(len(names) == len(set(names)), "case names must be distinct")
    failures = [r for r in battery.results if not r[4]]
    tally = collections.Counter(r[2].name for r in battery.results)
    print(f"\n{len(battery.results)} malformed requests; by status code received:")
    for code, count in sorted(tally.items()):
        print(f"  {code:20s} {count}")
    print(f"RSS before {rss_before} KiB, after {rss_after} KiB, "
          f"growth {rss_after - rss_before} KiB (limit {RSS_GROWTH_LIMIT_KIB} KiB)")
    problems = [f"case '{r[0]}': {r[5]} (message {r[3]!r})" for r in failures]
    if not healthy:
        problems.append("server not SERVING after the battery")
    if rss_after - rss_before > RSS_GROWTH_LIMIT_KIB:
        problems.append(f"RSS grew by {rss_after - rss_before} KiB")
    for m in PRE_EXISTING:
        if before[m] != after[m]:
            changed = [n for (n, v), (_, w) in zip(before[m][0], after[m][0]) if v != w]
            problems.append(f"model {m} changed: step {before[m][1]} -> {after[m][1]}, "
                            f"mode {before[m][2]} -> {after[m][2]}, tensors {changed}")
        else:
            print(f"model {m}: {len(before[m][0])} state tensors and step {before[m][1]} "
                  "bit-identical")
    if len(battery.results) < 60:
        problems.append(f"only {len(battery.results)} cases")
    if problems:
        print("\nFAILED:\n  " + "\n  ".join(problems))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())

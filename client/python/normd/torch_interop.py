"""Moving models between normd and PyTorch as nn.Sequential.

Layers map one to one, so normd's state names ("0.weight", "1.running_mean", ...) are the
Sequential's state_dict keys. Supported modules: Linear, BatchNorm1d, BatchNorm2d (momentum
None included), LayerNorm, GroupNorm, InstanceNorm1d, InstanceNorm2d, Conv2d (square kernel,
dilation 1, any groups, zero padding), MaxPool2d and AvgPool2d (square, ceil_mode False;
AvgPool2d with count_include_pad True), AdaptiveAvgPool2d((1, 1)), Flatten (start_dim 1), ReLU,
LeakyReLU, Tanh, Sigmoid, GELU (exact), Dropout, and residual blocks: normd.ResidualBlock,
body(x) + shortcut(x), whose attributes `body` and `shortcut` are nn.Sequentials of any of these
(blocks included), so a nested layer's state names are "4.body.1.running_mean".

torch is imported by these functions only, so the client works without it (ResidualBlock is
created on first use).
"""

import collections

import numpy as np

from normd.v1 import normd_pb2 as pb

__all__ = ["to_torch", "from_torch", "sequential_from_spec", "lr_schedule_from_torch",
           "ResidualBlock"]

_LOSSES = {"cross_entropy": pb.LOSS_CROSS_ENTROPY, "mse": pb.LOSS_MSE,
           "bce_with_logits": pb.LOSS_BCE_WITH_LOGITS}


def _f32(x: float) -> float:
    """The float32 value in its shortest decimal form: 1e-5 stays 1e-5 after the wire."""
    return float(str(np.float32(x)))


def _square(value, what: str, index: int) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"layer {index}: {what} must be square, got {tuple(value)}")
        value = value[0]
    return int(value)


_residual_block_class = None


def _residual_block():
    """The ResidualBlock class, defined once torch is imported."""
    global _residual_block_class
    if _residual_block_class is None:
        import torch.nn as nn

        class ResidualBlock(nn.Module):
            """A residual block as normd computes it: body(x) + shortcut(x), both nn.Sequential
            (an empty shortcut is the identity). The body runs first. ResNet's BasicBlock is
            ResidualBlock([conv, bn, relu, conv, bn], [conv1x1 (stride), bn]) followed by a
            ReLU in the enclosing Sequential.

            ResidualBlock(body, shortcut=()) takes lists (or iterables) of modules."""

            def __init__(self, body, shortcut=()):
                super().__init__()
                self.body = nn.Sequential(*body)
                self.shortcut = nn.Sequential(*shortcut)

            def forward(self, x):
                return self.body(x) + self.shortcut(x)

        ResidualBlock.__module__ = __name__
        _residual_block_class = ResidualBlock
    return _residual_block_class


def __getattr__(name):
    # normd.torch_interop.ResidualBlock without importing torch with the package.
    if name == "ResidualBlock":
        return _residual_block()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _layer_to_torch(layer: pb.LayerSpec, index):
    import torch.nn as nn

    kind = layer.WhichOneof("kind")
    if kind == "residual":
        block = layer.residual
        return _residual_block()(
            [_layer_to_torch(l, f"{index}.body.{i}") for i, l in enumerate(block.body)],
            [_layer_to_torch(l, f"{index}.shortcut.{i}") for i, l in enumerate(block.shortcut)])
    if kind == "adaptive_avg_pool2d":
        return nn.AdaptiveAvgPool2d((1, 1))
    if kind == "linear":
        s = layer.linear
        return nn.Linear(s.in_features, s.out_features,
                         bias=s.bias if s.HasField("bias") else True)
    if kind in ("batch_norm1d", "batch_norm2d"):
        s = getattr(layer, kind)
        cls = nn.BatchNorm1d if kind == "batch_norm1d" else nn.BatchNorm2d
        momentum = None if s.cumulative_average else (
            _f32(s.momentum) if s.HasField("momentum") else 0.1)
        return cls(s.num_features, eps=_f32(s.eps) if s.HasField("eps") else 1e-5,
                   momentum=momentum, affine=s.affine if s.HasField("affine") else True,
                   track_running_stats=(s.track_running_stats
                                        if s.HasField("track_running_stats") else True))
    if kind == "layer_norm":
        s = layer.layer_norm
        return nn.LayerNorm(list(s.normalized_shape),
                            eps=_f32(s.eps) if s.HasField("eps") else 1e-5,
                            elementwise_affine=(s.elementwise_affine
                                                if s.HasField("elementwise_affine") else True))
    if kind == "group_norm":
        s = layer.group_norm
        return nn.GroupNorm(s.num_groups, s.num_channels,
                            eps=_f32(s.eps) if s.HasField("eps") else 1e-5,
                            affine=s.affine if s.HasField("affine") else True)
    if kind in ("instance_norm1d", "instance_norm2d"):
        s = getattr(layer, kind)
        cls = nn.InstanceNorm1d if kind == "instance_norm1d" else nn.InstanceNorm2d
        return cls(s.num_features, eps=_f32(s.eps) if s.HasField("eps") else 1e-5,
                   momentum=_f32(s.momentum) if s.HasField("momentum") else 0.1,
                   affine=s.affine if s.HasField("affine") else False,
                   track_running_stats=(s.track_running_stats
                                        if s.HasField("track_running_stats") else False))
    if kind == "conv2d":
        s = layer.conv2d
        return nn.Conv2d(s.in_channels, s.out_channels, s.kernel_size,
                         stride=s.stride if s.HasField("stride") else 1, padding=s.padding,
                         bias=s.bias if s.HasField("bias") else True,
                         groups=s.groups if s.HasField("groups") else 1)
    if kind in ("max_pool2d", "avg_pool2d"):
        s = getattr(layer, kind)
        stride = s.stride if s.HasField("stride") else s.kernel_size
        cls = nn.MaxPool2d if kind == "max_pool2d" else nn.AvgPool2d
        return cls(s.kernel_size, stride=stride, padding=s.padding)
    if kind == "flatten":
        return nn.Flatten()
    if kind == "relu":
        return nn.ReLU()
    if kind == "leaky_relu":
        s = layer.leaky_relu
        return nn.LeakyReLU(_f32(s.negative_slope) if s.HasField("negative_slope") else 0.01)
    if kind == "tanh":
        return nn.Tanh()
    if kind == "sigmoid":
        return nn.Sigmoid()
    if kind == "gelu":
        return nn.GELU()
    if kind == "dropout":
        return nn.Dropout(_f32(layer.dropout.p))
    raise ValueError(f"layer {index}: kind {kind!r} has no PyTorch counterpart here")


def sequential_from_spec(spec: pb.ModelSpec, state=None):
    """An nn.Sequential built from a ModelSpec with `state` (names to arrays) loaded strictly,
    in train mode (e.g. a FoldBatchNorm answer). Without `state` the modules keep PyTorch's
    default initialisation (the benchmarks train the same spec on both sides)."""
    import torch
    import torch.nn as nn

    seq = nn.Sequential(*[_layer_to_torch(l, i) for i, l in enumerate(spec.layers)])
    if state is None:
        return seq
    tensors = collections.OrderedDict()
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            tensors[name] = torch.tensor(int(round(float(value))), dtype=torch.long)
        else:
            tensors[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    seq.load_state_dict(tensors, strict=True)
    return seq


def _spec_paths(layers, prefix=""):
    """(path, LayerSpec) for every layer of a spec's tree, in the server's order."""
    for i, layer in enumerate(layers):
        path = f"{prefix}{i}"
        yield path, layer
        if layer.WhichOneof("kind") == "residual":
            yield from _spec_paths(layer.residual.body, f"{path}.body.")
            yield from _spec_paths(layer.residual.shortcut, f"{path}.shortcut.")


def _layer_path(spec: pb.ModelSpec, label: str) -> str:
    """The module path of the layer a server label names: its configured name, else its path
    ("3", "4.body.1")."""
    for path, layer in _spec_paths(spec.layers):
        if layer.name == label:
            return path
    return label


def to_torch(client, model_id: str):
    """An nn.Sequential equal to normd model `model_id`, with its weights and BatchNorm buffers,
    in the same train/eval mode, and its per-layer options: a frozen layer is put in eval mode
    (note that a later seq.train() in PyTorch puts it back in train mode: call .eval() on it
    again), an untrainable layer's parameters get requires_grad_(False)."""
    model = client.get_model(model_id)
    seq = sequential_from_spec(model.spec, client.get_state(model_id))
    seq.train(model.mode == pb.MODE_TRAIN)
    for o in model.layer_options:
        module = seq.get_submodule(_layer_path(model.spec, o.layer))
        if o.frozen:
            module.eval()
        if not o.trainable:
            module.requires_grad_(False)
    return seq


def _module_to_spec(module, index, convert_child) -> pb.LayerSpec:
    """The LayerSpec of one module; index names it in errors ("3", "layer1.body.0").
    convert_child(child, branch, i) converts a residual block's layers."""
    import torch.nn as nn

    spec = pb.LayerSpec()

    def fail(why):
        raise ValueError(f"layer {index} ({type(module).__name__}): {why}")

    if isinstance(module, _residual_block()):
        if len(module.body) == 0:
            fail("the body is empty")
        spec.residual.SetInParent()
        for branch in ("body", "shortcut"):
            for i, (name, child) in enumerate(getattr(module, branch).named_children()):
                getattr(spec.residual, branch).append(convert_child(child, branch, i, name))
    elif isinstance(module, nn.AdaptiveAvgPool2d):
        size = module.output_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if size != (1, 1):
            fail("only output_size (1, 1) (global average pooling) is supported")
        spec.adaptive_avg_pool2d.SetInParent()
    elif isinstance(module, nn.Linear):
        spec.linear.in_features = module.in_features
        spec.linear.out_features = module.out_features
        spec.linear.bias = module.bias is not None
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        s = spec.batch_norm1d if isinstance(module, nn.BatchNorm1d) else spec.batch_norm2d
        s.num_features = module.num_features
        s.eps = module.eps
        if module.momentum is None:
            s.cumulative_average = True
        else:
            s.momentum = module.momentum
        s.affine = module.affine
        s.track_running_stats = module.track_running_stats
    elif isinstance(module, nn.GroupNorm):
        spec.group_norm.num_groups = module.num_groups
        spec.group_norm.num_channels = module.num_channels
        spec.group_norm.eps = module.eps
        spec.group_norm.affine = module.affine
    elif isinstance(module, (nn.InstanceNorm1d, nn.InstanceNorm2d)):
        if module.momentum is None:
            fail("momentum=None is not supported for InstanceNorm")
        s = (spec.instance_norm1d if isinstance(module, nn.InstanceNorm1d)
             else spec.instance_norm2d)
        s.num_features = module.num_features
        s.eps = module.eps
        s.momentum = module.momentum
        s.affine = module.affine
        s.track_running_stats = module.track_running_stats
    elif isinstance(module, nn.LayerNorm):
        spec.layer_norm.normalized_shape.extend(module.normalized_shape)
        spec.layer_norm.eps = module.eps
        spec.layer_norm.elementwise_affine = module.elementwise_affine
    elif isinstance(module, nn.Conv2d):
        if _square(module.dilation, "dilation", index) != 1:
            fail("only dilation 1 is supported")
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            fail("only numeric zero padding is supported")
        s = spec.conv2d
        s.in_channels = module.in_channels
        s.out_channels = module.out_channels
        s.kernel_size = _square(module.kernel_size, "kernel_size", index)
        s.stride = _square(module.stride, "stride", index)
        s.padding = _square(module.padding, "padding", index)
        s.bias = module.bias is not None
        if module.groups != 1:
            s.groups = module.groups
    elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if module.ceil_mode:
            fail("ceil_mode=True is not supported")
        if isinstance(module, nn.MaxPool2d):
            if _square(module.dilation, "dilation", index) != 1 or module.return_indices:
                fail("only dilation 1 without return_indices is supported")
            s = spec.max_pool2d
        else:
            if not module.count_include_pad or module.divisor_override is not None:
                fail("only count_include_pad=True without divisor_override is supported")
            s = spec.avg_pool2d
        s.kernel_size = _square(module.kernel_size, "kernel_size", index)
        s.stride = _square(module.stride if module.stride is not None else module.kernel_size,
                           "stride", index)
        s.padding = _square(module.padding, "padding", index)
    elif isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            fail("only Flatten(start_dim=1, end_dim=-1) is supported")
        spec.flatten.SetInParent()
    elif isinstance(module, nn.ReLU):
        spec.relu.SetInParent()
    elif isinstance(module, nn.LeakyReLU):
        spec.leaky_relu.negative_slope = module.negative_slope
    elif isinstance(module, nn.Tanh):
        spec.tanh.SetInParent()
    elif isinstance(module, nn.Sigmoid):
        spec.sigmoid.SetInParent()
    elif isinstance(module, nn.GELU):
        if getattr(module, "approximate", "none") != "none":
            fail("only the exact (erf) GELU is supported")
        spec.gelu.SetInParent()
    elif isinstance(module, nn.Dropout):
        spec.dropout.p = module.p
    else:
        fail("unsupported module")
    return spec


def _loss_enum(loss) -> int:
    if isinstance(loss, int):
        return loss
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {sorted(_LOSSES)}, got {loss!r}")
        return _LOSSES[loss]
    import torch.nn as nn

    for cls, value in ((nn.CrossEntropyLoss, pb.LOSS_CROSS_ENTROPY), (nn.MSELoss, pb.LOSS_MSE),
                       (nn.BCEWithLogitsLoss, pb.LOSS_BCE_WITH_LOGITS)):
        if isinstance(loss, cls):
            return value
    raise ValueError(f"unsupported loss {loss!r}")


def _optimizer_spec(optimizer) -> pb.OptimizerSpec:
    """From a pb.OptimizerSpec, its JSON mapping (dict) or a torch.optim SGD/Adam/AdamW."""
    from google.protobuf import json_format

    if optimizer is None:
        return pb.OptimizerSpec(sgd=pb.SGDSpec(lr=0.01))
    if isinstance(optimizer, pb.OptimizerSpec):
        return optimizer
    if isinstance(optimizer, dict):
        return json_format.ParseDict(optimizer, pb.OptimizerSpec())
    import torch.optim as optim

    g = optimizer.param_groups[0]
    if isinstance(optimizer, optim.SGD):
        return pb.OptimizerSpec(sgd=pb.SGDSpec(
            lr=g["lr"], momentum=g["momentum"], dampening=g["dampening"],
            nesterov=g["nesterov"], weight_decay=g["weight_decay"]))
    if isinstance(optimizer, (optim.Adam, optim.AdamW)):
        if g.get("amsgrad"):
            raise ValueError("amsgrad is not supported")
        return pb.OptimizerSpec(adam=pb.AdamSpec(
            lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"],
            weight_decay=g["weight_decay"],
            decoupled_weight_decay=isinstance(optimizer, optim.AdamW)))
    raise ValueError(f"unsupported optimizer {type(optimizer).__name__}")


def _lr_schedule_spec(schedule) -> pb.LrScheduleSpec:
    """From a pb.LrScheduleSpec, its JSON mapping (dict) or a torch scheduler."""
    from google.protobuf import json_format

    if isinstance(schedule, pb.LrScheduleSpec):
        return schedule
    if isinstance(schedule, dict):
        return json_format.ParseDict(schedule, pb.LrScheduleSpec())
    return lr_schedule_from_torch(schedule)


def _label_smoothing(loss) -> float:
    """A torch CrossEntropyLoss module's label_smoothing; 0 for anything else."""
    if isinstance(loss, (int, str)):
        return 0.0
    return float(getattr(loss, "label_smoothing", 0.0))


def lr_schedule_from_torch(scheduler) -> pb.LrScheduleSpec:
    """The pb.LrScheduleSpec equal to a fresh (not yet stepped) torch scheduler: LinearLR with
    end_factor 1 (a warm-up), StepLR, CosineAnnealingLR, or SequentialLR([LinearLR, StepLR or
    CosineAnnealingLR], milestones=[the LinearLR's total_iters]). ValueError for anything else."""
    import torch.optim.lr_scheduler as sched

    def fail(why):
        raise ValueError(f"unsupported learning-rate scheduler {type(scheduler).__name__}: {why}")

    def warmup(s, spec):
        if s.end_factor != 1.0:
            fail(f"LinearLR needs end_factor 1.0 (a warm-up), got {s.end_factor}")
        spec.warmup.steps = int(s.total_iters)
        spec.warmup.start_factor = float(s.start_factor)

    def decay(s, spec):
        if isinstance(s, sched.StepLR):
            spec.step.step_size = int(s.step_size)
            spec.step.gamma = float(s.gamma)
        elif isinstance(s, sched.CosineAnnealingLR):
            spec.cosine.t_max = int(s.T_max)
            spec.cosine.eta_min = float(s.eta_min)
        else:
            fail(f"{type(s).__name__} after the warm-up (StepLR or CosineAnnealingLR)")

    spec = pb.LrScheduleSpec()
    if scheduler.last_epoch != 0:
        fail(f"it has already stepped (last_epoch {scheduler.last_epoch}); give a fresh one "
             "and set optimizer.lr_scheduler.last_epoch with set_state to resume")
    if isinstance(scheduler, sched.SequentialLR):
        parts, milestones = scheduler._schedulers, scheduler._milestones
        if len(parts) != 2 or not isinstance(parts[0], sched.LinearLR):
            fail("SequentialLR must be [LinearLR, StepLR or CosineAnnealingLR]")
        if list(milestones) != [parts[0].total_iters]:
            fail(f"the milestone must be the warm-up's total_iters ({parts[0].total_iters}), "
                 f"got {list(milestones)}")
        warmup(parts[0], spec)
        decay(parts[1], spec)
    elif isinstance(scheduler, sched.LinearLR):
        warmup(scheduler, spec)
    else:
        decay(scheduler, spec)
    return spec


def from_torch(client, seq, input_shape, loss="cross_entropy", optimizer=None, id: str = "",
               seed: int = 0, lr_scheduler=None, max_grad_norm=None,
               no_weight_decay_on_norm_and_bias: bool = False):
    """Creates a normd model equal to nn.Sequential `seq` (weights and BatchNorm buffers, set
    with SetState strict) in the same train/eval mode; returns its pb.Model. Per-layer options
    come along: in a train-mode `seq`, a BatchNorm (with running statistics) in eval mode becomes
    frozen; a layer whose parameters all have requires_grad False becomes untrainable.

    input_shape: one sample's shape, e.g. [64] or [1, 8, 8]. loss: "cross_entropy", "mse",
    "bce_with_logits", a pb.Loss value or a torch loss module (CrossEntropyLoss's
    label_smoothing comes along). optimizer: a torch.optim SGD/Adam/AdamW (its first parameter
    group's hyperparameters), a pb.OptimizerSpec or its dict form (default SGD lr 0.01). The
    training recipe: lr_scheduler, a fresh torch scheduler (lr_schedule_from_torch) or a
    pb.LrScheduleSpec or its dict form; max_grad_norm, clip_grad_norm_'s max_norm;
    no_weight_decay_on_norm_and_bias, the usual two parameter groups. A child whose name is not
    its index becomes the layer's name (the metrics label); inside a normd.ResidualBlock, a
    layer whose torch path ("layer1.body.conv1") differs from normd's ("3.body.0") is named by
    its torch path.
    """
    import torch.nn as nn

    if not isinstance(seq, nn.Sequential):
        raise TypeError("from_torch takes a torch.nn.Sequential")
    optimizer_spec = pb.OptimizerSpec()
    optimizer_spec.CopyFrom(_optimizer_spec(optimizer))
    if lr_scheduler is not None:
        optimizer_spec.lr_schedule.CopyFrom(_lr_schedule_spec(lr_scheduler))
        if hasattr(lr_scheduler, "optimizer"):
            # A torch scheduler has already scaled the optimizer's lr (its step 0); normd's lr
            # is the base rate the scheduler started from.
            kind = optimizer_spec.WhichOneof("kind")
            getattr(optimizer_spec, kind).lr = float(
                lr_scheduler.optimizer.param_groups[0]["initial_lr"])
    if max_grad_norm is not None:
        optimizer_spec.clip_grad_norm.max_norm = float(max_grad_norm)
    if no_weight_decay_on_norm_and_bias:
        optimizer_spec.no_weight_decay_on_norm_and_bias = True
    spec = pb.ModelSpec(input_shape=[int(d) for d in input_shape], loss=_loss_enum(loss),
                        optimizer=optimizer_spec, seed=seed)
    if _label_smoothing(loss):
        spec.loss_options.label_smoothing = _label_smoothing(loss)
    # normd numbers a residual block's layers by position ("4.body.1"); torch may name them
    # ("layer1.body.conv1"). torch module path -> normd path, and the leaves to check options on.
    to_normd = {}
    leaves = []  # (torch path, normd path, label, module)

    def convert(module, torch_path, normd_path):
        layer = _module_to_spec(
            module, torch_path,
            lambda child, branch, i, name: convert(child, f"{torch_path}.{branch}.{name}",
                                                   f"{normd_path}.{branch}.{i}"))
        if torch_path != normd_path:
            layer.name = torch_path  # unique in the torch module tree, so a valid label
        to_normd[torch_path] = normd_path
        if not isinstance(module, _residual_block()):
            leaves.append((torch_path, layer.name or normd_path, module))
        return layer

    for index, (name, module) in enumerate(seq.named_children()):
        spec.layers.append(convert(module, name, str(index)))
    options = {}  # label -> options that differ from the defaults
    for torch_path, label, module in leaves:
        params = list(module.parameters(recurse=False))
        flags = {p.requires_grad for p in params}
        if len(flags) > 1:
            raise ValueError(f"layer {torch_path} ({type(module).__name__}): some parameters "
                             "require grad and some do not; normd's trainable flag is per layer")
        if flags == {False}:
            options.setdefault(label, {})["trainable"] = False
        has_stats = isinstance(module, (nn.modules.batchnorm._BatchNorm,
                                        nn.modules.instancenorm._InstanceNorm))
        if seq.training and has_stats and module.track_running_stats and not module.training:
            options.setdefault(label, {})["frozen"] = True
    model = client.create_model(spec, id=id)
    # The calls below name the model with its tenant: a bare id would be the caller's own
    # tenant's model when `id` named another tenant ("team-c/x", an admin's way there).
    name = f"{model.tenant}/{model.id}" if model.tenant else model.id
    state = collections.OrderedDict()
    for key, value in seq.state_dict().items():
        module_path, _, tensor = key.rpartition(".")
        state[f"{to_normd[module_path]}.{tensor}"] = (
            value.detach().cpu().numpy().astype(np.float32))
    try:
        client.set_state(name, state, strict=True)
        if options:
            client.set_layer_options(name, options)
        if not seq.training:
            client.set_mode(name, "eval")
        return client.get_model(name)
    except Exception:
        client.delete_model(name)  # do not leave a half-made model behind
        raise

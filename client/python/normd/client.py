"""normd.Client: the normd.v1.Trainer RPCs with numpy arrays in and out.

Every call takes timeout= (seconds; default the Client's timeout, a whole train_stream's default
its stream_timeout); a call that fails, the deadline included, raises NormdError with the gRPC
code and the server's message. predict() and evaluate() split large arrays into requests of
batch_size rows themselves.
"""

import collections
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, List, Mapping, Optional, Tuple

import grpc
import numpy as np
from google.protobuf import json_format

from normd.health.v1 import health_pb2, health_pb2_grpc
from normd.v1 import normd_pb2 as pb
from normd.v1 import normd_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # the training module imports this one
    from normd.training import History


class NormdError(Exception):
    """A failed call: .code is the grpc.StatusCode (DEADLINE_EXCEEDED when the call's timeout
    passed), .message the server's message, .method the RPC's name."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str = ""):
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        super().__init__(f"{method}: {name}: {message}" if method else f"{name}: {message}")
        self.code = code
        self.message = message
        self.method = method


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_tensor(array) -> pb.Tensor:
    """A row-major float32 wire tensor (raw little-endian bytes) from anything array-like."""
    a = np.asarray(_as_numpy(array), dtype="<f4", order="C")  # keeps 0-d arrays 0-d
    return pb.Tensor(shape=list(a.shape), raw=a.tobytes())


def from_tensor(t: pb.Tensor) -> np.ndarray:
    """A writable float32 array from a wire tensor in either encoding."""
    shape = tuple(t.shape)
    n = int(np.prod(shape, dtype=np.int64))
    if t.raw:
        if len(t.raw) != 4 * n:
            raise NormdError(grpc.StatusCode.INTERNAL,
                             f"tensor of shape {shape} carries {len(t.raw)} raw bytes")
        return np.frombuffer(t.raw, dtype="<f4").astype(np.float32).reshape(shape)
    if len(t.values) != n:
        raise NormdError(grpc.StatusCode.INTERNAL,
                         f"tensor of shape {shape} carries {len(t.values)} values")
    return np.array(t.values, dtype=np.float32).reshape(shape)


@dataclass
class ForwardResult:
    """Forward's answer: the output, the id to pass to backward() and per-layer statistics."""

    output: np.ndarray
    forward_id: int = 0  # non-zero when retain_for_backward was set
    layer_stats: List[pb.LayerStats] = field(default_factory=list)
    warnings: List[pb.SmallBatchWarning] = field(default_factory=list)  # train-mode batches


_MODES = {"train": pb.MODE_TRAIN, "eval": pb.MODE_EVAL}

# update_recipe's "leave this as it is".
KEEP = object()

# Rows per request of predict() and evaluate() unless batch_size says otherwise.
DEFAULT_BATCH_ROWS = 1024


def _row_chunks(rows: int, batch_size: Optional[int]) -> List[Tuple[int, int]]:
    """(start, count) of each request's rows; one chunk when batch_size is None."""
    if batch_size is None or rows == 0:
        return [(0, rows)]
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    return [(i, min(int(batch_size), rows - i)) for i in range(0, rows, int(batch_size))]


@dataclass
class FoldResult:
    """FoldBatchNorm's answer: the folded spec, its state_dict (names to float32 arrays) and,
    when new_model was given, the inference-only copy created on the server."""
    spec: pb.ModelSpec
    state: "collections.OrderedDict[str, np.ndarray]"
    model: Optional[pb.Model] = None

    def to_torch(self):
        """The folded model as a torch.nn.Sequential in eval mode."""
        from normd.torch_interop import sequential_from_spec
        return sequential_from_spec(self.spec, self.state).eval()


def _message(value, cls):
    """A protobuf message from a message, a dict (JSON mapping) or a JSON string."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        value = json.loads(value)
    return json_format.ParseDict(value, cls())


def _read_pem(value) -> Optional[bytes]:
    """PEM bytes as given, or read from a path given as str/os.PathLike."""
    if value is None or isinstance(value, bytes):
        return value
    with open(os.fspath(value), "rb") as f:
        return f.read()


class Client:
    """One channel to a normd server. Safe to share between threads; a context manager.

    address: host:port. timeout: default deadline in seconds of every unary call;
    stream_timeout: of a whole train_stream (a method's timeout= overrides them for one call).
    TLS: tls=True (system roots) or root_certificates; certificate_chain and private_key for
    mutual TLS; each PEM bytes or a file path. token: sent as "authorization: Bearer <token>"
    on every call; it (or the client certificate) names the caller's tenant on a server with
    tenants, and a plain model name is a model of that tenant.
    tenant: for admins, a tenant to work in (as normctl --tenant): plain model names, and
    create_model's id and fold_batch_norm's new_model, are sent as "TENANT/name" (an empty id as
    "TENANT/", the server picks one there), and list_models returns that tenant's models only.
    A name that already holds a '/' is sent as written. Every pb.Model carries .tenant.

    Models: create_model, get_model, list_models, delete_model, set_mode, set_lr,
    update_recipe (schedule, clipping, no-decay groups), ...
    Compute: train_step, train_stream, fit (whole epochs), predict, evaluate, forward/backward.
    State: get_state, set_state, save_model. Errors: NormdError (.code, .message).
    """

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float = 30.0, *,
                 stream_timeout: float = 24 * 3600.0, tls: bool = False,
                 root_certificates=None, certificate_chain=None, private_key=None,
                 server_name: Optional[str] = None, token: Optional[str] = None,
                 tenant: Optional[str] = None, max_receive_bytes: int = 256 << 20):
        self.address = address
        self.tenant = tenant or None
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        # Retries off: with gRPC Python 1.51's retry filter, a TrainStream opened while the
        # channel reconnects to a server that just went away can get its status yet never end
        # its iterator (tests/client/python_client_test.py reproduces it). normd sets no retry
        # policy, so this only gives up transparent retries of calls that never left the client.
        options = [("grpc.max_receive_message_length", max_receive_bytes),
                   ("grpc.max_send_message_length", -1),
                   ("grpc.enable_retries", 0)]
        if tls or root_certificates is not None or certificate_chain is not None:
            if (certificate_chain is None) != (private_key is None):
                raise ValueError("mutual TLS needs both certificate_chain and private_key")
            creds = grpc.ssl_channel_credentials(_read_pem(root_certificates),
                                                 _read_pem(private_key),
                                                 _read_pem(certificate_chain))
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(address, creds, options)
        else:
            self._channel = grpc.insecure_channel(address, options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._stub = pb_grpc.TrainerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel; calls after it fail."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _name(self, model: str) -> str:
        """A model name as sent: qualified with self.tenant unless it names a tenant already."""
        if self.tenant is None or "/" in model:
            return model
        return f"{self.tenant}/{model}"

    def _call(self, method: str, request, stub=None, timeout: Optional[float] = None):
        try:
            return getattr(stub or self._stub, method)(
                request, timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata)
        except grpc.RpcError as e:
            raise NormdError(e.code(), e.details(), method) from None

    @staticmethod
    def _supervised(request, labels, target):
        """Fills labels (int64 class indices) or target (a tensor) into request."""
        if (labels is None) == (target is None):
            raise ValueError("give exactly one of labels (class indices) or target (tensor)")
        if labels is not None:
            request.labels.extend(np.asarray(_as_numpy(labels), dtype=np.int64).ravel().tolist())
        else:
            request.target.CopyFrom(to_tensor(target))
        return request

    # -- models -----------------------------------------------------------------------------

    def create_model(self, spec, id: str = "", *, timeout: Optional[float] = None) -> pb.Model:
        """spec: a pb.ModelSpec, or its protobuf JSON mapping as a dict or string. id: empty lets
        the server choose one (the returned Model's .id)."""
        return self._call("CreateModel",
                          pb.CreateModelRequest(id=self._name(id),
                                                spec=_message(spec, pb.ModelSpec)),
                          timeout=timeout)

    def get_model(self, model: str, *, timeout: Optional[float] = None) -> pb.Model:
        """The model's spec, mode, step and options."""
        return self._call("GetModel", pb.GetModelRequest(model=self._name(model)), timeout=timeout)

    def list_models(self, *, timeout: Optional[float] = None) -> List[pb.Model]:
        """The models the caller may see: its tenant's, or every tenant's for an admin (only
        self.tenant's when that is set)."""
        models = self._call("ListModels", pb.ListModelsRequest(), timeout=timeout).models
        return [m for m in models if self.tenant is None or m.tenant == self.tenant]

    def delete_model(self, model: str, *, timeout: Optional[float] = None) -> None:
        """Removes the model and its checkpoint."""
        self._call("DeleteModel", pb.DeleteModelRequest(model=self._name(model)), timeout=timeout)

    def set_mode(self, model: str, mode, freeze_running_stats: Optional[bool] = None, *,
                 timeout: Optional[float] = None) -> pb.Model:
        """mode: "train", "eval" or a pb.Mode value. freeze_running_stats None keeps it."""
        request = pb.SetModeRequest(model=self._name(model), mode=_MODES.get(mode, mode))
        if freeze_running_stats is not None:
            request.freeze_running_stats = freeze_running_stats
        return self._call("SetMode", request, timeout=timeout)

    def reset_running_stats(self, model: str, *, timeout: Optional[float] = None) -> pb.Model:
        """Running means to 0, variances to 1, num_batches_tracked to 0 (PyTorch's reset)."""
        return self._call("ResetRunningStats",
                          pb.ResetRunningStatsRequest(model=self._name(model)),
                          timeout=timeout)

    def update_optimizer(self, model: str, optimizer, *,
                         timeout: Optional[float] = None) -> pb.Model:
        """optimizer: a pb.OptimizerSpec or its JSON mapping, e.g. {"sgd": {"lr": 0.1}}."""
        return self._call("UpdateOptimizer", pb.UpdateOptimizerRequest(
            model=self._name(model), optimizer=_message(optimizer, pb.OptimizerSpec)),
            timeout=timeout)

    def set_lr(self, model: str, lr: float, *, timeout: Optional[float] = None) -> pb.Model:
        """Changes only the (base) learning rate (reads the current optimizer spec first); a
        schedule keeps its progress and scales the new rate."""
        optimizer = pb.OptimizerSpec()
        optimizer.CopyFrom(self.get_model(model, timeout=timeout).spec.optimizer)
        kind = optimizer.WhichOneof("kind")
        if kind is None:
            raise ValueError(f"model {model} has no optimizer")
        getattr(optimizer, kind).lr = lr
        return self.update_optimizer(model, optimizer, timeout=timeout)

    def update_recipe(self, model: str, *, lr_schedule=KEEP, max_grad_norm=KEEP,
                      no_weight_decay_on_norm_and_bias=KEEP,
                      timeout: Optional[float] = None) -> pb.Model:
        """Changes the training recipe around the optimizer, keeping its kind, hyperparameters
        and state (reads the current optimizer spec first; an argument left out keeps its value).

        lr_schedule: None (no schedule), a pb.LrScheduleSpec, its dict form, e.g.
        {"warmup": {"steps": 5, "start_factor": 0.1}, "cosine": {"t_max": 95}}, or a fresh
        torch scheduler (normd.lr_schedule_from_torch); a schedule that differs from the
        current one starts from its step 0. max_grad_norm: None (no clipping) or
        clip_grad_norm_'s max_norm. no_weight_decay_on_norm_and_bias: the usual two parameter
        groups. The server refuses bad values with INVALID_ARGUMENT, changing nothing.
        """
        from normd.torch_interop import _lr_schedule_spec

        optimizer = pb.OptimizerSpec()
        optimizer.CopyFrom(self.get_model(model, timeout=timeout).spec.optimizer)
        if lr_schedule is not KEEP:
            optimizer.ClearField("lr_schedule")
            if lr_schedule is not None:
                optimizer.lr_schedule.CopyFrom(_lr_schedule_spec(lr_schedule))
        if max_grad_norm is not KEEP:
            optimizer.ClearField("clip_grad_norm")
            if max_grad_norm is not None:
                optimizer.clip_grad_norm.max_norm = float(max_grad_norm)
        if no_weight_decay_on_norm_and_bias is not KEEP:
            optimizer.no_weight_decay_on_norm_and_bias = bool(no_weight_decay_on_norm_and_bias)
        return self.update_optimizer(model, optimizer, timeout=timeout)

    def set_layer_options(self, model: str, layers, *,
                          timeout: Optional[float] = None) -> pb.Model:
        """Per-layer freezing and trainability. layers: {label: {"frozen": bool, "trainable":
        bool}} (a key left out keeps its value; label is the layer's name or index, "3"), or an
        iterable of pb.LayerOptions. The whole request is refused if any entry is bad."""
        request = pb.SetLayerOptionsRequest(model=self._name(model))
        if isinstance(layers, Mapping):
            for label, options in layers.items():
                unknown = set(options) - {"frozen", "trainable"}
                if unknown:
                    raise ValueError(f"layer {label}: unknown option(s) {sorted(unknown)}")
                request.layers.add(layer=str(label), **options)
        else:
            request.layers.extend(layers)
        return self._call("SetLayerOptions", request, timeout=timeout)

    def fold_batch_norm(self, model: str, new_model: Optional[str] = None, *,
                        timeout: Optional[float] = None) -> FoldResult:
        """The model with every BatchNorm that follows a Linear/Conv2d folded into it; with
        new_model also created on the server as an inference-only copy under that id."""
        r = self._call("FoldBatchNorm",
                       pb.FoldBatchNormRequest(
                           model=self._name(model),
                           new_model=self._name(new_model) if new_model else ""),
                       timeout=timeout)
        state = collections.OrderedDict((t.name, from_tensor(t.tensor)) for t in r.state.tensors)
        return FoldResult(r.spec, state, r.model if r.HasField("model") else None)

    def save_model(self, model: str, *, timeout: Optional[float] = None) -> int:
        """Returns the step held by the durable checkpoint."""
        return self._call("SaveModel", pb.SaveModelRequest(model=self._name(model)),
                          timeout=timeout).step

    # -- compute ----------------------------------------------------------------------------

    def forward(self, model: str, x, retain_for_backward: bool = False,
                layer_stats: bool = False, *, timeout: Optional[float] = None) -> ForwardResult:
        """One Forward of the whole batch x in the model's current mode."""
        r = self._call("Forward", pb.ForwardRequest(
            model=self._name(model), input=to_tensor(x), retain_for_backward=retain_for_backward,
            layer_stats=layer_stats), timeout=timeout)
        return ForwardResult(from_tensor(r.output), r.forward_id, list(r.layer_stats),
                             list(r.warnings))

    def predict(self, model: str, x, *, batch_size: Optional[int] = DEFAULT_BATCH_ROWS,
                timeout: Optional[float] = None) -> np.ndarray:
        """Forward's output alone, in the model's current mode, for an array of any length.

        x is sent batch_size rows per request (None: all in one) and the outputs concatenated;
        in eval mode that equals one request. timeout applies to each request.
        """
        x = _as_numpy(x)
        if x.ndim == 0:  # no rows to split: the server says what is wrong with it
            return self.forward(model, x, timeout=timeout).output
        parts = [self.forward(model, x[i:i + n], timeout=timeout).output
                 for i, n in _row_chunks(len(x), batch_size)]
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def backward(self, model: str, forward_id: int, grad_output,
                 return_grad_input: bool = False, *,
                 timeout: Optional[float] = None) -> Optional[np.ndarray]:
        """Accumulates gradients for a retained forward; the input's gradient if asked."""
        r = self._call("Backward", pb.BackwardRequest(
            model=self._name(model), forward_id=forward_id, grad_output=to_tensor(grad_output),
            return_grad_input=return_grad_input), timeout=timeout)
        return from_tensor(r.grad_input) if r.HasField("grad_input") else None

    def apply_gradients(self, model: str, *, timeout: Optional[float] = None) -> int:
        """One optimizer step with the accumulated gradients; returns the new step (the
        server's ApplyGradientsResponse also carries grad_norm and learning_rate: use
        apply_gradients_response for them)."""
        return self.apply_gradients_response(model, timeout=timeout).step

    def apply_gradients_response(self, model: str, *,
                                 timeout: Optional[float] = None) -> pb.ApplyGradientsResponse:
        """apply_gradients with the whole response: step, grad_norm (the gradients' total norm
        before clipping) and learning_rate (the rate the step used)."""
        return self._call("ApplyGradients", pb.ApplyGradientsRequest(model=self._name(model)),
                          timeout=timeout)

    def train_step(self, model: str, x, labels=None, target=None, *,
                   timeout: Optional[float] = None) -> pb.TrainStepResponse:
        """One optimisation step: labels (class indices) for cross-entropy, target otherwise.
        The response holds loss, step, samples, grad_norm (before clipping) and learning_rate
        (the rate the step used)."""
        request = pb.TrainStepRequest(model=self._name(model), input=to_tensor(x))
        return self._call("TrainStep", self._supervised(request, labels, target),
                          timeout=timeout)

    def train_stream(self, model: str, batches: Iterable[Tuple[Any, Any]], *,
                     timeout: Optional[float] = None) -> Iterator[pb.TrainStepResponse]:
        """Streams (x, y) batches over one TrainStream; yields one response per batch.

        y with an integer dtype is labels, a floating dtype is a target tensor. timeout: of the
        whole stream (default the Client's stream_timeout).
        """
        def requests():
            for x, y in batches:
                y = _as_numpy(y)
                request = pb.TrainStepRequest(model=self._name(model), input=to_tensor(x))
                if np.issubdtype(y.dtype, np.integer):
                    yield self._supervised(request, y, None)
                else:
                    yield self._supervised(request, None, y)

        responses = self._stub.TrainStream(
            requests(), timeout=self.stream_timeout if timeout is None else timeout,
            metadata=self._metadata)
        try:
            yield from responses
        except grpc.RpcError as e:
            raise NormdError(e.code(), e.details(), "TrainStream") from None

    def adapt_statistics(self, model: str, data, batch_size: int = 256, *,
                         timeout: Optional[float] = None) -> pb.Model:
        """Re-estimates the model's BatchNorm running statistics from unlabelled data (AdaBN,
        "precise BN") over one AdaptStatistics stream; returns the updated model.

        data: an array of samples, sent in batches of batch_size, or an iterable of batches.
        Every tracked, non-frozen BatchNorm layer's running_mean / running_var become the mean
        and unbiased variance of all values that reached it; nothing changes if the call fails.
        timeout: of the whole stream (default the Client's stream_timeout).
        """
        if hasattr(data, "shape"):
            arr = _as_numpy(data)
            batches = (arr[i:i + batch_size] for i in range(0, len(arr), batch_size))
        else:
            batches = data

        def requests():
            for i, x in enumerate(batches):
                yield pb.AdaptStatisticsRequest(model=self._name(model) if i == 0 else "",
                                                input=to_tensor(x))

        try:
            return self._stub.AdaptStatistics(requests(),
                                              timeout=self.stream_timeout if timeout is None
                                              else timeout,
                                              metadata=self._metadata)
        except grpc.RpcError as e:
            raise NormdError(e.code(), e.details(), "AdaptStatistics") from None

    def evaluate(self, model: str, x, labels=None, target=None, *,
                 batch_size: Optional[int] = DEFAULT_BATCH_ROWS,
                 timeout: Optional[float] = None) -> pb.EvaluateResponse:
        """Loss (and accuracy for cross-entropy) in eval semantics; changes nothing.

        x (and labels or target) are sent batch_size rows per request (None: all in one); the
        answer holds the sample-weighted means over the requests and their total samples, which
        equal one request's figures up to float rounding. timeout applies to each request.
        """
        if (labels is None) == (target is None):
            raise ValueError("give exactly one of labels (class indices) or target (tensor)")
        x = _as_numpy(x)
        y = _as_numpy(labels if labels is not None else target)
        paired = x.ndim > 0 and y.ndim > 0 and len(y) == len(x)
        chunks = _row_chunks(len(x), batch_size) if paired else [(0, 0)]
        if len(chunks) == 1:  # one request; rows that do not pair up get the server's answer
            request = pb.EvaluateRequest(model=self._name(model), input=to_tensor(x))
            return self._call("Evaluate", self._supervised(request, labels, target),
                              timeout=timeout)
        total = pb.EvaluateResponse()
        loss = accuracy = 0.0
        for i, n in chunks:
            request = pb.EvaluateRequest(model=self._name(model), input=to_tensor(x[i:i + n]))
            if labels is not None:
                self._supervised(request, y[i:i + n], None)
            else:
                self._supervised(request, None, y[i:i + n])
            r = self._call("Evaluate", request, timeout=timeout)
            loss += r.loss * r.samples
            accuracy += r.accuracy * r.samples
            total.samples += r.samples
        if total.samples:
            total.loss = loss / total.samples
            total.accuracy = accuracy / total.samples
        return total

    def fit(self, model: str, x, y=None, **options) -> "History":
        """Trains model for whole epochs over TrainStream; returns the per-epoch History.

        normd.fit(self, model, x, y, **options) with options epochs, batch_size, shuffle, seed,
        validation_data, validation_batch_size, lr (number, per-epoch list or callable),
        early_stopping (normd.EarlyStopping), progress, timeout and stream_timeout; see
        help(normd.fit).
        """
        from normd.training import fit
        return fit(self, model, x, y, **options)

    # -- state ------------------------------------------------------------------------------

    def get_state(self, model: str, include_optimizer: bool = False, *,
                  timeout: Optional[float] = None) -> "collections.OrderedDict[str, np.ndarray]":
        """An OrderedDict of PyTorch state_dict names to float32 arrays."""
        r = self._call("GetState", pb.GetStateRequest(model=self._name(model),
                                                      include_optimizer=include_optimizer),
                       timeout=timeout)
        return collections.OrderedDict((t.name, from_tensor(t.tensor)) for t in r.tensors)

    def set_state(self, model: str, state: Mapping[str, Any], strict: bool = True, *,
                  timeout: Optional[float] = None) -> pb.Model:
        """state: names to arrays (numpy or torch); num_batches_tracked may be an integer."""
        request = pb.SetStateRequest(model=self._name(model), strict=strict)
        for name, value in state.items():
            request.state.tensors.add(name=name, tensor=to_tensor(value))
        return self._call("SetState", request, timeout=timeout)

    def check_replicas(self, *, timeout: Optional[float] = None) -> pb.CheckReplicasResponse:
        """Data-parallel jobs: every rank's digest of its replicas (world_size, consistent,
        models, digests in rank order). A single process answers world_size 1. Admins only."""
        return self._call("CheckReplicas", pb.CheckReplicasRequest(), timeout=timeout)

    # -- health -----------------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: Optional[float] = None) -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", ..."""
        r = self._call("Check", health_pb2.HealthCheckRequest(service=service), self._health,
                       timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

"""normd.fit: the epoch loop over TrainStream, so a dataset trains in one call.

    history = client.fit("m", x_train, y_train, epochs=15, batch_size=32, seed=0,
                         validation_data=(x_val, y_val), lr=lambda epoch: 1e-3 * 0.9 ** epoch,
                         early_stopping=normd.EarlyStopping("val_accuracy", patience=3))
    pandas.DataFrame(history)   # one row per epoch

Contract:
- Data: numpy arrays (or torch tensors) x and y with the same number of rows — y with an integer
  dtype is class labels (cross-entropy), a floating dtype the target — or, with y None, any
  re-iterable of (x, y) batches such as a torch.utils.data.DataLoader (it shuffles itself).
- Each epoch is one TrainStream of batch_size-row batches; with shuffle, the rows are permuted by
  numpy's default_rng(seed), so the same seed (and the same starting model) gives the same
  batches and history. A trailing one-row batch joins the one before it (BatchNorm cannot train
  on one value per channel), as normctl does.
- lr: a number (set once before the first epoch), a sequence (lr[i] for epoch index i, the last
  one after its end) or a callable of the epoch index (0-based); set with Client.set_lr before an
  epoch only when it differs from the model's current rate, so the optimizer state is kept.
- validation_data (x, y): evaluated after every epoch with Client.evaluate (eval semantics,
  changes nothing), batched by validation_batch_size.
- early_stopping: stops after `patience` epochs in a row without improving the monitored figure
  by more than min_delta; the epochs run so far stay in the history.
- The model trains in its current mode (normd models start in train mode). A failed call raises
  NormdError and ends fit; the steps already taken stay taken.
"""

import collections.abc
import sys
import time
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional,
                    Sequence, Tuple, Union)

import numpy as np

from normd.client import DEFAULT_BATCH_ROWS, _as_numpy

if TYPE_CHECKING:
    from normd.client import Client

LearningRate = Union[float, Sequence[float], Callable[[int], float]]


@dataclass
class EarlyStopping:
    """Stop when `monitor` (a history key: "val_loss", "val_accuracy", "loss") has not improved
    by more than min_delta for `patience` epochs in a row. mode "min" or "max"; "auto" takes
    "max" for accuracies and "min" otherwise. restore_best: when fit ends after a worse epoch,
    put back the parameters and buffers (get_state/set_state) of the best epoch; the optimizer
    state and the step count stay those of the last epoch."""

    monitor: str = "val_loss"
    patience: int = 3
    min_delta: float = 0.0
    mode: str = "auto"
    restore_best: bool = False

    def __post_init__(self):
        if self.mode not in ("auto", "min", "max"):
            raise ValueError(f"EarlyStopping.mode must be auto, min or max, got {self.mode!r}")
        if self.patience < 1:
            raise ValueError(f"EarlyStopping.patience must be >= 1, got {self.patience}")
        if self.min_delta < 0:
            raise ValueError(f"EarlyStopping.min_delta must be >= 0, got {self.min_delta}")

    @property
    def maximize(self) -> bool:
        return self.mode == "max" or (self.mode == "auto" and "acc" in self.monitor)


class History(List[Dict[str, Any]]):
    """fit()'s result: one dict per epoch run (pandas.DataFrame(history) makes a table).

    Keys: epoch (1-based), lr (fit's lr argument for the epoch, None without one), last_lr (the
    rate the epoch's last step used: the model's schedule included), grad_norm (mean over the
    epoch's steps of the gradient norm before clipping), loss (sample-weighted mean training
    loss of the epoch), samples, step (the model's step after the epoch), seconds,
    samples_per_s and, with validation data, val_loss and val_accuracy (cross-entropy labels
    only). Attributes: stopped_early, and with
    early stopping best_epoch, best (the monitored figure's best value) and restored (the best
    epoch's state was put back).
    """

    stopped_early: bool = False
    best_epoch: Optional[int] = None
    best: Optional[float] = None
    restored: bool = False

    def column(self, key: str) -> List[Any]:
        """One key's value of every epoch, e.g. history.column("val_accuracy")."""
        return [record.get(key) for record in self]


def _labels_or_target(y: np.ndarray) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    return (y, None) if np.issubdtype(y.dtype, np.integer) else (None, y)


def _epoch_lr(lr: Optional[LearningRate], epoch: int) -> Optional[float]:
    if lr is None:
        return None
    if callable(lr):
        return float(lr(epoch))
    if isinstance(lr, (int, float, np.floating, np.integer)):
        return float(lr)
    if len(lr) == 0:
        raise ValueError("lr: an empty sequence")
    return float(lr[min(epoch, len(lr) - 1)])


def _current_lr(client: "Client", model: str, timeout: Optional[float]) -> Optional[float]:
    optimizer = client.get_model(model, timeout=timeout).spec.optimizer
    kind = optimizer.WhichOneof("kind")
    return float(getattr(optimizer, kind).lr) if kind else None


def _array_batches(x: np.ndarray, y: np.ndarray, batch_size: int,
                   order: np.ndarray) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    starts = list(range(0, len(order), batch_size))
    if len(starts) > 1 and len(order) - starts[-1] == 1:
        starts.pop()  # a one-row tail joins the batch before it
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(order)
        rows = order[start:end]
        yield x[rows], y[rows]


def _progress_bar(progress: bool, total: Optional[int], desc: str):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm missing (a source tree): fit prints a line per epoch instead
        return None
    return tqdm(total=total, desc=desc, unit=" samples", leave=True, dynamic_ncols=True)


def fit(client: "Client", model: str, x: Any, y: Any = None, *, epochs: int = 1,
        batch_size: int = 32, shuffle: bool = True, seed: Optional[int] = None,
        validation_data: Optional[Tuple[Any, Any]] = None,
        validation_batch_size: Optional[int] = DEFAULT_BATCH_ROWS,
        lr: Optional[LearningRate] = None, early_stopping: Optional[EarlyStopping] = None,
        progress: bool = True, timeout: Optional[float] = None,
        stream_timeout: Optional[float] = None) -> History:
    """Trains `model` on (x, y) for `epochs` epochs over TrainStream; returns the History.

    x, y: arrays with the same number of rows (integer y: labels; floating y: target), or y None
    and x a re-iterable of (x, y) batches (a torch DataLoader, a list of pairs). batch_size,
    shuffle and seed apply to arrays. validation_data: (x, y) arrays evaluated after each epoch.
    lr: a number, a per-epoch sequence or a callable of the 0-based epoch index. early_stopping:
    an EarlyStopping. progress: a tqdm bar per epoch (samples/s, running loss; renders in
    Jupyter); False prints nothing at all. timeout: of each unary call (evaluate, set_lr);
    stream_timeout: of each epoch's stream (default the Client's). See normd/training.py.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if early_stopping is not None and early_stopping.monitor.startswith("val_") \
            and validation_data is None:
        raise ValueError(f"early stopping on {early_stopping.monitor} needs validation_data")

    if y is not None:
        x_arr, y_arr = _as_numpy(x), _as_numpy(y)
        if x_arr.ndim == 0 or y_arr.ndim == 0 or len(x_arr) != len(y_arr):
            raise ValueError(f"x and y need the same number of rows, got shapes {x_arr.shape} "
                             f"and {y_arr.shape}")
        if len(x_arr) == 0:
            raise ValueError("x holds no rows")
        total: Optional[int] = len(x_arr)
        rng = np.random.default_rng(seed)
    else:
        if isinstance(x, np.ndarray) or hasattr(x, "detach"):
            raise ValueError("y is missing: give x and y arrays, or an iterable of (x, y) batches")
        if isinstance(x, collections.abc.Iterator) and epochs > 1:
            raise ValueError("x is a one-pass iterator; give a re-iterable (a DataLoader, a list) "
                             "to train more than one epoch")
        dataset = getattr(x, "dataset", None)
        total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None

    if validation_data is not None:
        x_val, y_val = (_as_numpy(v) for v in validation_data)
        val_labels, val_target = _labels_or_target(y_val)

    history = History()
    current_lr = _current_lr(client, model, timeout) if lr is not None else None
    best: Optional[float] = None
    best_state = None
    waited = 0
    for epoch in range(epochs):
        wanted = _epoch_lr(lr, epoch)
        if wanted is not None and (current_lr is None
                                   or np.float32(wanted) != np.float32(current_lr)):
            client.set_lr(model, wanted, timeout=timeout)
            current_lr = wanted

        if y is not None:
            order = rng.permutation(len(x_arr)) if shuffle else np.arange(len(x_arr))
            batches: Iterable[Tuple[Any, Any]] = _array_batches(x_arr, y_arr, batch_size, order)
        else:
            batches = x
        bar = _progress_bar(progress, total, f"epoch {epoch + 1}/{epochs}")
        loss_sum = 0.0
        samples = 0
        step = 0
        steps = 0
        grad_norm_sum = 0.0
        last_lr = None
        start = time.monotonic()
        try:
            for r in client.train_stream(model, batches, timeout=stream_timeout):
                loss_sum += r.loss * r.samples
                samples += r.samples
                step = r.step
                steps += 1
                grad_norm_sum += r.grad_norm
                last_lr = r.learning_rate
                if bar is not None:
                    bar.update(r.samples)
                    bar.set_postfix(loss=f"{loss_sum / max(samples, 1):.4f}", refresh=False)
            seconds = time.monotonic() - start
            if samples == 0:
                raise ValueError(f"epoch {epoch + 1} had no batches")
            record: Dict[str, Any] = {
                "epoch": epoch + 1, "lr": current_lr, "last_lr": last_lr,
                "grad_norm": grad_norm_sum / steps, "loss": loss_sum / samples,
                "samples": samples, "step": step, "seconds": seconds,
                "samples_per_s": samples / seconds if seconds > 0 else float("inf")}
            if validation_data is not None:
                v = client.evaluate(model, x_val, val_labels, val_target,
                                    batch_size=validation_batch_size, timeout=timeout)
                record["val_loss"] = v.loss
                if val_labels is not None:
                    record["val_accuracy"] = v.accuracy
            if bar is not None:
                bar.set_postfix({k: f"{record[k]:.4f}" for k in
                                 ("loss", "val_loss", "val_accuracy") if k in record})
        finally:
            if bar is not None:
                bar.close()
        if progress and bar is None:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in record.items()), file=sys.stderr)
        history.append(record)

        if early_stopping is not None:
            if early_stopping.monitor not in record:
                raise ValueError(f"early stopping monitors {early_stopping.monitor!r}, which the "
                                 f"history does not hold (it has {', '.join(record)})")
            value = float(record[early_stopping.monitor])
            if early_stopping.maximize:
                improved = best is None or value > best + early_stopping.min_delta
            else:
                improved = best is None or value < best - early_stopping.min_delta
            if improved:
                best, waited = value, 0
                history.best, history.best_epoch = value, epoch + 1
                if early_stopping.restore_best:
                    best_state = client.get_state(model, timeout=timeout)
            else:
                waited += 1
                if waited >= early_stopping.patience:
                    history.stopped_early = True
                    break
    if best_state is not None and history.best_epoch != len(history):
        client.set_state(model, best_state, timeout=timeout)
        history.restored = True
    return history

"""Size and cost of a model: parameters, multiply-adds, training-step memory and throughput."""

from __future__ import annotations

import copy
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .. import record
from ..checks import require_int

# ru_maxrss is in KiB on Linux and in bytes on macOS.
_MAXRSS_BYTES = 1 if sys.platform == "darwin" else 1024
MIB = 2**20


class StepTimer:
    """Seconds of each training step, without making the host wait on the device: on a GPU each
    step is bracketed by CUDA events and their times are read once, when asked (a synchronize
    per step would keep the host from queueing the next step's kernels while the GPU works); on
    a CPU the clock is read at once."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._start: Any = None
        self._pending: list[tuple[Any, Any]] = []
        self._seconds: list[float] = []

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        end = self._now()
        if self.cuda:
            self._pending.append((self._start, end))
        else:
            self._seconds.append(end - self._start)

    def seconds(self) -> list[float]:
        """Every step's seconds so far (on a GPU: one wait for the last step's end event)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self._seconds += [start.elapsed_time(end) / 1000 for start, end in self._pending]
            self._pending = []
        return self._seconds


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (the figure torchvision publishes)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Multiply-adds and FLOPs of one forward pass, per image.

    Convention: FLOPs = 2 x multiply-adds (MACs). ``torch.utils.flop_counter`` reports FLOPs that
    way, so MACs = flops / 2; torchvision's "GFLOPS" column is in fact GMACs. Only convolutions and
    matrix products count (BN, ReLU and pooling are free), as in torchvision's figures.

    Args:
        model: counted in eval mode under ``torch.no_grad``; the mode of every submodule is restored.
        input_shape: ``(C, H, W)`` of one image, or ``(N, C, H, W)`` (the count is divided by N).
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    param = next(model.parameters(), None)
    x = torch.zeros(
        shape,
        device=param.device if param is not None else None,
        dtype=param.dtype if param is not None and param.is_floating_point() else None,
    )
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, training in modes.items():
            m.training = training
    flops = counter.get_total_flops() // shape[0]
    return {"macs": flops // 2, "flops": flops}


def _input_tensor(batch: Any) -> Tensor:
    """The images of a batch: the batch itself, its first element, or its first tensor value."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        return next(v for v in batch.values() if isinstance(v, Tensor))
    return _input_tensor(batch[0])


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd saves for backward while active: each storage once (a tensor
    saved by two ops, or views of one buffer, cost memory once), parameters excluded (they exist
    whether or not anything is saved). Casts of the weights under autocast are counted: they are
    real copies. This is the activation memory of a training step, independent of the allocator,
    of what ran earlier in the process and of the device."""

    def __init__(self, parameters: Iterable[Tensor]) -> None:
        self._skip = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrappers)
            return t
        if storage.data_ptr() not in self._skip:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def saved_bytes_by_implementation(model: nn.Module, images: Tensor) -> dict[str, int]:
    """The bytes one eager training forward of `model` on `images` saves for backward, for each of
    its implementations (record.TRAIN_STEP_MB_BY_IMPL): a DenseNet's plain concatenation and its
    memory-efficient mode, any other model's one ("plain"). Measured on copies, with the random
    state restored after, so the run's own model, buffers and random stream are untouched."""
    from ..models.densenet import with_implementation

    twins = {impl: with_implementation(model, impl == "memory_efficient") for impl in record.TRAIN_STEP_MB_BY_IMPL}
    if twins["plain"] is None:
        twins = {"plain": copy.deepcopy(model)}
    found = {}
    for impl, twin in twins.items():
        twin.train()
        saved = SavedTensorBytes(twin.parameters())
        with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []), \
                torch.enable_grad(), saved:
            twin(images)
        found[impl] = saved.nbytes
    return found


def model_state_bytes(
    model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], only_existing_grads: bool = False
) -> int:
    """Parameters, their gradients (one per trainable parameter, or only those allocated now) and
    the optimizers' state."""
    params = sum(p.nbytes for p in model.parameters())
    grads = sum(p.nbytes for p in model.parameters() if (p.grad is not None if only_existing_grads else p.requires_grad))
    state = sum(
        v.nbytes for opt in optimizers for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)
    )
    return params + grads + state


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_BYTES / MIB


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process, so each run of a sweep that runs
    its jobs in one process sees its own peak. Linux only; False where it is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class SizeCostProbe(pl.Callback):
    """Logs what a model costs.

    - ``params``, ``macs_per_image``, ``flops_per_image``: once, at the first training batch's
      image size.
    - ``train_images_per_s``, ``epoch_time_s``, ``peak_memory_mb``: every training epoch.
      Throughput is images over the summed time of the training steps (forward, backward and
      optimizer step; data loading excluded), skipping the first ``warmup_steps`` of each epoch.
      Epoch time is wall time from epoch start to epoch end, validation included. Peak memory is
      ``torch.cuda.max_memory_allocated`` on a GPU, else the peak resident memory since fit start
      above the resident memory at fit start (Linux: VmHWM, reset at fit start).
    - ``memory/activations_mb``, ``memory/train_step_mb``: once, at the first training step:
      the bytes saved for backward (``SavedTensorBytes``) at the run's batch size and precision,
      and that plus parameters, gradients and optimizer state (``model_state_bytes``, read after
      the step, when the optimizer state exists). Deterministic: the same model, batch and
      precision give the same figure on any device and whatever ran before in the process. On a
      GPU also ``memory/gpu_step_peak_mb``: ``torch.cuda.max_memory_allocated`` during that step
      less what was allocated before it apart from the model (the in-memory data set).
    - ``memory/train_step_mb_plain`` and, for a DenseNet, ``memory/train_step_mb_memory_efficient``:
      once, at the first step: the same figure for each implementation, measured eagerly on copies
      of the model (``saved_bytes_by_implementation``), so a memory claim can name either.
    - ``infer_images_per_s``: once, at the end of training: median of ``infer_repeats`` eval-mode
      ``no_grad`` forwards of one random batch of the training batch's shape.
    """

    def __init__(self, warmup_steps: int = 3, infer_repeats: int = 5) -> None:
        require_int("warmup_steps", warmup_steps, 0)
        require_int("infer_repeats", infer_repeats, 1)
        self.warmup_steps = warmup_steps
        self.infer_repeats = infer_repeats
        self._batch_shape: tuple[int, ...] | None = None
        self._saved: SavedTensorBytes | None = None

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        # CUDA kernels run asynchronously: wait for them before reading the clock.
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch_shape = None
        self._saved, self._saved_closed, self._memory_logged = None, False, False
        # Peak resident memory since fit start: VmHWM after resetting it, where Linux allows;
        # else the growth of the process's lifetime peak (blind to an earlier, higher peak).
        self._peak_was_reset = _reset_peak_rss()
        self._fit_start_rss_mb = _proc_status_mb("VmRSS") if self._peak_was_reset else _max_rss_mb()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._step_timer = StepTimer(pl_module.device)
        self._step_images: list[int] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        images = _input_tensor(batch)
        if self._batch_shape is None:
            self._batch_shape = tuple(images.shape)
            # Laid out as the classifier lays out what it trains on.
            channels_last = getattr(pl_module, "channels_last", False)
            self._first_images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
            if trainer.is_global_zero:
                model = getattr(pl_module, "model", pl_module)
                cost = count_flops(model, self._batch_shape[1:])
                self._log(
                    trainer,
                    {
                        record.PARAMS: count_parameters(model),
                        record.MACS_PER_IMAGE: cost["macs"],
                        record.FLOPS_PER_IMAGE: cost["flops"],
                    },
                )
        self._step_batch_size = len(images)
        if self._saved is None and trainer.is_global_zero and not self._memory_logged:
            self._start_memory_count(pl_module)
        self._step_timer.start()

    def _start_memory_count(self, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", pl_module)
        if pl_module.device.type == "cuda":
            # What is allocated before the step apart from the model's own state: the data set.
            existing = model_state_bytes(model, pl_module.trainer.optimizers, only_existing_grads=True)
            self._gpu_other_bytes = torch.cuda.memory_allocated(pl_module.device) - existing
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._saved = SavedTensorBytes(model.parameters())
        self._saved.__enter__()

    def _stop_memory_count(self) -> None:
        if self._saved is not None and not self._saved_closed:
            self._saved.__exit__(None, None, None)
            self._saved_closed = True

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._stop_memory_count()  # the forward is done: everything backward needs is saved

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step_timer.stop()
        self._step_images.append(self._step_batch_size)
        if self._saved is not None and not self._memory_logged:
            self._stop_memory_count()
            self._log(trainer, self._memory_metrics(pl_module))
            self._memory_logged = True

    def _memory_metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        model = getattr(pl_module, "model", pl_module)
        state = model_state_bytes(model, pl_module.trainer.optimizers)
        metrics = {record.ACTIVATIONS_MB: self._saved.nbytes / MIB,
                   record.TRAIN_STEP_MB: (self._saved.nbytes + state) / MIB}
        with pl_module.trainer.precision_plugin.train_step_context():
            saved = saved_bytes_by_implementation(model, self._first_images)
        metrics.update({record.TRAIN_STEP_MB_BY_IMPL[impl]: (n + state) / MIB for impl, n in saved.items()})
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) - self._gpu_other_bytes
            metrics[record.GPU_STEP_PEAK_MB] = peak / MIB
        return metrics

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step_seconds = self._step_timer.seconds()
        if not step_seconds:
            return
        # Keep at least one step when an epoch is shorter than the warm-up.
        skip = min(self.warmup_steps, len(step_seconds) - 1)
        if pl_module.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(pl_module.device) / MIB
        elif self._peak_was_reset:
            peak_mb = (_proc_status_mb("VmHWM") or 0.0) - self._fit_start_rss_mb
        else:
            peak_mb = _max_rss_mb() - self._fit_start_rss_mb
        self._log(
            trainer,
            {
                record.TRAIN_IMAGES_PER_S: sum(self._step_images[skip:]) / sum(step_seconds[skip:]),
                record.EPOCH_TIME_S: time.perf_counter() - self._epoch_start,
                record.PEAK_MEMORY_MB: peak_mb,
            },
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_end, not on_fit_end: by fit end the strategy has moved the model back to the CPU.
        if self._batch_shape is None or not trainer.is_global_zero:
            return
        model = getattr(pl_module, "model", pl_module)
        param = next(model.parameters())
        x = torch.randn(self._batch_shape, device=param.device, dtype=param.dtype)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        seconds = []
        try:
            with torch.no_grad():
                for _ in range(self.infer_repeats + 1):  # the first forward is warm-up
                    self._sync(pl_module)
                    start = time.perf_counter()
                    model(x)
                    self._sync(pl_module)
                    seconds.append(time.perf_counter() - start)
        finally:
            for m, training in modes.items():
                m.training = training
        self._log(trainer, {record.INFER_IMAGES_PER_S: len(x) / statistics.median(seconds[1:])})

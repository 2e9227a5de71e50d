"""What a training job shows while it runs: before the first step, one block that says what will
run; then, on a terminal, a progress bar over the whole run ("job j/N epoch e/E", the run's
ETA); and one line per epoch with the time left in the run and in the sweep. Where stdout is not
a terminal (a pipe, a SLURM .out file) there is no bar: instead a first line FIRST_LINE_S after
training starts, with an estimate from the first steps, then a line at least every
PROGRESS_EVERY_S seconds, each with the mean loss of the steps since the line before and an ETA
from the rate of those steps. Lines go through `logging`, so Hydra's per-job `run.log` keeps them.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n, convert_inf
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import record
from ..runs.console import duration
from ..runs.logs import is_terminal

log = logging.getLogger("densenet_exp")
FIRST_LINE_S = 20.0  # without a progress bar: the first line this long after training starts
PROGRESS_EVERY_S = 60.0  # ... then a line at least this often


def _on_off(flag: Any) -> str:
    return "on" if flag else "off"


def _step_loss(outputs: Any) -> torch.Tensor | None:
    """The training step's loss as Lightning hands it to callbacks (a tensor, or a dict with
    "loss"), detached and still on its device: summing it there costs no host sync."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss.detach().float() if isinstance(loss, torch.Tensor) else None


def _per_step(seconds: float) -> str:
    return f"{seconds:.2g} s" if seconds < 10 else duration(seconds)


class StepWindow:
    """The training steps since the last progress line (or the epoch's start): their loss sum,
    their first and last step numbers, and the time they took (a run's first step, which includes
    warm-up, is not timed)."""

    def __init__(self, now: float, first_step: int) -> None:
        self.started, self.first_step, self.last_step = now, first_step, first_step - 1
        self.timed = 0  # steps whose time the window holds
        self.losses = 0
        self.loss_sum: torch.Tensor | None = None

    def add(self, step: int, loss: torch.Tensor | None, timed: bool, now: float) -> None:
        self.last_step = step
        if timed:
            self.timed += 1
        else:
            self.started = now
        if loss is not None:
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
            self.losses += 1

    def mean_loss(self) -> float | None:
        return None if self.loss_sum is None else float(self.loss_sum) / self.losses

    def step_s(self, now: float) -> float | None:
        return (now - self.started) / self.timed if self.timed else None


class JobReport(Callback):
    """Logs what will run before the first step, then one line per epoch with the time left in
    the run and, in a sweep, in the sweep (`later_jobs`: the jobs after this one, counted in runs
    of this one's length). With `lines_within_epoch` (no progress bar) it also logs a first line
    `first_s` after training starts and then a line at least every `every_s` seconds, each with
    the loss of its own steps. Every estimate uses the current rate: the steps since the last line
    (validation timed apart), or at an epoch's end that epoch. `clock` is for tests."""

    def __init__(self, plain: dict[str, Any], label: str, run: str, speed: dict[str, bool], later_jobs: float = 0.0,
                 lines_within_epoch: bool = False, every_s: float = PROGRESS_EVERY_S, first_s: float = FIRST_LINE_S,
                 name: str = "", clock: Callable[[], float] = time.perf_counter) -> None:
        self.plain, self.label, self.run, self.speed, self.name = plain, label, run, speed, name
        self.later_jobs, self.lines_within_epoch = later_jobs, lines_within_epoch
        self.every_s, self.first_s, self.clock = every_s, first_s, clock
        self.started = self.last_line = self.epoch_started = self.val_started = 0.0
        self.val_s = 0.0  # the last validation's seconds: each epoch ends with one
        self.steps_seen = 0
        self.lines = 0  # progress lines within epochs
        self.window = StepWindow(0.0, 1)
    def block(self, trainer: pl.Trainer, module: pl.LightningModule) -> str:
        cfg, data, trainer_cfg = self.plain, self.plain["data"], self.plain["trainer"]
        model = cfg["model"]
        knobs = "" if cfg.get("growth_rate") is None else (
            f"k={cfg['growth_rate']}, compression {cfg['compression']}, bottleneck {_on_off(cfg['bottleneck'])}")
        params = sum(p.numel() for p in module.parameters())
        sets = getattr(trainer.datamodule, "datasets", {}) if trainer.datamodule is not None else {}
        sizes = ", ".join(f"{len(sets[s])} {s}" for s in ("train", "val", "test") if s in sets)
        sizes = f"{sizes} images" if sizes else "sizes unknown"
        if sets and not getattr(trainer.datamodule, "has_test_set", True):
            sizes += ", no held-out test set (no test/ folder: no test metric)"
        loading = trainer.datamodule.loading.describe() if hasattr(trainer.datamodule, "loading") else ""
        device = str(trainer.strategy.root_device)
        if trainer.world_size > 1:
            device += f" x {trainer.world_size} processes ({trainer_cfg.get('strategy', 'ddp')})"
        steps = trainer.num_training_batches
        optim = cfg["optim"]
        probes = cfg.get("probes") or {}
        on = [name for name, enabled in probes.items() if enabled is True] if isinstance(probes, dict) else []
        resume = f", resuming at epoch {trainer.current_epoch + 1}" if trainer.current_epoch else ""
        lines = [
            f"{self.label + ': ' if self.label else ''}{self.run}",
            f"  model      {model.get('name') or model['arch']} ({model['arch']}{', ' + knobs if knobs else ''}), "
            f"{params / 1e6:.3f}M parameters",
            f"  input      {data.get('channels', '?')}x{data.get('image_size', '?')}x{data.get('image_size', '?')}, "
            f"{data['num_classes']} classes",
            f"  data       {data['name']}: {sizes}; batch {data['batch_size']}{loading}",
            f"  device     {device}, {torch.get_num_threads()} CPU threads; precision {trainer.precision}",
            f"  speed      channels_last {_on_off(self.speed.get('channels_last'))}, keep freed memory "
            f"{_on_off(self.speed.get('keep_freed_memory'))}, compile {_on_off(cfg['speed'].get('compile'))}, "
            f"memory-efficient {_on_off(model.get('memory_efficient'))}",
            f"  training   {trainer.max_epochs} epoch{'s' if trainer.max_epochs != 1 else ''} x {steps} steps, "
            f"{optim.get('name')} lr {optim.get('lr')}{resume}; probes: {', '.join(on) or 'none'}",
        ]
        return "\n".join(lines)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = self.last_line = self.clock()
        if trainer.is_global_zero:
            log.info(self.block(trainer, pl_module))

    def timing(self, elapsed: float, left: float, run_s: float) -> str:
        """"12.0 s so far, about 36.0 s left; sweep about 4 min 10 s left": `left` seconds of this
        run, and each later job of the sweep taking `run_s` (a whole run at the current rate)."""
        text = f"{duration(elapsed)} so far, about {duration(left)} left" if left > 0 else duration(elapsed)
        if self.later_jobs > 0:
            text += f"; sweep about {duration(left + self.later_jobs * run_s)} left"
        return text

    def _prefix(self) -> str:
        return f"{self.label} " if self.label else ""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_started = now = self.clock()
        self.window = StepWindow(now, 1)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_started = self.clock()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_s = self.clock() - self.val_started

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.lines_within_epoch or not trainer.is_global_zero:
            return
        now = self.clock()
        self.window.add(batch_idx + 1, _step_loss(outputs), timed=self.steps_seen > 0, now=now)
        self.steps_seen += 1
        if now - self.last_line < (self.every_s if self.lines else self.first_s):
            return
        steps = trainer.num_training_batches
        if not steps or math.isinf(steps):
            return
        window, epoch, epochs = self.window, trainer.current_epoch, trainer.max_epochs
        step_s = window.step_s(now) or (now - self.started) / self.steps_seen  # a single, untimed step
        epoch_s = steps * step_s + self.val_s
        left = ((epochs - epoch) * steps - batch_idx - 1) * step_s + (epochs - epoch) * self.val_s
        loss = window.mean_loss()
        figures = f", train loss {loss:.4f} (steps {window.first_step}-{window.last_step})" if loss is not None else ""
        where = f"epoch {epoch + 1}/{epochs}, step {batch_idx + 1}/{steps}{figures}"
        timing = self.timing(now - self.started, left, epochs * epoch_s)
        if self.lines:
            log.info(f"{self._prefix()}{where}; {_per_step(step_s)} a step ({timing})")
        else:
            log.info(f"{self._prefix()}training {self.name or 'started'}: {where}; first steps {_per_step(step_s)} "
                     f"each, about {duration(epoch_s)} an epoch ({timing})")
        self.lines += 1
        self.last_line = now
        self.window = StepWindow(now, batch_idx + 2)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        epoch, epochs = trainer.current_epoch + 1, trainer.max_epochs
        self.last_line = now = self.clock()
        epoch_s = now - self.epoch_started  # its steps and its validation: the current rate
        metrics = trainer.callback_metrics
        figures = ", ".join(
            f"{label} {float(metrics[key]):.4f}"
            for key, label in ((record.TRAIN_LOSS, "train loss"), (record.VAL_ACC, "val acc"))
            if key in metrics
        )
        timing = self.timing(now - self.started, (epochs - epoch) * epoch_s, epochs * epoch_s)
        log.info(f"{self._prefix()}epoch {epoch}/{epochs}: {figures} ({timing})")


class RunProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, counting the steps of every epoch so that its ETA is the whole
    run's; labelled "job j/N epoch e/E"; showing the loss and the last validation figures but
    no `v_num`. Log lines print above it rather than through it."""

    BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]"

    def __init__(self, label: str = "") -> None:
        super().__init__()
        self.label = label
        self._redirect: Any = None

    def _describe(self, trainer: pl.Trainer) -> str:
        epoch = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        return f"{self.label} {epoch} " if self.label else f"{epoch} "

    def _steps_per_epoch(self) -> int | None:
        steps = self.total_train_batches
        return None if steps is None or math.isinf(steps) else int(steps)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        per_epoch = self._steps_per_epoch()
        total = per_epoch * trainer.max_epochs if per_epoch and trainer.max_epochs and trainer.max_epochs > 0 else None
        if total and trainer.max_steps and trainer.max_steps > 0:
            total = min(total, trainer.max_steps)
        self.train_progress_bar = Tqdm(
            desc=self._describe(trainer),
            total=total,
            initial=trainer.current_epoch * (per_epoch or 0),  # a resumed run starts part way
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,  # the average over the whole run so far: validation time included
            bar_format=self.BAR_FORMAT,
        )
        if not self.is_disabled:
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description_str(self._describe(trainer), refresh=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = trainer.current_epoch * (self._steps_per_epoch() or 0) + batch_idx + 1
        if self._should_update(n, self.train_progress_bar.total):
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            _update_n(self.train_progress_bar, n)

    def _stop_redirect(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def on_train_end(self, *_: Any) -> None:
        self.train_progress_bar.close()
        self._stop_redirect()

    def on_exception(self, *_: Any) -> None:
        self._stop_redirect()

    # Validation and test: one bar per stage with its total known from the start (Lightning's
    # starts at "0/?" and restarts per data loader, which prints an extra line each time); it
    # vanishes when done: the epoch line and the job's summary line say the figures.
    def _stage_bar(self, desc: str, total: float, position: int) -> Tqdm:
        return Tqdm(desc=desc, total=convert_inf(total), position=position, disable=self.is_disabled, leave=False,
                    dynamic_ncols=True, file=sys.stdout, bar_format=self.BAR_FORMAT)

    def init_validation_tqdm(self) -> Tqdm:
        return self._stage_bar("validating ", self.total_val_batches, 2 * self.process_position + 1)

    def init_test_tqdm(self) -> Tqdm:
        return self._stage_bar("testing ", sum(self.trainer.num_test_batches), 2 * self.process_position)

    def on_validation_batch_start(self, *_: Any, **__: Any) -> None:
        pass

    def on_test_batch_start(self, *_: Any, **__: Any) -> None:
        pass

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: meaningless for an MLflow run
        return metrics


def job_callbacks(plain: dict[str, Any], label: str, run: str, speed: dict[str, bool],
                  later_jobs: float = 0.0, name: str = "") -> list[Callback]:
    """The callbacks that report a job's progress: the progress bar only where the trainer shows one
    and stdout is a terminal (elsewhere the bar is there but silent, so Lightning adds none of its
    own, and the progress lines say how far an epoch got)."""
    bar = plain["trainer"].get("enable_progress_bar", True)
    terminal = is_terminal(sys.stdout)
    report: list[Callback] = [JobReport(plain, label, run, speed, later_jobs,
                                        lines_within_epoch=not (bar and terminal), name=name)]
    if bar:
        report.append(RunProgressBar(label))
        if not terminal:
            report[-1].disable()
    return report

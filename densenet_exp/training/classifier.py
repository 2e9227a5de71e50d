"""The LightningModule every run trains: any image classifier, cross-entropy, torchmetrics
accuracy, and the optimizer and learning-rate schedule its config names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from .. import record
from ..options import milestone_epochs
from .speed import compile_cache_per_cpu_capability

# The names are listed torch-free in options.OPTIMIZERS and options.SCHEDULERS, for the config checks.
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Reading a GPU value on the host waits for every queued kernel: the training step only counts
# non-finite losses on the device, and the count is read every this many steps and at the end
# of each training epoch.
NAN_CHECK_EVERY_N_STEPS = 100
# Where checkpoints of earlier versions kept a second copy of the weights (the forward wrapper).
OLD_WRAPPER_PREFIX = "forward_fn."


class ImageClassifier(L.LightningModule):
    """Train, validate and test `model`; metrics are logged once per epoch (`train/loss`,
    `train/acc`, `val/loss`, `val/acc`, `lr`, then `test/loss`, `test/acc`[, `test/acc_top5`]), so
    no step waits on the tracking store and a resumed run logs every epoch exactly once."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optim: Mapping[str, Any],
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = optim  # conf/optim/<name>.yaml: every key the optimizer and schedule read
        self.label_smoothing = label_smoothing
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # torch.compile wraps the training forward only: evaluation would compile a second graph
        # (and a third for a last, smaller batch) to save little. `self.model` stays the plain
        # module for probes and checkpoints: the wrapper is kept out of the module tree, so the
        # state dict holds each weight once and loads whether or not the writing run compiled.
        if compile:
            compile_cache_per_cpu_capability()
        object.__setattr__(self, "train_forward", torch.compile(self.model) if compile else self.model)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_images = SumMetric()  # how many images the test accuracy covers, over all ranks
        # Top-5 says little with 10 classes or fewer.
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 10 else None
        # First non-finite training loss: its step (-1: none) and value, kept on the loss's device.
        # Plain tensors, not buffers: DDP would overwrite each rank's with rank 0's.
        self.bad_loss_step: Tensor | None = None
        self.bad_loss_value: Tensor | None = None

    # Under DDP, losses are averaged over ranks (sync_dist) and torchmetrics accuracies sum
    # their counts over ranks, so rank 0 logs the accuracy of the whole data set.

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (self.train_forward if self.training else self.model)(x)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the wrapper left the module tree hold each weight twice.
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(OLD_WRAPPER_PREFIX)]:
            del state[key]

    def _loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits, y

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, logits, y = self._loss(batch)
        self._note_nonfinite(loss.detach())
        self.train_acc.update(logits, y)
        self.log("loss", loss, prog_bar=True, logger=False)
        self.log(record.TRAIN_LOSS, loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log(record.TRAIN_ACC, self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _note_nonfinite(self, loss: Tensor) -> None:
        """Remember the first non-finite loss, on the device: no host sync here."""
        if self.bad_loss_step is None or self.bad_loss_step.device != loss.device:
            self.bad_loss_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.bad_loss_value = torch.zeros((), device=loss.device)
        first = ~torch.isfinite(loss) & (self.bad_loss_step < 0)
        self.bad_loss_step = torch.where(first, self.global_step, self.bad_loss_step)
        self.bad_loss_value = torch.where(first, loss.float(), self.bad_loss_value)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % NAN_CHECK_EVERY_N_STEPS == 0 or self.trainer.is_last_batch:
            self.check_loss_finite()

    def check_loss_finite(self) -> None:
        """Fail the run, naming the step, if a training loss was NaN or infinite (one host sync)."""
        step = -1 if self.bad_loss_step is None else int(self.bad_loss_step)
        if step >= 0:
            raise FloatingPointError(
                f"training loss is {float(self.bad_loss_value)} at epoch {self.current_epoch}, step {step}: "
                "lower optim.lr or check the data"
            )

    def on_train_epoch_end(self) -> None:
        self.log(record.LEARNING_RATE, self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.val_acc.update(logits, y)
        self.log(record.VAL_LOSS, loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log(record.VAL_ACC, self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self.test_predictions: list[Tensor] = []

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, logits, y = self._loss(batch)
        self.test_predictions.append(torch.stack((y, logits.argmax(dim=1))).cpu())
        self.test_acc.update(logits, y)
        self.log(record.TEST_LOSS, loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log(record.TEST_ACC, self.test_acc, on_step=False, on_epoch=True)
        self.test_images.update(len(y))
        self.log(record.TEST_IMAGES, self.test_images, on_step=False, on_epoch=True)
        if self.test_top5 is not None:
            self.test_top5.update(logits, y)
            self.log(record.TEST_ACC_TOP5, self.test_top5, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        """record.TEST_PREDICTIONS to every MLflow logger (one process: a DDP rank sees only its share)."""
        if self.trainer.world_size > 1 or not self.test_predictions:
            return
        rows = torch.cat(self.test_predictions, dim=1).T.tolist()
        text = "target,predicted\n" + "".join(f"{t},{p}\n" for t, p in rows)
        for logger in self.trainer.loggers:
            if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_text"):  # MLFlowLogger
                logger.experiment.log_text(logger.run_id, text, record.TEST_PREDICTIONS)

    @staticmethod
    def build_optimizer(params: Any, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
        kwargs: dict[str, Any] = {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"]}
        if cfg["name"] == "sgd":
            kwargs.update(momentum=cfg["momentum"], nesterov=cfg["nesterov"])
        return OPTIMIZERS[cfg["name"]](params, **kwargs)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim
        optimizer = self.build_optimizer(self.parameters(), cfg)
        scheduler = cfg["scheduler"]
        epochs = self.trainer.max_epochs
        if scheduler == "multistep":
            milestones = milestone_epochs(cfg["milestones"], epochs)
            sched = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=cfg["gamma"])
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if scheduler == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=cfg["lr"],
                total_steps=int(self.trainer.estimated_stepping_batches),
                pct_start=cfg["pct_start"],
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return {"optimizer": optimizer}

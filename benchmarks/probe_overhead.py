"""Time a smoke-size epoch with every probe on (``conf/probes/all.yaml``) against every probe off,
alternating runs, and print the overhead ratio (median of each). Not a test: takes minutes.

    .venv/bin/python benchmarks/probe_overhead.py [--batches 20 --batch-size 16 --repeats 3]

Model: DenseNet (L=40, k=12) on synthetic 1x28x28 images. Two figures are printed: the training
epoch's wall time (what the per-step hooks cost) and the whole fit's (adding the once-per-run work:
the FLOP count, timed inference forwards, plots and artifact uploads).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from densenet_exp.training.classifier import ImageClassifier
from densenet_exp.models import densenet_cifar
from densenet_exp.probes import PROBES, build_probes

ALL_PROBES = Path(__file__).resolve().parents[1] / "conf" / "probes" / "all.yaml"


def Classifier() -> ImageClassifier:
    """The harness's LightningModule around DenseNet (L=40, k=12)."""
    model = densenet_cifar(40, 12, bottleneck=False, compression=1.0, in_channels=1, num_classes=10)
    return ImageClassifier(model, num_classes=10, optim={"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False,
                                                          "weight_decay": 0.0, "scheduler": "constant"})


class EpochTimer(L.Callback):
    """Wall time of the (single) training epoch, validation included, in both configurations."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def synthetic(batches: int, batch_size: int) -> DataLoader:
    n = batches * batch_size
    data = TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))
    return DataLoader(data, batch_size=batch_size)


def run_once(probes_cfg: dict, args: argparse.Namespace, root: Path) -> tuple[float, float]:
    """(epoch seconds, fit seconds) of one single-epoch fit logged to a local MLflow store."""
    L.seed_everything(0, verbose=False)
    logger = MLFlowLogger("overhead", tracking_uri=f"sqlite:///{root}/mlflow.db", artifact_location=str(root / "art"))
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=1,
        logger=logger,
        callbacks=[timer, *build_probes(probes_cfg)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        accelerator="cpu",
        default_root_dir=root,
    )
    start = time.perf_counter()
    trainer.fit(Classifier(), synthetic(args.batches, args.batch_size), synthetic(args.val_batches, args.batch_size))
    return timer.seconds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--val-batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    on = dict(OmegaConf.to_container(OmegaConf.load(ALL_PROBES)))
    off = dict.fromkeys(PROBES, False)
    print(f"probes on: {on}")
    times: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        run_once(off, args, Path(tmp))  # warm-up: imports, MLflow store creation, allocator
        for i in range(args.repeats):
            # Alternate, starting with the other configuration each round, so drift in machine load
            # falls on both.
            for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                times[name].append(run_once(on if name == "on" else off, args, Path(tmp)))
                epoch, fit = times[name][-1]
                print(f"round {i + 1} probes {name:3s}: epoch {epoch:6.2f} s, fit {fit:6.2f} s", flush=True)
    for column, what in enumerate(("epoch", "fit")):
        median = {name: statistics.median(t[column] for t in runs) for name, runs in times.items()}
        print(
            f"{what:5s} median: on {median['on']:.2f} s, off {median['off']:.2f} s, "
            f"overhead ratio {median['on'] / median['off']:.3f}"
        )


if __name__ == "__main__":
    main()

"""How a probe hands its results to the run: scalars to every logger, files to every MLflow run."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import MLFlowLogger


def log_results(
    trainer: pl.Trainer,
    metrics: dict[str, float],
    artifact_path: str | None = None,
    write: Callable[[Path, MLFlowLogger], list[Path]] | None = None,
) -> None:
    """Log `metrics` to every logger of `trainer` at its global step; then, for each MLflow logger,
    log the files `write(folder, logger)` puts in a temporary folder as artifacts under
    `artifact_path` (files go only where artifacts can: MLflow)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    if write is None:
        return
    for logger in trainer.loggers:
        if not isinstance(logger, MLFlowLogger):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            for path in write(Path(tmp), logger):
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=artifact_path)

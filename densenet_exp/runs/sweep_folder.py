"""A sweep's folder (hydra.sweep.dir), the files its jobs and its parent run share: the plan (how
many jobs, which knobs vary), the parent run's id, one record per job (the MLflow run it logged
to) and one line per failed job. Light to import: no MLflow, Lightning or torch."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

PLAN_FILE = "sweep_plan.json"
JOBS_DIR = "jobs"  # one <job number>.json per job: the MLflow run it logged to
PARENT_ID_FILE = "mlflow_parent_run_id"
FAILURES_DIR = "failed_jobs"


@dataclass(frozen=True)
class SweepPlan:
    """What a multirun launches, written to its folder before the first job starts."""

    jobs: int | None  # how many jobs; None where the sweeper cannot say in advance
    varying: tuple[str, ...]  # keys given more than one value, e.g. ("growth_rate", "seed")

    @classmethod
    def of(cls, config: DictConfig) -> SweepPlan:
        """The plan of a multirun's config: the sweeper's `params`, then the command line (a later
        value of a key replaces an earlier one, as in Hydra's BasicSweeper); a sweeper with
        `n_trials` (Optuna) runs that many jobs."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        sweeper = OmegaConf.select(config, "hydra.sweeper") or {}  # a config built by hand may lack it
        arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        arguments += list(config.hydra.overrides.task)
        try:
            overrides = OverridesParser.create().parse_overrides(arguments)
        except Exception:  # e.g. glob(), which needs Hydra's config loader: say less, fail nothing
            return cls(None, ())
        sizes: dict[str, int | None] = {}
        for override in overrides:
            key = override.key_or_group
            if override.is_sweep_override():
                sizes[key] = len(list(override.sweep_string_iterator())) if override.is_discrete_sweep() else None
            else:
                sizes.pop(key, None)
        if sweeper.get("n_trials") is not None:
            jobs = int(sweeper.n_trials)
        else:
            counts = list(sizes.values())
            jobs = math.prod(counts) if None not in counts else None
        return cls(jobs, tuple(sizes))

    def write(self, sweep_dir: Path) -> None:
        (sweep_dir / PLAN_FILE).write_text(json.dumps({"jobs": self.jobs, "varying": list(self.varying)}))

    @classmethod
    def read(cls, sweep_dir: Path) -> SweepPlan | None:
        path = sweep_dir / PLAN_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(data["jobs"], tuple(data["varying"]))


def parent_run_id(sweep_dir: Path) -> str | None:
    path = sweep_dir / PARENT_ID_FILE
    return path.read_text().strip() if path.is_file() else None


def record_job(hc: Any, run_id: str, skipped: bool = False) -> None:
    """Note, for the closing table, which MLflow run this sweep job logs to (or, `skipped`, which
    FINISHED run already holds its config)."""
    if hc.mode != RunMode.MULTIRUN:
        return
    folder = Path(hc.sweep.dir) / JOBS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"job": int(hc.job.num), "run_id": run_id, "skipped": skipped, "started": time.time()}
    (folder / f"{hc.job.num}.json").write_text(json.dumps(entry))


def record_failed_job(sweep_dir: Path, job_num: int, title: str, error: BaseException) -> str:
    """Note, for the list that ends the sweep, that job `job_num` (named `title`, console.job_title)
    failed and why, in one line; returns the line."""
    from .logs import error_line

    folder = sweep_dir / FAILURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    line = f"{title} failed: {error_line(error)}"
    (folder / f"{job_num}.txt").write_text(line + "\n")
    return line

"""A sweep as the researcher sees it in the terminal: how many jobs it launches and which knobs
vary (so each job can say "job j/N" and name its run by the knobs that differ), one record per
job, and the table that closes the sweep. Light to import: Hydra's sweep callback uses it.

What a job shows while it trains (the block before training, the progress bar, a line per
epoch) is in progress.py.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.types import RunMode
from omegaconf import DictConfig

from .. import record
from .tracking import FAILURES_DIR

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

PLAN_FILE = "sweep_plan.json"
JOBS_DIR = "jobs"  # one <job number>.json per job: the MLflow run it logged to

# Knobs a run name already carries (the variant names the model and k, theta, B; "-s" the seed).
NAMED_ELSEWHERE = ("model", "growth_rate", "compression", "bottleneck", "seed")
# Short labels for knobs a sweep may also vary: `optim.lr=0.05` names a run `...-lr0.05`.
# Other keys are labelled by their last part (`optim.nesterov=true` -> `nesterovtrue`) and
# config groups by their choice (`optim=adam` -> `adam`).
KNOB_LABELS = {
    "optim.lr": "lr",
    "optim.weight_decay": "wd",
    "optim.momentum": "mom",
    "data.batch_size": "bs",
    "data.train_size": "n",
    "data.augment": "aug",
    "trainer.max_epochs": "ep",
    "trainer.precision": "p",
    "loss.label_smoothing": "ls",
}


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

        sweeper = config.hydra.sweeper
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


def job_label(hc: Any) -> str:
    """"job 2/6" for a sweep's third job (numbers from 1), "" for a single run."""
    if hc.mode != RunMode.MULTIRUN:
        return ""
    plan = SweepPlan.read(Path(hc.sweep.dir))
    total = f"/{plan.jobs}" if plan and plan.jobs else ""
    return f"job {int(hc.job.num) + 1}{total}"


def jobs_after(hc: Any) -> int:
    """How many jobs of this sweep come after this one (0 outside a sweep or when unknown)."""
    if hc.mode != RunMode.MULTIRUN:
        return 0
    plan = SweepPlan.read(Path(hc.sweep.dir))
    return max(0, plan.jobs - int(hc.job.num) - 1) if plan and plan.jobs else 0


def _short(value: str) -> str:
    """A knob's value as a run name shows it: 0.012345678 -> 0.0123; integers and words unchanged."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() else f"{number:.3g}"


def swept_labels(hc: Any) -> list[str]:
    """Labels of the knobs this job's sweep varies beyond model, k, theta, B and seed, with this
    job's values, e.g. ["lr0.05", "adam"]; [] outside a sweep."""
    if hc.mode != RunMode.MULTIRUN:
        return []
    plan = SweepPlan.read(Path(hc.sweep.dir))
    if plan is None:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    labels = []
    for override in OverridesParser.create().parse_overrides(list(hc.overrides.task)):
        key = override.key_or_group
        if key not in plan.varying or key in NAMED_ELSEWHERE:
            continue
        value = _short(override.get_value_element_as_str())
        labels.append(value if key in hc.runtime.choices else KNOB_LABELS.get(key, key.rsplit(".", 1)[-1]) + value)
    return labels


def record_job(hc: Any, run_id: str, skipped: bool = False) -> None:
    """Note, for the closing table, which MLflow run this sweep job logs to (or, `skipped`, which
    FINISHED run already holds its config)."""
    if hc.mode != RunMode.MULTIRUN:
        return
    folder = Path(hc.sweep.dir) / JOBS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"job": int(hc.job.num), "run_id": run_id, "skipped": skipped, "started": time.time()}
    (folder / f"{hc.job.num}.json").write_text(json.dumps(entry))


def duration(seconds: float) -> str:
    """4.2 s, 3 min 05 s, 2 h 03 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def sweep_summary(client: MlflowClient, parent_id: str, sweep_dir: Path, config: DictConfig,
                  parent_deleted: bool = False) -> str:
    """The table that ends a sweep: one row per job (variant, seed, status, test accuracy, wall
    time), the parent run id (or, `parent_deleted`, that no job trained under it) and the report
    command to run next."""
    from tabulate import tabulate

    jobs = sweep_dir / JOBS_DIR
    failures = sweep_dir / FAILURES_DIR
    records = {int(p.stem): json.loads(p.read_text()) for p in jobs.glob("*.json")} if jobs.is_dir() else {}
    failed = {int(p.stem) for p in failures.glob("*.txt")} if failures.is_dir() else set()
    rows, earlier = [], False
    for job in sorted(records.keys() | failed):
        entry = records.get(job)
        if entry is None:  # failed before it had a run (its config, say); the error is printed below
            rows.append([job + 1, "-", "-", "FAILED", "-", "-"])
            continue
        try:
            run = client.get_run(entry["run_id"])
        except Exception as err:  # the store went away: the table must not cost the sweep its exit status
            rows.append([job + 1, "-", "-", f"unknown ({type(err).__name__})", "-", "-"])
            continue
        earlier |= run.data.tags.get(record.SWEEP_ID) != parent_id  # skipped, or resumed from an earlier sweep
        acc = run.data.metrics.get(record.TEST_ACC)
        ended = run.info.end_time is not None and run.info.status != "RUNNING"
        wall = "-"
        if ended and not entry["skipped"]:  # from when the job chose its run (a resumed run started earlier)
            wall = duration(max(0.0, run.info.end_time / 1000 - entry["started"]))
        rows.append([
            job + 1,
            run.data.tags.get(record.VARIANT, run.info.run_name),
            run.data.tags.get(record.SEED, "-"),
            "SKIPPED (done before)" if entry["skipped"] else run.info.status,
            "-" if acc is None else f"{acc:.4f}",
            wall,
        ])
    table = tabulate(rows, headers=["job", "variant", "seed", "status", "test acc", "wall time"],
                     colalign=("right", "left", "right", "left", "right", "right"), disable_numparse=True)
    experiment = config.tracking.experiment
    command = f"python -m densenet_exp.report --experiment {experiment}"
    earlier |= parent_deleted
    if not earlier:
        command += f" --sweep {parent_id}"
    if config.tracking.uri:
        command += f" --tracking-uri {config.tracking.uri}"
    lines = [
        f"\nSweep {sweep_dir} ({len(rows)} job{'s' if len(rows) != 1 else ''}):",
        table,
        f"No job logged a run of its own (each was FINISHED before, or failed first): the sweep's parent run "
        f"{parent_id} was removed" if parent_deleted else f"Parent run: {parent_id} (MLflow experiment {experiment!r})",
        f"Report: {command}",
    ]
    if earlier:
        lines.append("  (some jobs' runs come from earlier sweeps, so the report covers the whole experiment)")
    return "\n".join(lines)

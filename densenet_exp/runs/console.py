"""A sweep as the researcher sees it in the terminal: "job j/N", run names by the knobs the sweep
varies (from its plan, sweep_folder.py), and the table that closes the sweep. Light to import:
Hydra's sweep callback uses it.

What a job shows while it trains (the block before training, the progress bar, a line per
epoch) is in progress.py.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.types import RunMode
from omegaconf import DictConfig

from .. import record
from ..config import DENSENET_KNOBS
from .sweep_folder import FAILURES_DIR, JOBS_DIR, SweepPlan

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


# The command line the user typed, left in the environment by run.py for the jobs it starts: a
# job that a launcher runs in another process (a SLURM job's own argv is submitit's) names it as
# the command that resumes its run.
COMMAND_ENV = "DENSENET_EXP_COMMAND"


def resume_command(argv: list[str]) -> str:
    return os.environ.get(COMMAND_ENV) or shlex.join(["python", "-m", "densenet_exp.run", *argv[1:]])


# Knobs a run name already carries (the variant names the model and k, theta, B; "-s" the seed).
NAMED_ELSEWHERE = ("model", *DENSENET_KNOBS, "seed")
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


def _swept(hc: Any) -> list[Any] | None:
    """This sweep job's parsed overrides of the keys its sweep varies; None outside a sweep or where
    the sweep's plan is unknown."""
    plan = SweepPlan.read(Path(hc.sweep.dir)) if hc.mode == RunMode.MULTIRUN else None
    if plan is None:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(hc.overrides.task))
    return [o for o in overrides if o.key_or_group in plan.varying]


def swept_labels(hc: Any) -> list[str]:
    """Labels of the knobs this job's sweep varies beyond model, k, theta, B and seed, with this
    job's values, e.g. ["lr0.05", "adam"]; [] outside a sweep."""
    labels = []
    for override in _swept(hc) or []:
        key = override.key_or_group
        if key in NAMED_ELSEWHERE:
            continue
        value = _short(override.get_value_element_as_str())
        labels.append(value if key in hc.runtime.choices else KNOB_LABELS.get(key, key.rsplit(".", 1)[-1]) + value)
    return labels


def job_title(hc: Any) -> str:
    """"job 2/8 [model=resnet20 seed=1]": a sweep job as the failure list names it, by the
    overrides its sweep varies (all of its overrides where the sweep's plan is unknown)."""
    swept = _swept(hc)
    overrides = list(hc.overrides.task) if swept is None else [o.input_line for o in swept]
    return f"{job_label(hc)} [{' '.join(overrides)}]"


def duration(seconds: float) -> str:
    """4.2 s, 3 min 05 s, 2 h 03 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


ACCURACIES = (record.TEST_ACC, record.VAL_ACC)  # the closing table's accuracy columns


def sweep_summary(client: MlflowClient, parent_id: str, sweep_dir: Path, config: DictConfig,
                  parent_deleted: bool = False) -> str:
    """The table that ends a sweep: one row per job (variant, seed, status, test and validation
    accuracy: an image folder without test/ has only the latter; wall time), the parent run id (or, `parent_deleted`, that no job trained under it) and the report
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
            rows.append([job + 1, "-", "-", "FAILED", "-", "-", "-"])
            continue
        try:
            run = client.get_run(entry["run_id"])
        except Exception as err:  # the store went away: the table must not cost the sweep its exit status
            rows.append([job + 1, "-", "-", f"unknown ({type(err).__name__})", "-", "-", "-"])
            continue
        earlier |= run.data.tags.get(record.SWEEP_ID) != parent_id  # skipped, or resumed from an earlier sweep
        ended = run.info.end_time is not None and run.info.status != "RUNNING"
        wall = "-"
        if ended and not entry["skipped"]:  # from when the job chose its run (a resumed run started earlier)
            wall = duration(max(0.0, run.info.end_time / 1000 - entry["started"]))
        rows.append([
            job + 1,
            run.data.tags.get(record.VARIANT, run.info.run_name),
            run.data.tags.get(record.SEED, "-"),
            "SKIPPED (done before)" if entry["skipped"] else run.info.status,
            *("-" if acc is None else f"{acc:.4f}" for acc in (run.data.metrics.get(m) for m in ACCURACIES)),
            wall,
        ])
    table = tabulate(rows, headers=["job", "variant", "seed", "status", "test acc", "val acc", "wall time"],
                     colalign=("right", "left", "right", "left", "right", "right", "right"), disable_numparse=True)
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

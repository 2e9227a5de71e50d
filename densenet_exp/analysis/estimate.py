"""How long a plan's confirmation stage will take, from its exploration runs' own timings, and
whether its seeds give its accuracy claims the power they need.

    python -m densenet_exp.study estimate PLAN [--jobs 2] [--sd PP]

Each confirmation arm is timed by the exploration runs of the same model on this store: training
images per second (steps only, as the size-cost probe logs them while the pilot's jobs shared the
cores, so the figure already includes that sharing), the share of each epoch spent outside the
steps (validation, logging) and the per-run fixed cost (start-up, compile, test, probes). The
arm's epochs and training images come from its composed config (an image folder's images counted
in the folder).

The seeds' power is sized by the claim engine (densenet_exp/claims/sizing.py) from
`exploration_sd` here.
Torch-free.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from .. import record
from ..checks import InvalidValue
from ..config import composed, flatten
from ..options import train_images
from ..plan import Plan
from ..validate import arm_config


def exploration_runs(plan: Plan, client: MlflowClient) -> list:
    """The plan experiment's finished exploration runs (the pilot), as MLflow Run objects."""
    experiment = client.get_experiment_by_name(plan.experiment)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=(
        f"tags.{record.STUDY_STAGE} = 'exploration' and attributes.status = 'FINISHED'"), max_results=10_000)


def logged_train_images(params: dict[str, str]) -> int | None:
    """The training images of a run, from its logged params (MLflow keeps None as "None"); None
    where they cannot be known (an image folder that no longer reads as one)."""
    data = {key: None if params.get(f"data.{key}") in (None, "None") else params[f"data.{key}"]
            for key in ("name", "root", "val_size", "train_size")}
    try:
        return train_images(data)
    except InvalidValue:
        return None


def timings(plan: Plan, uri: str) -> pd.DataFrame:
    """Per finished exploration run: model, train images/s (median over epochs), epoch overhead
    (epoch time over step time) and fixed seconds (run wall time minus its epochs)."""
    client = MlflowClient(uri)
    rows = []
    for run in exploration_runs(plan, client):
        ips = [m.value for m in client.get_metric_history(run.info.run_id, record.TRAIN_IMAGES_PER_S)]
        epochs = [m.value for m in client.get_metric_history(run.info.run_id, record.EPOCH_TIME_S)]
        params = run.data.params
        if not ips or not epochs:
            continue
        images = logged_train_images(params)
        steps_s = images / float(np.median(ips)) if images else np.nan  # a folder gone since: no overhead
        wall = (run.info.end_time - run.info.start_time) / 1000
        rows.append({"model": params.get("model.name"), "images_per_s": float(np.median(ips)), "best_images_per_s": max(ips),
                     "epoch_overhead": float(np.median(epochs[1:] or epochs)) / steps_s if len(epochs) > 1 else np.nan,
                     "fixed_s": max(0.0, wall - sum(epochs))})
    return pd.DataFrame(rows, columns=["model", "images_per_s", "best_images_per_s", "epoch_overhead", "fixed_s"])


def estimate(plan: Plan, uri: str, jobs: int) -> tuple[pd.DataFrame, float, float]:
    """Per confirmation arm: model, epochs, minutes per run, runs, arm minutes (at the median
    speed of its model's exploration runs, and at their fastest epoch: other work on the machine
    slows the median); and the stage's wall-clock hours at both speeds with `jobs` at a time
    (NaN where an arm's model was never explored)."""
    measured = timings(plan, uri)
    overhead = float(measured["epoch_overhead"].median()) if measured["epoch_overhead"].notna().any() else 1.1
    fixed = float(measured["fixed_s"].median()) if len(measured) else 60.0
    rows = []
    for arm in plan.arms["confirmation"]:
        cfg = arm_config(plan, "confirmation", arm)  # an image folder's null settings read from its files
        mine = measured[measured["model"] == cfg["model"]["name"]]
        ips = float(mine["images_per_s"].median()) if len(mine) else float("nan")
        best = float(mine["best_images_per_s"].max()) if len(mine) else float("nan")
        epochs, images = int(cfg["trainer"]["max_epochs"]), train_images(cfg["data"]) or 0
        minutes = [(epochs * images / speed * overhead + fixed) / 60 for speed in (ips, best)]
        seeds = len(plan.seeds_of("confirmation", arm))
        rows.append({"arm": arm, "model": cfg["model"]["name"], "train images/s": round(ips, 1),
                     "fastest": round(best, 1), "epochs": epochs, "minutes per run": round(minutes[0], 1),
                     "runs": seeds, "arm minutes": round(minutes[0] * seeds, 1),
                     "arm minutes (fastest)": round(minutes[1] * seeds, 1)})
    table = pd.DataFrame(rows)
    # An arm without a timed model leaves the stage unknown (NaN), not shorter.
    hours = [float(table[c].sum(skipna=False)) / 60 / jobs if len(table) else 0.0
             for c in ("arm minutes", "arm minutes (fastest)")]
    return table, hours[0], hours[1]


def exploration_sd(plan: Plan, uri: str, arms: list[str]) -> float:
    """Pooled SD of test accuracy (fraction) over the exploration runs that share an arm's model,
    optimizer, schedule and epochs, in groups of two seeds or more; NaN without any."""
    runs = exploration_runs(plan, MlflowClient(uri))
    squares, dof = 0.0, 0
    for arm in arms:
        # The arm's recipe as far as accuracy goes, as runs log it (flattened params): model,
        # optimizer and schedule, epochs.
        wanted = {k: v for k, v in flatten(composed([*plan.recipe, *plan.arms["confirmation"][arm]])).items()
                  if k in ("model.name", "trainer.max_epochs") or k.startswith("optim.")}
        same = [r.data.metrics[record.TEST_ACC] for r in runs if record.TEST_ACC in r.data.metrics
                and all(r.data.params.get(k) == str(v) for k, v in wanted.items())]
        if len(same) >= 2:
            squares += float(np.var(same, ddof=1)) * (len(same) - 1)
            dof += len(same) - 1
    return math.sqrt(squares / dof) if dof else float("nan")


def print_estimate(plan: Plan, uri: str, jobs: int) -> int:
    """The confirmation stage's time (the sizing of its tests is the claim engine's: claims.sizing)."""
    table, hours, fastest = estimate(plan, uri, jobs)
    if table.empty:
        print(f"plan {plan.name}: no confirmation arms declared yet", file=sys.stderr)
        return 2
    print(table.to_markdown(index=False))
    missing = table.loc[table["train images/s"].isna(), "arm"].tolist()
    if missing:
        print(f"no exploration run times these arms' models: {', '.join(missing)}", file=sys.stderr)
    print(f"confirmation stage: about {hours:.2f} h of wall time with {jobs} jobs at a time at the explored runs' "
          f"median speed, {fastest:.2f} h at their fastest epochs (the machine to itself)"
          + ("" if math.isfinite(hours) else " (unknown: see above)"))
    return 0

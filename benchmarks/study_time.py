"""Expected time of a study plan from short runs of its arms (a pilot) in an MLflow store.

    python benchmarks/study_time.py --experiment gpu_check --seeds 5 --epochs 30
    python benchmarks/study_time.py --tracking-uri sqlite:///mlflow.db --experiment study_fmnist --epochs 10

Per arm (the `variant` tag) the newest FINISHED run gives: training images/s (`train_images_per_s`,
last epoch), seconds per epoch (`epoch_time_s`, validation included, mean over its epochs) and
the run's fixed cost (its wall time less its epochs: start-up, compile, test, probes). A planned
run of E epochs then takes fixed + E x epoch seconds, and the plan (every arm, --seeds runs each)
takes the sum over arms divided by the jobs that share the machine (--jobs; default: the
`parallel_jobs` the pilot ran with, whose epoch times already include that sharing). The pilot
should train on the plan's training set (epoch time is not rescaled).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from densenet_exp import record  # noqa: E402  (torch-free)


def arm_timings(client: Any, experiment: str) -> list[dict[str, Any]]:
    """One row per variant: its newest FINISHED run's throughput, epoch time and fixed cost."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"--experiment={experiment!r} is invalid: expected an experiment of the store")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        variant = run.data.tags.get(record.VARIANT)
        if variant is None or variant in rows or record.EPOCH_TIME_S not in run.data.metrics:
            continue
        epochs = [m.value for m in client.get_metric_history(run.info.run_id, record.EPOCH_TIME_S)]
        wall = (run.info.end_time - run.info.start_time) / 1000
        rows[variant] = {
            "arm": variant,
            "device": run.data.tags.get("gpu") or run.data.tags.get(record.DEVICE, "?"),
            "precision": run.data.tags.get(record.PRECISION, "?"),
            "jobs": int(run.data.tags.get(record.PARALLEL_JOBS, "1")),
            "images_per_s": run.data.metrics.get(record.TRAIN_IMAGES_PER_S, float("nan")),
            "epoch_s": sum(epochs) / len(epochs),
            "fixed_s": max(0.0, wall - sum(epochs)),
        }
    return sorted(rows.values(), key=lambda r: r["arm"])


def plan_minutes(rows: list[dict[str, Any]], seeds: int, epochs: int, jobs: int | None) -> tuple[float, int]:
    """Minutes for `seeds` runs of `epochs` epochs of every arm, `jobs` at a time."""
    jobs = jobs or max(r["jobs"] for r in rows)
    return sum(seeds * (r["fixed_s"] + epochs * r["epoch_s"]) for r in rows) / jobs / 60, jobs


def format_report(rows: list[dict[str, Any]], seeds: int, epochs: int, jobs: int | None) -> str:
    lines = ["| arm | device | precision | jobs at once | train img/s | epoch s | fixed s per run | run of the plan (min) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        run_min = (r["fixed_s"] + epochs * r["epoch_s"]) / 60
        lines.append(f"| {r['arm']} | {r['device']} | {r['precision']} | {r['jobs']} | {r['images_per_s']:.0f} "
                     f"| {r['epoch_s']:.1f} | {r['fixed_s']:.0f} | {run_min:.1f} |")
    minutes, jobs = plan_minutes(rows, seeds, epochs, jobs)
    lines.append(f"\nexpected: {minutes:.0f} min for the plan ({len(rows)} arms x {seeds} seeds x {epochs} epochs, "
                 f"{jobs} jobs at once)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--experiment", required=True)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--jobs", type=int, default=None, help="runs at once in the plan (default: as in the pilot)")
    args = p.parse_args(argv)
    import mlflow

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    rows = arm_timings(mlflow.MlflowClient(uri), args.experiment)
    if not rows:
        raise SystemExit(f"no FINISHED run with {record.EPOCH_TIME_S} in experiment {args.experiment!r} of {uri}")
    report = format_report(rows, args.seeds, args.epochs, args.jobs)
    print(report)
    return report


if __name__ == "__main__":
    main()

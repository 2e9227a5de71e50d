"""An experiment's runs as one portable file, and back into any MLflow store.

    python -m densenet_exp.export save --experiment study_fmnist --out docs/results/study_fmnist/runs.jsonl.gz
    python -m densenet_exp.export load docs/results/study_fmnist/runs.jsonl.gz --tracking-uri sqlite:///study.db

A SQLite store cannot travel: its artifact locations are absolute paths on the machine that wrote
it. The export keeps, per run, what the report and the notebooks read: status and times, params,
tags, every metric's full history, and the small text artifacts (TEXT_ARTIFACTS). Loading creates
the runs anew (MLflow chooses run ids) and points parent links and sweep ids at the new ids.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from . import record
from .store import tracking_uri

# Artifacts the report and notebooks read; figures are drawn again from these.
TEXT_ARTIFACTS = (record.CONFIG_YAML, record.FEATURE_REUSE_MATRICES, record.RELATIVE_GRADS)
# Tags that hold a run id of the same experiment.
RUN_ID_TAGS = (MLFLOW_PARENT_RUN_ID, record.SWEEP_ID)
_BATCH = 1000  # MLflow's log_batch limit on metrics per call


def _text_artifacts(client: MlflowClient, run_id: str, tmp: Path) -> dict[str, str]:
    texts = {}
    for path in TEXT_ARTIFACTS:
        folder = path.rpartition("/")[0] or None
        if path in {a.path for a in client.list_artifacts(run_id, folder)}:
            texts[path] = Path(client.download_artifacts(run_id, path, str(tmp))).read_text()
    return texts


def save(experiment: str, tracking_uri: str, out: Path) -> int:
    """Write every run of `experiment` (oldest first) to `out` (gzip-compressed JSON lines).
    Returns the number of runs."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment {experiment!r} in {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=50_000)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same runs give the same bytes.
    with tempfile.TemporaryDirectory() as tmp, gzip.GzipFile(out, "wb", mtime=0) as raw:
        for run in runs:
            run_id = run.info.run_id
            entry = {
                "experiment": experiment,
                "run_id": run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "start_time": run.info.start_time,
                "end_time": run.info.end_time,
                "params": dict(sorted(run.data.params.items())),
                "tags": {k: v for k, v in sorted(run.data.tags.items()) if not k.startswith("mlflow.log-model")},
                "metrics": {
                    key: [[m.step, m.timestamp, m.value] for m in client.get_metric_history(run_id, key)]
                    for key in sorted(run.data.metrics)
                },
                "artifacts": _text_artifacts(client, run_id, Path(tmp, run_id)),
            }
            raw.write((json.dumps(entry, sort_keys=True) + "\n").encode())
    return len(runs)


def read(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(path: Path, tracking_uri: str, experiment: str | None = None) -> str:
    """Create the runs of the export `path` in the store at `tracking_uri`, in experiment
    `experiment` (default: the one it was saved from). Returns the experiment's name."""
    records = read(path)
    experiment = experiment or (records[0]["experiment"] if records else path.name.split(".")[0])
    client = MlflowClient(tracking_uri)
    from .tracking import ensure_experiment  # creates the experiment with artifacts beside a SQLite file

    experiment_id = ensure_experiment(client, experiment)
    new_ids: dict[str, str] = {}
    for entry in records:  # oldest first: a sweep's parent precedes its children
        tags = {k: new_ids.get(v, v) if k in RUN_ID_TAGS else v for k, v in entry["tags"].items()}
        run = client.create_run(experiment_id, start_time=entry["start_time"], tags=tags,
                                run_name=entry["run_name"])
        run_id = new_ids[entry["run_id"]] = run.info.run_id
        params = [Param(k, v) for k, v in entry["params"].items()]
        metrics = [Metric(k, v, ts, step) for k, history in entry["metrics"].items() for step, ts, v in history]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in entry["artifacts"].items():
                local = Path(tmp, name)
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(text)
                client.log_artifact(run_id, str(local), name.rpartition("/")[0] or None)
        client.set_terminated(run_id, entry["status"], end_time=entry["end_time"])
    return experiment


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenet_exp.export", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save", help="write an experiment's runs to a file")
    s.add_argument("--experiment", required=True)
    s.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    s.add_argument("--out", type=Path, required=True, help="a .jsonl.gz file")
    ld = sub.add_parser("load", help="create the runs of a file in a store")
    ld.add_argument("file", type=Path)
    ld.add_argument("--experiment", help="default: the experiment the file was saved from")
    ld.add_argument("--tracking-uri", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise

    if args.command == "save":
        n = save(args.experiment, tracking_uri(args.tracking_uri, Path.cwd()), args.out)
        print(f"{n} runs of {args.experiment} written to {args.out}")
    else:
        name = load(args.file, args.tracking_uri, args.experiment)
        print(f"{args.file} loaded into {args.tracking_uri} as experiment {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

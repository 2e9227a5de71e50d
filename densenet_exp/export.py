"""An experiment's runs as one portable file, and back into any MLflow store.

    python -m densenet_exp.export save --experiment study_fmnist --out docs/results/study_fmnist/runs.jsonl.gz
    python -m densenet_exp.export load docs/results/study_fmnist/runs.jsonl.gz --tracking-uri sqlite:///study.db

A SQLite store cannot travel: its artifact locations are absolute paths on the machine that wrote
it. The export keeps, per run, what the report and the notebooks read: status and times, params,
tags, every metric's full history, and the small text artifacts (TEXT_ARTIFACTS). Loading creates
the runs anew (MLflow chooses run ids) and points parent links and sweep ids at the new ids.

A loaded run is a record of a run trained elsewhere: it keeps its original id (tag
`source_run_id`), so loading a file twice is refused (`--again` loads copies); it drops the tags
that name the processes and files of the machine that trained it (its owner, lock and checkpoint
folder), so no launch here resumes it or touches those paths; one that was RUNNING when saved is
loaded KILLED. The experiment's name (flag or file) and the artifacts' names pass the checks a
name that reaches the file system must pass.
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
from .checks import InvalidValue, require, require_name
from .runs.store import (
    StoreConfigError,
    StoreUnreachable,
    bound_tool_waits,
    check_store,
    prepare_store,
    retry_locked,
    tool_uri,
)

# Artifacts the report and notebooks read; figures are drawn again from these.
TEXT_ARTIFACTS = (record.CONFIG_YAML, record.FEATURE_REUSE_MATRICES, record.FEATURE_REUSE_MATRICES_INIT, record.RELATIVE_GRADS,
                  record.TEST_PREDICTIONS)
# Tags that hold a run id of the same experiment.
RUN_ID_TAGS = (MLFLOW_PARENT_RUN_ID, record.SWEEP_ID)
# Tags that name processes and files of the machine that trained a run: not loaded.
LOCAL_TAGS = (record.OWNER, record.OWNER_LOCK, record.OWNER_HEARTBEAT, record.OWNER_SLURM_JOB, record.CHECKPOINT_DIR)
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


class AlreadyLoaded(RuntimeError):
    """Runs of the file are in the experiment already."""


def read(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def source_id(entry: dict) -> str:
    """The id a run had in the store it was first saved from (through any loads and saves since)."""
    return entry["tags"].get(record.SOURCE_RUN_ID) or entry["run_id"]


def check_records(records: list[dict], path: Path) -> None:
    """Each run's artifacts are ones an export writes (a name like `../x` would leave the folder)."""
    for entry in records:
        for name in entry.get("artifacts", {}):
            require(f"artifact {name!r} of run {entry.get('run_id')!r} in {path}", name, name in TEXT_ARTIFACTS,
                    f"one of {', '.join(TEXT_ARTIFACTS)}")


def already_loaded(client: MlflowClient, experiment_id: str, records: list[dict]) -> list[str]:
    """The source ids of the file's runs that the experiment holds (as loaded copies or as the
    originals)."""
    held = set()
    for run in retry_locked(lambda: client.search_runs([experiment_id], max_results=50_000)):
        held.update({run.info.run_id, run.data.tags.get(record.SOURCE_RUN_ID)})
    return [source_id(entry) for entry in records if source_id(entry) in held]


def load(path: Path, tracking_uri: str, experiment: str | None = None, again: bool = False) -> str:
    """Create the runs of the export `path` in the store at `tracking_uri`, in experiment
    `experiment` (default: the one it was saved from). Returns the experiment's name. Raises
    InvalidValue for a name that may not reach the file system, AlreadyLoaded if a run of the
    file is in the experiment already (unless `again`: then they are loaded as copies)."""
    records = read(path)
    if experiment is not None:
        require_name("--experiment", experiment)
    elif records:
        experiment = require_name(f"the experiment field of {path}", records[0].get("experiment"))
    else:
        experiment = require_name(f"the experiment named by the file name {path.name}", path.name.split(".")[0])
    check_records(records, path)
    client = MlflowClient(tracking_uri)
    from .runs.tracking import ensure_experiment  # creates the experiment with artifacts beside a SQLite file

    experiment_id = ensure_experiment(client, experiment)
    present = [] if again else already_loaded(client, experiment_id, records)
    if present:
        raise AlreadyLoaded(f"{len(present)} of the {len(records)} runs of {path} are in experiment {experiment!r} of "
                            f"{tracking_uri} already (e.g. run {present[0]}): nothing loaded; --again loads copies")
    new_ids: dict[str, str] = {}
    for entry in records:  # oldest first: a sweep's parent precedes its children
        tags = {k: new_ids.get(v, v) if k in RUN_ID_TAGS else v for k, v in entry["tags"].items() if k not in LOCAL_TAGS}
        tags[record.SOURCE_RUN_ID] = source_id(entry)
        status = entry["status"]
        if status == "RUNNING":  # nothing trains it here
            status, tags[record.STOP_REASON] = "KILLED", f"RUNNING when saved; loaded from {path.name}"
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
        client.set_terminated(run_id, status, end_time=entry["end_time"])
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
    ld.add_argument("--tracking-uri", required=True, help="created if it is a new SQLite file")
    ld.add_argument("--again", action="store_true", help="load runs that the experiment holds already, as copies")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file otherwise
    bound_tool_waits()
    uri, key = tool_uri(args.tracking_uri)
    try:
        if args.command == "save":
            check_store(uri, key)  # reads only: never creates a store
            n = save(args.experiment, uri, args.out)
            print(f"{n} runs of {args.experiment} written to {args.out}")
        else:
            prepare_store(uri, key)
            try:
                name = load(args.file, uri, args.experiment, args.again)
            except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:
                if isinstance(err, InvalidValue):
                    raise
                raise InvalidValue(f"{args.file} is not a file that `export save` wrote ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
            print(f"{args.file} loaded into {uri} as experiment {name}")
    except (InvalidValue, StoreConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except AlreadyLoaded as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except StoreUnreachable as err:
        print(f"error: {err}: start it, or point {key} at another store", file=sys.stderr)
        return 75
    return 0


if __name__ == "__main__":
    sys.exit(main())

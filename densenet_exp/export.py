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

import gzip
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from . import record
from .checks import EXIT_BUSY, EXIT_STORE_DOWN, ArgumentParser, InvalidValue, OneLineError, entry_point, require, require_name
from .runs.store import (
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
MAX_RECORD_BYTES = 256 * 2**20  # one run's line: a long run's full metric histories take a few MB
MAX_INT64 = 2**63  # MLflow stores steps and times as 64-bit integers
RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
# The fields `save` writes, and their JSON types.
JSON_TYPES = {str: "a string", int: "an integer", dict: "a JSON object", type(None): "null"}
RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "experiment": str, "run_id": str, "run_name": (str, type(None)), "status": str, "start_time": int,
    "end_time": (int, type(None)), "params": dict, "tags": dict, "metrics": dict, "artifacts": dict,
}


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


class AlreadyLoaded(OneLineError, RuntimeError):
    """Runs of the file are in the experiment already."""

    exit_code = EXIT_BUSY


def read(path: Path) -> list[dict]:
    """The file's records, each line read up to MAX_RECORD_BYTES (a longer one is refused before
    it fills the memory)."""
    records = []
    with gzip.open(path, "rt") as f:
        for number, line in enumerate(iter(lambda: f.readline(MAX_RECORD_BYTES + 1), ""), 1):
            require(f"line {number} of {path}", f"{len(line)} characters", len(line) <= MAX_RECORD_BYTES,
                    f"a run's record of at most {MAX_RECORD_BYTES} characters")
            if line.strip():
                records.append(json.loads(line))
    return records


def source_id(entry: dict) -> str:
    """The id a run had in the store it was first saved from (through any loads and saves since)."""
    return entry["tags"].get(record.SOURCE_RUN_ID) or entry["run_id"]


def check_records(records: list[dict], path: Path) -> None:
    """Every record, whole, before anything is written (so a bad one leaves nothing loaded): the
    fields `save` writes, of its types; times in ms since 1970; finite metric values at steps in
    MLflow's range; artifacts that an export writes (a name like `../x` would leave the folder)."""
    for number, entry in enumerate(records, 1):
        where = f"record {number} of {path}"
        require(where, type(entry).__name__, isinstance(entry, dict), "a JSON object (a run)")
        for key, kind in RECORD_FIELDS.items():
            value = entry.get(key)
            require(f"{key} of {where}", value, isinstance(value, kind) and not isinstance(value, bool),
                    " or ".join(JSON_TYPES[k] for k in _kinds(kind)))
        require(f"status of {where}", entry["status"], entry["status"] in RUN_STATUSES, f"one of {', '.join(RUN_STATUSES)}")
        for key in ("start_time", "end_time"):
            ok = entry[key] is None or 0 <= entry[key] < MAX_INT64
            require(f"{key} of {where}", entry[key], ok, "milliseconds since 1970 (an integer >= 0)")
        for field in ("params", "tags", "artifacts"):
            for key, value in entry[field].items():
                require(f"{field}[{key!r}] of {where}", value, isinstance(value, str), "a string")
        for name in entry["artifacts"]:
            require(f"artifact {name!r} of run {entry['run_id']!r} in {path}", name, name in TEXT_ARTIFACTS,
                    f"one of {', '.join(TEXT_ARTIFACTS)}")
        for key, history in entry["metrics"].items():
            require(f"metrics[{key!r}] of {where}", history, isinstance(history, list), "a list of [step, time, value]")
            for point in history:
                require(f"metrics[{key!r}] of {where}", point, _metric_point(point),
                        f"[step, time, value]: a step in [0, 2^63), a time in ms >= 0, a finite number or NaN")


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _metric_point(point: object) -> bool:
    if not (isinstance(point, list) and len(point) == 3):
        return False
    step, timestamp, value = point
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (step, timestamp))
    # NaN is what MLflow holds for a value that diverged; an infinity or a huge number is not a figure.
    number = isinstance(value, int | float) and not isinstance(value, bool) and not math.isinf(value)
    return ints and number and 0 <= step < MAX_INT64 and 0 <= timestamp < MAX_INT64


def already_loaded(client: MlflowClient, experiment_id: str, records: list[dict]) -> list[str]:
    """The source ids of the file's runs that the experiment holds (as loaded copies or as the
    originals)."""
    held = set()
    for run in retry_locked(lambda: client.search_runs([experiment_id], max_results=50_000)):
        held.update({run.info.run_id, run.data.tags.get(record.SOURCE_RUN_ID)})
    return [source_id(entry) for entry in records if source_id(entry) in held]


def checked(path: Path) -> list[dict]:
    """The records of the export `path`, each checked whole (check_records)."""
    records = read(path)
    check_records(records, path)
    return records


def load(path: Path, tracking_uri: str, experiment: str | None = None, again: bool = False,
         records: list[dict] | None = None) -> str:
    """Create the runs of the export `path` (its `checked` records, if read already) in the store
    at `tracking_uri`, in experiment `experiment` (default: the one it was saved from), all or
    none. Returns the experiment's name. Raises InvalidValue for a bad record or a name that may
    not reach the file system, AlreadyLoaded if a run of the file is in the experiment already
    (unless `again`: then they are loaded as copies)."""
    records = checked(path) if records is None else records
    if experiment is not None:
        require_name("--experiment", experiment)
    elif records:
        experiment = require_name(f"the experiment field of {path}", records[0].get("experiment"))
    else:
        experiment = require_name(f"the experiment named by the file name {path.name}", path.name.split(".")[0])
    client = MlflowClient(tracking_uri)
    from .runs.tracking import ensure_experiment  # creates the experiment with artifacts beside a SQLite file

    experiment_id = ensure_experiment(client, experiment)
    present = [] if again else already_loaded(client, experiment_id, records)
    if present:
        raise AlreadyLoaded(f"{len(present)} of the {len(records)} runs of {path} are in experiment {experiment!r} of "
                            f"{tracking_uri} already (e.g. run {present[0]}): nothing loaded; --again loads copies")
    new_ids: dict[str, str] = {}
    try:
        _write(client, experiment_id, records, path, new_ids)
    except BaseException:
        # All or nothing: the runs made so far are deleted (a rerun then loads the file whole).
        for run_id in new_ids.values():
            retry_locked(lambda run_id=run_id: client.delete_run(run_id))
        raise
    return experiment


def _write(client: MlflowClient, experiment_id: str, records: list[dict], path: Path, new_ids: dict[str, str]) -> None:
    """Create the checked `records` as runs; `new_ids` maps each source id to its new run id."""
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


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m densenet_exp.export", description=__doc__.split("\n\n")[0])
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
            try:
                records = checked(args.file)  # the whole file, before the store is touched
            except (OSError, EOFError, ValueError) as err:
                if isinstance(err, InvalidValue):
                    raise
                raise InvalidValue(f"{args.file} is not a file that `export save` wrote ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
            prepare_store(uri, key)
            name = load(args.file, uri, args.experiment, args.again, records)
            print(f"{args.file} loaded into {uri} as experiment {name}")
    except StoreUnreachable as err:
        print(f"error: {err}: start it, or point {key} at another store", file=sys.stderr)
        return EXIT_STORE_DOWN
    return 0


if __name__ == "__main__":
    sys.exit(main())

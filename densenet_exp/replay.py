"""Send what a run could not log while its tracking store was unreachable.

    python -m densenet_exp.replay outputs/runs/<time>/unsent_metrics.jsonl [--tracking-uri URI]

Each line of the file is one record (`tracking.spool`): metrics at a step, or the status the
run (or a sweep's parent) should have ended with. Metrics already in the run's history at that
step are skipped, so replaying twice, or after the run was resumed, logs nothing twice. A status
is applied only to a run that is still RUNNING with its owner gone. The file is renamed to
`*.replayed` once everything is in.

Like a run, it gives up on a server that stays down within the `tracking.http` bounds of the run
config (exit 75), and it never creates a store: each store it names must exist.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from .checks import EXIT_BAD_INPUT, EXIT_STORE_DOWN, ArgumentParser, OneLineError, entry_point
from .runs.ownership import owner_gone
from .runs.store import bound_tool_waits, check_store, retry_locked, unreachable


def replay(path: Path, uri: str | None = None, owner_timeout_s: float = 600) -> dict[str, int]:
    """Send the records of `path`; returns how many metric values were sent, were already there,
    and how many statuses were applied."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_run: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        by_run[(uri or record["uri"], record["run_id"])].append(record)
    for store in {store for store, _ in by_run}:
        check_store(store, "--tracking-uri" if uri else f"uri (in {path.name})")
    counts = {"sent": 0, "present": 0, "statuses": 0}
    for (store, run_id), items in by_run.items():
        client = MlflowClient(store)
        run = retry_locked(lambda: client.get_run(run_id))
        logged = {(key, m.step) for key in run.data.metrics
                  for m in retry_locked(lambda: client.get_metric_history(run_id, key))}
        metrics = [Metric(key, float(value), int(r.get("time") or 0), int(r["step"]))
                   for r in items if "metrics" in r for key, value in r["metrics"].items()]
        fresh = {(m.key, m.step): m for m in metrics if (m.key, m.step) not in logged}
        counts["present"] += len(metrics) - len(fresh)
        batch = list(fresh.values())
        for i in range(0, len(batch), 1000):  # MLflow's limit per log_batch call
            retry_locked(lambda: client.log_batch(run_id, metrics=batch[i : i + 1000]))
        counts["sent"] += len(batch)
        statuses = [r for r in items if "status" in r]
        if statuses and run.info.status == "RUNNING" and owner_gone(run, owner_timeout_s) is not None:
            last = statuses[-1]
            for key, value in last.get("tags", {}).items():
                retry_locked(lambda: client.set_tag(run_id, key, value))
            retry_locked(lambda: client.set_terminated(run_id, last["status"]))
            counts["statuses"] += 1
    return counts


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m densenet_exp.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="an unsent_metrics.jsonl a run left in its output folder")
    parser.add_argument("--tracking-uri", help="the store to send to; default: the one each record names")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        print(f"error: {args.file} is not a file", file=sys.stderr)
        return EXIT_BAD_INPUT
    bound_tool_waits()  # a server that stays down: give up as a run does
    try:
        counts = replay(args.file, args.tracking_uri)
    except Exception as err:
        if unreachable(err):  # StoreUnreachable too: replay's own advice, not the run's
            print("error: the tracking store is still unreachable: try again once it is back", file=sys.stderr)
            return EXIT_STORE_DOWN
        if isinstance(err, OneLineError):
            raise
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
        return 1
    done = args.file.with_name(args.file.name + ".replayed")
    args.file.rename(done)
    print(f"sent {counts['sent']} metric value(s), {counts['present']} already there, {counts['statuses']} run "
          f"status(es) set; the file is now {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

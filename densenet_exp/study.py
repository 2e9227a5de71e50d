"""Run a declared study plan (densenet_exp/plan.py), stage by stage.

    python -m densenet_exp.study show PLAN                       # the plan, its hash, its jobs
    python -m densenet_exp.study run PLAN --stage exploration    # the pilot
    python -m densenet_exp.study estimate PLAN [--sd PP]         # confirmation time and power, from the pilot
    python -m densenet_exp.study run PLAN --stage confirmation --jobs 2

`run` trains every (seed, arm) job of the stage that has no FINISHED run yet (in the store that
job writes to: the recipe's or arm's `tracking.uri`, else --tracking-uri), seeds outer, each
as `python -m densenet_exp.run` in its own process (its own output folder under
outputs/studies/<plan>/<stage>/), `--jobs` at a time with one torch thread each: two one-thread
jobs train 1.2-1.3x faster than one two-thread job on 2 cores (docs/performance.md). A stopped
study resumes when the same command runs again: finished jobs are skipped, killed runs resume
from their last checkpoint. One `run` at a time per plan: a second says in one line which process
holds the plan. Once the plan's confirmation has started, its file may not change: `run` stops
in one line when the file differs from every version the confirmation's runs started under,
unless `--new-plan` starts the edited file's confirmation (only its runs count as its finished
jobs). Exit status: 0 every job finished, 1 some failed, 2 bad input, 3 the plan is held by
another `run`, 75 a store is unreachable, 130/143 stopped.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import record
from .checks import (EXIT_BUSY, EXIT_STORE_DOWN, ArgumentParser, InvalidValue, OneLineError, entry_point, require_flag,
                     require_name)
from .plan import STAGES, Job, Plan, require_declared_rule

OUTPUT_ROOT = Path("outputs/studies")
PLAN_LOCK = "study.lock"  # in the plan's output folder: held by the one `study run` of the plan


_checked: set[str] = set()  # stores plan_runs has checked


class PlanBusy(OneLineError, RuntimeError):
    """Another `study run` holds the plan's lock; the message names it."""

    exit_code = EXIT_BUSY


class PlanChanged(OneLineError, ValueError):
    """The plan file differs from the one its confirmation started under."""


class plan_lock:
    """An exclusive, non-blocking flock on the plan's lock file, which names its holder, so that
    two runners never train the same job twice (the second would find the first's jobs unfinished)."""

    def __init__(self, plan: Plan, stage: str) -> None:
        self.path = OUTPUT_ROOT / plan.name / PLAN_LOCK
        self.about = f"{socket.gethostname()}:{os.getpid()} (--stage {stage}, since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC)"
        self.fd: int | None = None

    def __enter__(self) -> plan_lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 400).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise PlanBusy(f"plan {self.path.parent.name} is being run by {holder} (lock {self.path}): wait for "
                           "it to end, or stop it and run this command again") from None
        os.ftruncate(fd, 0)
        os.write(fd, self.about.encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.fd is not None
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def check_names(plan: Plan) -> None:
    """The plan's experiment and arm names name folders (outputs/studies/<plan>/<stage>/<arm>-s<seed>):
    each must be one safe path component (checks.require_name)."""
    require_name("experiment", plan.experiment)
    for stage, arms in plan.arms.items():
        for arm in arms:
            require_name(f"{stage}.arms", arm)


def job_stores(plan: Plan, stage: str) -> dict[str, str]:
    """Arm -> the store its jobs write to: the `tracking.uri` its recipe and overrides compose to
    (a preset may set it too), else $MLFLOW_TRACKING_URI (which `main` sets), as the job reads it."""
    from .config import composed
    from .runs.store import tracking_uri

    stores = {}
    for arm, overrides in plan.arms[stage].items():
        try:
            configured = composed([*plan.recipe, *overrides])["tracking"]["uri"]
        except Exception as err:  # Hydra's and OmegaConf's errors: an override that does not compose
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise InvalidValue(f"{stage}.arms.{arm}={list(overrides)!r} (after the recipe) does not compose: {first}")
        stores[arm] = tracking_uri(configured, Path.cwd())
    return stores


def plan_runs(plan: Plan, stage: str, uri: str, status: str | None = None) -> list[Any]:
    """The runs of the plan's `stage` in the store at `uri` (of `status`, if given); none where
    the store does not exist yet (reading must not create it). One line for a store that cannot work."""
    from mlflow.tracking import MlflowClient

    from .runs.store import check_store, retry_locked, sqlite_path

    path = sqlite_path(uri) if uri.startswith("sqlite:") else None
    if path is not None and not path.is_file():
        return []
    if uri not in _checked:  # once per process: a check reads the whole file
        check_store(uri, "tracking.uri")  # heals a hot journal; one line for a store that cannot work
        _checked.add(uri)
    client = MlflowClient(uri)
    experiment = retry_locked(lambda: client.get_experiment_by_name(plan.experiment))
    if experiment is None:
        return []
    where = f" and attributes.status = '{status}'" if status else ""
    return retry_locked(lambda: client.search_runs([experiment.experiment_id], filter_string=(
        f"tags.{record.STUDY_PLAN} = '{plan.name}' and tags.{record.STUDY_STAGE} = '{stage}'{where}"),
        max_results=50_000))


def finished_jobs(plan: Plan, stage: str, stores: dict[str, str]) -> set[tuple[str, int]]:
    """(arm, seed) of the stage's runs that FINISHED, each arm's looked up in the store its jobs
    write to (`stores`, job_stores). A confirmation job counts as done only under this version
    of the plan file: after `--new-plan`, the runs of an older version are not this plan's."""
    done = set()
    for uri in set(stores.values()):
        for r in plan_runs(plan, stage, uri, "FINISHED"):
            arm = r.data.tags.get(record.STUDY_ARM, "")
            current = stage == "exploration" or r.data.tags.get(record.STUDY_PLAN_HASH) == plan.hash
            if stores.get(arm) == uri and current:
                done.add((arm, int(r.data.params.get("seed", -1))))
    return done


def check_unchanged(plan: Plan, stores: dict[str, str]) -> None:
    """PlanChanged when the plan's confirmation started under other versions of its file and not
    under this one (once `--new-plan` started this version's, it goes on without the flag)."""
    hashes = {r.data.tags.get(record.STUDY_PLAN_HASH, "") for uri in set(stores.values())
              for r in plan_runs(plan, "confirmation", uri)}
    other = sorted(h[:12] for h in hashes - {plan.hash})
    if other and plan.hash not in hashes:
        raise PlanChanged(f"{plan.path} changed after plan {plan.name}'s confirmation started (its runs started under "
                          f"sha256 {', '.join(other)}; the file is now {plan.hash[:12]}): restore the file, or pass "
                          "--new-plan to run the edited file as a new confirmation (the report judges each arm only "
                          "on runs of its current config)")


def job_command(plan: Plan, job: Job, stage: str, jobs: int) -> list[str]:
    folder = OUTPUT_ROOT / plan.name / stage / f"{job.arm}-s{job.seed}"
    return [sys.executable, "-m", "densenet_exp.run", *job.overrides, f"tracking.experiment={plan.experiment}",
            f"parallel_jobs={jobs}", f"cpu_threads={max(1, (os.cpu_count() or 1) // jobs)}",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={folder}"]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {secs:02d} s"


class Runner:
    """`jobs` processes at a time; one line as each job ends, with the stage's ETA."""

    def __init__(self, plan: Plan, stage: str, jobs: int) -> None:
        self.plan, self.stage, self.jobs = plan, stage, jobs
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.done: list[float] = []
        self.failed: list[str] = []
        self.stopping = False

    def run_one(self, job: Job, total: int) -> None:
        if self.stopping:
            return
        command = job_command(self.plan, job, self.stage, self.jobs)
        folder = Path(command[-1].split("=", 1)[1])
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(folder / "stdout.log", "ab") as out:
            child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, process_group=0)
            with self.lock:
                self.children.add(child)
            code = child.wait()
        with self.lock:
            self.children.discard(child)
            elapsed = time.perf_counter() - started
            self.done.append(elapsed)
            if code != 0 and not self.stopping:
                self.failed.append(f"{job.arm} seed {job.seed} (exit {code}, log {folder / 'stdout.log'})")
            left = total - len(self.done)
            eta = sum(self.done) / len(self.done) * left / self.jobs
            print(f"[{len(self.done)}/{total}] {job.arm} seed {job.seed}: "
                  f"{'finished' if code == 0 else f'exit {code}'} in {_duration(elapsed)}; "
                  f"about {_duration(eta)} left", flush=True)

    def stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        with self.lock:
            for child in self.children:
                child.send_signal(signum)  # each run closes as KILLED and resumes on the next `run`

    def run(self, todo: list[Job]) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.stop)
        with ThreadPoolExecutor(self.jobs) as pool:
            for future in [pool.submit(self.run_one, job, len(todo)) for job in todo]:
                future.result()
        if self.stopping:
            print("stopped: run the same command to resume", file=sys.stderr)
            return 130
        if self.failed:
            print("failed jobs:\n  " + "\n  ".join(self.failed), file=sys.stderr)
            return 1
        return 0


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m densenet_exp.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("show", "run", "estimate"))
    parser.add_argument("plan", help="the plan file (YAML)")
    parser.add_argument("--stage", choices=STAGES, default="confirmation")
    parser.add_argument("--jobs", type=_jobs, default=os.cpu_count() or 1, help="jobs at a time (default: one per core)")
    parser.add_argument("--new-plan", action="store_true", help="run: the plan file was edited after its confirmation "
                                                                 "started; run the edited file as a new confirmation")
    parser.add_argument("--sd", type=float, help="estimate: the seed SD of test accuracy in points (default: the "
                                                  "pilot's, over arms with two seeds or more)")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    args = parser.parse_args(argv)
    from .claims import describe, load_plan

    plan = load_plan(args.plan)
    check_names(plan)
    from .runs.store import tracking_uri

    uri = tracking_uri(args.tracking_uri, Path.cwd())
    if args.command == "show":
        print("\n".join(describe(plan)))
        for job in plan.jobs(args.stage):
            print(f"  {args.stage} {job.arm} seed {job.seed}: {' '.join(job.overrides)}")
        return 0
    if args.command == "estimate":
        from .claims.sizing import print_estimate

        return print_estimate(plan, uri, args.jobs, args.sd)  # an unreadable arm folder: entry_point's one line
    os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    from .runs.store import StoreUnreachable

    try:
        with plan_lock(plan, args.stage):
            stores = job_stores(plan, args.stage)
            if not args.new_plan:
                check_unchanged(plan, job_stores(plan, "confirmation"))
            if args.stage == "confirmation" and not any(plan_runs(plan, "confirmation", u)
                                                       for u in set(stores.values()) or {uri}):
                require_declared_rule(plan)
            done = finished_jobs(plan, args.stage, stores)
            todo = [j for j in plan.jobs(args.stage) if (j.arm, j.seed) not in done]
            print(f"plan {plan.name} (sha256 {plan.hash[:12]}), {args.stage}: {len(todo)} of "
                  f"{len(plan.jobs(args.stage))} jobs to run, {args.jobs} at a time; store "
                  f"{', '.join(sorted(set(stores.values()))) or uri}", flush=True)
            return Runner(plan, args.stage, args.jobs).run(todo)
    except StoreUnreachable as err:
        print(f"error: {err}: start it, or point the plan's tracking.uri elsewhere", file=sys.stderr)
        return EXIT_STORE_DOWN


def _jobs(text: str) -> int:
    """--jobs: an integer >= 1 (argparse prints the message as one line)."""
    require_flag("--jobs", text, text.isdigit() and int(text) >= 1, "an integer >= 1")
    return int(text)


if __name__ == "__main__":
    sys.exit(main())

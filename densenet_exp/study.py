"""Run a declared study plan (densenet_exp/plan.py), stage by stage.

    python -m densenet_exp.study show PLAN                       # the plan, its hash, its jobs
    python -m densenet_exp.study run PLAN --stage exploration    # the pilot
    python -m densenet_exp.study estimate PLAN [--sd PP]         # confirmation time and power, from the pilot
    python -m densenet_exp.study run PLAN --stage confirmation --jobs 2

`run` trains every (seed, arm) job of the stage that has no FINISHED run yet, seeds outer, each
as `python -m densenet_exp.run` in its own process (its own output folder under
outputs/studies/<plan>/<stage>/), `--jobs` at a time with one torch thread each: two one-thread
jobs train 1.2-1.3x faster than one two-thread job on 2 cores (docs/performance.md). A stopped
study resumes when the same command runs again: finished jobs are skipped, killed runs resume
from their last checkpoint. Exit status: 0 every job finished, 1 some failed, 130/143 stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .checks import InvalidValue
from .plan import STAGES, Job, Plan

OUTPUT_ROOT = Path("outputs/studies")


def finished_jobs(plan: Plan, stage: str, uri: str) -> set[tuple[str, int]]:
    """(arm, seed) of the stage's runs that FINISHED in the plan's experiment."""
    from mlflow.tracking import MlflowClient

    from . import record

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(plan.experiment)
    if experiment is None:
        return set()
    runs = client.search_runs([experiment.experiment_id], filter_string=(
        f"tags.{record.STUDY_PLAN} = '{plan.name}' and tags.{record.STUDY_STAGE} = '{stage}' "
        "and attributes.status = 'FINISHED'"), max_results=50_000)
    return {(r.data.tags.get(record.STUDY_ARM, ""), int(r.data.params.get("seed", -1))) for r in runs}


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m densenet_exp.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("show", "run", "estimate"))
    parser.add_argument("plan", help="the plan file (YAML)")
    parser.add_argument("--stage", choices=STAGES, default="confirmation")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="jobs at a time (default: one per core)")
    parser.add_argument("--sd", type=float, help="estimate: the seed SD of test accuracy in points (default: the "
                                                  "pilot's, over arms with two seeds or more)")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    args = parser.parse_args(argv)
    from .claims import describe, load_plan

    try:
        plan = load_plan(args.plan)
    except InvalidValue as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .runs.store import tracking_uri

    uri = tracking_uri(args.tracking_uri, Path.cwd())
    if args.command == "show":
        print("\n".join(describe(plan)))
        for job in plan.jobs(args.stage):
            print(f"  {args.stage} {job.arm} seed {job.seed}: {' '.join(job.overrides)}")
        return 0
    if args.command == "estimate":
        from .claims.sizing import print_estimate

        return print_estimate(plan, uri, args.jobs, args.sd)
    os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    todo = [j for j in plan.jobs(args.stage) if (j.arm, j.seed) not in finished_jobs(plan, args.stage, uri)]
    print(f"plan {plan.name} (sha256 {plan.hash[:12]}), {args.stage}: {len(todo)} of "
          f"{len(plan.jobs(args.stage))} jobs to run, {args.jobs} at a time; store {uri}", flush=True)
    return Runner(plan, args.stage, args.jobs).run(todo)


if __name__ == "__main__":
    sys.exit(main())

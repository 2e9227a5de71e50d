"""Shared fixtures: run the harness's command line against a throwaway MLflow store."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker (and each process it starts) gets its share of the cores for
    torch's threads (unless OMP_NUM_THREADS is set): two workers of two spinning OpenMP threads
    each on two cores stall each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
        if "torch" in sys.modules:  # read at torch's import: too late for this process
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@dataclass
class Store:
    """A SQLite MLflow store in a temporary folder and a way to run the CLI against it."""

    path: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.path / 'mlflow.db'}"

    def client(self):
        import mlflow

        return mlflow.MlflowClient(self.uri)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DENSENET_EXP_"))}
        env.update(MLFLOW_TRACKING_URI=self.uri, PYTHONUNBUFFERED="1")
        env.pop("HYDRA_FULL_ERROR", None)
        return env

    def command(self, *overrides: str, multirun: bool = False, out: str = "out") -> list[str]:
        dirs = [f"hydra.sweep.dir={self.path / out}"] if multirun else [f"hydra.run.dir={self.path / out}"]
        return [sys.executable, "-m", "densenet_exp.run", *(["-m"] if multirun else []), *overrides, *dirs]

    def run(self, *overrides: str, multirun: bool = False, out: str = "out", timeout: int = 600):
        return subprocess.run(
            self.command(*overrides, multirun=multirun, out=out),
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_here(self, *overrides: str, out: str = "out") -> tuple[int, str]:
        """The command line run in this process (no second start-up of torch, Lightning and
        MLflow: for checks that end before training). Returns (exit code, stderr)."""
        import contextlib
        import io
        from unittest import mock

        from densenet_exp import run

        argv = ["densenet_exp.run", *overrides, f"hydra.run.dir={self.path / out}"]
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # run.main installs its own
        stderr, code = io.StringIO(), 0
        try:
            with mock.patch.dict(os.environ, self.env(), clear=True), mock.patch.object(sys, "argv", argv), \
                    contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                run.main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return code, stderr.getvalue()

    def runs(self, experiment: str = "smoke"):
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        return [] if exp is None else client.search_runs([exp.experiment_id])

    def all_runs(self):
        client = self.client()
        ids = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(ids) if ids else []


def build_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder made by `build` once per test session. Under pytest-xdist (make test) the workers
    share it: the first to ask builds it while holding a lock, the others wait and read it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock  # a dependency of torch

    shared = tmp_path_factory.getbasetemp().parent  # this session's, above each worker's own
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker's failed attempt
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Store:
    """DenseNet and ResNet, two seeds each, on a slice of Fashion-MNIST (about two minutes), trained
    once per test session (shared by the xdist workers) for the report, notebook and run-record tests."""
    def train(folder: Path) -> None:
        result = Store(folder).run("experiment=smoke", "model=densenet_tiny,resnet20", "seed=0,1", multirun=True,
                                   out="sweep")
        assert result.returncode == 0, result.stderr[-3000:]

    return Store(build_once(tmp_path_factory, "tiny_sweep", train))


@pytest.fixture(scope="session")
def migrated_store_file(tmp_path_factory) -> Path:
    """An empty SQLite store with MLflow's tables made once: creating them costs each new store
    about two seconds of migrations."""
    template = Store(tmp_path_factory.mktemp("template"))
    template.client().search_experiments()
    return template.path / "mlflow.db"


@pytest.fixture
def store(tmp_path: Path, migrated_store_file: Path) -> Store:
    """A store with MLflow's tables and nothing in them."""
    shutil.copyfile(migrated_store_file, tmp_path / "mlflow.db")
    return Store(tmp_path)


@pytest.fixture
def new_store(tmp_path: Path) -> Store:
    """A store whose file does not exist yet (the first client creates it)."""
    return Store(tmp_path)


def run_until(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """Wait until `ready()` holds while `proc` still runs; fail if `proc` ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.1)
    assert proc.poll() is None, "the process ended before the moment the test waits for: give it more work"


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """Kill -9 `proc` (and reap it) once `ready()` holds (see run_until); kill it on failure too."""
    try:
        run_until(proc, ready, timeout)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()


def owner_alive(run) -> bool:
    """Whether the process its `owner` tag names (host:pid) runs on this machine."""
    import socket

    host, _, pid = run.data.tags.get("owner", "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_clean(store: Store, experiment: str | None = None) -> None:
    """What every lifecycle test checks last: in the whole store (or in `experiment`, where tests
    share a store), no run is RUNNING without a live owner and no (metric, step) was logged twice."""
    client = store.client()
    for run in store.all_runs() if experiment is None else store.runs(experiment):
        if run.info.status == "RUNNING":
            assert owner_alive(run), f"run {run.info.run_id} RUNNING, owner {run.data.tags.get('owner')} gone"
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_id, key, steps)

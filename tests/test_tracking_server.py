"""Shared tracking: runs logged over HTTP to `mlflow server` (PostgreSQL backend in CI, where
DENSENET_EXP_SERVER_BACKEND names it; SQLite otherwise), and a server outage loses nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, Store, assert_clean, run_until
from densenet_exp.runs.checkpoints import PAUSE_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tools/tracking-server` on a free port of 127.0.0.1, restartable on the same port."""

    def __init__(self, state: Path) -> None:
        self.port, self.state, self.proc = free_port(), state, None
        self.backend = os.environ.get("DENSENET_EXP_SERVER_BACKEND") or f"sqlite:///{state / 'server.db'}"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "PORT": str(self.port), "STATE_DIR": str(self.state), "BACKEND_URI": self.backend,
               "MLFLOW": str(Path(sys.executable).parent / "mlflow")}
        self.proc = subprocess.Popen([str(ROOT / "tools" / "tracking-server")], env=env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).read() == b"OK":
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not come up on {self.uri}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture
def server(tmp_path: Path):
    srv = Server(tmp_path / "server")
    srv.start()
    yield srv
    srv.stop()


class HttpStore(Store):
    def __init__(self, path: Path, uri: str) -> None:
        super().__init__(path)
        self._uri = uri

    @property
    def uri(self) -> str:  # type: ignore[override]
        return self._uri


def test_sweep_over_http_records_params_metrics_and_artifacts(server, tmp_path):
    store = HttpStore(tmp_path, server.uri)
    name = f"http-{uuid.uuid4().hex[:8]}"
    result = store.run("experiment=smoke", "probes=none", f"tracking.experiment={name}", "seed=0,1", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [r for r in store.runs(name) if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 2
    client = store.client()
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.params["data.name"] == "fashion_mnist"
        assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2 and "test/acc" in run.data.metrics
        # The config and the test predictions travel over HTTP too (probes=none: no probe files).
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml", "predictions"]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "predictions")] == ["predictions/test.csv"]


@pytest.mark.slow  # a minute of restarts and retries: CI runs it (make test-slow)
def test_server_outage_during_a_run_loses_nothing(server, tmp_path):
    store = HttpStore(tmp_path, server.uri)
    name = f"outage-{uuid.uuid4().hex[:8]}"
    # MLflow's own patience (7 retries, about 4 minutes) outlasts a restart on a loaded machine.
    overrides = ("experiment=smoke", "probes=none", f"tracking.experiment={name}", "trainer.max_epochs=3",
                 "data.train_size=2048", "tracking.http.max_retries=7")
    proc = subprocess.Popen(store.command(*overrides), cwd=ROOT, env=store.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    client = store.client()

    def first_epoch_logged() -> bool:
        runs = store.runs(name)
        return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "val/acc"))

    run_until(proc, first_epoch_logged)
    server.stop()  # the server goes away mid-run ...
    time.sleep(5)
    server.start()  # ... and comes back on the same port: the client's retries deliver the rest
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    (run,) = store.runs(name)
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    for key in ("train/loss", "val/acc", "lr"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 3, key


@pytest.mark.slow
def test_a_server_down_for_good_stops_the_run_within_a_minute_and_the_replay_delivers(server, tmp_path):
    store = HttpStore(tmp_path, server.uri)
    name = f"down-{uuid.uuid4().hex[:8]}"
    overrides = ("experiment=smoke", "probes=none", f"tracking.experiment={name}", "trainer.max_epochs=3",
                 "tracking.http.max_retries=2", "tracking.http.backoff_factor=1", "tracking.http.timeout_s=5")
    # The run pauses 20 s at the start of epoch 1, with epoch 0 logged: the server dies meanwhile.
    proc = subprocess.Popen(store.command(*overrides), cwd=ROOT, env={**store.env(), PAUSE_ENV: "20@1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    run_until(proc, lambda: bool(lines.append(proc.stdout.readline()) or "pausing" in lines[-1]))
    server.stop()  # for good
    gone = time.monotonic()
    output = "".join(lines) + proc.communicate(timeout=60)[0]  # the bound: under a minute
    print(f"server gone to exit: {time.monotonic() - gone:.1f} s")
    assert proc.returncode == 75, output[-3000:]
    unsent = tmp_path / "out" / "unsent_metrics.jsonl"
    assert f"error: the tracking server at {server.uri} is unreachable" in output
    assert f"python -m densenet_exp.replay {unsent}" in output and "Traceback" not in output
    records = [json.loads(line) for line in unsent.read_text().splitlines()]
    assert any("metrics" in r for r in records) and records[-1]["status"] == "KILLED"

    server.start()  # back, with what it had before
    replay = subprocess.run([sys.executable, "-m", "densenet_exp.replay", str(unsent)], cwd=ROOT, env=store.env(),
                            capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stderr[-2000:]
    (run,) = store.runs(name)
    assert run.info.status == "KILLED" and "unreachable" in run.data.tags["stop_reason"]
    client = store.client()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [7, 15]  # epoch 1 replayed
    again = store.run(*overrides, out="again")  # and the same command resumes the run
    assert again.returncode == 0, again.stderr[-3000:]
    (run,) = store.runs(name)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc")) == [7, 15, 23]
    assert_clean(store, name)  # the module's tests share one server


def test_metrics_are_kept_on_disk_when_the_store_is_gone_for_good(tmp_path, monkeypatch):
    from densenet_exp.runs.store import StoreUnreachable
    from densenet_exp.runs.run_logger import RunLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # no server will ever answer: fail fast
    uri = f"http://127.0.0.1:{free_port()}"
    logger = RunLogger(experiment_name="x", tracking_uri=uri, run_id="abc", unsent=tmp_path / "unsent.jsonl")
    with pytest.raises(StoreUnreachable) as gone:
        logger.log_metrics({"val/acc": 0.5}, step=3)
    (line,) = (tmp_path / "unsent.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record.pop("time") > 0
    assert record == {"uri": uri, "run_id": "abc", "step": 3, "metrics": {"val/acc": 0.5}}
    assert f"python -m densenet_exp.replay {tmp_path / 'unsent.jsonl'}" in gone.value.advice()

"""The replay (densenet_exp/replay.py): what a store that went away could not take, kept in a
run's unsent_metrics.jsonl, is sent once the store is back; nothing twice, no store created."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT
from densenet_exp.replay import main as replay_main
from densenet_exp.runs.store import prepare_store
from densenet_exp.runs.tracking import ensure_experiment


def test_the_replay_sends_each_figure_once_and_closes_a_run_whose_owner_is_gone(tmp_path):
    """Replay half of whose figures reached the store before it went away."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri)
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(client, "x"), tags={"owner": "gone:1"}).info.run_id
    client.log_metric(run_id, "val/acc", 0.5, step=7)  # sent before the store went away
    spool = tmp_path / "unsent_metrics.jsonl"
    records = [{"uri": uri, "run_id": run_id, "step": 7, "time": 1, "metrics": {"val/acc": 0.5, "val/loss": 1.0}},
               {"uri": uri, "run_id": run_id, "step": 15, "time": 2, "metrics": {"val/acc": 0.6}},
               {"uri": uri, "run_id": run_id, "status": "KILLED", "tags": {"stop_reason": "store unreachable"}}]
    spool.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert replay_main([str(spool)]) == 0
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/acc")) == [7, 15]
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [7]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "store unreachable"
    assert not spool.exists() and spool.with_name(spool.name + ".replayed").exists()


def test_replay_has_a_command_line():
    result = subprocess.run([sys.executable, "-m", "densenet_exp.replay", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and "unsent_metrics.jsonl" in result.stdout


def test_replay_never_creates_a_store(tmp_path, capsys):
    missing = tmp_path / "gone" / "mlflow.db"
    spool = tmp_path / "unsent_metrics.jsonl"
    spool.write_text(json.dumps({"uri": f"sqlite:///{missing}", "run_id": "r", "step": 1, "metrics": {"x": 1}}) + "\n")
    assert replay_main([str(spool)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: uri (in unsent_metrics.jsonl)=") and f"there is no MLflow store at {missing}" in err
    assert err.count("\n") == 1
    assert not missing.parent.exists() and spool.exists()


@pytest.mark.slow  # the bounds' own waits: about 30 s
def test_replay_gives_up_on_a_server_that_stays_down_within_the_runs_bounds(tmp_path):
    """Issue 23, finding 7: the replay waited 248 s (MLflow's own retries) where a run gives up
    after tracking.http's (about 30 s)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    spool = tmp_path / "unsent_metrics.jsonl"
    spool.write_text(json.dumps({"uri": f"http://127.0.0.1:{port}", "run_id": "r", "step": 1, "metrics": {"x": 1}})
                     + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "densenet_exp.replay", str(spool)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    took = time.monotonic() - started
    assert result.returncode == 75, result.stderr[-2000:]
    assert "still unreachable" in result.stderr and "Traceback" not in result.stderr
    assert took < 120, took  # the bounds of conf/config.yaml, not MLflow's 7 retries
    print(f"replay gave up after {took:.0f} s")

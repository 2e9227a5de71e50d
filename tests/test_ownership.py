"""Run ownership and the store's safety (issue 16): no launch takes over a live run, a new SQLite
store survives two processes creating it at once, runs whose owner died are closed and resumed,
unusable stores and checkpoints are reported in one line. Real processes on a throwaway store;
each scenario ends with `assert_clean` (no run RUNNING without a live owner, no (metric, step)
twice)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import ROOT, Store, assert_clean, kill_when, run_until
from densenet_exp.runs.checkpoints import OWNER_KEY, PAUSE_ENV, kept_best, owner, prune_best, resume_problem
from densenet_exp.runs.ownership import OwnerLock, earlier_live_rival, owner_gone
from densenet_exp.runs.store import MLFLOW_TABLES, StoreConfigError, prepare_store
from densenet_exp.runs.sweep import SweepParentRun
from densenet_exp.runs.sweep_folder import PARENT_ID_FILE
from densenet_exp.runs.tracking import ensure_experiment

SMOKE = ("experiment=smoke", "probes=none")


def start(store, *overrides: str, out: str = "out", env: dict | None = None, multirun: bool = False):
    return subprocess.Popen(store.command(*overrides, out=out, multirun=multirun), cwd=ROOT,
                            env={**store.env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def fake_run(tags: dict, status: str = "RUNNING", start_time: int = 0, run_id: str = "r"):
    return SimpleNamespace(info=SimpleNamespace(status=status, start_time=start_time, run_id=run_id),
                           data=SimpleNamespace(tags=tags))


# --- 1. a second launch of a live config is refused -----------------------------------------


@pytest.mark.slow
def test_a_second_launch_of_a_live_config_is_refused(store):
    overrides = (*SMOKE, "trainer.max_epochs=3")
    ensure_experiment(store.client(), "smoke")
    # A pauses at the start of epoch 2, with its epoch-0 checkpoint on disk: alive, mid-run.
    first = start(store, *overrides, out="a", env={PAUSE_ENV: "300@2"})
    ckpt = store.path / "a" / "checkpoints" / "last.ckpt"
    try:
        run_until(first, ckpt.exists)
        (live,) = store.runs("smoke")
        for out in ("b", "a"):  # another folder, and the live run's own folder
            second = store.run(*overrides, out=out)
            assert second.returncode == 3, second.stderr[-2000:]
            assert f"error: MLflow run {live.info.run_id}" in second.stderr and "is being trained by" in second.stderr
            assert "Traceback" not in second.stderr
        assert not (store.path / "b").exists() and ckpt.exists()  # B left nothing; A's folder is intact
        (still,) = store.runs("smoke")
        assert still.info.run_id == live.info.run_id and still.info.status == "RUNNING"
        assert_clean(store)
        # tracking.resume=false is the documented way to train a separate run beside it.
        separate = store.run(*overrides, "tracking.resume=false", out="c")
        assert separate.returncode == 0, separate.stderr[-2000:]
        assert len(store.runs("smoke")) == 2
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    resumed = store.run(*overrides, out="d")  # A's owner is gone now: its run is resumed
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert store.client().get_run(live.info.run_id).info.status == "FINISHED"
    assert_clean(store)


@pytest.mark.slow
def test_two_identical_sweeps_at_once_train_each_config_once(store):
    overrides = (*SMOKE, "seed=0,1", "trainer.max_epochs=1")
    ensure_experiment(store.client(), "smoke")
    procs = [start(store, *overrides, out=f"sweep{i}", multirun=True) for i in range(2)]
    for proc in procs:
        code, stderr = proc.wait(900), proc.stderr.read()
        # A job whose config the other sweep trains is refused and reported; nothing is trained twice.
        assert code == 0 or (code == 1 and "is being trained by" in stderr), stderr[-3000:]
    children = [r for r in store.runs("smoke") if r.data.tags.get("sweep") != "parent"]
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert_clean(store)
    again = store.run(*overrides, out="again", multirun=True)
    assert again.returncode == 0 and again.stdout.count("skipped, already FINISHED") == 2


def test_of_two_runs_created_at_once_only_the_first_goes_on(tmp_path):
    me = f"{socket.gethostname()}:{os.getpid()}"
    held = OwnerLock(tmp_path)
    # Lock not taken yet: the run's owner is gone; taken: alive (the kernel, not the pid, decides).
    mine = fake_run({"owner": me, "owner_lock": str(held.path)}, start_time=2, run_id="b")
    rival = fake_run({"owner": me, "owner_lock": str(held.path)}, start_time=1, run_id="a")
    assert owner_gone(rival, 600) is not None
    assert held.acquire()
    try:
        assert owner_gone(rival, 600) is None
        assert earlier_live_rival([mine, rival], "b", 600) is rival  # b backs off
        assert earlier_live_rival([mine, rival], "a", 600) is None  # a goes on
    finally:
        held.release()


def test_owners_on_other_machines_are_judged_by_their_heartbeat(monkeypatch):
    fresh = fake_run({"owner": "elsewhere:12", "owner_heartbeat": str(int(time.time()) - 30)})
    stale = fake_run({"owner": "elsewhere:12", "owner_heartbeat": str(int(time.time()) - 700)})
    assert owner_gone(fresh, 600) is None
    assert "no heartbeat for" in owner_gone(stale, 600)
    # A SLURM job that was requeued is gone for its own next start, however fresh its heartbeat.
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued = fake_run({"owner": "node1:12", "owner_heartbeat": str(int(time.time())), "owner_slurm_job": "77:0"})
    assert "before it was requeued" in owner_gone(requeued, 600)


# --- 2. a new SQLite store, two processes at once -------------------------------------------


def test_two_processes_create_a_new_store_at_once(new_store):
    store = new_store
    assert not (store.path / "mlflow.db").exists()
    procs = [start(store, *SMOKE, f"seed={seed}", out=f"s{seed}") for seed in (0, 1)]
    results = [(p.wait(600), p.stderr.read()) for p in procs]
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
        assert "alembic" not in stderr
    runs = store.runs("smoke")
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert_clean(store)


@pytest.mark.slow
def test_a_kill_during_a_new_stores_creation_never_leaves_it_half_made(tmp_path):
    """Issue 23, finding 5: kill -9 at several moments after "Creating initial MLflow database
    tables"; the store appears complete or not at all, and the next launch uses it."""
    for delay in (0.3, 0.8, 1.5, 3.0):
        store = Store(tmp_path / f"kill-{delay}")
        db = store.path / "mlflow.db"
        proc = start(store, *SMOKE)
        # From the moment MLflow starts "Creating initial MLflow database tables" (in the draft file).
        run_until(proc, (store.path / "mlflow.db.creating").exists, timeout=600)
        time.sleep(delay)
        kill_when(proc, lambda: True)
        if db.exists():  # moved into place whole, or not at all
            with sqlite3.connect(db) as conn:
                tables = {r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")}
            assert set(MLFLOW_TABLES) <= tables and not [t for t in tables if t.startswith("_alembic_tmp_")], delay
        prepare_store(store.uri)  # what the next launch does first
        client = store.client()
        probe = client.create_run(ensure_experiment(client, "smoke"))  # the store takes a run
        client.set_terminated(probe.info.run_id, "FINISHED")  # and leaves no ownerless RUNNING one
        assert not (store.path / "mlflow.db.creating").exists()
    # A launch on the last of them trains. Its own folder: on a fast CPU the run killed at 3.0 s
    # may already have left a checkpoint there, which another configuration rightly may not reuse.
    result = store.run(*SMOKE, "trainer.max_epochs=1", out="after")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_clean(store)


@pytest.mark.parametrize("written", [False, True], ids=["unwritten", "with-a-run"])
def test_a_half_made_store_is_made_anew_only_if_nothing_was_written_to_it(store, written, capsys):
    """A store that older code left half-made (a kill during its migrations): set aside and
    made anew if no run was written to it, else one line and left alone."""
    if written:
        client = store.client()
        client.create_run(ensure_experiment(client, "smoke"))
    db = store.path / "half" / "mlflow.db"  # a copy: no client of this process has it open
    db.parent.mkdir()
    shutil.copyfile(store.path / "mlflow.db", db)
    with sqlite3.connect(db) as conn:  # as a kill mid-migration leaves it
        conn.execute("update alembic_version set version_num = 'half_made'")
        conn.execute("create table _alembic_tmp_datasets (x integer)")
    before = db.read_bytes()
    if written:
        with pytest.raises(StoreConfigError, match="is not a usable MLflow store"):
            prepare_store(f"sqlite:///{db}")
        assert db.read_bytes() == before and not list(db.parent.glob("*half-made*"))
        return
    prepare_store(f"sqlite:///{db}")
    err = capsys.readouterr().err
    assert f"warning: {db} is a half-made MLflow store that no run has written to: set aside as" in err
    (aside,) = db.parent.glob("mlflow.db.half-made-*")
    assert aside.read_bytes() == before
    client = MlflowClient(f"sqlite:///{db}")
    client.create_run(ensure_experiment(client, "smoke"))


@pytest.mark.slow
def test_two_sweeps_on_a_new_store_each_get_their_parent(store):
    procs = [start(store, *SMOKE, f"seed={a},{a + 1}", "trainer.max_epochs=1", out=f"sweep{a}", multirun=True)
             for a in (0, 2)]
    for proc in procs:
        assert proc.wait(900) == 0, proc.stderr.read()[-3000:]
    runs = store.runs("smoke")
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("sweep_id") == parent.info.run_id]
        assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert_clean(store)


def test_a_sweep_whose_parent_cannot_be_created_stops_loudly(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("the store refused the parent run")

    monkeypatch.setattr(MlflowClient, "create_run", refuse)
    config = OmegaConf.load(ROOT / "conf" / "config.yaml")
    config.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config.tracking.experiment = "smoke"  # config.yaml alone composes no data set to name one from
    config.hydra = {"runtime": {"cwd": str(ROOT)}, "sweep": {"dir": str(tmp_path / "sweep")},
                    "overrides": {"task": []}}
    with pytest.raises(SystemExit) as stop:
        SweepParentRun().on_multirun_start(config)  # Hydra turns any other exception into a warning
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "error: the sweep's parent run could not be created" in err and "no job was started" in err
    assert not (tmp_path / "sweep" / PARENT_ID_FILE).exists()


# --- 3. runs whose owner is gone are closed, and resumed ------------------------------------


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_closed_then_resumed(store):
    overrides = (*SMOKE, "data.train_size=4096")
    ensure_experiment(store.client(), "smoke")
    kill_when(start(store, *overrides), lambda: bool(store.runs("smoke")))
    (orphan,) = store.runs("smoke")
    assert orphan.info.status == "RUNNING"
    other = store.run(*SMOKE, "seed=1", "trainer.max_epochs=1", out="other")  # any later launch closes it
    assert other.returncode == 0, other.stderr[-2000:]
    closed = store.client().get_run(orphan.info.run_id)
    assert closed.info.status == "KILLED" and "ended without closing it" in closed.data.tags["stop_reason"]
    assert_clean(store)
    again = store.run(*overrides, out="again")  # its own config resumes it, from the start
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = store.client().get_run(orphan.info.run_id)
    assert resumed.info.status == "FINISHED" and "ended without closing it" in resumed.data.tags["resumed_after"]
    assert len(store.runs("smoke")) == 2
    assert_clean(store)


@pytest.mark.slow
def test_a_reused_output_folder_never_resumes_one_configuration_from_another(store):
    """Issue 23, finding 2: run A killed in folder D; configuration B launched in D is refused
    (D holds A's resume point); a checkpoint of another run put in A's folder (as older code
    left it) is set aside with a warning naming both runs, never loaded; A finishes."""
    a = (*SMOKE, "trainer.max_epochs=2")
    ensure_experiment(store.client(), "smoke")
    last = store.path / "D" / "checkpoints" / "last.ckpt"
    kill_when(start(store, *a, out="D"), last.exists, timeout=900)  # killed in epoch 1, from epoch 0's checkpoint
    (killed,) = store.runs("smoke")

    b = store.run(*a, "optim.lr=0.1", out="D")
    assert b.returncode == 2, b.stderr[-3000:]
    lines = [line for line in b.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: hydra.run.dir=") and killed.info.run_id in lines[0]
    assert len(store.runs("smoke")) == 1 and last.is_file()

    # B trained elsewhere; its checkpoint copied into A's folder, where a resume would find it.
    other = store.run(*a, "optim.lr=0.1", "trainer.max_epochs=1", out="E")
    assert other.returncode == 0, other.stderr[-3000:]
    (b_run,) = [r for r in store.runs("smoke") if r.info.run_id != killed.info.run_id]
    shutil.copyfile(store.path / "E" / "checkpoints" / "last.ckpt", last)

    result = store.run(*a, out="D")  # A's own command
    assert result.returncode == 0, result.stderr[-3000:]
    warning = next(line for line in result.stderr.splitlines() if line.startswith("warning: checkpoint"))
    assert f"belongs to MLflow run {b_run.info.run_id}" in warning and killed.info.run_id in warning
    assert "starts over from epoch 0" in warning
    assert len(list(last.parent.glob("last.ckpt.foreign-*"))) == 1
    run = store.client().get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    assert sorted(m.step for m in store.client().get_metric_history(run.info.run_id, "val/acc")) == [7, 15]
    assert owner(last) == {"run_id": killed.info.run_id, "config_hash": run.data.tags["config_hash"]}
    assert_clean(store)


@pytest.mark.slow
def test_a_run_killed_under_one_thread_count_resumes_under_another(store):
    """`study run --jobs 1` then `--jobs 2` (or a machine with more cores) sets other threads: the
    killed run resumes from its checkpoint, in its folder, as the same MLflow run."""
    a = (*SMOKE, "trainer.max_epochs=2")
    ensure_experiment(store.client(), "smoke")
    last = store.path / "D" / "checkpoints" / "last.ckpt"
    kill_when(start(store, *a, "cpu_threads=2", "parallel_jobs=1", out="D"), last.exists, timeout=900)
    (killed,) = store.runs("smoke")
    result = store.run(*a, "cpu_threads=1", "parallel_jobs=2", out="D")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store.runs("smoke")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert sorted(m.step for m in store.client().get_metric_history(run.info.run_id, "val/acc")) == [7, 15]
    assert_clean(store)


def test_a_run_tagged_with_the_older_hash_is_found_under_it(tmp_path):
    """A run killed before the machine keys left the hash is still a run of its config."""
    from densenet_exp.runs.tracking import runs_of_config

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = ensure_experiment(client, "smoke")
    old = client.create_run(experiment, tags={"config_hash": "older"}).info.run_id
    new = client.create_run(experiment, tags={"config_hash": "today"}).info.run_id
    client.create_run(experiment, tags={"config_hash": "another"})
    assert [r.info.run_id for r in runs_of_config(client, experiment, "today", "older")] == [new, old]
    assert [r.info.run_id for r in runs_of_config(client, experiment, "today", "today")] == [new]


def test_a_checkpoint_resumes_only_the_run_it_names(tmp_path):
    """Every checkpoint carries its run id and config hash; any other run, a checkpoint that names
    none and a `last.ckpt` that is a folder are refused with the reason."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, OWNER_KEY: {"run_id": "a", "config_hash": "h"}}, path)
    assert resume_problem(path, "a", "h") is None
    kind, why = resume_problem(path, "b", "h")
    assert kind == "foreign" and why == "belongs to MLflow run a (config h), not to MLflow run b (config h)"
    assert resume_problem(path, "a", "other")[0] == "foreign"
    torch.save({"state_dict": {}}, path)
    assert "names no MLflow run" in resume_problem(path, "a", "h")[1]
    path.unlink()
    path.mkdir()
    assert resume_problem(path, "a", "h") == ("corrupt", "is not a file")


def test_only_the_best_checkpoint_its_state_keeps_stays_after_a_resume(tmp_path):
    for name in ("best-epoch=0.ckpt", "best-epoch=1.ckpt", "last.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    kept = tmp_path / "best-epoch=0.ckpt"
    torch.save({"callbacks": {"ModelCheckpoint{}": {"best_k_models": {str(kept): torch.tensor(0.5)},
                                                     "best_model_path": str(kept)}}}, tmp_path / "last.ckpt")
    assert kept_best(tmp_path / "last.ckpt") == {kept}
    assert prune_best(tmp_path, {kept}) == [tmp_path / "best-epoch=1.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-epoch=0.ckpt", "last.ckpt"]


# --- 7. one line for every unusable store and checkpoint ------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_unusable_store_file_is_one_line(store, damage):
    db = store.path / "mlflow.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a database\n" * 100)
    else:
        client = store.client()
        run = client.create_run(ensure_experiment(client, "smoke"))
        for step in range(200):
            client.log_metric(run.info.run_id, "x", step, step=step)
        with db.open("r+b") as f:
            f.truncate(db.stat().st_size // 2)
    result = store.run(*SMOKE)
    assert result.returncode == 2
    assert f"{db} is not a usable MLflow store" in result.stderr and "move it aside" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (store.path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", pytest.param("folder", marks=pytest.mark.slow)])
def test_a_corrupt_checkpoint_is_set_aside_and_the_run_starts_over(store, damage):
    overrides = (*SMOKE, "trainer.max_epochs=1")
    assert store.run(*overrides).returncode == 0
    (run,) = store.runs("smoke")
    client = store.client()
    client.set_terminated(run.info.run_id, "KILLED")  # as if stopped: the next launch resumes it
    last = store.path / "out" / "checkpoints" / "last.ckpt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    else:
        last.unlink()
        last.mkdir()
    result = store.run(*overrides, out="again")
    assert result.returncode == 0, result.stderr[-3000:]
    why = "cannot be read" if damage == "truncated" else "is not a file"
    assert f"warning: checkpoint {last} {why}" in result.stderr and "starts over from epoch 0" in result.stderr
    folder = last.parent
    assert len(list(folder.glob("last.ckpt.corrupt-*"))) == 1
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["best-epoch=0.ckpt", "last.ckpt"]  # no last-v1.ckpt
    torch.load(last, weights_only=True)  # the new one reads
    assert client.get_run(run.info.run_id).info.status == "FINISHED" and len(store.runs("smoke")) == 1
    assert_clean(store)

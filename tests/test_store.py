"""A store that a kill mid-write leaves with SQLite's hot journal heals on the next open, by a
writer (`run`) or a reader (`report`, export, notebooks) alike (issue 31)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, Store, kill_when
from densenet_exp.runs.store import StoreConfigError, check_store, prepare_store
from densenet_exp.runs.tracking import ensure_experiment

# Inserts junk tags in one transaction with a one-page cache, so SQLite spills changed pages into
# the database file before the commit (their originals in the journal), then waits to be killed.
WRITER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size=1")
conn.execute("BEGIN")
for i in range(3000):
    conn.execute("insert into tags (key, value, run_uuid) values (?, ?, ?)", (f"junk{i}", "x" * 500, sys.argv[2]))
print("spilled", flush=True)
time.sleep(600)
"""


def committed_run(store: Store) -> str:
    """A FINISHED run with a metric: the committed data every heal must keep."""
    client = store.client()
    run = client.create_run(ensure_experiment(client, "smoke"), tags={"kept": "yes"})
    client.log_metric(run.info.run_id, "m", 1.5)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def kill_mid_write(store: Store, run_id: str) -> Path:
    """kill -9 a writer inside its spilled transaction; returns the hot journal it leaves."""
    db = store.path / "mlflow.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db), run_id], stdout=subprocess.PIPE, text=True)
    kill_when(proc, lambda: proc.stdout.readline().strip() == "spilled", timeout=120)
    journal = Path(f"{db}-journal")
    assert journal.is_file() and journal.stat().st_size > 0
    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # what a read-only check met (the bug)
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            conn.execute("PRAGMA quick_check").fetchone()
    return journal


def assert_committed_only(store: Store, run_id: str) -> None:
    with sqlite3.connect(store.path / "mlflow.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("select count(*) from tags where key like 'junk%'").fetchone()[0] == 0
    run = store.client().get_run(run_id)
    assert run.data.tags["kept"] == "yes" and run.data.metrics == {"m": 1.5} and run.info.status == "FINISHED"


@pytest.mark.parametrize("opens", [check_store, prepare_store], ids=["reader", "writer"])
def test_a_hot_journal_is_rolled_back_by_the_next_open(store, opens):
    run_id = committed_run(store)
    journal = kill_mid_write(store, run_id)
    opens(store.uri)
    assert not journal.exists()
    assert_committed_only(store, run_id)


def test_a_store_with_a_journal_beside_it_is_never_to_be_moved(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database" * 100)
    Path(f"{db}-journal").write_bytes(b"\0" * 512)
    with pytest.raises(StoreConfigError) as err:
        check_store(f"sqlite:///{db}")
    message = str(err.value)
    assert "move it aside" not in message and "never move it apart from mlflow.db-journal" in message
    assert "\n" not in message


@pytest.mark.slow
def test_run_and_report_go_on_after_a_kill_mid_write(store):
    """The issue's reproduction: kill -9 inside a spilled transaction, then the report, then
    (after a second kill) a training run; both go on and the store holds the committed data only."""
    trained = store.run("experiment=smoke", "trainer.max_epochs=1", out="first")
    assert trained.returncode == 0, trained.stderr[-3000:]
    (first,) = store.runs()
    kill_mid_write(store, first.info.run_id)
    report = subprocess.run([sys.executable, "-m", "densenet_exp.report", "--experiment", "smoke", "--out",
                             str(store.path / "report")], cwd=ROOT, env=store.env(), capture_output=True, text=True,
                            timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "Traceback" not in report.stderr
    kill_mid_write(store, first.info.run_id)
    again = store.run("experiment=smoke", "trainer.max_epochs=1", "seed=1", out="second")
    assert again.returncode == 0, again.stderr[-3000:]
    with sqlite3.connect(store.path / "mlflow.db") as conn:
        assert conn.execute("select count(*) from tags where key like 'junk%'").fetchone()[0] == 0
    runs = [r for r in store.runs() if r.data.tags.get("report") != "true"]
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert store.client().get_run(first.info.run_id).data.metrics == first.data.metrics


def test_a_store_that_cannot_be_made_leaves_no_draft(tmp_path, monkeypatch):
    from mlflow.store.tracking import sqlalchemy_store

    def full_disk(self, uri, *args, **kwargs):
        sqlite3.connect(uri.removeprefix("sqlite:///")).execute("create table half (x)")  # what it began to write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sqlalchemy_store.SqlAlchemyStore, "__init__", full_disk)
    db = tmp_path / "mlflow.db"
    with pytest.raises(StoreConfigError, match="no MLflow store could be made at .* \\(.*No space left on device\\)"):
        prepare_store(f"sqlite:///{db}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db.lock"]

"""The portable export of an experiment's runs: what the report reads survives save and load."""

from __future__ import annotations

import gzip
import json

import pytest

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from densenet_exp import export
from densenet_exp.runs.ownership import lock_path


def make_store(path, experiment="study") -> tuple[str, str, str]:
    uri = f"sqlite:///{path / 'src.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(experiment, artifact_location=(path / "art").as_uri())
    parent = client.create_run(exp, tags={"sweep": "parent"}, run_name="sweep-x").info.run_id
    child = client.create_run(exp, tags={MLFLOW_PARENT_RUN_ID: parent, "sweep_id": parent, "variant": "<b>v</b>"},
                              run_name="v-s0").info.run_id
    client.log_param(child, "data.batch_size", "128")
    client.log_batch(child, metrics=[Metric("val/acc", 0.5 + e / 10, 1000 + e, e) for e in range(3)])
    (path / "matrices.json").write_text("[[[1.0, null]]]")
    client.log_artifact(child, str(path / "matrices.json"), "feature_reuse")
    client.set_terminated(child, "FINISHED")
    client.set_terminated(parent, "KILLED")
    return uri, parent, child


def test_saved_runs_load_into_another_store_with_links_pointing_at_the_new_ids(tmp_path):
    uri, old_parent, old_child = make_store(tmp_path)
    out = tmp_path / "runs.jsonl.gz"
    assert export.save("study", uri, out) == 2
    first = out.read_bytes()
    export.save("study", uri, out)
    assert out.read_bytes() == first  # the same runs give the same bytes
    assert gzip.decompress(first).count(b"\n") == 2

    target = f"sqlite:///{tmp_path / 'dst.db'}"
    assert export.load(out, target) == "study"
    client = MlflowClient(target)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("study").experiment_id])}
    parent, child = runs["sweep-x"], runs["v-s0"]
    assert parent.info.status == "KILLED" and child.info.status == "FINISHED"
    assert child.data.tags[MLFLOW_PARENT_RUN_ID] == child.data.tags["sweep_id"] == parent.info.run_id != old_parent
    assert child.data.tags["variant"] == "<b>v</b>" and child.data.params == {"data.batch_size": "128"}
    history = client.get_metric_history(child.info.run_id, "val/acc")
    assert [(m.step, m.timestamp, m.value) for m in history] == [(e, 1000 + e, 0.5 + e / 10) for e in range(3)]
    local = client.download_artifacts(child.info.run_id, "feature_reuse/matrices.json", str(tmp_path / "dl"))
    assert open(local).read() == "[[[1.0, null]]]"


def rewrite(path, change) -> None:
    """Apply `change` to each record of the export `path` (a crafted file)."""
    records = export.read(path)
    for entry in records:
        change(entry)
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(entry) + "\n" for entry in records))


def test_a_crafted_export_writes_nothing_outside_the_store(tmp_path, capsys):
    """Issue 23, finding 3: `export load F --experiment ../../../escaped_exp`, a file whose
    `experiment` field is `../../pwn_from_file`, or whose artifact name climbs out."""
    uri, _, _ = make_store(tmp_path)
    out = tmp_path / "runs.jsonl.gz"
    export.save("study", uri, out)
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    target = f"sqlite:///{work / 'dst.db'}"
    assert export.main(["load", str(out), "--tracking-uri", target, "--experiment", "../../../escaped_exp"]) == 2
    assert "error: --experiment='../../../escaped_exp' is invalid" in capsys.readouterr().err
    rewrite(out, lambda entry: entry.update(experiment="../../pwn_from_file"))
    assert export.main(["load", str(out), "--tracking-uri", target]) == 2
    assert f"error: the experiment field of {out}='../../pwn_from_file' is invalid" in capsys.readouterr().err
    rewrite(out, lambda entry: entry.update(experiment="study", artifacts={"../../evil.txt": "x"} if entry["artifacts"]
                                            else {}))
    assert export.main(["load", str(out), "--tracking-uri", target]) == 2
    assert "error: artifact '../../evil.txt' of run" in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*") if "escaped" in p.name or "pwn" in p.name or "evil" in p.name]


def test_a_loaded_run_is_a_record_that_no_launch_resumes(tmp_path):
    """Tags naming the trainer's processes and files are not loaded; a run RUNNING when saved is
    loaded KILLED (nothing trains it here)."""
    uri, _, child = make_store(tmp_path)
    client = MlflowClient(uri)
    lock = str(tmp_path / "elsewhere" / "checkpoints" / "owner.lock")
    client.set_tag(child, "owner_lock", lock)
    client.set_tag(child, "checkpoint_dir", str(tmp_path / "elsewhere" / "checkpoints"))
    client.update_run(child, "RUNNING")
    out = tmp_path / "runs.jsonl.gz"
    export.save("study", uri, out)
    target = f"sqlite:///{tmp_path / 'dst.db'}"
    export.load(out, target)
    dst = MlflowClient(target)
    (loaded,) = [r for r in dst.search_runs([dst.get_experiment_by_name("study").experiment_id])
                 if r.info.run_name == "v-s0"]
    assert loaded.info.status == "KILLED" and "RUNNING when saved" in loaded.data.tags["stop_reason"]
    assert "owner_lock" not in loaded.data.tags and "checkpoint_dir" not in loaded.data.tags
    assert loaded.data.tags["source_run_id"] == child
    assert lock_path(loaded) is None  # so the ownership rule never claims it


def test_loading_runs_that_are_there_already_is_refused_unless_asked(tmp_path, capsys):
    uri, _, _ = make_store(tmp_path)
    out = tmp_path / "runs.jsonl.gz"
    export.save("study", uri, out)
    target = f"sqlite:///{tmp_path / 'dst.db'}"
    client = MlflowClient(target)
    count = lambda: len(client.search_runs([client.get_experiment_by_name("study").experiment_id]))  # noqa: E731
    assert export.main(["load", str(out), "--tracking-uri", target]) == 0
    assert count() == 2
    assert export.main(["load", str(out), "--tracking-uri", target]) == 3
    assert "2 of the 2 runs of" in capsys.readouterr().err and count() == 2
    assert export.main(["load", str(out), "--tracking-uri", uri]) == 3  # back into the store it came from
    export.save("study", target, tmp_path / "again.jsonl.gz")  # a copy of the copies: still the same runs
    assert export.main(["load", str(tmp_path / "again.jsonl.gz"), "--tracking-uri", target]) == 3
    assert export.main(["load", str(out), "--tracking-uri", target, "--again"]) == 0
    assert count() == 4


def test_export_save_never_creates_a_store(tmp_path, capsys):
    missing = tmp_path / "none" / "mlflow.db"
    args = ["save", "--experiment", "study", "--tracking-uri", f"sqlite:///{missing}", "--out", str(tmp_path / "x.gz")]
    assert export.main(args) == 2
    assert f"there is no MLflow store at {missing}" in capsys.readouterr().err
    assert not missing.parent.exists()


def rewrite_second(path, change) -> None:
    """Apply `change` to the file's second record only: the first is good, as in issue 31."""
    records = export.read(path)
    change(records[1])
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(entry) + "\n" for entry in records))


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(start_time="yesterday"), "start_time of record 2 of"),
    (lambda e: e["metrics"].update({"val/acc": [[-1, 1000, 0.5]]}), "metrics['val/acc'] of record 2 of"),
    (lambda e: e["metrics"].update({"val/acc": [[0, 1000, float("inf")]]}), "metrics['val/acc'] of record 2 of"),
    (lambda e: e["params"].update({"seed": 3}), "params['seed'] of record 2 of"),
    (lambda e: e.update(status="DONE"), "status of record 2 of"),
    (lambda e: e.pop("tags"), "tags of record 2 of"),
])
def test_a_bad_record_loads_nothing_and_the_fixed_file_loads_whole(tmp_path, capsys, change, message):
    uri, _, _ = make_store(tmp_path)
    out = tmp_path / "runs.jsonl.gz"
    export.save("study", uri, out)
    good = out.read_bytes()
    rewrite_second(out, change)
    target = f"sqlite:///{tmp_path / 'dst.db'}"
    capsys.readouterr()  # MLflow's lines as it made the source store
    assert export.main(["load", str(out), "--tracking-uri", target]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "dst.db").exists()  # checked whole before the store is touched
    out.write_bytes(good)
    assert export.main(["load", str(out), "--tracking-uri", target]) == 0  # not refused as loaded already


def test_a_failed_write_leaves_no_run_behind(tmp_path, monkeypatch):
    uri, _, _ = make_store(tmp_path)
    out = tmp_path / "runs.jsonl.gz"
    export.save("study", uri, out)
    target = f"sqlite:///{tmp_path / 'dst.db'}"
    calls = []
    real = MlflowClient.set_terminated

    def full_disk(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", full_disk)
    with pytest.raises(OSError):
        export.load(out, target)
    monkeypatch.undo()
    client = MlflowClient(target)
    assert client.search_runs([client.get_experiment_by_name("study").experiment_id]) == []
    assert export.load(out, target) == "study"
    assert len(client.search_runs([client.get_experiment_by_name("study").experiment_id])) == 2


def test_a_line_longer_than_a_record_may_be_is_refused_before_it_is_read_whole(tmp_path, monkeypatch, capsys):
    uri, _, _ = make_store(tmp_path)
    out = tmp_path / "runs.jsonl.gz"
    export.save("study", uri, out)
    monkeypatch.setattr(export, "MAX_RECORD_BYTES", 100)
    capsys.readouterr()
    assert export.main(["load", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'dst.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: line 1 of {out}='101 characters' is invalid: expected a run's record of at most 100")

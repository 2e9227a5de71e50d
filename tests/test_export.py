"""The portable export of an experiment's runs: what the report reads survives save and load."""

from __future__ import annotations

import gzip

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from densenet_exp import export


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

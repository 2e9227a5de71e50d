"""The card's command end to end: sweeps, resume after SIGKILL, bad input, failing jobs and
reproducibility, each on a real slice of Fashion-MNIST against a throwaway MLflow store."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run_until
from densenet_exp.tracking import ensure_experiment

SMOKE = ("experiment=smoke", "probes=none")
PROBE_METRICS = {
    "params", "macs_per_image", "flops_per_image", "peak_memory_mb", "train_images_per_s", "infer_images_per_s",
    "epoch_time_s", "grad/early_rel_init", "grad/early_over_late_init", "epochs_to_90pct",
    "memory/train_step_mb", "memory/activations_mb",
}
REUSE_METRICS = {"reuse_early_share", "reuse_classifier_late_share", "reuse_transition_on_block_input"}


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_sweep_nests_finished_children_under_one_parent(store):
    result = store.run("experiment=smoke", "growth_rate=12,32", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = store.runs("smoke")
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(r.data.params["growth_rate"] for r in children) == ["12", "32"]
    assert sorted(r.info.run_name for r in children) == ["densenet_tiny-k12-c0.5-B-s0", "densenet_tiny-k32-c0.5-B-s0"]
    assert sorted(r.data.tags["variant"] for r in children) == ["densenet_tiny-k12-c0.5-B", "densenet_tiny-k32-c0.5-B"]
    client = store.client()
    for run in children:
        assert run.info.status == "FINISHED"
        assert 0.0 <= run.data.metrics["test/acc"] <= 1.0
        for key in ("train/loss", "train/acc", "val/loss", "val/acc", "lr"):
            assert len(metric_steps(client, run.info.run_id, key)) == 2, key  # one per epoch
        tags = run.data.tags
        assert tags["sweep_id"] == parents[0].info.run_id and tags["sweep_job"] in {"0", "1"}
        assert tags["device"] == "cpu" and tags["version.torch"] and "git_dirty" in tags
        assert "growth_rate=12,32" not in tags["overrides"] and "experiment=smoke" in tags["overrides"]
        assert [a.path for a in client.list_artifacts(run.info.run_id) if a.path == "config.yaml"]
        assert PROBE_METRICS | REUSE_METRICS <= set(run.data.metrics)  # the default probes are on
    # The summary line of each run names variant, accuracy, parameters, time and run id.
    assert result.stdout.count("test accuracy") == 2


def test_killed_run_resumes_into_the_same_mlflow_run(store):
    overrides = (*SMOKE, "trainer.max_epochs=3", "data.train_size=6144")
    ensure_experiment(store.client(), "smoke")  # create the store first: polling must not race its migration
    proc = subprocess.Popen(store.command(*overrides), cwd=ROOT, env=store.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = store.path / "out" / "checkpoints" / "last.ckpt"

    def first_epoch_done() -> bool:
        runs = store.runs("smoke")
        return ckpt.exists() and bool(runs) and bool(metric_steps(store.client(), runs[0].info.run_id, "train/loss"))

    try:
        run_until(proc, first_epoch_done)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    (killed,) = store.runs("smoke")
    assert killed.info.status == "RUNNING"

    result = store.run(*overrides, out="again")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store.runs("smoke")
    assert run.info.run_id == killed.info.run_id
    assert run.info.status == "FINISHED"
    client = store.client()
    for key in ("train/loss", "val/acc", "val/loss", "lr"):
        steps = metric_steps(client, run.info.run_id, key)
        assert len(steps) == 3 and len(set(steps)) == 3, (key, steps)
    assert "test/acc" in run.data.metrics


BAD_INPUTS = [
    ("growth_rate=0", ["growth_rate=0", "integer >= 1"]),
    ("compression=1.5", ["compression=1.5", "(0, 1]"]),
    ("bottleneck=maybe", ["bottleneck='maybe'", "true or false"]),
    ("model=nope", ["model/nope", "densenet121"]),
    ("data=nope", ["data/nope", "fashion_mnist"]),
    ("data.batch_size=0", ["data.batch_size=0", "integer >= 1"]),
    ("optim.lr=-0.1", ["optim.lr=-0.1", "> 0"]),
    ("data.root=/does/not/exist", ["data.root='/does/not/exist'", "dataset-fashion-mnist"]),
    ("model.stem=round", ["stem='round'", "imagenet, cifar"]),
    ("trainer.max_epochs=0", ["trainer.max_epochs=0", "integer >= 1"]),
]


@pytest.mark.parametrize("override,expected", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_fails_before_any_run(store, override, expected):
    result = store.run("experiment=smoke", override)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, (text, result.stderr[-2000:])
    assert "Traceback" not in result.stderr  # one clear message, not a stack trace
    assert store.all_runs() == [] if (store.path / "mlflow.db").exists() else True
    assert not (store.path / "out").exists()  # no half-written output folder either


def test_failing_job_leaves_the_others_and_exits_nonzero(store):
    # lr=1e12 drives the loss to NaN within a few steps: the harness must stop that job.
    result = store.run(*SMOKE, "optim.lr=1e12,0.05", multirun=True)
    assert result.returncode != 0
    assert "1 job(s) of the sweep failed" in result.stderr and "#0" in result.stderr
    runs = {r.data.params["optim.lr"]: r for r in store.runs("smoke") if "optim.lr" in r.data.params}
    failed, ok = runs["1000000000000.0"], runs["0.05"]
    assert failed.info.status == "FAILED" and "loss is nan" in failed.data.tags["error"]
    assert ok.info.status == "FINISHED" and "test/acc" in ok.data.metrics
    (parent,) = [r for r in store.runs("smoke") if r.data.tags.get("sweep") == "parent"]
    assert parent.info.status == "FAILED" and "#0" in parent.data.tags["failed_jobs"]


def test_same_config_and_seed_give_identical_metrics(store):
    first = store.run(*SMOKE, "seed=3", out="a")
    second = store.run(*SMOKE, "seed=3", out="b")
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-3000:]
    a, b = sorted(store.runs("smoke"), key=lambda r: r.info.start_time)
    assert a.info.run_id != b.info.run_id
    assert a.data.metrics == b.data.metrics
    assert set(a.data.metrics) >= {"train/loss", "val/acc", "test/acc"}
    assert not (PROBE_METRICS | REUSE_METRICS) & set(a.data.metrics)  # probes off: none of theirs
    client = store.client()
    assert [m.value for m in client.get_metric_history(a.info.run_id, "train/loss")] == [
        m.value for m in client.get_metric_history(b.info.run_id, "train/loss")
    ]


def test_a_different_seed_changes_the_metrics(store):
    assert store.run(*SMOKE, "seed=1", out="a").returncode == 0
    assert store.run(*SMOKE, "seed=2", out="b").returncode == 0
    a, b = store.runs("smoke")
    assert a.data.metrics["train/loss"] != b.data.metrics["train/loss"]


def test_checkpoint_is_logged_and_loads_with_weights_only(store):
    import torch

    result = store.run(*SMOKE, "trainer.max_epochs=1", "tracking.log_checkpoint=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store.runs("smoke")
    client = store.client()
    (ckpt,) = [a for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    local = client.download_artifacts(run.info.run_id, ckpt.path, str(store.path))
    state = torch.load(local, weights_only=True)
    assert any(k.startswith("model.features.denseblock1") for k in state["state_dict"])
    assert Path(run.data.tags["checkpoint_dir"], "last.ckpt").is_file()


def test_resnet_run_carries_probe_metrics_but_no_feature_reuse(store):
    result = store.run("experiment=smoke", "model=resnet20", "trainer.max_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store.runs("smoke")
    assert run.info.run_name == "resnet20-s0" and run.data.tags["variant"] == "resnet20"
    assert run.data.params["growth_rate"] == "None"
    assert PROBE_METRICS <= set(run.data.metrics) and not REUSE_METRICS & set(run.data.metrics)
    artifacts = {a.path for a in store.client().list_artifacts(run.info.run_id, "gradient_flow")}
    assert artifacts == {"gradient_flow/relative_grads.csv", "gradient_flow/relative_grads.png"}

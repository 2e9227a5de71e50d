"""The card's command end to end: sweeps, resume after SIGKILL, SIGTERM and Ctrl-C, bad input,
failing jobs and reproducibility, each on a real slice of Fashion-MNIST against a throwaway
MLflow store."""

from __future__ import annotations

import http.server
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, Store, assert_clean, kill_when, run_until
from densenet_exp.runs.checkpoints import PAUSE_ENV
from densenet_exp.runs.tracking import ensure_experiment

SMOKE = ("experiment=smoke", "probes=none")
PROBE_METRICS = {
    "params", "macs_per_image", "flops_per_image", "peak_memory_mb", "train_images_per_s", "infer_images_per_s",
    "epoch_time_s", "grad/early_rel_init", "grad/early_over_late_init", "epochs_to_90pct",
    "memory/train_step_mb", "memory/activations_mb",
}
REUSE_METRICS = {"reuse_early_share", "reuse_classifier_late_share", "reuse_transition_on_block_input"}


def metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


class Output:
    """The lines a child process prints, collected by a thread while the test watches it."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.thread.start()

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def text(self) -> str:
        self.thread.join(5)
        return "".join(self.lines)


def start(store, *overrides: str, multirun: bool = False, env: dict | None = None) -> tuple[subprocess.Popen, Output]:
    proc = subprocess.Popen(store.command(*overrides, multirun=multirun), cwd=ROOT, env={**store.env(), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, Output(proc)


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
        # Each test image's label and prediction, in order: the accuracy the run logged, again.
        local = client.download_artifacts(run.info.run_id, "predictions/test.csv", str(store.path / run.info.run_id))
        predictions = pd.read_csv(local)
        assert list(predictions.columns) == ["target", "predicted"] and len(predictions) == 256
        assert (predictions["target"] == predictions["predicted"]).mean() == pytest.approx(run.data.metrics["test/acc"])
    # The summary line of each run names variant, accuracy, parameters, time and run id.
    assert result.stdout.count("test accuracy") == 2


@pytest.mark.slow
def test_kill_between_an_epochs_metrics_and_its_checkpoint_resumes_exactly(store):
    # Smoke: 8 steps per epoch, metrics at steps 7, 15, 23. The run pauses at the start of epoch 2,
    # after every figure of epoch 1 is logged and before epoch 1's checkpoint becomes last.ckpt.
    overrides = (*SMOKE, "trainer.max_epochs=3")
    ensure_experiment(store.client(), "smoke")  # create the store first: polling must not race its migration
    proc, out = start(store, *overrides, env={PAUSE_ENV: "300@2"})
    kill_when(proc, lambda: out.has("pausing"))  # paused: what it logged is what it had at the kill
    (killed,) = store.runs("smoke")
    assert metric_steps(store.client(), killed.info.run_id, "train/loss") == [7, 15]  # inside the window
    assert killed.info.status == "RUNNING"

    result = store.run(*overrides, out="again")  # resumes from epoch 0's checkpoint, redoes epoch 1
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store.runs("smoke")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    client = store.client()
    for key in ("train/loss", "train/acc", "val/acc", "val/loss", "lr"):
        assert metric_steps(client, run.info.run_id, key) == [7, 15, 23], key
    assert "test/acc" in run.data.metrics
    # Epoch 1's best checkpoint, written before the kill, is not left beside the newer one (issue 23).
    assert len(list((store.path / "out" / "checkpoints").glob("best-*.ckpt"))) == 1
    assert_clean(store)
    # Exact: the same figures as a run that was never interrupted.
    reference = store.run(*overrides, "tracking.experiment=reference", out="reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    (ref,) = store.runs("reference")
    for key in ("train/loss", "val/acc", "test/acc"):
        assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)] == [
            m.value for m in sorted(client.get_metric_history(ref.info.run_id, key), key=lambda m: m.step)], key


def test_sigterm_exits_143_with_the_run_killed_and_the_same_command_resumes_it(store):
    overrides = (*SMOKE, "trainer.max_epochs=3")
    ensure_experiment(store.client(), "smoke")
    proc, out = start(store, *overrides, env={PAUSE_ENV: "300@2"})  # a pause that a stop ends
    try:
        run_until(proc, lambda: out.has("pausing"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 143
    finally:
        proc.kill()
    (killed,) = store.runs("smoke")
    assert killed.info.status == "KILLED"
    # At the next step: the first of epoch 2 (8 steps per epoch).
    assert killed.data.tags["stop_reason"].startswith("stopped by SIGTERM at epoch 2, step 17")
    assert "resume it with: python -m densenet_exp.run experiment=smoke" in out.text()
    assert_clean(store)

    result = store.run(*overrides, out="again")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = store.runs("smoke")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert "stop_reason" not in run.data.tags and "SIGTERM" in run.data.tags["resumed_after"]
    assert metric_steps(store.client(), run.info.run_id, "val/acc") == [7, 15, 23]
    assert_clean(store)


@pytest.mark.slow
@pytest.mark.parametrize("signum,extra", [(signal.SIGTERM, ()), (signal.SIGKILL, ("data.val_size=0",))],
                         ids=["sigterm", "kill-9-without-validation"])
def test_a_run_stopped_during_its_test_resumes_straight_into_the_test(store, signum, extra):
    """Issue 23, finding 1: SIGTERM (SLURM's preemption) or kill -9 0.3 s after `Trainer.fit`
    stopped, while the test runs; the same command tests the final weights (last.ckpt of the last
    epoch) and finishes the run, each (metric, step) once."""
    overrides = (*SMOKE, *extra)
    ensure_experiment(store.client(), "smoke")
    proc, out = start(store, *overrides, env={PAUSE_ENV: "300@test"})  # the test lasts until the signal
    try:
        # Inside the test, after its first batch: `Trainer.fit` has stopped (Lightning says so in
        # run.log only, as it leaves the console to the harness's own lines).
        run_until(proc, lambda: out.has("pausing"), timeout=1800)
        assert out.has("pausing 300 s in the test")  # not a timeout: the moment the issue names
        time.sleep(0.3)
        proc.send_signal(signum)
        assert proc.wait(120) == (143 if signum == signal.SIGTERM else -signal.SIGKILL)
    finally:
        proc.kill()
    (stopped,) = store.runs("smoke")
    assert stopped.info.status == ("KILLED" if signum == signal.SIGTERM else "RUNNING")
    assert "test/acc" not in stopped.data.metrics

    result = store.run(*overrides)  # the command it printed
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (run,) = store.runs("smoke")
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    client = store.client()
    for key in ("train/loss", "lr", *(() if extra else ("val/acc",))):
        assert metric_steps(client, run.info.run_id, key) == [7, 15], key  # not trained again
    assert metric_steps(client, run.info.run_id, "test/acc") == [16]
    assert len(list((store.path / "out" / "checkpoints").glob("best-*.ckpt"))) == (0 if extra else 1)
    assert_clean(store)
    if signum == signal.SIGTERM:  # the test of the final weights, as if never stopped
        reference = store.run(*overrides, "tracking.experiment=reference", out="reference")
        assert reference.returncode == 0, reference.stderr[-3000:]
        (ref,) = store.runs("reference")
        assert run.data.metrics["test/acc"] == ref.data.metrics["test/acc"]


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_at_the_next_step_and_the_rerun_finishes_it(store):
    overrides = (*SMOKE, "seed=0,1")  # 8 steps per epoch
    ensure_experiment(store.client(), "smoke")
    proc, out = start(store, *overrides, multirun=True, env={PAUSE_ENV: "300@1"})
    try:
        run_until(proc, lambda: out.has("pausing"))  # job #0, start of epoch 1
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
        print(f"SIGINT to exit: {time.monotonic() - sent:.1f} s")  # timings on a shared machine: report only
    finally:
        proc.kill()
    assert code == 130, out.text()[-3000:]
    runs = store.runs("smoke")
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    (child,) = [r for r in runs if r.data.tags.get("sweep") != "parent"]  # job #1 never started
    assert child.info.status == "KILLED"
    assert child.data.tags["stop_reason"].startswith("stopped by SIGINT (Ctrl-C) at epoch 1, step 9")
    assert parent.info.status == "KILLED" and "stopped by SIGINT" in parent.data.tags["stop_reason"]
    assert "resume it with: python -m densenet_exp.run -m experiment=smoke" in out.text()
    assert_clean(store)

    result = store.run(*overrides, multirun=True, out="again")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = store.runs("smoke")
    (new_parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent" and r.info.run_id != parent.info.run_id]
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert new_parent.info.status == "FINISHED" and len(children) == 2
    assert all(r.info.status == "FINISHED" and r.data.tags["sweep_id"] == new_parent.info.run_id for r in children)
    assert child.info.run_id in {r.info.run_id for r in children}  # resumed, not started anew
    assert_clean(store)


def test_the_training_step_never_waits_on_the_device(monkeypatch):
    """The NaN check must not read the loss on the host every step (a GPU sync); counted here on
    a CPU by wrapping every Tensor method that hands a value to Python."""
    import lightning as L
    import torch

    from densenet_exp.training.classifier import ImageClassifier

    reads: list[str] = []
    inside = [False]
    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if inside[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    module = ImageClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10)), num_classes=10,
                             optim={"name": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False,
                                    "weight_decay": 0.0, "scheduler": "constant"})
    step = module.training_step

    def watched(*args, **kwargs):
        inside[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(module, "training_step", watched)
    x, y = torch.randn(160, 1, 4, 4), torch.randint(0, 10, (160,))
    x[100] = float("nan")  # batch 12 of 20 (steps 0..19) makes the loss NaN
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    with pytest.raises(FloatingPointError, match="training loss is nan at epoch 0, step 12"):
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))
    assert trainer.global_step == 20  # the check ran at the epoch's last batch, not at each step
    assert reads == []


def test_an_error_after_a_stop_signal_counts_as_the_stop(monkeypatch):
    """SLURM signals every process of a job at its time limit, a C++ compiler that torch.compile
    started included: the error that follows is the stop, and the run is KILLED, not FAILED."""
    from densenet_exp.runs import stopping

    monkeypatch.setattr(stopping, "_received", None)
    assert stopping.as_stopped(RuntimeError("C++ compile error")) is None
    monkeypatch.setattr(stopping, "_received", signal.SIGTERM)
    stopped = stopping.as_stopped(RuntimeError("C++ compile error"))
    assert stopped.code == 143 and stopped.reason == "stopped by SIGTERM"


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
    ("tracking.experiment=../../../escaped", ["tracking.experiment='../../../escaped'", "names a folder"]),
    ("tracking.experiment=", ["tracking.experiment=''", "letters, digits"]),
    ("+foo=1", ["+foo=1", "nothing reads key 'foo'"]),
    ("data.batch_size=512", ["data.batch_size=512", "at most the training set's size (256 images)"]),
    ("tracking.uri=bogus://x", ["tracking.uri='bogus://x'", "sqlite:///PATH"]),
    ("tracking.uri=sqlite:////dev/null/x/mlflow.db", ["/dev/null is not a folder", "writable folder"]),
    ("tracking.heartbeat_s=inf", ["tracking.heartbeat_s=inf", "seconds > 0 and at most"]),
]


@pytest.mark.parametrize("override,expected", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_fails_before_any_run(store, override, expected):
    code, stderr = store.run_here("experiment=smoke", override)  # the command line, in this process
    assert code != 0
    for text in expected:
        assert text in stderr, (text, stderr[-2000:])
    assert "Traceback" not in stderr  # one clear message, not a stack trace
    assert store.all_runs() == [] if (store.path / "mlflow.db").exists() else True
    assert not (store.path / "out").exists()  # no half-written output folder either


@pytest.mark.parametrize("override", ["growth_rate=0", "tracking.uri=bogus://x"])
def test_bad_input_as_a_process_is_one_line_and_exit_code_2(store, override):
    result = store.run("experiment=smoke", override)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {override.split('=')[0]}="), result.stderr[-2000:]
    assert store.all_runs() == [] if (store.path / "mlflow.db").exists() else True
    assert not (store.path / "out").exists()


def test_an_output_folder_that_cannot_be_created_is_one_line(new_store):
    store = new_store
    command = [*store.command("experiment=smoke"), "hydra.run.dir=/dev/null/out"]  # the last one wins
    result = subprocess.run(command, cwd=ROOT, env=store.env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "error: hydra.run.dir='/dev/null/out' cannot be created: /dev/null is not a writable folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (store.path / "mlflow.db").exists()  # stopped before the store was touched


def test_a_tracking_uri_that_answers_http_but_is_not_mlflow_is_one_line(store):
    """Issue 23, finding 6: a plain web server (`python -m http.server`) at tracking.uri."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the server's request lines would join the command's stderr
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, stderr = store.run_here("experiment=smoke", f"tracking.uri={uri}")
    finally:
        server.shutdown()
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: tracking.uri='{uri}' does not answer as an MLflow"), stderr
    assert not (store.path / "out").exists()


def test_help_piped_into_a_reader_that_stops_early_prints_no_error(tmp_path):
    """Issue 23, finding 6: `run --help | head` (here `| true`, which reads nothing)."""
    errors = tmp_path / "stderr.txt"
    subprocess.run(f"{shlex.quote(sys.executable)} -m densenet_exp.run --help 2>{errors} | true", shell=True,
                   cwd=ROOT, timeout=120, check=True)
    assert errors.read_text() == ""


def test_failing_job_leaves_the_others_and_exits_nonzero(store):
    # lr=1e12 drives the loss to NaN within a few steps: the harness must stop that job.
    result = store.run(*SMOKE, "optim.lr=1e12,0.05", multirun=True)
    assert result.returncode != 0
    # Named as the sweep's table numbers it, by the knob the sweep varies, with its reason.
    line = "job 1/2 [optim.lr=1000000000000.0] failed: FloatingPointError: training loss is nan"
    assert f"1 job(s) of the sweep failed:\n  {line}" in result.stderr, result.stderr[-3000:]
    runs = {r.data.params["optim.lr"]: r for r in store.runs("smoke") if "optim.lr" in r.data.params}
    failed, ok = runs["1000000000000.0"], runs["0.05"]
    assert failed.info.status == "FAILED" and "loss is nan" in failed.data.tags["error"]
    assert ok.info.status == "FINISHED" and "test/acc" in ok.data.metrics
    (parent,) = [r for r in store.runs("smoke") if r.data.tags.get("sweep") == "parent"]
    assert parent.info.status == "FAILED" and parent.data.tags["failed_jobs"].startswith(line)


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory) -> tuple[Store, dict[str, object]]:
    """Three smoke runs in one store, probes off, checkpoints logged: seed 3 twice, seed 4 once. Seeds
    3 (a) and 4 (c) are the two jobs of one sweep (one start-up of torch, Lightning and MLflow for
    both); b is seed 3 again, a run of its own in a new process."""
    store = Store(tmp_path_factory.mktemp("seeded"))
    result = store.run(*SMOKE, "seed=3,4", "tracking.log_checkpoint=true", multirun=True, out="ac")
    assert result.returncode == 0, result.stderr[-3000:]
    result = store.run(*SMOKE, "seed=3", "tracking.log_checkpoint=true", out="b")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((r for r in store.runs("smoke") if r.data.tags.get("sweep") != "parent"),
                  key=lambda r: r.info.start_time)  # a, c (the sweep's jobs), then b
    assert [r.data.params["seed"] for r in runs] == ["3", "4", "3"]
    return store, dict(zip("acb", runs))


def test_same_config_and_seed_give_identical_metrics(seeded_runs):
    store, runs = seeded_runs
    a, b = runs["a"], runs["b"]
    assert a.info.run_id != b.info.run_id
    assert a.data.metrics == b.data.metrics
    assert set(a.data.metrics) >= {"train/loss", "val/acc", "test/acc"}
    assert not (PROBE_METRICS | REUSE_METRICS) & set(a.data.metrics)  # probes off: none of theirs
    client = store.client()
    assert [m.value for m in client.get_metric_history(a.info.run_id, "train/loss")] == [
        m.value for m in client.get_metric_history(b.info.run_id, "train/loss")
    ]


def test_a_different_seed_changes_the_metrics(seeded_runs):
    _, runs = seeded_runs
    assert runs["a"].data.params["seed"] == "3" and runs["c"].data.params["seed"] == "4"
    assert runs["a"].data.metrics["train/loss"] != runs["c"].data.metrics["train/loss"]


def test_checkpoint_is_logged_and_loads_with_weights_only(seeded_runs):
    import torch

    store, runs = seeded_runs
    run = runs["a"]
    client = store.client()
    (ckpt,) = [a for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    local = client.download_artifacts(run.info.run_id, ckpt.path, str(store.path))
    state = torch.load(local, weights_only=True)
    assert any(k.startswith("model.features.denseblock1") for k in state["state_dict"])
    assert Path(run.data.tags["checkpoint_dir"], "last.ckpt").is_file()


def test_resnet_run_carries_probe_metrics_but_no_feature_reuse(tiny_sweep):
    (run,) = [r for r in tiny_sweep.runs("smoke")
              if r.data.params.get("model.arch") == "resnet_cifar" and r.data.params.get("seed") == "0"]
    store = tiny_sweep
    assert run.info.run_name == "resnet20-s0" and run.data.tags["variant"] == "resnet20"
    assert run.data.params["growth_rate"] == "None"
    assert PROBE_METRICS <= set(run.data.metrics) and not REUSE_METRICS & set(run.data.metrics)
    artifacts = {a.path for a in store.client().list_artifacts(run.info.run_id, "gradient_flow")}
    assert artifacts == {"gradient_flow/relative_grads.csv", "gradient_flow/relative_grads.png"}

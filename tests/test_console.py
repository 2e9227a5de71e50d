"""What a researcher sees: the block before training, progress over the whole run, the table
that closes a sweep, run names that tell seeds and swept knobs apart, and Hydra's run.log."""

from __future__ import annotations

import re
from types import SimpleNamespace

from hydra.types import RunMode
from omegaconf import OmegaConf

from densenet_exp.runs.console import job_label, swept_labels
from densenet_exp.runs.sweep_folder import SweepPlan
from densenet_exp.job import run_name, variant_name


def multirun_config(params: dict, task: list[str], **sweeper) -> object:
    return OmegaConf.create({"hydra": {"sweeper": {"params": params, **sweeper}, "overrides": {"task": task}}})


def test_sweep_plan_counts_jobs_and_finds_the_varying_knobs():
    task = ["experiment=smoke", "growth_rate=12,32", "optim.lr=0.1,0.05"]
    plan = SweepPlan.of(multirun_config({"seed": "0,1,2"}, task))
    assert plan == SweepPlan(12, ("seed", "growth_rate", "optim.lr"))
    # A value on the command line fixes a key the preset sweeps, as in Hydra's BasicSweeper.
    assert SweepPlan.of(multirun_config({"seed": "0,1,2"}, ["seed=4"])) == SweepPlan(1, ())
    # Optuna: as many jobs as trials; the searched keys vary.
    optuna = SweepPlan.of(multirun_config({"optim.lr": "tag(log, interval(0.01, 0.5))"}, [], n_trials=7))
    assert optuna == SweepPlan(7, ("optim.lr",))


def test_run_names_carry_the_swept_knobs_and_the_seed(tmp_path):
    SweepPlan(8, ("growth_rate", "optim.lr", "seed", "optim")).write(tmp_path)
    cfg = {"model": {"name": "densenet_tiny", "arch": "densenet_cifar"}, "growth_rate": 12, "compression": 0.5,
           "bottleneck": True}

    def job(num: int, seed: int, lr: str) -> SimpleNamespace:
        return SimpleNamespace(
            mode=RunMode.MULTIRUN, sweep=SimpleNamespace(dir=str(tmp_path)), job=SimpleNamespace(num=num),
            overrides=SimpleNamespace(task=["experiment=smoke", "growth_rate=12", f"optim.lr={lr}", f"seed={seed}",
                                            "optim=adam"]),
            runtime=SimpleNamespace(choices={"optim": "adam", "model": "densenet_tiny"}),
        )

    names = set()
    for num, (seed, lr) in enumerate([(0, "0.05"), (1, "0.05"), (0, "0.012345678")]):
        hc = job(num, seed, lr)
        variant = variant_name(cfg, swept_labels(hc))
        names.add(run_name(variant, {**cfg, "seed": seed}))
        assert job_label(hc) == f"job {num + 1}/8"
    # k is in the variant already; lr and the optimizer group are labelled; each seed is its own run.
    assert names == {"densenet_tiny-k12-c0.5-B-lr0.05-adam-s0", "densenet_tiny-k12-c0.5-B-lr0.05-adam-s1",
                     "densenet_tiny-k12-c0.5-B-lr0.0123-adam-s0"}
    single = SimpleNamespace(mode=RunMode.RUN)
    assert swept_labels(single) == [] and job_label(single) == ""


def test_sweep_says_what_runs_and_ends_with_a_table_of_its_jobs(store):
    result = store.run("experiment=smoke", "probes=none", "seed=0,1", "trainer.max_epochs=1",
                       "trainer.enable_progress_bar=true", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    runs = store.runs("smoke")
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = sorted((r for r in runs if r.data.tags.get("sweep_id")), key=lambda r: r.data.tags["seed"])

    # Run names differ across seeds; the variant groups them.
    assert [r.info.run_name for r in children] == ["densenet_tiny-k4-c0.5-B-s0", "densenet_tiny-k4-c0.5-B-s1"]
    assert {r.data.tags["variant"] for r in children} == {"densenet_tiny-k4-c0.5-B"}

    # Before training, each job says what will run.
    for j, run in enumerate(children, start=1):
        assert f"job {j}/2: densenet_tiny-k4-c0.5-B-s{j - 1}: MLflow run {run.info.run_id}" in out
    for line in ("  model      densenet_tiny (densenet, k=4, compression 0.5, bottleneck on), 0.005M parameters",
                 "  input      1x28x28, 10 classes",
                 "  data       fashion_mnist: 256 train, 128 val, 256 test images; batch 32",
                 "  training   1 epoch x 8 steps, sgd lr 0.05; probes: none"):
        assert out.count(line) == 2, (line, out[-4000:])
    # trainer=auto: bf16 autocast where the CPU has it natively, else fp32.
    assert re.search(r"  device     cpu, \d+ CPU threads; precision (32-true|bf16-mixed)", out)

    # Progress into a pipe: no bar even when asked for one (it would be carriage returns and escape
    # codes), one line per epoch labelled with job and epoch; no v_num, no "0/?".
    assert "\r" not in out and "\x1b[" not in out and "100%" not in out
    assert "v_num" not in out and "0/?" not in out
    assert out.count("job 1/2 epoch 1/1: train loss") == 1 and out.count("job 2/2 epoch 1/1: train loss") == 1

    # The closing table: one row per job with its status, test and validation accuracy, the parent run id,
    # and the report command for this sweep.
    table = out[out.index("\nSweep "):]
    for j, run in enumerate(children, start=1):
        row = (rf"\n\s+{j}\s+densenet_tiny-k4-c0.5-B\s+{j - 1}\s+FINISHED\s+{run.data.metrics['test/acc']:.4f}"
               rf"\s+{run.data.metrics['val/acc']:.4f}\s+\d")
        assert re.search(row, table), table
    assert f"Parent run: {parent.info.run_id}" in table
    assert f"Report: python -m densenet_exp.report --experiment smoke --sweep {parent.info.run_id}" in table

    # Hydra's per-job run.log keeps the harness's lines, time-stamped.
    for j, run in enumerate(children):
        log = (store.path / "out" / str(j) / "run.log").read_text()
        assert f"MLflow run {run.info.run_id}" in log and "  model      densenet_tiny" in log
        assert "epoch 1/1: train loss" in log and "test accuracy" in log


def test_closing_table_marks_skipped_and_failed_jobs(store, tmp_path):
    """A rerun sweep: job 1 trained, job 2 skipped (its config FINISHED in an earlier sweep), job 3
    failed before it had a run. The report command then covers the whole experiment."""
    from densenet_exp.runs.console import sweep_summary
    from densenet_exp.runs.sweep_folder import JOBS_DIR, record_failed_job, record_job
    from densenet_exp.runs.tracking import ensure_experiment

    client = store.client()
    experiment_id = ensure_experiment(client, "smoke")
    parent = client.create_run(experiment_id, tags={"sweep": "parent"}).info.run_id
    runs = {}
    # An image folder without test/ logs validation accuracy alone ("earlier").
    for name, sweep_id, metric, acc in (("trained", parent, "test/acc", 0.5), ("earlier", "0ld", "val/acc", 0.25)):
        tags = {"variant": f"v-{name}", "seed": "3", "sweep_id": sweep_id}
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        client.log_metric(run_id, metric, acc)
        runs[name] = run_id
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / JOBS_DIR).mkdir(parents=True)
    for num, (name, skipped) in enumerate((("trained", False), ("earlier", True))):
        hc = SimpleNamespace(mode=RunMode.MULTIRUN, sweep=SimpleNamespace(dir=str(sweep_dir)),
                             job=SimpleNamespace(num=num))
        record_job(hc, runs[name], skipped=skipped)
        client.set_terminated(runs[name], "FINISHED")
    record_failed_job(sweep_dir, 2, "job 3/3 [data.batch_size=0]", ValueError("data.batch_size=0 is invalid"))
    config = OmegaConf.create({"tracking": {"experiment": "smoke", "uri": None}})

    table = sweep_summary(client, parent, sweep_dir, config)
    assert re.search(r"\s+test acc\s+val acc\s+wall time\n", table), table
    assert re.search(r"\n\s+1\s+v-trained\s+3\s+FINISHED\s+0\.5000\s+-\s+\d", table), table
    assert re.search(r"\n\s+2\s+v-earlier\s+3\s+SKIPPED \(done before\)\s+-\s+0\.2500\s+-", table), table
    assert re.search(r"\n\s+3\s+-\s+-\s+FAILED", table), table
    assert f"Parent run: {parent}" in table
    assert "Report: python -m densenet_exp.report --experiment smoke\n" in table + "\n"  # no --sweep: runs predate it


def test_the_failure_list_names_each_job_as_the_table_does_with_the_reason_a_clean_up_error_hid(tmp_path):
    """Issue 37: the console said `job #1` where the table said 2, and Lightning's clean-up error
    ("Please call iter(combined_loader) first") hid why the job failed."""
    from densenet_exp.runs.console import job_title
    from densenet_exp.runs.sweep import SweepParentRun
    from densenet_exp.runs.sweep_folder import record_failed_job

    SweepPlan(8, ("seed",)).write(tmp_path)
    hc = SimpleNamespace(mode=RunMode.MULTIRUN, sweep=SimpleNamespace(dir=str(tmp_path)), job=SimpleNamespace(num=1),
                         overrides=SimpleNamespace(task=["data=imagefolder", "data.root=/pets", "seed=1"]))
    try:
        try:
            raise AttributeError("'Process' object has no attribute 'env'")
        except AttributeError:
            raise RuntimeError("Please call `iter(combined_loader)` first.\nmore")  # noqa: B904 (as Lightning does)
    except RuntimeError as err:
        hidden = err
    line = record_failed_job(tmp_path, 1, job_title(hc), hidden)
    assert line == ("job 2/8 [seed=1] failed: AttributeError: 'Process' object has no attribute 'env' (then, while "
                    "handling it, RuntimeError: Please call `iter(combined_loader)` first.)")
    try:
        raise ValueError("data.batch_size=0 is invalid") from KeyError("batch")  # translated on purpose: the reason
    except ValueError as err:
        translated = err
    hc.job.num = 0
    record_failed_job(tmp_path, 0, job_title(hc), translated)
    sweep = SweepParentRun()
    sweep.sweep_dir = tmp_path
    assert sweep._failures() == ["job 1/8 [seed=1] failed: ValueError: data.batch_size=0 is invalid", line]
    (tmp_path / "sweep_plan.json").unlink()  # a plan unknown: every override names the job
    assert job_title(hc) == "job 1 [data=imagefolder data.root=/pets seed=1]"


def test_a_sweep_whose_jobs_logged_no_run_of_their_own_leaves_no_parent(store, tmp_path, capsys):
    """A rerun of a finished sweep skips every job: its parent would be an empty run in the table."""
    import signal

    from conftest import ROOT
    from densenet_exp.runs.sweep import SweepParentRun

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # the sweep installs its own
    config = OmegaConf.load(ROOT / "conf" / "config.yaml")
    config.tracking.uri, config.tracking.experiment = store.uri, "smoke"
    client = store.client()
    try:
        for name in ("skipped_all", "trained_one"):
            config.hydra = {"runtime": {"cwd": str(ROOT)}, "sweep": {"dir": str(tmp_path / name)},
                            "overrides": {"task": []}, "sweeper": {"params": {}}}
            sweep = SweepParentRun()
            sweep.on_multirun_start(config)
            if name == "trained_one":
                run = client.create_run(client.get_run(sweep.run_id).info.experiment_id,
                                        tags={"sweep_id": sweep.run_id})
                client.set_terminated(run.info.run_id, "FINISHED")
            sweep.on_multirun_end(config)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    parents = [r for r in store.runs("smoke") if r.data.tags.get("sweep") == "parent"]
    assert [p.data.tags["sweep_dir"] for p in parents] == [str(tmp_path / "trained_one")]
    out = capsys.readouterr().out
    assert "parent run" in out and "was removed" in out and out.count("Parent run: ") == 1


def test_piped_progress_says_what_trains_early_then_each_minute_with_its_own_loss_and_the_current_rate(caplog):
    """Issue 37: piped output (a SLURM .out) got its first line after 5 minutes, repeated the
    previous epoch's loss, and an ETA from the run's average rate on a machine that had slowed."""
    import logging

    import torch

    from densenet_exp.training.progress import JobReport

    now = [0.0]
    job = JobReport({}, "job 1/3", "run", {}, later_jobs=2, lines_within_epoch=True, name="net-s0",
                    clock=lambda: now[0])
    trainer = SimpleNamespace(is_global_zero=True, num_training_batches=100, current_epoch=0, max_epochs=2,
                              sanity_checking=False, callback_metrics={"train/loss": torch.tensor(9.0)})
    job.started = job.last_line = 0.0  # on_train_start, without the block before it

    def steps(first: int, count: int, seconds: float, loss: float) -> None:
        for idx in range(first, first + count):
            now[0] += seconds
            job.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, idx)

    with caplog.at_level(logging.INFO, logger="densenet_exp"):
        job.on_train_epoch_start(trainer, None)
        steps(0, 1, 5.0, 3.0)  # the first step: warm-up, not timed
        steps(1, 14, 1.0, 2.0)  # 19 s: no line yet
        assert caplog.messages == []
        steps(15, 1, 1.0, 2.0)  # 20 s
        (first,) = caplog.messages
        # The loss of steps 1-16, the rate of steps 2-16; 184 steps left at 1 s, two later runs of 200 s.
        assert first == ("job 1/3 training net-s0: epoch 1/2, step 16/100, train loss 2.0625 (steps 1-16); first "
                         "steps 1 s each, about 1 min 40 s an epoch (20.0 s so far, about 3 min 04 s left; sweep "
                         "about 9 min 44 s left)")
        steps(16, 19, 3.0, 1.0)  # the machine slows to 3 s a step: 77 s, no line within the minute
        assert len(caplog.messages) == 1
        steps(35, 1, 3.0, 1.0)  # 80 s: a minute after the first line
        assert caplog.messages[-1] == ("job 1/3 epoch 1/2, step 36/100, train loss 1.0000 (steps 17-36); 3 s a step "
                                       "(1 min 20 s so far, about 8 min 12 s left; sweep about 28 min 12 s left)")
        steps(36, 64, 3.0, 1.0)  # the epoch's last step, then 10 s of validation
        job.on_validation_start(trainer, None)
        now[0] += 10.0
        job.on_validation_end(trainer, None)
        trainer.callback_metrics = {"train/loss": torch.tensor(1.5)}
        job.on_train_epoch_end(trainer, None)
        assert caplog.messages[-1].startswith("job 1/3 epoch 1/2: train loss 1.5000 (")
        trainer.current_epoch = 1
        job.on_train_epoch_start(trainer, None)
        steps(0, 20, 3.0, 0.5)
        # Its own steps' loss, not the last epoch's 1.5; 80 steps at 3 s and one validation left.
        assert caplog.messages[-1].startswith("job 1/3 epoch 2/2, step 20/100, train loss 0.5000 (steps 1-20); 3 s a "
                                              "step (") and "about 4 min 10 s left" in caplog.messages[-1]
    # A line at least every minute: at 20, 80, 140, 200 and 260 s, the epoch's end (282 s), 342 s.
    assert len(caplog.messages) == 7


def test_mlflow_ui_gives_every_experiment_its_view_of_training_runs_and_opens_the_latest(store):
    """Issue 37: the saved column view was set on one experiment only, and report runs were listed
    among training runs."""
    import importlib.machinery
    import importlib.util
    import json

    from conftest import ROOT

    loader = importlib.machinery.SourceFileLoader("mlflow_ui", str(ROOT / "tools" / "mlflow-ui"))
    ui = importlib.util.module_from_spec(importlib.util.spec_from_loader("mlflow_ui", loader))
    loader.exec_module(ui)
    client = store.client()
    first, second = (client.create_experiment(name) for name in ("smoke", "imagefolder-pets"))
    client.create_run(first, start_time=1000, tags={"variant": "densenet_tiny-k4"})
    trained = client.create_run(second, start_time=2000, tags={"variant": "resnet20"}).info.run_id
    client.create_run(first, start_time=3000, tags={"report": "true"})  # the latest run, not a training run
    url, name = ui.runs_table_url(store.uri, None, 5000)
    assert name == "imagefolder-pets" and url.endswith(f"#/experiments/{second}/runs?viewStateShareKey={ui.VIEW}")
    key = f"mlflow.sharedViewState.{ui.VIEW}"
    for experiment in (first, second):
        state = json.loads(json.loads(client.get_experiment(experiment).tags[key])["state"])
        assert state["searchFilter"] == ui.TRAINING_RUNS and state["selectedColumns"] == ui.COLUMNS
    # The view's filter, as the UI runs it: training runs only.
    client.create_run(second, tags={"report": "true"})
    assert [r.info.run_id for r in client.search_runs([second], ui.TRAINING_RUNS)] == [trained]
    # A view the UI saved over (updatedAt moved on) is left as it is.
    saved = json.dumps({"name": ui.VIEW, "createdAt": 1, "updatedAt": 2, "state": json.dumps({"searchFilter": ""})})
    client.set_experiment_tag(first, key, saved)
    ui.runs_table_url(store.uri, "smoke", 5000)
    assert client.get_experiment(first).tags[key] == saved


def test_a_jobs_console_keeps_third_party_warnings_and_tips_for_run_log():
    """Issue 37: with cpu_parallel a quarter of the console was Lightning's and alembic's notices."""
    import logging
    import subprocess
    import sys

    from conftest import ROOT
    from densenet_exp.runs.logs import HarnessOnly, LauncherConsole

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "text", None, None)

    job, launcher = HarnessOnly(), LauncherConsole()
    for name in ("densenet_exp", "densenet_exp.search"):
        assert job.filter(record(name, logging.INFO))
    for name, level in (("lightning.pytorch.utilities.rank_zero", logging.INFO), ("alembic.runtime.migration",
                        logging.INFO), ("py.warnings", logging.WARNING), ("hydra_plugins.hydra_joblib_launcher",
                        logging.INFO)):
        assert not job.filter(record(name, level)), name
    assert job.filter(record("mlflow", logging.ERROR))
    assert launcher.filter(record("py.warnings", logging.WARNING))  # no run.log keeps the launcher's
    # run.py turns Python warnings (Lightning's UserWarnings) into records of py.warnings.
    code = ("import logging, sys, warnings\nimport densenet_exp.run\n"
            "handler = logging.StreamHandler(sys.stdout)\nhandler.setFormatter(logging.Formatter('%(name)s: %(message)s'))\n"
            "logging.getLogger('py.warnings').addHandler(handler)\n"
            "warnings.warn('The `srun` command is available on your system but is not used', UserWarning)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("py.warnings: ") and "srun" in result.stdout and "srun" not in result.stderr

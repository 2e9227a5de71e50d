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

    # The closing table: one row per job with its status and test accuracy, the parent run id,
    # and the report command for this sweep.
    table = out[out.index("\nSweep "):]
    for j, run in enumerate(children, start=1):
        row = rf"\n\s+{j}\s+densenet_tiny-k4-c0.5-B\s+{j - 1}\s+FINISHED\s+{run.data.metrics['test/acc']:.4f}\s+\d"
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
    for name, sweep_id, acc in (("trained", parent, 0.5), ("earlier", "0ld", 0.25)):
        tags = {"variant": f"v-{name}", "seed": "3", "sweep_id": sweep_id}
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        client.log_metric(run_id, "test/acc", acc)
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
    assert re.search(r"\n\s+1\s+v-trained\s+3\s+FINISHED\s+0\.5000\s+\d", table), table
    assert re.search(r"\n\s+2\s+v-earlier\s+3\s+SKIPPED \(done before\)\s+0\.2500\s+-", table), table
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


def test_without_a_progress_bar_a_long_epoch_logs_a_line_with_the_time_left(caplog):
    import logging

    from densenet_exp.training.progress import JobReport

    job = JobReport({}, "job 2/4", "run", {}, later_jobs=2, lines_within_epoch=True, every_s=0)
    job.started = job.last_line = 0.0
    trainer = SimpleNamespace(is_global_zero=True, num_training_batches=10, current_epoch=0, max_epochs=2,
                              callback_metrics={"train/loss": 1.5})
    with caplog.at_level(logging.INFO, logger="densenet_exp"):
        job.on_train_batch_end(trainer, None, None, None, 4)  # 5 of 20 steps done
    (line,) = caplog.messages
    assert line.startswith("job 2/4 epoch 1/2, step 5/10, train loss 1.5000 (")
    assert "so far, about" in line and "; sweep about" in line
    # 5 of 20 steps in t: 3t left here, 4t for each of the two jobs after it.
    assert job.timing(10.0, 5, 20) == "10.0 s so far, about 30.0 s left; sweep about 1 min 50 s left"

"""Scale-out on real engines: parallel sweeps (joblib), submitit's local launcher, DDP on CPU
(in-memory and ImageFolder data), and sweeps that resume by skipping finished configurations."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from conftest import ROOT, assert_clean, kill_when
from densenet_exp.training.data import ImageDataModule
from densenet_exp.analysis.results import load_runs
from densenet_exp.runs.tracking import ensure_experiment

SMOKE = ("experiment=smoke", "probes=none")


def children(store):
    return [r for r in store.runs("smoke") if "mlflow.parentRunId" in r.data.tags]


def test_parallel_joblib_sweep_loses_nothing_in_one_sqlite_store(store):
    result = store.run(*SMOKE, "seed=0,1,2,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = children(store)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2", "3"]
    client = store.client()
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags.get("stop_reason")
        assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
        assert {"test/acc", "train/loss", "lr"} <= set(run.data.metrics)
    assert "locked" not in result.stderr


def test_a_slurm_job_takes_as_many_torch_threads_as_cores_it_was_given(monkeypatch):
    from densenet_exp.job import cpu_threads

    hc = {"launcher": {"_target_": "hydra_plugins.densenet_exp_slurm.SlurmLauncher"}}
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert cpu_threads(None, hc) is None  # torch's default outside SLURM
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # torch would count the node's cores
    assert cpu_threads(None, hc) == 1 and cpu_threads(3, hc) == 3


def test_the_resume_command_is_the_one_typed_not_the_jobs_own(monkeypatch):
    from densenet_exp.runs.console import COMMAND_ENV, resume_command

    monkeypatch.delenv(COMMAND_ENV, raising=False)
    assert resume_command(["run.py", "experiment=smoke"]) == "python -m densenet_exp.run experiment=smoke"
    monkeypatch.setenv(COMMAND_ENV, "python -m densenet_exp.run -m growth_rate=4,8")  # the sweep's, inherited
    assert resume_command(["submitit/core/_submit.py", "out/.submitit/7"]) == "python -m densenet_exp.run -m growth_rate=4,8"


def test_the_slurm_launcher_queues_only_the_jobs_left_and_keeps_their_numbers(monkeypatch):
    """A rerun whose job #1 is FINISHED queues #0 and #2, which keep their numbers (their folders,
    their records in the sweep); the sweeper gets all three results in order."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    import densenet_exp.job
    from hydra_plugins.densenet_exp_slurm import SlurmLauncher, SubmititSlurmLauncher

    launcher = SlurmLauncher(jobs_run_here=True)
    launcher.hydra_context = SimpleNamespace(config_loader=SimpleNamespace(
        load_sweep_config=lambda cfg, overrides: OmegaConf.create({"hydra": {"job": {"num": None}}, "o": overrides})))
    monkeypatch.setattr(densenet_exp.job, "before_queueing",
                        lambda cfg, here: {"val_acc": 0.5} if cfg.o == ["seed=1"] else None)
    queued = []

    def submit(self, overrides, initial_job_idx):
        queued.append(overrides)
        return [JobReturn(overrides=o, status=JobStatus.COMPLETED, _return_value=0.1) for o in overrides]

    monkeypatch.setattr(SubmititSlurmLauncher, "launch", submit)
    results = launcher.launch([["seed=0"], ["seed=1"], ["seed=2"]], initial_job_idx=0)
    assert queued == [[["seed=0"], ["seed=2"]]]
    assert [r.return_value for r in results] == [0.1, 0.5, 0.1]
    assert launcher.job_nums == {("seed=0",): 0, ("seed=2",): 2}  # what each queued job runs as


@pytest.mark.slow  # a launcher or sweeper plugin end to end: CI runs it (make test-slow)
def test_submitit_local_launcher_finishes_both_jobs(store):
    result = store.run(*SMOKE, "seed=0,1", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                       multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = children(store)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" and "test/acc" in r.data.metrics for r in runs)


def test_ddp_on_cpu_logs_one_run_with_accuracy_over_all_ranks(store):
    from densenet_exp.training.data import ImageDataModule
    from densenet_exp.models import build_model

    result = store.run(*SMOKE, "trainer=ddp", "trainer.max_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    # A second process joined: Lightning says so at INFO, which goes to each rank's log, not the console.
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (store.path / "out" / "rank1.log").read_text()
    runs = store.all_runs()
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["trainer.strategy"] == "ddp" and run.data.params["trainer.devices"] == "2"
    # Each rank tests half of the 256-image slice; the logged figures cover both halves.
    assert run.data.metrics["test/images"] == 256
    # And the accuracy is that of the whole slice: evaluate rank 0's final weights on every test
    # image here. (Rank 1's BatchNorm statistics differ by its last batch, hence the tolerance.)
    local = store.client().download_artifacts(run.info.run_id, "config.yaml", str(store.path))
    cfg = yaml.safe_load(open(local).read())
    model = build_model(cfg["model"])
    state = torch.load(store.path / "out" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    model.eval()
    dm = ImageDataModule(cfg["data"], seed=cfg["seed"])
    dm.setup()
    test = dm.datasets["test"]
    with torch.no_grad():
        x, y = test[list(range(len(test)))]
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert abs(run.data.metrics["test/acc"] - acc) <= 4 / 256


def test_rerun_sweep_skips_finished_jobs_and_redoes_the_rest(store):
    overrides = (*SMOKE, "seed=0,1", "data.train_size=4096")
    ensure_experiment(store.client(), "smoke")
    proc = subprocess.Popen(store.command(*overrides, multirun=True), cwd=ROOT, env=store.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: any(r.info.status == "FINISHED" for r in children(store)))
    (first,) = [r for r in children(store) if r.info.status == "FINISHED"]
    (old_parent,) = [r for r in store.runs("smoke") if r.data.tags.get("sweep") == "parent"]
    assert old_parent.info.status == "RUNNING"  # kill -9: nothing could close it

    result = store.run(*overrides, multirun=True, out="again")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("skipped, already FINISHED") == 1
    finished = [r for r in children(store) if r.info.status == "FINISHED"]
    assert sorted(r.data.params["seed"] for r in finished) == ["0", "1"]
    assert first.info.run_id in {r.info.run_id for r in finished}  # not trained again
    # The dead sweep's parent is closed with the reason, and the new sweep holds both jobs (the
    # skipped one and the one resumed or redone), so its report sees the whole sweep.
    old_parent = store.client().get_run(old_parent.info.run_id)
    assert old_parent.info.status == "KILLED" and "ended without closing it" in old_parent.data.tags["stop_reason"]
    (new_parent,) = [r for r in store.runs("smoke") if r.data.tags.get("sweep") == "parent" and r.info.status == "FINISHED"]
    assert len(load_runs("smoke", store.uri, new_parent.info.run_id)) == 2
    assert first.info.run_id in {r.info.run_id for r in children(store) if r.data.tags["sweep_id"] == new_parent.info.run_id}
    assert_clean(store)


@pytest.mark.slow  # a launcher or sweeper plugin end to end: CI runs it (make test-slow)
def test_optuna_search_runs_each_trial_as_a_child_run(store):
    result = store.run(*SMOKE, "hparams_search=optuna", "model=densenet_tiny", "trainer.max_epochs=1",
                       "hydra.sweeper.n_trials=3", "tracking.experiment=smoke", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = children(store)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    best = max(r.data.metrics["val/acc"] for r in runs)
    results = yaml.safe_load((store.path / "out" / "optimization_results.yaml").read_text())
    assert results["completed"] == 3 and abs(results["best_value"] - best) < 1e-6
    assert f"best value {best:.4f}" in result.stdout
    for run in runs:  # the searched values reached the model
        assert run.data.params["growth_rate"] in {"8", "12", "16", "24", "32"}
        assert 0.25 <= float(run.data.params["compression"]) <= 1.0


@pytest.mark.slow  # four trials, a kill and a resume
def test_an_optuna_search_killed_after_two_of_four_trials_resumes_and_finishes_four_in_one_study(store, tmp_path):
    import sqlite3

    import optuna

    from densenet_exp.report import write_report

    overrides = (*SMOKE, "hparams_search=optuna", "trainer.max_epochs=1", "hydra.sweeper.n_trials=4")
    storage = store.path / "optuna.db"  # beside the run store

    def completed() -> int:
        try:
            with sqlite3.connect(f"file:{storage}?mode=ro", uri=True, timeout=1) as db:
                return db.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        except sqlite3.Error:
            return 0

    ensure_experiment(store.client(), "smoke")
    proc = subprocess.Popen(store.command(*overrides, multirun=True), cwd=ROOT, env=store.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: completed() >= 2, timeout=1200)
    assert completed() == 2
    result = store.run(*overrides, multirun=True, out="again", timeout=1200)  # the same command, a new sweep folder
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 of 4 trials finished" in result.stdout
    (name,) = optuna.get_all_study_names(f"sqlite:///{storage}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    trials = [r for r in store.runs("smoke") if r.data.tags.get("search_study") == name]
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)
    assert {t.user_attrs["mlflow_run_id"] for t in complete} == {r.info.run_id for r in trials}
    for run in trials:  # launched rounded: the run's params are what Optuna's trial says, to 3 digits
        assert len(run.data.params["compression"].removeprefix("0.")) <= 3
    assert_clean(store)
    found = write_report("smoke", store.uri, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"### Study `{name}`" in text and "4 finished trials" in text and found.summary.empty
    assert any(p.name.startswith("search_history_") for p in found.files)
    # The best trial again with confirmation seeds: its overrides, without the search, new seeds.
    top = subprocess.run([sys.executable, "-m", "densenet_exp.search", "--experiment", "smoke", "--top", "1",
                          "--dry-run"], cwd=ROOT, env=store.env(), capture_output=True, text=True, timeout=600)
    assert top.returncode == 0, top.stderr[-2000:]
    (line,) = top.stdout.splitlines()
    assert "-m densenet_exp.run -m experiment=smoke probes=none trainer.max_epochs=1 growth_rate=" in line
    assert line.endswith(" seed=1,2,3") and "hparams_search" not in line


def _shard_worker(rank: int, world: int, root: str, init: str, out: str) -> None:
    """One DDP rank: the images its training loader yields in two epochs, gathered on rank 0."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dm = ImageDataModule({"name": "imagefolder", "root": root, "image_size": 8, "batch_size": 4,
                          "eval_batch_size": 4, "num_workers": 0, "val_size": None, "split_seed": 0}, seed=3)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)  # what _loader reads of a Trainer
    dm.setup("fit")
    seen = {}
    for epoch in range(2):
        for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
            loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch's start
            # Image i of class c is filled with red = i: read it back from the normalized pixels.
            seen[split, epoch] = [(int(c), round(float(x[0, 4, 4] * 0.229 + 0.485) * 255))
                                  for xs, cs in loader for x, c in zip(xs, cs)]
    gathered = [None] * world
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def test_ddp_with_imagefolder_data_shows_each_image_once_per_epoch(tmp_path):
    from PIL import Image

    for split, n in (("train", 40), ("val", 10)):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(n // 2):
                Image.new("RGB", (8, 8), (i, c, 0)).save(tmp_path / split / f"c{c}" / f"{i}.png")
    out = tmp_path / "seen.pt"
    mp.spawn(_shard_worker, args=(2, str(tmp_path), f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2)
    ranks = torch.load(out, weights_only=False)
    for epoch in range(2):
        train = [r["train", epoch] for r in ranks]
        assert len(train[0]) == len(train[1]) == 20  # equal steps per rank
        assert sorted(train[0] + train[1]) == [(c, i) for c in range(2) for i in range(20)]  # each image once
        val = [r["val", epoch] for r in ranks]
        assert sorted(val[0] + val[1]) == [(c, i) for c in range(2) for i in range(5)]
    assert ranks[0]["train", 0] != ranks[0]["train", 1]  # reshuffled each epoch

"""Declared evidence that cannot be inflated (issue 31): one `study run` per plan, finished jobs
found in the store the jobs write to, a run tagged with an arm refused at launch unless it has
the arm's config, the plan file pinned once its confirmation started, and the report counting
each declared (arm, seed) once, naming what it leaves out."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import ROOT, Store
from densenet_exp import record, report, study
from densenet_exp.analysis.declared import arm_key, one_per_declared
from densenet_exp.checks import EXIT_BAD_INPUT, EXIT_BUSY, InvalidValue
from densenet_exp.config import compose_config
from densenet_exp.plan import load_plan
from densenet_exp.runs.store import prepare_store
from densenet_exp.runs.tracking import ensure_experiment
from densenet_exp.validate import check_arm_config, resolved_config

PLAN = """
name: tiny
experiment: tiny_study
recipe: [experiment=smoke, probes=none, trainer.max_epochs=1, data.train_size=256, data.val_size=64{store}]
exploration:
  seeds: [0]
  arms:
    a: [model=densenet_tiny, optim.lr=0.1]
confirmation:
  seeds: [10, 11]
  arms:
    a: [model=densenet_tiny]
"""


def plan_file(tmp_path, own_store: str | None = None, text: str = PLAN):
    path = tmp_path / "plan.yaml"
    path.write_text(text.format(store=f", tracking.uri={own_store}" if own_store else ""))
    return load_plan(path)


def plan_run(store: Store, plan, stage: str, arm: str, seed: int, plan_hash: str | None = None,
             status: str = "FINISHED", **tags: str) -> str:
    """A run of the plan's job as the store holds it (no training)."""
    client = store.client()
    run = client.create_run(ensure_experiment(client, plan.experiment), tags={
        record.STUDY_PLAN: plan.name, record.STUDY_PLAN_HASH: plan_hash or plan.hash, record.STUDY_STAGE: stage,
        record.STUDY_ARM: arm, **tags})
    client.log_param(run.info.run_id, "seed", str(seed))
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


# --- the report: each declared (arm, seed) once --------------------------------------------

def test_each_declared_job_counts_once_and_every_run_left_out_is_named(tmp_path):
    plan = plan_file(tmp_path)
    arm = {"model": {"name": "densenet_tiny"}, "trainer": {"accelerator": "auto", "benchmark": "auto"}}
    ours = arm_key(arm, {"trainer.accelerator": "cpu"})
    other = arm_key({**arm, "growth_rate": 32}, {"trainer.accelerator": "cpu"})
    rows = [  # run_id, stage, arm, seed, status, config_key, start
        ("first", "confirmation", "a", 10, "FINISHED", ours, 1),
        ("again", "confirmation", "a", 10, "FINISHED", ours, 2),
        ("k32", "confirmation", "a", 11, "FINISHED", other, 3),
        ("good", "confirmation", "a", 11, "FINISHED", ours, 4),
        ("stray", "confirmation", "a", 99, "FINISHED", ours, 5),
        ("ghost", "confirmation", "zz", 10, "FINISHED", ours, 6),
        ("pilot", "exploration", "a", 0, "FINISHED", other, 7),
        ("killed", "confirmation", "a", 11, "KILLED", ours, 8),
    ]
    runs = pd.DataFrame([{"run_id": r, "status": st, "start_time": pd.Timestamp(2026, 1, 1, 0, t), "seed": seed,
                          "config_key": key, f"tags.{record.CONFIG_KEY}": key, f"tags.{record.STUDY_PLAN}": "tiny",
                          f"tags.{record.STUDY_STAGE}": stage, f"tags.{record.STUDY_ARM}": a,
                          "params.trainer.accelerator": "cpu"} for r, stage, a, seed, st, key, t in rows])
    kept, left_out = one_per_declared(plan, runs.sample(frac=1, random_state=0), {"a": arm})
    assert set(kept["run_id"]) == {"first", "good", "pilot", "killed"}
    assert len(left_out) == 4 and all("\n" not in line for line in left_out)
    text = " ".join(left_out)
    assert "run again (arm a, seed 10): a second finished run of this declared job (run first is kept)" in text
    assert f"run k32 (arm a, seed 11): its config (key {other}) is not the arm's" in text
    assert "run stray (arm a, seed 99): not a declared" in text and "run ghost (arm zz, seed 10)" in text


def test_the_arms_key_takes_what_the_run_resolved_per_machine():
    arm = {"trainer": {"accelerator": "auto", "benchmark": "auto"}, "optim": {"lr": 0.1}}
    on_cpu = arm_key(arm, {"trainer.accelerator": "cpu"})
    assert on_cpu == arm_key({"trainer": {"accelerator": "cpu"}, "optim": {"lr": 0.1}}, {})  # benchmark dropped
    assert on_cpu != arm_key(arm, {"trainer.accelerator": "gpu", "trainer.benchmark": "True"})


def test_the_report_names_duplicates_and_mis_tagged_runs_and_judges_without_them(store, tmp_path):
    """Hand-written runs (no config_key tag: duplicates only) and one tagged with another key."""
    plan = plan_file(tmp_path)
    ids = {seed: plan_run(store, plan, "confirmation", "a", seed) for seed in (10, 11)}
    twice = plan_run(store, plan, "confirmation", "a", 10)
    wrong = plan_run(store, plan, "confirmation", "a", 11, **{record.CONFIG_KEY: "0123456789ab"})
    found = report.judge(report.load_evidence(plan.experiment, store.uri), report.DEFAULT_MARGIN_PP, plan)
    assert sorted(found.confirmation.arms["a"].runs["run_id"]) == sorted(ids.values())
    notes = " ".join(found.confirmation.notes)
    assert f"run {twice} (arm a, seed 10): a second finished run" in notes and f"run {wrong} (arm a, seed 11)" in notes
    assert found.confirmed is not None and len(found.confirmed) == 1
    assert not found.explored["run_id"].isin([twice, wrong]).any()  # left out of everything, not explored instead


# --- launch: a run tagged with an arm has the arm's config ---------------------------------

def test_a_run_of_an_arm_must_have_the_arms_config(tmp_path):
    plan = plan_file(tmp_path)
    (job, _) = plan.jobs("confirmation")
    bookkeeping = ["tracking.experiment=elsewhere", "parallel_jobs=2", "cpu_threads=1", "trainer.enable_progress_bar=false"]
    check_arm_config(resolved_config(compose_config([*job.overrides, *bookkeeping])))  # what `study run` launches
    with pytest.raises(InvalidValue) as err:
        check_arm_config(resolved_config(compose_config([*job.overrides, "growth_rate=32"])))
    message = str(err.value)
    assert message.startswith("study.arm='a' is invalid: expected a run of that arm's config")
    assert "growth_rate=32 (the arm's: 4)" in message and "\n" not in message


def test_a_mis_tagged_run_is_refused_at_launch_in_one_line(store, tmp_path):
    plan = plan_file(tmp_path)
    code, err = store.run_here(*plan.recipe, "model=densenet_tiny", "growth_rate=32", "seed=11",
                               f"study.plan={plan.path}", "study.stage=confirmation", "study.arm=a")
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: study.arm='a' is invalid") and "growth_rate=32" in err
    assert store.runs("tiny_study") == []


# --- the runner ----------------------------------------------------------------------------

def test_a_second_runner_on_the_plan_says_who_holds_it(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    plan = plan_file(tmp_path)
    with study.plan_lock(plan, "confirmation"):
        assert study.main(["run", str(plan.path), "--tracking-uri", store.uri]) == EXIT_BUSY
    err = capsys.readouterr().err
    assert err.startswith(f"error: plan tiny is being run by {socket.gethostname()}:{os.getpid()} (--stage "
                          "confirmation") and err.count("\n") == 1


def test_finished_jobs_are_found_in_the_store_the_recipe_names(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    own = Store(tmp_path / "own")
    plan = plan_file(tmp_path, own.uri)
    prepare_store(own.uri)
    plan_run(own, plan, "exploration", "a", 0)
    plan_run(store, plan, "exploration", "zz", 0)  # the default store: not where the jobs write
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    stores = study.job_stores(plan, "exploration")
    assert stores == {"a": own.uri}
    assert study.finished_jobs(plan, "exploration", stores) == {("a", 0)}
    assert study.main(["run", str(plan.path), "--stage", "exploration", "--tracking-uri", store.uri]) == 0
    assert "0 of 1 jobs to run" in capsys.readouterr().out


def test_the_runner_stops_when_the_plan_changed_after_its_confirmation_started(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    plan = plan_file(tmp_path)
    for seed in (10, 11):
        plan_run(store, plan, "confirmation", "a", seed, plan_hash="0" * 64)
    assert study.main(["run", str(plan.path), "--tracking-uri", store.uri]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"changed after plan tiny's confirmation started (its runs started under sha256 " \
                                      f"000000000000; the file is now {plan.hash[:12]})" in err
    # --new-plan: the older version's runs are not this plan's finished jobs.
    stores = study.job_stores(plan, "confirmation")
    assert study.finished_jobs(plan, "confirmation", stores) == set()
    plan_run(store, plan, "confirmation", "a", 10)  # as `--new-plan` starts this version's confirmation
    assert study.finished_jobs(plan, "confirmation", stores) == {("a", 10)}
    study.check_unchanged(plan, stores)  # this version's confirmation has started: it goes on


def test_jobs_must_be_at_least_one(tmp_path):
    plan = plan_file(tmp_path)
    result = subprocess.run([sys.executable, "-m", "densenet_exp.study", "run", str(plan.path), "--jobs", "0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_BAD_INPUT and "Traceback" not in result.stderr
    assert "--jobs='0' is invalid: expected an integer >= 1" in result.stderr


# --- end to end ----------------------------------------------------------------------------

@pytest.mark.slow
def test_two_runners_a_rerun_and_a_report_count_each_declared_seed_once(store, tmp_path):
    """Two `study run` on one plan whose recipe names its own store: the second stops in one line
    naming the first; a rerun finds every job done; a job trained again by hand and a run of
    another config are named and left out of the report."""
    own = Store(tmp_path / "own")
    plan = plan_file(tmp_path, own.uri)
    command = [sys.executable, "-m", "densenet_exp.study", "run", str(plan.path), "--jobs", "1"]
    env = store.env()  # MLFLOW_TRACKING_URI: the default store, which the recipe overrides
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / study.OUTPUT_ROOT / plan.name / study.PLAN_LOCK
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == EXIT_BUSY and second.stderr.count("\n") == 1
    assert f":{first.pid} (--stage confirmation" in second.stderr
    assert store.runs(plan.experiment) == []  # every run is in the recipe's store
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 of 2 jobs to run" in again.stdout, again.stderr[-2000:]

    (job, _) = plan.jobs("confirmation")  # the first job, trained again by hand as the runner would
    by_hand = subprocess.run([*study.job_command(plan, job, "confirmation", 1), f"hydra.run.dir={tmp_path / 'by-hand'}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    wrong = plan_run(own, plan, "confirmation", "a", 11, **{record.CONFIG_KEY: "0123456789ab"})
    runs = {r.info.run_id: r for r in own.runs(plan.experiment)}
    twice = max((r for r in runs.values() if r.data.params["seed"] == "10"), key=lambda r: r.info.start_time)

    code = report.main(["--plan", str(plan.path), "--tracking-uri", own.uri, "--out", str(tmp_path / "report")])
    assert code == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"run {twice.info.run_id} (arm a, seed 10): a second finished run" in text
    assert f"run {wrong} (arm a, seed 11): its config (key 0123456789ab) is not the arm's" in text
    found = report.judge(report.load_evidence(plan.experiment, own.uri), report.DEFAULT_MARGIN_PP, plan)
    kept = found.confirmation.arms["a"].runs
    assert sorted(kept["seed"].astype(int)) == [10, 11] and twice.info.run_id not in set(kept["run_id"])

"""Study plans (densenet_exp/plan.py), their checks, and the runner that trains a stage
(densenet_exp/study.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, Store
from densenet_exp import record
from densenet_exp.checks import InvalidValue
from densenet_exp.claims import load_plan, name
from densenet_exp.validate import validate_study

PLAN = """
name: tiny
experiment: tiny_study
recipe: [experiment=smoke, probes=none, trainer.max_epochs=1, data.train_size=256, data.val_size=64]
exploration:
  seeds: [0]
  arms:
    a: [model=densenet_tiny]
    b: {overrides: [model=densenet_tiny, growth_rate=8], seeds: [0, 1]}
confirmation:
  seeds: [10, 11]
  arms:
    a: [model=densenet_tiny]
claims:
  - {kind: feature_reuse, arm: a, min_layers: 2}
"""


def plan_file(tmp_path, text: str = PLAN, name: str = "plan.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_plan_expands_into_jobs_seeds_outer_with_the_split_drawn_by_the_seed(tmp_path):
    plan = load_plan(plan_file(tmp_path))
    jobs = plan.jobs("exploration")
    assert [(j.arm, j.seed) for j in jobs] == [("a", 0), ("b", 0), ("b", 1)]
    assert jobs[2].overrides[-6:] == ("growth_rate=8", "seed=1", "data.split_seed=1", f"study.plan={plan.path}",
                                      "study.stage=exploration", "study.arm=b")
    assert [(j.arm, j.seed) for j in plan.jobs("confirmation")] == [("a", 10), ("a", 11)]
    assert len(plan.hash) == 64 and name(plan.claims[0]).startswith("feature reuse of a")
    assert any("confirmation: seeds 10, 11" in line for line in plan.describe())


@pytest.mark.parametrize("edit, message", [
    (lambda t: t + "colour: blue\n", "plan key colour='blue' is invalid"),
    (lambda t: t.replace("seeds: [10, 11]", "seeds: [0, 11]"), "confirmation.seeds=[0] is invalid: expected seeds "
                                                             "the exploration stage did not use"),
    (lambda t: t.replace("arm: a,", "arm: zz,"), "claims[0].arm='zz' is invalid: expected an arm of the confirmation"),
    (lambda t: t.replace("{kind: feature_reuse, arm: a, min_layers: 2}", "{kind: fewer_params, smaller: a}"),
     "claims[0].larger=None is invalid: expected a value (required)"),
    (lambda t: t.replace("a: [model=densenet_tiny]\nclaims", "a: model=densenet_tiny\nclaims"),
     "confirmation.arms.a='model=densenet_tiny' is invalid: expected a list of KEY=VALUE overrides"),
    (lambda t: t + "  - {kind: [\n", "is not valid YAML"),
])
def test_a_bad_plan_is_one_line_naming_the_key(tmp_path, edit, message):
    with pytest.raises(InvalidValue) as err:
        load_plan(plan_file(tmp_path, edit(PLAN)))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_run_of_a_plan_must_use_its_stage_arm_and_seeds(tmp_path):
    path = str(plan_file(tmp_path))
    validate_study({"seed": 10, "study": {"plan": path, "stage": "confirmation", "arm": "a"}})
    for study, seed, message in [
        ({"plan": path, "stage": "confirmation", "arm": "b"}, 10, "study.arm='b' is invalid"),
        ({"plan": path, "stage": "confirmation", "arm": "a"}, 0, "seed=0 is invalid: expected one of the plan's "
                                                               "confirmation seeds of this arm [10, 11]"),
        ({"plan": path, "stage": "pilot", "arm": "a"}, 0, "study.stage='pilot' is invalid"),
        ({"plan": None, "stage": "confirmation", "arm": None}, 0, "study.stage='confirmation' is invalid: expected "
                                                                  "null without study.plan"),
    ]:
        with pytest.raises(InvalidValue, match=message.replace("[", r"\[").replace("]", r"\]")):
            validate_study({"seed": seed, "study": study})


@pytest.mark.slow
def test_the_runner_trains_a_stage_tags_its_runs_and_skips_them_when_run_again(tmp_path):
    store = Store(tmp_path)
    path = plan_file(tmp_path)
    command = [sys.executable, "-m", "densenet_exp.study", "run", str(path), "--stage", "exploration", "--jobs", "2"]
    first = subprocess.run(command, cwd=tmp_path, env=store.env(), capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "3 of 3 jobs to run" in first.stdout and first.stdout.count("finished in") == 3
    client = store.client()
    runs = client.search_runs([client.get_experiment_by_name("tiny_study").experiment_id])
    plan = load_plan(path)
    assert sorted((r.data.tags[record.STUDY_ARM], r.data.params["seed"]) for r in runs) == [("a", "0"), ("b", "0"),
                                                                                          ("b", "1")]
    assert {r.data.tags[record.STUDY_PLAN_HASH] for r in runs} == {plan.hash}
    assert {r.data.tags[record.PARALLEL_JOBS] for r in runs} == {"2"} and {r.info.status for r in runs} == {"FINISHED"}
    again = subprocess.run(command, cwd=tmp_path, env=store.env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 of 3 jobs to run" in again.stdout


def test_the_runner_answers_a_bad_plan_in_one_line(tmp_path):
    path = plan_file(tmp_path, PLAN.replace("name: tiny", "name: 'a b'"))
    result = subprocess.run([sys.executable, "-m", "densenet_exp.study", "show", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: name='a b' is invalid")

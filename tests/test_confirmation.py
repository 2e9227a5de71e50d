"""Known answers for the verdicts of a declared plan (the claim engine, densenet_exp/claims/) and for the
exploratory ones without a plan: stores written by hand, one scenario per experiment."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mlflow.entities import Metric

from conftest import Store
from densenet_exp import claims as confirmation
from densenet_exp.analysis import results, stats, verdicts
from densenet_exp.claims import evidence
from densenet_exp import record, report
from densenet_exp.measures.figure5 import FIGURE5
from densenet_exp.claims import load_plan
from densenet_exp.analysis.verdicts import CONTRADICTED, EXPLORATORY, INCONCLUSIVE, NOT_COMPARABLE, SUPPORTED
from builders import add_run
from test_verdicts import figure5_like

SEEDS = [100, 101, 102, 103, 104]
ARMS = {  # arm -> params
    "small": {"model.name": "densenet_bc28_k12", "model.arch": "densenet_cifar", "model.depth": 28,
              "growth_rate": 12, "compression": 0.5, "bottleneck": True},
    "big": {"model.name": "resnet20", "model.arch": "resnet_cifar", "model.depth": 20},
    "plain_a": {"model.name": "plain20", "model.arch": "plain_cifar", "model.depth": 20},
    "plain_b": {"model.name": "plain56", "model.arch": "plain_cifar", "model.depth": 56},
}
RECIPE = {"data.batch_size": 128, "data.augment": "none", "data.val_size": 5000, "optim.lr": 0.1,
          "trainer.max_epochs": 3}
PLAN = """
name: known
experiment: {experiment}
recipe: [experiment=fmnist_decisive]
exploration:
  seeds: [0]
  arms:
    small-lr: [model=densenet_bc28_k12]
confirmation:
  seeds: [100, 101, 102, 103, 104]
  arms:
    small: [model=densenet_bc28_k12]
    big: [model=resnet20]
    plain_a: [model=plain20]
    plain_b: [model=plain56]
claims:
  - {{kind: fewer_params, smaller: small, larger: big, margin_pp: 0.5}}
  - {{kind: matched_cost, smaller: small, larger: big, margin_pp: 0.5}}
  - {{kind: degradation, family: plain, shallow: plain_a, deep: plain_b, control: true}}
  - {{kind: feature_reuse, arm: small, min_layers: 6}}
  - {{kind: gradient_flow, dense: small, baseline: big}}
"""


def body_csv(early: float, late: float, classifier: float) -> str:
    """relative_grads.csv of a net with six body 3x3 convs (early ones `early`, late ones `late`), a
    stem and a classifier whose relative gradient dominates the last layers."""
    rows = [("stem", 0, 0.5)] + [("body", d, early if d <= 2 else late) for d in range(1, 7)] + [("classifier", 7,
                                                                                                   classifier)]
    lines = [f"init,0,{d},{d / 7},layer{d},{'Linear' if r == 'classifier' else 'Conv2d'},{r},{g},1.0,{g}"
             for r, d, g in rows]
    return ",".join(record.RELATIVE_GRADS_COLUMNS) + "\n" + "\n".join(lines) + "\n"


def as_json(matrices) -> str:
    return json.dumps([[[None if math.isnan(v) else v for v in row] for row in m.tolist()] for m in matrices])


def write_plan(tmp_path, experiment: str) -> "confirmation.Plan":
    path = tmp_path / f"{experiment}.yaml"
    path.write_text(PLAN.format(experiment=experiment))
    return load_plan(path)


def build(store: Store, plan, acc: dict[str, float], curve_gain_pp: float = 0.1, loss: dict[str, float] | None = None,
          untrained: bool = False, stage: str = "confirmation", spread: float = 0.001,
          by_impl: dict[str, dict[str, float]] | None = None) -> None:
    """Five seeds per arm of `plan`: test accuracy around acc[arm] (seed SD about `spread`), three
    validation checks ending with a gain of `curve_gain_pp`, final training loss loss[arm],
    Figure 5 matrices (trained like the paper's, or equal to init if `untrained`) for DenseNets."""
    client = store.client()
    experiment_id = client.create_experiment(plan.experiment, artifact_location=(store.path / plan.experiment).as_uri())
    rng = np.random.default_rng(0)
    loss = loss or {arm: 0.2 for arm in ARMS}
    for arm, params in ARMS.items():
        for i, seed in enumerate(SEEDS):
            final = acc[arm] + spread * (i - 2)
            dense = params["model.arch"].startswith("densenet")
            init = [np.where(np.isnan(m), np.nan, 1.0) * rng.uniform(0.97, 1.03, m.shape) for m in figure5_like(rng)]
            trained = init if untrained else figure5_like(rng)
            artifacts = {record.RELATIVE_GRADS: body_csv(0.05, 0.02 if arm == "big" else 0.05, 2.0)}
            if dense:
                artifacts |= {record.FEATURE_REUSE_MATRICES: as_json(trained),
                              record.FEATURE_REUSE_MATRICES_INIT: as_json(init)}
            run_id = add_run(client, experiment_id, arm, {**RECIPE, **params, "data.split_seed": seed},
                             {record.TEST_ACC: final, record.PARAMS: 100_000 if arm == "small" else 270_000,
                              record.FLOPS_PER_IMAGE: 20e6 if arm == "small" else 80e6,
                              record.TRAIN_STEP_MB: 640.0 if arm == "small" else 320.0,
                              record.TRAIN_LOSS: loss[arm] * (1 + 0.01 * (i - 2)),
                              **{record.TRAIN_STEP_MB_BY_IMPL[impl]: mb
                                 for impl, mb in (by_impl or {}).get(arm, {}).items()}}, seed, "fashion_mnist",
                             tags={record.STUDY_PLAN: plan.name, record.STUDY_PLAN_HASH: plan.hash,
                                   record.STUDY_STAGE: stage, record.STUDY_ARM: arm}, artifacts=artifacts)
            checks = [final - 0.05, final - curve_gain_pp / 100 - 0.01, final - curve_gain_pp / 100, final][1:]
            client.log_batch(run_id, metrics=[Metric(record.VAL_ACC, v, 0, s) for s, v in enumerate(checks)])


def judged(store: Store, plan) -> dict[str, verdicts.Claim]:
    evidence = report.load_evidence(plan.experiment, store.uri)
    found = report.judge(evidence, 0.5, plan)
    return {c.claim: c for c in found.confirmation.claims}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("confirmation"))


@pytest.fixture(scope="module")
def non_inferior(store, tmp_path_factory):
    plan = write_plan(tmp_path_factory.mktemp("plans"), "non_inferior")
    build(store, plan, {"small": 0.921, "big": 0.920, "plain_a": 0.90, "plain_b": 0.85},
          loss={"small": 0.2, "big": 0.2, "plain_a": 0.2, "plain_b": 0.4})
    return plan


def test_a_truly_non_inferior_declared_pair_is_supported_with_its_power(store, non_inferior):
    claims = judged(store, non_inferior)
    params = next(c for name, c in claims.items() if "fewer parameters" in name)
    assert params.verdict == SUPPORTED, params.label
    assert params.p_holm < 0.05 and "2.70x fewer" in params.evidence and "power" in params.evidence
    same = next(c for name, c in claims.items() if "same test accuracy" in name)
    assert same.verdict == SUPPORTED  # TOST within 0.5 pp
    flops = next(c for name, c in claims.items() if "fewer FLOPs" in name)
    memory = next(c for name, c in claims.items() if "more train-step memory" in name)
    assert flops.verdict == SUPPORTED and memory.verdict == SUPPORTED  # exact figures once matched
    assert "[plain concatenation (model.memory_efficient=false); the other implementation was not measured" in memory.claim
    control = next(c for name, c in claims.items() if "plain20" not in name and "trains worse" in name)
    assert control.verdict == SUPPORTED  # plain_b's loss is 2x plain_a's


def test_memory_is_judged_for_each_densenet_implementation_against_the_resnets_one(store, tmp_path):
    """Plain concatenation needs 2x ResNet-20's train-step memory; memory-efficient mode 0.94x: one
    line each, the second "not supported for this pair"; the ResNet's one implementation serves both."""
    plan = write_plan(tmp_path, "by_impl")
    build(store, plan, {"small": 0.921, "big": 0.920, "plain_a": 0.90, "plain_b": 0.85},
          loss={"small": 0.2, "big": 0.2, "plain_a": 0.2, "plain_b": 0.4},
          by_impl={"small": {"plain": 640.0, "memory_efficient": 300.0}, "big": {"plain": 320.0}})
    memory = {name: c for name, c in judged(store, plan).items() if "more train-step memory" in name}
    plain = next(c for name, c in memory.items() if name.endswith("[plain concatenation]"))
    efficient = next(c for name, c in memory.items() if name.endswith("[memory-efficient mode]"))
    assert len(memory) == 2 and plain.verdict == SUPPORTED and "ratio 2 " in plain.evidence
    assert efficient.verdict == INCONCLUSIVE and efficient.reason == "not supported for this pair (ratio 0.938)"
    assert "small: 2.344 MiB; big: 2.5 MiB" in efficient.evidence  # per image, batch 128


def test_the_same_store_without_a_plan_is_only_exploratory(store, non_inferior):
    done = results.finished(results.load_runs(non_inferior.experiment, store.uri))
    judged = verdicts.evaluate_claims(done, margin_pp=0.5)
    assert {c.verdict for c in judged.claims} <= {EXPLORATORY, INCONCLUSIVE, NOT_COMPARABLE}
    assert any(c.verdict == EXPLORATORY and "leans supported" in c.reason for c in judged.claims)


def test_arms_still_climbing_in_their_last_checks_are_not_converged(store, tmp_path):
    plan = write_plan(tmp_path, "climbing")
    build(store, plan, {"small": 0.921, "big": 0.920, "plain_a": 0.90, "plain_b": 0.85}, curve_gain_pp=2.0)
    claims = judged(store, plan)
    params = next(c for name, c in claims.items() if "fewer parameters" in name)
    assert params.verdict == INCONCLUSIVE and params.reason.startswith("not converged: small seed 100: gained 2.00 pp")


def test_an_untrained_densenet_is_inconclusive_on_every_figure5_observation(store, tmp_path):
    plan = write_plan(tmp_path, "untrained")
    build(store, plan, {"small": 0.921, "big": 0.920, "plain_a": 0.90, "plain_b": 0.85}, untrained=True)
    claims = judged(store, plan)
    reuse = [c for name, c in claims.items() if name.startswith("feature reuse")]
    assert len(reuse) == 4 and {c.verdict for c in reuse} == {INCONCLUSIVE}
    assert all("did not change" in c.reason for c in reuse), [c.label for c in reuse]
    # Matrices trained like the paper's Figure 5 decide (c) and (d).
    trained_plan = write_plan(tmp_path, "trained")
    build(store, trained_plan, {"small": 0.921, "big": 0.920, "plain_a": 0.90, "plain_b": 0.85})
    trained = judged(store, trained_plan)
    observations = {name[len("feature reuse ("):][0]: c.verdict for name, c in trained.items()
                    if name.startswith("feature reuse")}
    assert observations["c"] == SUPPORTED and observations["d"] == SUPPORTED


def test_a_classifier_that_dominates_the_late_layers_does_not_make_a_gradient_verdict(store, non_inferior):
    # big's body convs: early 0.05, late 0.02 (a real decay), classifier 2.0. small: 0.05 throughout.
    claims = judged(store, non_inferior)
    gradient = next(c for name, c in claims.items() if "stronger early gradients" in name)
    assert gradient.verdict != CONTRADICTED
    assert "early/late 2.5" in gradient.evidence  # measured on the body convs, the classifier left out


def test_confirmation_runs_only_count_and_exploration_runs_do_not(store, tmp_path):
    plan = write_plan(tmp_path, "explored")
    build(store, plan, {"small": 0.921, "big": 0.920, "plain_a": 0.90, "plain_b": 0.85}, stage="exploration")
    claims = judged(store, plan)
    assert {c.verdict for c in claims.values()} <= {INCONCLUSIVE, NOT_COMPARABLE}
    params = next(c for name, c in claims.items() if "fewer parameters" in name)
    assert "0 usable runs" in params.reason


def test_the_report_prints_the_plan_and_says_when_the_plan_changed(store, non_inferior, tmp_path):
    found = report.write_report(non_inferior.experiment, store.uri, tmp_path / "out", plan=non_inferior)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Declared plan: known" in text and non_inferior.hash[:12] in text
    assert "Every confirmation run started under this plan file" in text
    changed = non_inferior.path.with_name("changed.yaml")
    changed.write_text(non_inferior.path.read_text() + "\n# edited after the runs\n")
    edited = load_plan(changed)
    found = report.judge(report.load_evidence(edited.experiment, store.uri), 0.5, edited)
    assert any("The plan file changed after confirmation runs started" in n for n in found.confirmation.notes)


def test_the_reports_p_values_and_power_agree_with_an_independent_computation(store, non_inferior):
    """Holm, TOST, non-inferiority and power, recomputed with scipy and closed forms on the very
    numbers the report judged: they agree to 1e-9."""
    from scipy import stats as sp

    found = report.judge(report.load_evidence(non_inferior.experiment, store.uri), 0.5, non_inferior)
    conf = found.confirmation
    small, big = conf.arms["small"], conf.arms["big"]
    a, b, m = small.values(record.TEST_ACC), big.values(record.TEST_ACC), 0.005
    claims = {c.claim: c for c in conf.claims}
    params = next(c for name, c in claims.items() if "fewer parameters" in name)
    assert params.p_value == pytest.approx(sp.ttest_ind(a + m, b, equal_var=False, alternative="greater").pvalue,
                                           rel=1e-9)
    same = next(c for name, c in claims.items() if "same test accuracy" in name)
    lower = sp.ttest_ind(a + m, b, equal_var=False, alternative="greater").pvalue
    upper = sp.ttest_ind(a - m, b, equal_var=False, alternative="less").pvalue
    assert same.p_value == pytest.approx(max(lower, upper), rel=1e-9)
    # Holm over the whole declared family: a test a gate stopped counts with p = 1.
    family = [c for c in conf.claims if c.in_family]
    raw = [c.p_value if c.p_value is not None else 1.0 for c in family]
    order = np.argsort(raw, kind="stable")
    running, by_hand = 0.0, {}
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(family) - rank) * raw[i]))
        by_hand[i] = running
    tested = [i for i, c in enumerate(family) if c.p_value is not None]
    assert [family[i].p_holm for i in tested] == pytest.approx([by_hand[i] for i in tested], rel=1e-9)
    # Power of the one-sided non-inferiority test, the noncentral t distribution, at the level Holm's
    # first step holds each of the family's tests to (alpha / k), not at alpha.
    sd = stats.pooled_sd(a, b)
    n1, n2, df = len(a), len(b), len(a) + len(b) - 2
    noncentrality = (m / sd) * np.sqrt(n1 * n2 / (n1 + n2))
    k = len(family)
    assert k == 8
    power = lambda alpha: 1 - sp.nct.cdf(sp.t.ppf(1 - alpha, df), df, noncentrality)  # noqa: E731
    assert stats.power(sd, m, n1, n2, non_inferior.alpha / k) == pytest.approx(power(non_inferior.alpha / k), rel=1e-9)
    assert f"power {power(non_inferior.alpha / k):.2f} " in params.evidence
    assert f"alpha {non_inferior.alpha / k:.3g} (Holm's first step over {k} tests)" in params.evidence
    assert power(non_inferior.alpha / k) < power(non_inferior.alpha)
    # The seeds 80% power needs at that level: the fewest with power >= 0.8 (equal sides).
    needed = next(n for n in range(2, 200) if 1 - sp.nct.cdf(sp.t.ppf(1 - non_inferior.alpha / k, 2 * n - 2),
                                                              2 * n - 2, (m / sd) * np.sqrt(n / 2)) >= 0.8)
    assert f"80% power needs {needed} seeds per side" in params.evidence


def test_the_family_is_every_declared_test_whatever_the_gates_stop(store, non_inferior):
    """stats.FAMILY_RULE: the family judged is the one the plan declares (what `study estimate` sizes
    at alpha / k), gated claims included with p = 1, so a failing gate never lowers the bar."""
    found = report.judge(report.load_evidence(non_inferior.experiment, store.uri), 0.5, non_inferior)
    family = found.confirmation.family
    assert confirmation.tests(non_inferior) == 8 == len(family)
    assert confirmation.KINDS["feature_reuse"].tests({}) == len(verdicts.REUSE_DIRECTIONS)
    assert any("fewer parameters" in c for c in family) and any("same test accuracy" in c for c in family)
    assert "8 declared tests" in found.confirmation.procedure


def test_keys_the_plan_sets_per_arm_may_differ_and_others_may_not(tmp_path):
    import pandas as pd

    path = tmp_path / "p.yaml"
    path.write_text(PLAN.format(experiment="x").replace("small: [model=densenet_bc28_k12]",
                                                        "small: [model=densenet_bc28_k12, optim.lr=0.2]"))
    plan = load_plan(path)

    def arm(name: str, lr: str, batch: str) -> evidence.Arm:
        return evidence.Arm(name, pd.DataFrame({"run_id": ["r"], "family": ["x"], "params.optim.lr": [lr],
                                                    "params.data.batch_size": [batch]}))

    assert evidence.undeclared_differences(plan, arm("small", "0.2", "128"), arm("big", "0.1", "128")) == []
    assert evidence.undeclared_differences(plan, arm("small", "0.2", "128"), arm("big", "0.1", "64")) == [
        "data.batch_size: 128, 64"]

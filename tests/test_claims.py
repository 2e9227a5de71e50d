"""Known answers for the claim engine (densenet_exp/claims/): the family fixed by the plan, TOST's
power, the knob factorial, the frontier and paired designs, each on a synthetic MLflow store built
here and judged by the report's own path."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from mlflow.entities import Metric

from builders import add_run
from conftest import Store
from densenet_exp import claims, record, report
from densenet_exp.analysis import stats
from densenet_exp.analysis.verdicts import CONTRADICTED, INCONCLUSIVE, SUPPORTED, Claim
from densenet_exp.checks import InvalidValue
from densenet_exp.claims import family, sizing

SEEDS = [400, 401, 402, 403, 404, 405]
RECIPE = {"data.batch_size": 128, "data.augment": "none", "data.val_size": 5000, "optim.lr": 0.1,
          "trainer.max_epochs": 3, "model.arch": "densenet", "model.name": "densenet_s9"}


def write(tmp_path, text: str, name: str = "plan.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return claims.load_plan(path)


def cell(k: int, theta: float, b: bool) -> str:
    return f"k{k}-c{theta:g}-{'B' if b else 'noB'}"


CELLS = list(itertools.product((12, 32), (0.5, 1.0), (True, False)))
FACTORIAL = """
name: factorial
experiment: {experiment}
paired: true
confirmation:
  seeds: [400, 401, 402, 403, 404, 405]
  arms:
{arms}
claims:
  - {{kind: knob_effect, arms: [{names}], effect: growth_rate, test: superiority, claimed: 32}}
  - {{kind: knob_effect, arms: [{names}], effect: compression, test: non_inferiority, claimed: 0.5, margin_pp: 0.5}}
  - {{kind: knob_effect, arms: [{names}], effect: "compression:bottleneck", test: equivalence, margin_pp: 0.5}}
"""


def factorial_store(tmp_path, experiment: str, k_effect: float, interaction: float):
    """8 cells x 6 seeds, paired: accuracy 90% + k_effect (pp) at k=32 + interaction x (theta, B coded
    +-1/2) + a per-seed shift shared by every cell of the seed + noise (SD 0.15 pp); flat curves."""
    names = [cell(*c) for c in CELLS]
    arms = "\n".join(f"    {cell(k, t, b)}: [model=densenet_s9, growth_rate={k}, compression={t}, bottleneck={b}]"
                     for k, t, b in CELLS)
    plan = write(tmp_path, FACTORIAL.format(experiment=experiment, arms=arms, names=", ".join(names)),
                 f"{experiment}.yaml")
    store = Store(tmp_path / experiment)
    client = store.client()
    eid = client.create_experiment(experiment, artifact_location=(store.path / "a").as_uri())
    rng = np.random.default_rng(7)
    shift = dict(zip(SEEDS, rng.normal(0, 0.4, len(SEEDS))))
    for (k, t, b), seed in itertools.product(CELLS, SEEDS):
        pp = 90 + k_effect * (k == 32) + interaction * (0.5 if t == 1.0 else -0.5) * (0.5 if b else -0.5)
        acc = (pp + shift[seed] + rng.normal(0, 0.15)) / 100
        run_id = add_run(client, eid, cell(k, t, b), {**RECIPE, "growth_rate": k, "compression": t, "bottleneck": b,
                                                     "data.split_seed": seed},
                         {record.TEST_ACC: acc, record.PARAMS: 1000 * k}, seed, "fashion_mnist",
                         tags={record.STUDY_PLAN: plan.name, record.STUDY_PLAN_HASH: plan.hash,
                               record.STUDY_STAGE: "confirmation", record.STUDY_ARM: cell(k, t, b)})
        client.log_batch(run_id, metrics=[Metric(record.VAL_ACC, acc, 0, s) for s in range(6)])
    return store, plan


def effect(claim: Claim, term: str) -> float:
    """The contrast's estimate in points, as the evidence line prints it."""
    import re

    return float(re.search(rf"{re.escape(term)} effect ([+-][0-9.]+) pp", claim.evidence).group(1))


def verdicts_of(store: Store, plan) -> list[Claim]:
    return report.judge(report.load_evidence(plan.experiment, store.uri), 0.5, plan).confirmation.claims


def test_a_planted_knob_effect_is_found_and_an_absent_one_is_non_inferior(tmp_path):
    store, plan = factorial_store(tmp_path, "planted_k", k_effect=0.6, interaction=0.0)
    k, theta, inter = verdicts_of(store, plan)
    assert k.verdict == SUPPORTED and effect(k, "k") == pytest.approx(0.6, abs=0.15), k
    assert theta.verdict == SUPPORTED, theta  # theta 0.5 non-inferior to theta 1 within 0.5 pp
    assert inter.verdict == SUPPORTED, inter  # no interaction: equivalent within ±0.5 pp
    assert "seed as block" in k.test


def test_a_planted_interaction_is_found(tmp_path):
    store, plan = factorial_store(tmp_path, "planted_x", k_effect=0.0, interaction=1.5)
    k, theta, inter = verdicts_of(store, plan)
    assert inter.verdict == CONTRADICTED and effect(inter, "theta:B") == pytest.approx(1.5, abs=0.15), inter
    assert k.verdict != SUPPORTED  # no k effect was planted


FRONTIER = """
name: frontier
experiment: {experiment}
confirmation:
  seeds: [400, 401, 402, 403, 404, 405]
  arms:
    bc16: [model=densenet_bc16_k12]
    bc28: [model=densenet_bc28_k12]
    r20: [model=resnet20]
    r56: [model=resnet56]
    tiny: [model=resnet20]
claims:
  - {{kind: frontier, dense: [bc16, bc28], baselines: {baselines}, by: params, min_factor: 2, margin_pp: 0.5}}
"""
FRONTIER_ARMS = {"bc16": ("densenet_cifar", 44_000), "bc28": ("densenet_cifar", 102_000),
                 "r20": ("resnet_cifar", 269_000), "r56": ("resnet_cifar", 853_000), "tiny": ("resnet_cifar", 60_000)}


def frontier_store(tmp_path, experiment: str, baselines: str, acc_pp: dict[str, float]):
    plan = write(tmp_path, FRONTIER.format(experiment=experiment, baselines=baselines), f"{experiment}.yaml")
    store = Store(tmp_path / experiment)
    client = store.client()
    eid = client.create_experiment(experiment, artifact_location=(store.path / "a").as_uri())
    rng = np.random.default_rng(3)
    for (arm, (arch, params)), seed in itertools.product(FRONTIER_ARMS.items(), SEEDS):
        acc = (acc_pp[arm] + rng.normal(0, 0.2)) / 100
        run_id = add_run(client, eid, arm, {**RECIPE, "model.arch": arch, "model.name": arm, "data.split_seed": seed},
                         {record.TEST_ACC: acc, record.PARAMS: params}, seed, "fashion_mnist",
                         tags={record.STUDY_PLAN: plan.name, record.STUDY_PLAN_HASH: plan.hash,
                               record.STUDY_STAGE: "confirmation", record.STUDY_ARM: arm})
        client.log_batch(run_id, metrics=[Metric(record.VAL_ACC, acc, 0, s) for s in range(6)])
    return store, plan


def test_a_frontier_holds_when_every_baseline_has_a_non_inferior_densenet(tmp_path):
    acc = {"bc16": 90.0, "bc28": 91.3, "r20": 91.0, "r56": 91.2, "tiny": 89.0}
    store, plan = frontier_store(tmp_path, "front_ok", "[r20, r56]", acc)
    (claim,) = verdicts_of(store, plan)
    assert claim.verdict == SUPPORTED, claim
    # r20 (269k) is answered by bc28 (102k, 2.63x fewer), r56 too: the largest DenseNet within budget.
    assert "r20 (2.69e+05): bc28" in claim.evidence and "r56 (8.53e+05): bc28" in claim.evidence


def test_a_frontier_with_a_baseline_no_densenet_answers_is_not_supported(tmp_path):
    acc = {"bc16": 90.0, "bc28": 91.0, "r20": 91.0, "r56": 91.2, "tiny": 89.0}
    store, plan = frontier_store(tmp_path, "front_none", "[r20, tiny]", acc)
    (claim,) = verdicts_of(store, plan)
    assert claim.verdict == INCONCLUSIVE and "not supported: tiny" in claim.reason, claim
    # ...and one whose DenseNet is clearly worse is contradicted.
    acc = {"bc16": 90.0, "bc28": 89.0, "r20": 91.0, "r56": 91.2, "tiny": 89.0}
    store, plan = frontier_store(tmp_path, "front_worse", "[r20, r56]", acc)
    (claim,) = verdicts_of(store, plan)
    assert claim.verdict == CONTRADICTED, claim


def test_a_paired_plan_whose_arms_set_their_own_split_is_refused_in_one_line(tmp_path):
    text = """
name: p
paired: true
confirmation:
  seeds: [1, 2, 3]
  arms:
    a: [model=resnet20]
    b: [model=resnet20, data.split_seed=7]
"""
    with pytest.raises(InvalidValue) as err:
        write(tmp_path, text)
    message = str(err.value)
    assert "confirmation.arms.b='data.split_seed=7' is invalid" in message and "paired" in message
    assert "\n" not in message


def test_paired_runs_that_did_not_share_their_split_are_not_judged_within_seed(tmp_path):
    store, plan = factorial_store(tmp_path, "unshared", k_effect=0.6, interaction=0.0)
    client = store.client()
    run = client.search_runs([client.get_experiment_by_name("unshared").experiment_id], max_results=1)[0]
    client.log_param(run.info.run_id, "data.train_size", "1000")  # this arm's seed saw another split
    found = report.judge(report.load_evidence(plan.experiment, store.uri), 0.5, plan).confirmation
    assert all(c.verdict == INCONCLUSIVE and "declared paired, but seed" in c.reason for c in found.claims)
    assert any("ran on different splits" in n for n in found.notes)


# --- the fixed family ------------------------------------------------------------------------------

def _family(tmp_path, procedure: str):
    return write(tmp_path, f"""
name: fam
procedure: {procedure}
confirmation:
  seeds: [1, 2, 3]
  arms:
    a: [model=resnet20]
    b: [model=resnet56]
    d: [model=densenet_bc28_k12]
claims:
  - {{kind: fewer_params, smaller: d, larger: a, margin_pp: 0.5}}
  - {{kind: fewer_params, smaller: d, larger: b, margin_pp: 0.5}}
  - {{kind: feature_reuse, arm: d}}
  - {{kind: gradient_flow, dense: d, baseline: a}}
  - {{kind: gradient_flow, dense: d, baseline: b, phase: epoch1}}
""", f"{procedure}.yaml")


def _claims(ps):
    out = []
    for i, p in enumerate(ps):
        c = Claim("fam", f"claim {i}", INCONCLUSIVE, "", "no test", reason="" if p is not None else "gated")
        c.p_value, c.direction = p, (1 if p is not None else 0)
        out.append(c)
    return out


def test_a_gated_out_claim_still_counts_in_the_holm_family(tmp_path):
    plan = _family(tmp_path, "holm")
    assert claims.tests(plan) == 8  # 1 + 1 + 4 + 1 + 1
    judged = _claims([0.004, 0.03, None, None, None, None, None, None])  # 6 of 8 stopped by gates
    decided = family.decide(plan, judged)
    assert len(decided) == 8
    assert judged[0].p_holm == pytest.approx(8 * 0.004) and judged[0].verdict == SUPPORTED  # alpha / 8, not / 2
    assert judged[1].p_holm == pytest.approx(7 * 0.03) and judged[1].verdict == INCONCLUSIVE
    assert all(c.reason == "gated" for c in judged[2:])
    assert "stopped by a gate, counted with p = 1" in family.procedure_line(plan, decided)
    sized = sizing.sizing(plan, "sqlite:///unused.db", sd_pp=0.3)
    assert sized["alpha"].iloc[0].startswith("0.00625 (Holm, k = 8)")


def test_a_fixed_sequence_tests_in_order_each_at_alpha(tmp_path):
    plan = _family(tmp_path, "fixed_sequence")
    judged = _claims([0.04, 0.03, None, 0.001, None, None, None, None])
    family.decide(plan, judged)
    assert [c.verdict for c in judged[:2]] == [SUPPORTED, SUPPORTED]  # 0.04 < alpha: no correction in a sequence
    assert judged[3].verdict == INCONCLUSIVE and judged[3].p_holm == 1.0  # a gated test ended the sequence
    sized = sizing.sizing(plan, "sqlite:///unused.db", sd_pp=0.3)
    assert sized["alpha"].iloc[0].startswith("0.05 (fixed sequence)")
    # The second test is reached only when the first rejects; a claim without a power model ends the chain.
    first, second = sized["power"].iloc[:2]
    reach = sized["power to reach and reject"]
    assert reach.iloc[0] == pytest.approx(first, abs=1e-3) and reach.iloc[1] == pytest.approx(first * second, abs=1e-3)
    assert reach.iloc[1] < second
    assert sized["power to reach and reject"].iloc[2:].isna().all()


# --- TOST power ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sd, n, difference", [(0.33, 10, 0.0), (0.33, 10, 0.15), (0.37, 8, 0.1), (0.2, 5, 0.0)])
def test_tost_power_agrees_with_a_simulation_of_the_welch_tost(sd, n, difference):
    from scipy import stats as sp

    margin, alpha, draws = 0.5, 0.025, 20_000
    rng = np.random.default_rng(11)
    a = rng.normal(difference, sd, (draws, n))
    b = rng.normal(0.0, sd, (draws, n))
    va, vb = a.var(axis=1, ddof=1) / n, b.var(axis=1, ddof=1) / n
    se = np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (n - 1))  # Welch-Satterthwaite
    d = a.mean(axis=1) - b.mean(axis=1)
    lower = sp.t.sf((d + margin) / se, dof)
    upper = sp.t.cdf((d - margin) / se, dof)
    simulated = float(np.mean(np.maximum(lower, upper) < alpha))
    assert stats.tost_power(sd, margin, n, n, alpha, difference) == pytest.approx(simulated, abs=0.02)


def test_the_plan_reference_documents_every_claim_kind_and_its_keys():
    from conftest import ROOT

    usage = (ROOT / "docs" / "usage.md").read_text()
    section = usage[usage.index("## Plan reference"):usage.index("## Probes")]
    for kind, module in claims.KINDS.items():
        row = next((line for line in section.splitlines() if line.startswith(f"| `{kind}`")), "")
        assert row, f"docs/usage.md's plan reference lacks the claim kind {kind}"
        assert all(f"`{key}`" in row for key in module.KEYS), (kind, row)


# --- the settled rule ------------------------------------------------------------------------------

SETTLED = """
name: settled
experiment: {experiment}
settled: {{min_checks: 3, tolerance_pp: 0.2}}
confirmation:
  seeds: [400, 401, 402]
  arms:
    a: [model=resnet20]
    b: [model=plain20]
claims:
  - {{kind: fewer_params, smaller: a, larger: b, margin_pp: 0.5, min_param_factor: 1}}
"""
STEP_RECIPE = {**RECIPE, "data.name": "fashion_mnist", "data.train_size": "None", "optim.scheduler": "multistep",
               "optim.milestones": "[0.34, 0.67]"}


def settled_store(tmp_path, experiment: str, final_rise_pp: float, noise_pp: float):
    """Two arms x 3 seeds, 12 checks a run (every quarter epoch of 3, drops after epochs 1 and 2); the
    final phase (4 checks after the drop at 2) rises by `final_rise_pp` with noise of SD `noise_pp`."""
    plan = write(tmp_path, SETTLED.format(experiment=experiment), f"{experiment}.yaml")
    store = Store(tmp_path / experiment)
    client = store.client()
    eid = client.create_experiment(experiment, artifact_location=(store.path / "a").as_uri())
    rng = np.random.default_rng(5)
    batches = 55_000 // 128 + 1  # full Fashion-MNIST less 5000 for validation, batch 128
    for arm, seed in itertools.product(("a", "b"), (400, 401, 402)):
        final = 0.91 + rng.normal(0, 0.002)
        run_id = add_run(client, eid, arm, {**STEP_RECIPE, "model.arch": "resnet_cifar", "model.name": arm,
                                            "data.split_seed": seed},
                         {record.TEST_ACC: final, record.PARAMS: 1000}, seed, "fashion_mnist",
                         tags={record.STUDY_PLAN: plan.name, record.STUDY_PLAN_HASH: plan.hash,
                               record.STUDY_STAGE: "confirmation", record.STUDY_ARM: arm})
        checks = []
        for q in range(1, 13):
            epoch = q / 4
            pp = 85 + 2 * min(epoch, 2) if epoch <= 2 else 89 + final_rise_pp * (epoch - 2.25) / 0.75
            checks.append(Metric(record.VAL_ACC, (pp + rng.normal(0, noise_pp)) / 100, 0, round(epoch * batches) - 1))
        client.log_batch(run_id, metrics=checks)
    return store, plan


def test_arms_still_rising_over_their_last_phase_are_not_settled(tmp_path):
    store, plan = settled_store(tmp_path, "rising", final_rise_pp=0.5, noise_pp=0.02)
    (claim,) = verdicts_of(store, plan)
    assert claim.verdict == INCONCLUSIVE and "not converged" in claim.reason and "over its final phase (mean of its runs" in \
        claim.reason, claim


def test_a_flat_final_phase_with_noise_under_the_tolerance_is_settled(tmp_path):
    store, plan = settled_store(tmp_path, "flat", final_rise_pp=0.0, noise_pp=0.03)
    (claim,) = verdicts_of(store, plan)
    assert "not converged" not in claim.reason and claim.p_value is not None, claim


# --- the variance split over seeds and test images ---------------------------------------------------

def test_a_planned_pair_with_predictions_splits_its_variance_over_seeds_and_test_images(tmp_path):
    """VARIANCE_RULE on predictions built here: the test-set SE is the SE of the per-image
    difference of correctness, recomputed by hand."""
    import pandas as pd

    from densenet_exp.claims import evidence

    rng = np.random.default_rng(2)
    target = rng.integers(0, 10, 2000)

    def predictions(acc: float) -> pd.DataFrame:
        right = rng.random(len(target)) < acc
        return pd.DataFrame({"target": target, "predicted": np.where(right, target, (target + 1) % 10)})

    runs = {f"{arm}{s}": predictions(acc) for arm, acc in (("a", 0.92), ("b", 0.90)) for s in range(4)}

    def arm(name: str) -> evidence.Arm:
        ids = [f"{name}{s}" for s in range(4)]
        acc = [(runs[i]["target"] == runs[i]["predicted"]).mean() for i in ids]
        return evidence.Arm(name, pd.DataFrame({"run_id": ids, "seed": range(4), record.TEST_ACC: acc}))

    a, b = arm("a"), arm("b")
    ctx = type("Ctx", (), {"predictions": runs, "plan": type("Plan", (), {"paired": False})()})()
    line = evidence.variance_split(ctx, a, b, evidence.accuracy(ctx.plan, a, b))
    correct = [np.mean([runs[f"{n}{s}"]["target"] == runs[f"{n}{s}"]["predicted"] for s in range(4)], axis=0)
               for n in "ab"]
    test_se = np.std(correct[0] - correct[1], ddof=1) / np.sqrt(len(target))
    assert f"test-set SE {100 * test_se:.2f} pp" in line and "over seeds and 2,000 test images" in line
    # A run without predictions: no split is claimed.
    del runs["b3"]
    assert evidence.variance_split(ctx, a, b, evidence.accuracy(ctx.plan, a, b)) == ""


def test_arms_that_are_not_a_full_factorial_are_not_fitted(tmp_path):
    """Seven of the eight cells: the fit would be rank-deficient and its coefficients arbitrary."""
    store, plan = factorial_store(tmp_path, "seven", k_effect=0.6, interaction=0.0)
    names = [cell(*c) for c in CELLS][:7]
    arms = "\n".join(f"    {cell(k, t, b)}: [model=densenet_s9, growth_rate={k}, compression={t}, bottleneck={b}]"
                     for k, t, b in CELLS)
    text = FACTORIAL.format(experiment="seven", arms=arms, names=", ".join(names)).replace("name: factorial",
                                                                                          "name: factorial\n")
    seven = write(tmp_path, text, "seven-of-eight.yaml")
    k, _, _ = verdicts_of(store, seven)
    assert k.verdict == "not comparable" and "not a full factorial" in k.reason, k


def test_near_chance_is_decided_on_the_last_validation_check_of_every_run_never_on_test_accuracy(tmp_path):
    """Seed 400's validation stayed at chance (its test accuracy is high); seed 401's test accuracy is
    at chance (its validation is high); the rest trained. Only seed 400 is left out, whichever run
    comes last, with or without a settled rule."""
    import pandas as pd

    from densenet_exp.claims import evidence

    for settled in ("", "settled: {min_checks: 2, tolerance_pp: 5.0}\n"):
        plan = write(tmp_path, "name: chance\nexperiment: chance\n" + settled + "confirmation:\n  seeds: [400, 401, 402]\n"
                     "  arms:\n    a: [model=densenet_s9]\nclaims:\n  - {kind: feature_reuse, arm: a}\n",
                     f"chance{len(settled)}.yaml")
        val = {400: 0.12, 401: 0.90, 402: 0.91}
        test = {400: 0.90, 401: 0.11, 402: 0.91}
        runs = pd.DataFrame({"run_id": [f"r{s}" for s in val], "seed": list(val), "num_classes": 10,
                             f"tags.{record.STUDY_ARM}": "a", record.TEST_ACC: [test[s] for s in val]})
        curves = pd.DataFrame([{"run_id": f"r{s}", "epoch": e, "value": v - 0.001 * (3 - e), "lr_drops": (1.0,)}
                               for s, v in val.items() for e in (1.5, 2.0, 2.5, 3.0)])
        (arm,) = evidence.arms_of(plan, runs, curves).values()
        assert arm.near_chance == ["seed 400: last validation accuracy 0.120, chance 0.100"], settled


def test_test_predictions_are_read_only_when_a_plan_is_judged_and_only_for_its_runs(tmp_path, monkeypatch):
    """One download per run: a report without a plan reads none; a plan reads its own runs' only."""
    store, plan = factorial_store(tmp_path, "lazy", k_effect=0.6, interaction=0.0)
    client = store.client()
    add_run(client, client.get_experiment_by_name(plan.experiment).experiment_id, "stray", RECIPE, {record.TEST_ACC: 0.9},
            7, "fashion_mnist")
    asked = []
    monkeypatch.setattr(report, "test_predictions", lambda runs, uri: asked.append(set(runs["run_id"])) or {})
    evidence = report.load_evidence(plan.experiment, store.uri)
    report.judge(evidence, 0.5)
    assert asked == []
    report.judge(evidence, 0.5, plan)
    (ids,) = asked
    assert len(ids) == 8 * 6 and ids < set(evidence.done["run_id"])  # the stray run is not the plan's


# --- the budget check -----------------------------------------------------------------------------

BUDGET_PLAN = """
name: budget
experiment: {experiment}
convergence: {{max_gain_pp: 0.3}}
confirmation:
  seeds: [400, 401, 402, 403, 404, 405]
  arms:
    d: [model=densenet_bc28_k12]
    r: [model=resnet20]
budget:
  seeds: [500, 501, 502, 503, 504, 505]
  arms:
    d: [model=densenet_bc28_k12, trainer.max_epochs=6]
    r: [model=resnet20, trainer.max_epochs=6]
claims:
  - {{kind: fewer_params, smaller: d, larger: r, margin_pp: 0.5}}
"""


def budget_store(tmp_path, experiment: str, moved_pp: float, budget_seeds: int = 6):
    """d 0.1 pp above r at the confirmation's budget (6 seeds, SD 0.1 pp), and `moved_pp` further at
    twice the budget, on the budget stage's own seeds (the first `budget_seeds` of them)."""
    plan = write(tmp_path, BUDGET_PLAN.format(experiment=experiment), f"{experiment}.yaml")
    store = Store(tmp_path / experiment)
    client = store.client()
    eid = client.create_experiment(experiment, artifact_location=(store.path / "a").as_uri())
    rng = np.random.default_rng(3)
    arms = {"d": ({"model.name": "densenet_bc28_k12", "model.arch": "densenet_cifar"}, 100_000),
            "r": ({"model.name": "resnet20", "model.arch": "resnet_cifar"}, 270_000)}
    for stage, seeds, epochs in (("confirmation", SEEDS, 3), ("budget", [500 + i for i in range(budget_seeds)], 6)):
        for (arm, (params, n)), seed in itertools.product(arms.items(), seeds):
            pp = 91 + (0.1 if arm == "d" else 0) + (1 + (moved_pp if arm == "d" else 0)) * (stage == "budget")
            acc = (pp + rng.normal(0, 0.1)) / 100
            run_id = add_run(client, eid, arm, {**RECIPE, **params, "trainer.max_epochs": epochs, "data.split_seed": seed},
                             {record.TEST_ACC: acc, record.PARAMS: n}, seed, "fashion_mnist",
                             tags={record.STUDY_PLAN: plan.name, record.STUDY_PLAN_HASH: plan.hash,
                                   record.STUDY_STAGE: stage, record.STUDY_ARM: arm})
            client.log_batch(run_id, metrics=[Metric(record.VAL_ACC, acc, 0, s) for s in range(6)])
    return store, plan


@pytest.mark.parametrize("moved_pp, budget_seeds, holds", [(0.05, 6, True), (0.6, 6, False), (0.05, 1, False)])
def test_a_claim_that_moves_at_twice_the_budget_holds_at_this_budget_only(tmp_path, moved_pp, budget_seeds, holds):
    """Issue 30: doubling the budget must move the arm difference by less than half the margin."""
    store, plan = budget_store(tmp_path, f"budget{len(str(moved_pp))}{budget_seeds}", moved_pp, budget_seeds)
    (claim,) = verdicts_of(store, plan)
    assert claim.verdict == SUPPORTED, claim.label
    if holds:
        assert claim.reason == "" and "budget check (trainer.max_epochs=6; 6, 6 seeds)" in claim.evidence
        assert abs(float(re.search(r"moved ([+-][0-9.]+) pp", claim.evidence).group(1))) < 0.25  # half the margin
    elif budget_seeds == 1:
        assert claim.reason.startswith("holds at this budget only: the budget stage (trainer.max_epochs=6) has 1 and 1")
    else:
        assert claim.reason.startswith("holds at this budget only: at trainer.max_epochs=6 the difference moved +0.")
        assert "half the margin is 0.25" in claim.reason
    assert ("budget", claims.evidence.BUDGET_RULE) in claims.rules(plan)


def test_a_budget_arm_is_a_confirmation_arm_trained_longer_on_its_own_seeds(tmp_path):
    base = BUDGET_PLAN.format(experiment="b")
    for bad, key in ((base.replace("    d: [model=densenet_bc28_k12, trainer.max_epochs=6]", "    x: [model=resnet20]"), "budget.arms.x"),
                     (base.replace("[model=densenet_bc28_k12, trainer.max_epochs=6]", "[model=resnet56, trainer.max_epochs=6]"),
                      "budget.arms.d"),
                     (base.replace("[model=densenet_bc28_k12, trainer.max_epochs=6]", "[model=densenet_bc28_k12]"), "budget.arms.d"),
                     (base.replace("seeds: [500, 501", "seeds: [400, 501"), "budget.seeds")):
        with pytest.raises(InvalidValue, match=rf"^{re.escape(key)}="):
            write(tmp_path, bad, "bad.yaml")

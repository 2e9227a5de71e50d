"""The verdict rules of densenet_exp.analysis.verdicts on stores written by hand with known values (one
experiment per scenario), plus real models at initialization for the gradient-flow claim."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats
from torch import nn

from conftest import Store
from densenet_exp.analysis import figures, results, stats, verdicts
from densenet_exp import record, report
from densenet_exp.measures.figure5 import FIGURE5, figure5_ratios
from densenet_exp.probes.gradient_flow import relative_gradients, weighted_layers
from densenet_exp.probes.gradient_flow import summarize as summarize_gradients
from densenet_exp.analysis.verdicts import CONTRADICTED, EXPLORATORY, INCONCLUSIVE, NOT_COMPARABLE, SUPPORTED
from builders import add_run

KNOBS_NONE = {"growth_rate": None, "compression": None, "bottleneck": None}
SMALL = {"model.name": "densenet_small", "model.arch": "densenet", "model.block_config": "[2, 6, 12]",
         "growth_rate": 12, "compression": 0.5, "bottleneck": True}  # depth 1 + 2*20 + 2 + 1 = 44
BIG = {"model.name": "densenet_small", "model.arch": "densenet", "model.block_config": "[2, 6, 12]",
       "growth_rate": 24, "compression": 1.0, "bottleneck": False}  # depth 1 + 20 + 2 + 1 = 24
RESNET = {"model.name": "resnet20", "model.arch": "resnet_cifar", "model.depth": 20, **KNOBS_NONE}
PLAIN = {"model.name": "plain20", "model.arch": "plain_cifar", "model.depth": 20, **KNOBS_NONE}
RECIPE = {"data.batch_size": 32, "data.augment": "none", "data.val_size": 128, "optim.lr": 0.05,
          "trainer.precision": "32-true"}


def figure5_like(rng: np.random.Generator, blocks: int = 3, num_layers: int = 6) -> list[np.ndarray]:
    """Matrices shaped like the paper's Figure 5: early sources used throughout, the block input
    strong in block 1 and weak (the transition output) in blocks 2 and 3, transitions spread
    evenly, the classifier heavy on the last layers; a little noise per run."""
    matrices = []
    for b in range(blocks):
        m = np.full((num_layers + 1, num_layers + 1), np.nan)
        for layer in range(1, num_layers + 1):
            for s in range(layer):
                m[s, layer - 1] = 1.5 if s == layer - 1 else (1.4 if b == 0 else 0.3) if s == 0 else 1.0
        late = np.arange(num_layers + 1) > num_layers - num_layers // 2
        m[:, -1] = 1.0 if b < blocks - 1 else np.where(late, 3.0, 0.6)
        matrices.append(m * rng.uniform(0.97, 1.03, m.shape))
    return matrices


def recency(blocks: int = 3, num_layers: int = 6) -> list[np.ndarray]:
    """Every layer, transition and classifier reads almost only its most recent source."""
    matrices = []
    for _ in range(blocks):
        m = np.full((num_layers + 1, num_layers + 1), np.nan)
        for target in range(num_layers + 1):
            m[: target + 1, target] = 0.01
            m[target, target] = 1.0
        matrices.append(m)
    return matrices


def as_json(matrices: list[np.ndarray]) -> str:
    return json.dumps([[[None if math.isnan(v) else v for v in row] for row in m.tolist()] for m in matrices])


# Scenario "equivalent": three seeds; the small DenseNet (c) is within the margin of resnet20 (R)
# with fewer parameters; the big DenseNet (D) is the most accurate on validation.
EQUIVALENT = {
    "dense-small": (SMALL, {"test/acc": [0.9245, 0.9250, 0.9255], "val/acc": [0.900, 0.905, 0.910],
                            "params": [100_000] * 3, "flops_per_image": [20e6] * 3,
                            "memory/train_step_mb": [640.0] * 3, "train_images_per_s": [100, 101, 102]}),
    "dense-big": (BIG, {"test/acc": [0.950, 0.951, 0.952], "val/acc": [0.930, 0.931, 0.932],
                        "params": [400_000] * 3, "flops_per_image": [80e6] * 3, "memory/train_step_mb": [900.0] * 3,
                        "train_images_per_s": [50, 50.5, 51], "grad/early_rel_init": [0.05, 0.055, 0.06]}),
    "resnet20": (RESNET, {"test/acc": [0.9248, 0.9250, 0.9252], "val/acc": [0.910, 0.911, 0.912],
                          "params": [270_000] * 3, "flops_per_image": [40e6] * 3,
                          "memory/train_step_mb": [320.0] * 3, "train_images_per_s": [300, 301, 302],
                          "grad/early_rel_init": [0.2, 0.21, 0.22], "grad/early_over_late_init": [1.3, 1.2, 1.4]}),
    "plain20": (PLAIN, {"test/acc": [0.90, 0.91, 0.92], "val/acc": [0.89, 0.895, 0.90], "params": [270_000] * 3,
                        "grad/early_rel_init": [0.005, 0.0055, 0.006],
                        "grad/early_over_late_init": [0.1, 0.12, 0.11]}),
}


def build(store: Store, experiment: str, spec: dict, seeds: int = 3, extra: dict | None = None,
          artifacts=None, data: str = "fashion_mnist") -> None:
    client = store.client()
    experiment_id = client.create_experiment(experiment, artifact_location=(store.path / experiment).as_uri())
    rng = np.random.default_rng(0)
    for variant, (params, metrics) in spec.items():
        for seed in range(seeds):
            files = artifacts(variant, {k: v[seed] for k, v in metrics.items()}, rng) if artifacts else None
            add_run(client, experiment_id, variant, {**RECIPE, **params, **(extra or {}).get(variant, {})},
                    {k: v[seed] for k, v in metrics.items()}, seed, data, artifacts=files)


def flat(rng: np.random.Generator) -> list[np.ndarray]:
    """Figure 5 matrices at He initialization: every source about the same weight per map."""
    return [np.where(np.isnan(m), np.nan, 1.0) * rng.uniform(0.97, 1.03, m.shape) for m in figure5_like(rng)]


def body_grads_csv(early: float, early_over_late: float) -> str:
    """relative_grads.csv at init: a stem, eight body 3x3 convs (the first two `early`, the last two
    early / early_over_late) and a classifier far above them all."""
    late = early / early_over_late
    rows = [("stem", 1.0)] + [("body", early if d < 2 else late if d > 5 else (early + late) / 2) for d in range(8)]
    rows.append(("classifier", 5.0))
    lines = [f"init,0,{d},{d / 9},l{d},{'Linear' if r == 'classifier' else 'Conv2d'},{r},{g},1.0,{g}"
             for d, (r, g) in enumerate(rows)]
    return ",".join(record.RELATIVE_GRADS_COLUMNS) + "\n" + "\n".join(lines) + "\n"


def reuse_artifacts(variant: str, metrics: dict, rng: np.random.Generator) -> dict | None:
    """Trained (Figure 5-like) and init matrices for dense-big; body-conv gradients where the spec has them."""
    files = {}
    if variant == "dense-big":
        files |= {record.FEATURE_REUSE_MATRICES: as_json(figure5_like(rng)),
                  record.FEATURE_REUSE_MATRICES_INIT: as_json(flat(rng))}
    if "grad/early_rel_init" in metrics:
        files[record.RELATIVE_GRADS] = body_grads_csv(metrics["grad/early_rel_init"],
                                                      metrics.get("grad/early_over_late_init", 1.0))
    return files or None


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store(tmp_path_factory.mktemp("verdicts"))
    build(store, "equivalent", EQUIVALENT, artifacts=reuse_artifacts)
    build(store, "one_seed", EQUIVALENT, seeds=1, artifacts=reuse_artifacts)
    loss = {**EQUIVALENT, "dense-small": (SMALL, {**EQUIVALENT["dense-small"][1], "test/acc": [0.900, 0.901, 0.902]})}
    build(store, "clear_loss", loss, artifacts=reuse_artifacts)
    # The test-best DenseNet (dense-big) is not the val-best (dense-small).
    flipped = {**EQUIVALENT, "dense-small": (SMALL, {**EQUIVALENT["dense-small"][1], "val/acc": [0.96, 0.965, 0.97]})}
    build(store, "selection", flipped)
    no_val = {v: (p, {**m, "train/loss": [0.3 if v == "dense-small" else 0.5] * 3}) for v, (p, m) in EQUIVALENT.items()}
    build(store, "no_val", no_val, extra={v: {"data.val_size": 0} for v in EQUIVALENT})
    return store


def judge(store: Store, experiment: str, margin_pp: float = 0.5, edit=None) -> dict[str, verdicts.Claim]:
    done = results.finished(results.load_runs(experiment, store.uri))
    if edit:
        done = edit(done.copy())
    matrices = results.feature_reuse_matrices(done, store.uri)
    init = results.feature_reuse_matrices(done, store.uri, record.FEATURE_REUSE_MATRICES_INIT)
    judged = verdicts.evaluate_claims(done, matrices, margin_pp, init, results.relative_grads(done, store.uri))
    assert [c.claim for c in judged.claims] == verdicts.CLAIMS
    return {c.claim: c for c in judged.claims}


def leans(claim: verdicts.Claim) -> str:
    """What an exploratory claim would have been decided as (its verdict otherwise)."""
    if claim.verdict != EXPLORATORY:
        return claim.verdict
    return SUPPORTED if "leans supported" in claim.reason else CONTRADICTED


def test_holm_matches_hand_computed_values():
    # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> running max 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-12)
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([0.02]) == pytest.approx([0.02])


def test_tost_agrees_with_two_one_sided_welch_tests_by_hand():
    a, b, m = np.array([0.921, 0.925, 0.923]), np.array([0.920, 0.926, 0.921, 0.924]), 0.005
    lower = scipy_stats.ttest_ind(a + m, b, equal_var=False, alternative="greater").pvalue
    upper = scipy_stats.ttest_ind(a - m, b, equal_var=False, alternative="less").pvalue
    assert stats.tost(a, b, m) == pytest.approx(max(lower, upper), rel=1e-9)
    # Non-inferiority is the lower of the two one-sided tests.
    assert stats.welch_one_sided(a, b, "larger", -m) == pytest.approx(lower, rel=1e-9)


def test_three_seeds_inside_the_margin_lean_fewer_parameters_and_unlock_the_cost_claims(store):
    claims = judge(store, "equivalent")
    assert {c.verdict for c in claims.values()} <= {EXPLORATORY, INCONCLUSIVE, NOT_COMPARABLE}  # no plan
    params = claims[verdicts.PARAMS]
    assert leans(params) == SUPPORTED and params.p_value < 0.05 and params.p_holm >= params.p_value
    assert "c = dense-small" in params.evidence and "same accuracy" in params.test
    # Matched accuracy: memory per image 640/32 = 20 MiB vs 320/32 = 10 MiB, exact figures.
    memory = claims[verdicts.MEMORY]
    assert leans(memory) == SUPPORTED and memory.p_value is None and "20 MiB/image" in memory.evidence
    assert leans(claims[verdicts.COMPUTE]) == SUPPORTED  # 1/100 s vs 1/300 s per image
    assert leans(claims[verdicts.COMPUTE_FLOP]) == SUPPORTED  # 1e9/(50.5*80e6) vs 1e9/(301*40e6)
    # Gradient flow on body convs: plain20 vanishes (early/late 0.11), dense-big (depth 24) is the closest DenseNet.
    plain = claims["stronger gradient flow than a plain net (init)"]
    assert leans(plain) == SUPPORTED and "depth 24" in plain.evidence and "log10" in plain.test
    resnet = claims["stronger gradient flow than a ResNet (init)"]
    assert resnet.verdict == INCONCLUSIVE and "no vanishing gradient" in resnet.reason
    # Feature reuse against init: trained like Figure 5 from a flat start.
    for observation in "cd":
        assert leans(claims[FIGURE5[observation][0]]) == SUPPORTED, observation
    # Holm over every claim with a test.
    tested = [c for c in claims.values() if c.p_value is not None]
    assert [c.p_holm for c in tested] == pytest.approx(stats.holm([c.p_value for c in tested]), rel=1e-9)


def test_one_seed_per_side_leaves_every_claim_inconclusive(store):
    claims = judge(store, "one_seed")
    assert {c.verdict for c in claims.values()} == {INCONCLUSIVE}
    assert claims[verdicts.PARAMS].reason == "needs >= 3 seeds per side"
    assert claims[FIGURE5["a"][0]].reason == "needs >= 3 seeds per side"
    assert claims[verdicts.MEMORY].reason == "accuracy not matched"  # no TOST without 3 seeds


def test_a_clear_loss_outside_the_margin_leans_contradicted(store):
    claims = judge(store, "clear_loss")
    params = claims[verdicts.PARAMS]
    assert leans(params) == CONTRADICTED and params.p_holm < 0.05 and "-2.40 pp" in params.evidence
    assert claims[verdicts.MEMORY].reason == "accuracy not matched"


def test_a_wider_margin_is_applied_and_printed(store):
    claims = judge(store, "clear_loss", margin_pp=3.0)  # -2.4 pp is inside ±3 pp: not a loss any more
    assert leans(claims[verdicts.PARAMS]) == SUPPORTED
    assert "±3 pp" in claims[verdicts.PARAMS].test
    assert "±3 percentage points" in dict(verdicts.method(3.0))["same accuracy (equivalence)"]


@pytest.mark.parametrize("column, value, key", [
    ("params.trainer.max_epochs", "5", "trainer.max_epochs"),
    ("params.data.augment", "crop_flip", "data.augment"),
    ("tags.precision", "bf16-mixed", "precision"),
    ("params.data.batch_size", "64", "data.batch_size"),
    ("tags.git_commit", "abc123", "git_commit"),
])
def test_a_recipe_mismatch_between_d_and_r_is_not_comparable_and_names_the_key(store, column, value, key):
    def edit(done):
        done.loc[done["variant"] == "resnet20", column] = value
        return done

    claims = judge(store, "equivalent", edit=edit)
    params = claims[verdicts.PARAMS]
    assert params.verdict == NOT_COMPARABLE and params.reason.startswith(f"{key}: ")
    assert claims[verdicts.MEMORY].verdict == INCONCLUSIVE  # no pair at matched accuracy
    assert claims[verdicts.COMPUTE_FLOP].verdict == NOT_COMPARABLE


def test_timing_claims_need_the_same_parallel_jobs_and_steady_throughput(store):
    def shared_cores(done):
        done["tags.parallel_jobs"] = np.where(done["variant"] == "resnet20", "2", None)  # others: not recorded
        return done

    claims = judge(store, "equivalent", edit=shared_cores)
    assert leans(claims[verdicts.PARAMS]) == SUPPORTED  # accuracy does not depend on timing
    for name in (verdicts.COMPUTE, verdicts.COMPUTE_FLOP):
        assert claims[name].verdict == NOT_COMPARABLE and "parallel_jobs: 1, 2" in claims[name].reason

    def noisy(done):
        done.loc[done["variant"] == "resnet20", "train_images_per_s"] = [300.0, 150.0, 450.0]
        return done

    claims = judge(store, "equivalent", edit=noisy)
    assert claims[verdicts.COMPUTE].verdict == INCONCLUSIVE and "noisy throughput: resnet20 CV 50%" in \
        claims[verdicts.COMPUTE].reason


def test_selection_uses_validation_accuracy_and_the_report_says_what_test_would_have_picked(store, tmp_path):
    done = results.finished(results.load_runs("selection", store.uri))
    judged = verdicts.evaluate_claims(done)
    sel = judged.selections["fashion_mnist"]
    assert sel.criterion == "val/acc" and sel.dense.variant == "dense-small" and sel.dense_by_test.variant == "dense-big"
    found = report.write_report("selection", store.uri, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "D = `dense-small` (mean val/acc 0.965)" in text
    assert "the highest mean test accuracy would have picked `dense-big`" in text and "not used" in text
    assert found.judgement.selections["fashion_mnist"].dense.variant == "dense-small"


def test_runs_without_a_validation_split_are_selected_on_training_loss_and_the_report_says_so(store, tmp_path):
    done = results.finished(results.load_runs("no_val", store.uri))
    assert (done["val_size"] == 0).all()
    sel = verdicts.evaluate_claims(done).selections["fashion_mnist"]
    assert sel.criterion == "train/loss" and sel.dense.variant == "dense-small"  # loss 0.3 < 0.5
    report.write_report("no_val", store.uri, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "no validation split" in text and "selected on the lowest mean last-epoch training loss" in text


def test_figure5_observations_are_judged_on_the_change_from_initialization():
    rng = np.random.default_rng(1)
    runs = pd.DataFrame({"run_id": ["r0", "r1", "r2"], "variant": "d", "seed": [0, 1, 2]})

    def verdict_of(start, end):
        init = {i: start() for i in runs["run_id"]}
        trained = {i: end() if end else init[i] for i in runs["run_id"]}
        claims = verdicts.reuse_change_claims("x", "d", runs, trained, init, None)
        verdicts.decide(claims)
        return {c.claim[len("feature reuse ("):][0]: c for c in claims}

    # Trained like the paper's Figure 5 from a flat start: (c) and (d) hold, (a) and (b) keep their weight.
    got = verdict_of(lambda: flat(rng), lambda: figure5_like(rng))
    assert {k: c.verdict for k, c in got.items()} == dict.fromkeys("abcd", SUPPORTED)
    # An untrained net (trained = init) is inconclusive on every observation: nothing changed.
    got = verdict_of(lambda: flat(rng), None)
    assert {c.verdict for c in got.values()} == {INCONCLUSIVE}
    # Noise alone (a barely trained net): (a) and (b) are not read as reuse.
    got = verdict_of(lambda: flat(rng), lambda: flat(rng))
    assert got["a"].verdict == INCONCLUSIVE and "barely moved" in got["a"].reason
    # Training that drops early sources for the most recent one contradicts (a) and (b).
    got = verdict_of(lambda: flat(rng), lambda: [m * rng.uniform(0.97, 1.03, m.shape) for m in recency()])
    assert got["a"].verdict == CONTRADICTED and got["b"].verdict == CONTRADICTED


def test_figure5_ratios_by_hand():
    # One block of L = 3 layers plus a classifier; layer 3 reads sources 0, 1, 2 with 2, 1, 1.
    m = np.array([[1.0, 1.0, 2.0, 1.0],
                  [np.nan, 1.0, 1.0, 1.0],
                  [np.nan, np.nan, 1.0, 1.0],
                  [np.nan, np.nan, np.nan, 5.0]])
    ratios = figure5_ratios([m])
    # (a) block 1, layer 3: early sources {1, 0} get (1 + 2) / 4 of the weight; uniform gives 2/3.
    assert ratios["reuse/early_over_uniform"] == pytest.approx((3 / 4) / (2 / 3))
    # (d) classifier: later floor(3/2) = 1 layer (source 3) gets 5/8; uniform gives 1/4.
    assert ratios["reuse/classifier_late_over_uniform"] == pytest.approx((5 / 8) / (1 / 4))
    assert "reuse/transition_output_over_uniform" not in ratios  # a single block has no transition


# --- gradient flow with real models at initialization ----------------------------------------


def relative_grads_at_init(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> pd.DataFrame:
    """gradient_flow/relative_grads.csv's rows for one training-mode step at initialization, as the probe writes them."""
    model.train()
    nn.functional.cross_entropy(model(images), labels).backward()
    return relative_gradients(weighted_layers(model), "init", 0)


def early_and_ratio(table: pd.DataFrame) -> tuple[float, float]:
    """The probe's summary on the body 3x3 convolutions: early relative gradient, early over late."""
    metrics = summarize_gradients(table)
    return metrics["grad/early_rel_init"], metrics["grad/early_over_late_init"]


def test_gradient_flow_of_real_plain110_and_densenet_at_initialization(tmp_path):
    """DenseNet-BC (L=100, k=4 to keep it cheap) and plain-110 at initialization, three seeds each,
    one training-mode batch of 4 random 16x16 images. Measured: the plain net's early layers do not get a vanishing
    gradient but an exploding one (about 1e5 times the DenseNet's relative gradient, and 1e5-1e6
    times its own late layers': BatchNorm in train mode, cf. He et al. 2016, Sec. 4.1), so the
    claim against vanishing gradients cannot be judged against it, and the verdict says so."""
    from densenet_exp.models import build_model

    store = Store(tmp_path)
    client = store.client()
    experiment_id = client.create_experiment("grads", artifact_location=(tmp_path / "a").as_uri())
    models = {"densenet-bc100": {"model.name": "densenet_bc100_k12", "model.arch": "densenet_cifar",
                                 "model.depth": 100, "growth_rate": 4, "compression": 0.5, "bottleneck": True},
              "plain110": {"model.name": "plain110", "model.arch": "plain_cifar", "model.depth": 110, **KNOBS_NONE}}
    measured: dict[str, list[float]] = {}
    for variant, params in models.items():
        for seed in range(3):
            torch.manual_seed(seed)
            config = {"arch": params["model.arch"], "depth": params["model.depth"], "in_channels": 1,
                      **({"growth_rate": 4} if variant.startswith("densenet") else {})}
            table = relative_grads_at_init(build_model(config), torch.randn(4, 1, 16, 16), torch.arange(4))
            early, ratio = early_and_ratio(table)
            measured.setdefault(variant, []).append(early)
            add_run(client, experiment_id, variant, {**RECIPE, **params},
                    {"test/acc": 0.5, "val/acc": 0.5, "grad/early_rel_init": early, "grad/early_over_late_init": ratio},
                    seed, "fashion_mnist", artifacts={"gradient_flow/relative_grads.csv": table.to_csv(index=False)})
    dense, plain = np.array(measured["densenet-bc100"]), np.array(measured["plain110"])
    assert plain.min() > 100 * dense.max()  # not smaller: exploding
    done = results.finished(results.load_runs("grads", store.uri))
    grads = results.relative_grads(done, store.uri)
    claims = {c.claim: c for c in verdicts.evaluate_claims(done, grads=grads).claims}
    claim = claims["stronger gradient flow than a plain net (init)"]
    assert claim.verdict == INCONCLUSIVE and "plain110 shows no vanishing gradient" in claim.reason
    assert "exploding" in claim.reason and "depth 100" in claim.evidence and "depth 110" in claim.evidence
    assert set(grads["family"]) == {"densenet", "plain"} and set(grads["phase"]) == {"init"}
    fig = figures.plot_relative_grads(grads, "fashion_mnist")
    assert fig is not None and len(fig.axes[0].lines) == 2

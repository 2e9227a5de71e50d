"""The ablation report and the notebooks. First a store written by hand with chosen values, whose
means, stds, intervals and verdicts are checked against figures computed here; then one real tiny
sweep, shared by the report CLI test, both notebooks and (slow) a headless Chromium rendering."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.transforms import Bbox
import nbformat
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from scipy import stats

from builders import add_run
from conftest import ROOT, Store
from densenet_exp.measures.figure5 import FIGURE5
from densenet_exp.analysis import figures, results, tables, verdicts
from densenet_exp import record, report
from densenet_exp.measures import run_figures

# --- a store with known values ---------------------------------------------------------------

EXPERIMENT = "ablation"
KNOBS_NONE = {"growth_rate": None, "compression": None, "bottleneck": None}
# variant -> (params logged by every run, per-seed metrics: one list of seed values per metric)
FASHION = {
    "densenet_small-k12-c0.5-B": (
        {"model.name": "densenet_small", "model.arch": "densenet", "model.block_config": "[2, 6, 12]",
         "growth_rate": 12, "compression": 0.5, "bottleneck": True},
        {"test/acc": [0.915, 0.925, 0.935], "val/acc": [0.90, 0.91, 0.92], "params": [100_000] * 3,
         "flops_per_image": [20e6] * 3, "grad/early_rel_init": [0.05, 0.06, 0.07],
         "memory/train_step_mb": [200, 200, 200], "train_images_per_s": [150, 160, 170]},  # no inference speed
    ),
    "densenet_small-k24-c1": (
        {"model.name": "densenet_small", "model.arch": "densenet", "model.block_config": "[2, 6, 12]",
         "growth_rate": 24, "compression": 1.0, "bottleneck": False},
        {"test/acc": [0.93, 0.94, 0.95], "val/acc": [0.92, 0.93, 0.94], "params": [400_000] * 3,
         "flops_per_image": [80e6, 80e6, None], "grad/early_rel_init": [0.08, 0.09, 0.1],
         "memory/train_step_mb": [300, 300, 300], "train_images_per_s": [400, 410, 420],
         "infer_images_per_s": [1000, 1100, 1200]},
    ),
    "resnet20": (
        {"model.name": "resnet20", "model.arch": "resnet_cifar", "model.depth": 20, **KNOBS_NONE},
        {"test/acc": [0.92, 0.925, 0.93], "val/acc": [0.91, 0.915, 0.92], "params": [270_000] * 3,
         "flops_per_image": [40e6] * 3, "grad/early_rel_init": [0.2, 0.25, 0.3],
         "grad/early_over_late_init": [1.1, 1.2, 1.3], "memory/train_step_mb": [100, 100, 100],
         "train_images_per_s": [300, 310, 320], "infer_images_per_s": [2000, 2100, 2200]},
    ),
}
# One seed each, outside the sweep; densenet_bc100_k12 and resnet110 on C10+ match the paper's Table 2.
C10_PLUS = {"data.augment": "crop_flip"}
CIFAR = {
    "densenet_bc100_k12-k12-c0.5-B": (
        {"model.name": "densenet_bc100_k12", "model.arch": "densenet_cifar", "model.depth": 100, "growth_rate": 12,
         "compression": 0.5, "bottleneck": True, **C10_PLUS},
        {"test/acc": [0.80], "val/acc": [0.79], "params": [800_000], "memory/train_step_mb": [500],
         "train_images_per_s": [50]},
    ),
    "resnet20": (
        {"model.name": "resnet20", "model.arch": "resnet_cifar", "model.depth": 20, **KNOBS_NONE, **C10_PLUS},
        {"test/acc": [0.85], "val/acc": [0.84], "params": [270_000], "memory/train_step_mb": [100],
         "train_images_per_s": [300]},
    ),
    "resnet110": (
        {"model.name": "resnet110", "model.arch": "resnet_cifar", "model.depth": 110, **KNOBS_NONE, **C10_PLUS},
        {"test/acc": [0.83], "val/acc": [0.82], "params": [1_700_000]},
    ),
    # ResNet-110 without augmentation (C10): the C10+ figure must not be shown beside it.
    "resnet110-noaug": (
        {"model.name": "resnet110", "model.arch": "resnet_cifar", "model.depth": 110, **KNOBS_NONE,
         "data.augment": "none"},
        {"test/acc": [0.70], "val/acc": [0.69], "params": [1_700_000]},
    ),
}
BLOCKS = [np.full((7, 7), 1.0) for _ in range(3)]  # three blocks of L = 6 layers
HOSTILE = {"variant": "<script>alert(1)</script>", "error": "<img src=x onerror=alert(2)>"}


def has_row(markdown: str, *cells: str) -> bool:
    """Whether a markdown table row holds these cells side by side (whatever the padding)."""
    pattern = r"\|\s*" + r"\s*\|\s*".join(re.escape(c) for c in cells) + r"\s*\|"
    return re.search(pattern, markdown) is not None


# Layer names of a CIFAR ResNet, as a file written before the probe recorded roles (no role column):
# the reader gives them stem, body x 3 and classifier.
OLD_LAYERS = [("conv1", "Conv2d"), ("layer1.0.conv1", "Conv2d"), ("layer1.0.conv2", "Conv2d"),
              ("layer2.0.conv1", "Conv2d"), ("fc", "Linear")]


def relative_grads_csv(scale: float) -> str:
    rows = [f"{phase},{d},{d / 4},{name},{kind},{scale * (d + 1)},1.0,{scale * (d + 1)}"
            for phase in ("init", "epoch1") for d, (name, kind) in enumerate(OLD_LAYERS)]
    return "phase,depth,relative_depth,layer,kind,grad_norm,weight_norm,relative_grad\n" + "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """The store: a sweep (parent run) of two DenseNets and a ResNet x 3 seeds on fashion_mnist, plus
    a failed and a running run of it; outside it, single-seed runs on cifar10 and an old report run."""
    store = Store(tmp_path_factory.mktemp("known"))
    client = store.client()
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=(store.path / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="sweep", tags={"sweep": "parent"}).info.run_id
    client.set_terminated(parent, "FINISHED")
    child = {"mlflow.parentRunId": parent, "sweep_id": parent}
    for variant, (params, metrics) in FASHION.items():
        for seed in range(3):
            artifacts = {"gradient_flow/relative_grads.csv": relative_grads_csv(0.1 * (seed + 1))}
            if params["model.arch"] == "densenet":
                artifacts["feature_reuse/matrices.json"] = json.dumps([b.tolist() for b in BLOCKS])
            values = {k: v[seed] for k, v in metrics.items() if k != "val/acc"}
            run_id = add_run(client, experiment_id, variant, params, values, seed, "fashion_mnist", tags=child,
                             artifacts=artifacts)
            for step, (epoch, acc) in enumerate([(0, 0.5), (1, metrics["val/acc"][seed])]):
                client.log_batch(run_id, metrics=[Metric("val/acc", acc, 0, 10 * step + 9),
                                                  Metric("epoch", epoch, 0, 10 * step + 9)])
    dense_params = FASHION["densenet_small-k12-c0.5-B"][0]
    add_run(client, experiment_id, "densenet_small-k12-c0.5-B", dense_params, {"test/acc": 0.1}, 3,
            "fashion_mnist", status="FAILED", tags={**child, "error": "RuntimeError: boom"})
    add_run(client, experiment_id, "densenet_small-k12-c0.5-B", dense_params, {}, 4, "fashion_mnist",
            status="RUNNING", tags=child)
    for variant, (params, metrics) in CIFAR.items():
        seed = 1 if variant.endswith("noaug") else 0
        add_run(client, experiment_id, variant, params, {k: v[0] for k, v in metrics.items()}, seed, "cifar10")
    add_run(client, experiment_id, "report-old", FASHION["resnet20"][0], {"test/acc": 0.0}, 0, "fashion_mnist",
            tags={"report": "true"})
    # Values that try to put script into a colleague's report.
    add_run(client, experiment_id, HOSTILE["variant"], {**dense_params, "model.name": HOSTILE["error"]}, {}, 9,
            "fashion_mnist", status="FAILED", tags={"error": HOSTILE["error"]})
    return store, parent


def row(summary, data: str, model: str, growth_rate=None):
    match = (summary["data"] == data) & (summary["model"] == model)
    if growth_rate is not None:
        match &= summary["growth_rate"] == growth_rate
    assert match.sum() == 1
    return summary[match.fillna(False)].iloc[0]


def test_load_runs_skips_parent_and_report_runs_and_keeps_unfinished_for_listing(known):
    store, parent = known
    runs = results.load_runs(EXPERIMENT, store.uri)
    assert len(runs) == 9 + 2 + 4 + 1  # no parent, no report run
    assert sorted(runs.loc[runs["status"] != "FINISHED", "status"]) == ["FAILED", "FAILED", "RUNNING"]
    assert "RuntimeError: boom" in runs.loc[runs["status"] == "FAILED", "error"].tolist()
    assert len(results.finished(runs)) == 13
    sweep = results.load_runs(EXPERIMENT, store.uri, sweep=parent)
    assert len(sweep) == 11 and set(sweep["data"]) == {"fashion_mnist"}
    resnet = runs[runs["model"] == "resnet20"].iloc[0]
    assert resnet["family"] == "resnet" and pd.isna(resnet["growth_rate"]) and pd.isna(resnet["bottleneck"])
    assert resnet["depth"] == 20 and resnet["parallel_jobs"] == 1  # no tag: one job
    small = runs[runs["variant"] == "densenet_small-k12-c0.5-B"].iloc[0]
    assert small["depth"] == 1 + 2 * 20 + 2 + 1  # first conv, two convs per bottleneck layer, transitions, fc
    with pytest.raises(results.ExperimentNotFound, match="no experiment 'nope'"):
        results.load_runs("nope", store.uri)


def test_sweep_filter_accepts_run_ids_only(known, tmp_path, capsys):
    store, _ = known
    with pytest.raises(results.InvalidRunId, match="--sweep=.* is not a run id"):
        results.load_runs(EXPERIMENT, store.uri, sweep="x' OR '1'='1")
    code = report.main(["--experiment", EXPERIMENT, "--tracking-uri", store.uri, "--out", str(tmp_path / "r"),
                        "--sweep", "x' OR '1'='1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not a run id" in err and not (tmp_path / "r").exists()


def test_learning_curves_and_relative_grads_read_history_and_artifacts(known):
    store, _ = known
    done = results.finished(results.load_runs(EXPERIMENT, store.uri))
    curves = results.learning_curves(done, store.uri)
    assert len(curves) == 2 * 9 + 4  # two epochs of the nine fashion_mnist runs, one value of each cifar10 run
    resnet = curves[(curves["variant"] == "resnet20") & (curves["data"] == "fashion_mnist")].sort_values(["seed", "epoch"])
    assert resnet["epoch"].tolist() == [1, 2] * 3
    assert resnet["value"].tolist() == pytest.approx([0.5, 0.91, 0.5, 0.915, 0.5, 0.92])
    grads = results.relative_grads(done, store.uri)
    assert len(grads) == 9 * 2 * 5 and set(grads["family"]) == {"densenet", "resnet"}
    assert list(grads.columns[:len(record.RELATIVE_GRADS_COLUMNS)]) == list(record.RELATIVE_GRADS_COLUMNS)
    assert grads.groupby("run_id")["role"].apply(list).map(tuple).unique().tolist() == [
        ("stem", "body", "body", "body", "classifier") * 2]  # read from the names: the files have no role
    assert set(grads["phase"]) == {"init", "epoch1"} and grads["relative_depth"].max() == 1


# The fmnist_pair recipe: 55,000 training images in batches of 128 (429 steps per epoch), a
# validation check every half epoch, the learning rate / 10 after epochs 1 and 2 of 3.
HALF_EPOCH_RECIPE = {"data.val_size": 5000, "data.batch_size": 128, "data.train_size": None, "trainer.max_epochs": 3,
                     "trainer.val_check_interval": 0.5, "optim.scheduler": "multistep", "optim.milestones": [0.34, 0.67]}
HALF_EPOCH_CHECKS = [213, 427, 642, 856, 1071, 1285]  # the steps Lightning logs them at


def test_learning_curves_give_one_point_per_check_over_runs_not_per_epoch_metric(tmp_path):
    """Two checks per epoch and 3 seeds: each point has the 3 runs' values at one check (the `epoch`
    metric, equal for both checks of an epoch, groups nothing), at its position in epochs."""
    store = Store(tmp_path)
    client = store.client()
    experiment_id = client.create_experiment("half_epochs", artifact_location=(tmp_path / "artifacts").as_uri())
    params = {**FASHION["resnet20"][0], **HALF_EPOCH_RECIPE}
    for seed in range(3):
        run_id = add_run(client, experiment_id, "resnet20", params, {"test/acc": 0.9}, seed, "fashion_mnist")
        for check, step in enumerate(HALF_EPOCH_CHECKS):
            client.log_batch(run_id, metrics=[Metric("val/acc", 0.6 + 0.05 * check + 0.01 * seed, 0, step),
                                              Metric("epoch", check // 2, 0, step)])
    done = results.finished(results.load_runs("half_epochs", store.uri))
    curves = results.learning_curves(done, store.uri)
    points = figures.curve_points(curves)
    assert points["runs"].tolist() == [3] * 6 and points["check"].tolist() == list(range(1, 7))
    assert points["epoch"].tolist() == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert points["mean"].tolist() == pytest.approx([0.61 + 0.05 * check for check in range(6)])
    assert set(curves["lr_drops"]) == {(1, 2)}
    fig = figures.plot_learning_curves(curves, "fashion_mnist")
    (ax,) = fig.axes
    (container,) = ax.containers
    assert len(container.lines[0].get_xdata()) == 6 and "n=3" in container.get_label()
    assert [t.get_text() for t in fig.legends[0].get_texts()][-1] == container.get_label()


def test_runs_that_differ_in_more_than_the_seed_are_never_pooled(known):
    store, _ = known
    done = results.finished(results.load_runs(EXPERIMENT, store.uri))
    # Runs logged without the config_key tag get it from their params: one key per configuration.
    assert done.groupby(["data", "variant"])["config_key"].nunique().eq(1).all()
    # ResNet-110 on cifar10 ran with and without augmentation: two configurations, two rows.
    summary = results.summarize(done)
    resnet110 = summary[(summary["data"] == "cifar10") & (summary["model"] == "resnet110")]
    assert sorted(resnet110["variant"]) == ["resnet110", "resnet110-noaug"] and set(resnet110["runs"]) == {1}
    assert results.pooling_problems(done) == []
    # A rerun of a seed is still one configuration: flagged, not split.
    first = done[(done["model"] == "resnet20") & (done["data"] == "fashion_mnist")].iloc[:1]
    (problem,) = results.pooling_problems(pd.concat([done, first]))
    assert problem.startswith("`resnet20` on fashion_mnist: seed 0 repeated")


def test_configurations_that_share_a_name_are_two_rows_and_the_report_says_how_they_differ(store, tmp_path):
    client = store.client()
    experiment_id = client.create_experiment("names", artifact_location=(tmp_path / "artifacts").as_uri())
    dense = FASHION["densenet_small-k12-c0.5-B"][0]
    for blocks, acc in (("[2, 6, 12]", 0.9), ("[4, 4]", 0.8)):
        for seed in range(2):
            add_run(client, experiment_id, "densenet_small-k12-c0.5-B", {**dense, "model.block_config": blocks},
                    {"test/acc": acc + seed / 100}, seed, "fashion_mnist")
    done = results.finished(results.load_runs("names", store.uri))
    summary = results.summarize(done)
    assert len(summary) == 2 and list(summary["runs"]) == [2, 2]
    assert sorted(summary["test/acc mean"]) == pytest.approx([0.805, 0.905])
    assert sorted(summary["differs"]) == ["model.block_config=[2, 6, 12]", "model.block_config=[4, 4]"]
    (problem,) = results.pooling_problems(done)
    assert "2 configurations share this name; they differ in model.block_config" in problem
    cells = report.format_summary(summary)
    assert sorted(cells["differs"]) == sorted(summary["differs"])


def transformed_interval(values: list[float], forward, back) -> tuple[float, float]:
    z = [forward(v) for v in values]
    half = stats.t.ppf(0.975, len(z) - 1) * statistics.stdev(z) / math.sqrt(len(z))
    return back(statistics.mean(z) - half), back(statistics.mean(z) + half)


def expected_interval(metric: str, values: list[float]) -> tuple[float, float]:
    if metric.endswith("acc"):
        return transformed_interval(values, lambda v: math.log(v / (1 - v)), lambda z: 1 / (1 + math.exp(-z)))
    return transformed_interval(values, math.log, math.exp)


def test_intervals_stay_inside_the_metric_range_and_need_three_values():
    low, high = results.interval([0.70, 0.80, 0.99], "test/acc")  # a t-interval would be [0.55, 1.14]
    assert 0 < low < 0.70 and 0.99 < high < 1
    assert (low, high) == pytest.approx(expected_interval("test/acc", [0.70, 0.80, 0.99]))
    low, high = results.interval([10.0, 100.0, 1000.0], "train_images_per_s")
    assert 0 < low and (low, high) == pytest.approx(expected_interval("x", [10.0, 100.0, 1000.0]))
    assert results.interval([-1.0, 2.0, 3.0], "delta")[0] < -1  # plain scale where values can be negative
    # Two values (t = 12.7: an accuracy's interval would be nearly [0, 1]), one, or no spread: none.
    assert all(math.isnan(v) for v in results.interval([0.80, 0.90], "test/acc") + results.interval([0.9], "test/acc")
               + results.interval([5, 5, 5], "params"))


def test_summary_gives_mean_std_and_range_respecting_interval_over_seeds(known):
    store, _ = known
    everything = sorted({m for _, metrics in FASHION.values() for m in metrics} | set(results.SUMMARY_METRICS))
    summary = results.summarize(results.finished(results.load_runs(EXPERIMENT, store.uri)), everything)
    assert len(summary) == 3 + 4  # data sets never pooled: resnet20 has a row on each
    for variant, (params, metrics) in FASHION.items():
        got = row(summary, "fashion_mnist", params["model.name"], params["growth_rate"])
        assert got["runs"] == 3 and got["seeds"] == "0, 1, 2" and got["variant"] == variant
        for metric, values in metrics.items():
            values = [v for v in values if v is not None]
            assert got[f"{metric} n"] == len(values)
            assert got[f"{metric} mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert got[f"{metric} std"] == pytest.approx(statistics.stdev(values), rel=1e-12, abs=1e-12)
            if len(set(values)) > 1:
                low, high = expected_interval(metric, values)
                assert (got[f"{metric} ci_low"], got[f"{metric} ci_high"]) == pytest.approx((low, high), rel=1e-9)
            else:  # no spread: no interval
                assert pd.isna(got[f"{metric} ci_low"])
    # A missing metric is NaN with n = 0 (a blank cell), a partly missing one counts its runs.
    small = row(summary, "fashion_mnist", "densenet_small", 12)
    assert small["infer_images_per_s n"] == 0 and pd.isna(small["infer_images_per_s mean"])
    cells = report.format_summary(summary)
    assert cells.loc[small.name, "inference images/s"] == ""
    assert cells.loc[row(summary, "fashion_mnist", "densenet_small", 24).name, "FLOPs / image"] == "80M (n=2)"
    acc = cells.loc[row(summary, "fashion_mnist", "resnet20").name, "test accuracy (%)"]
    low, high = expected_interval("test/acc", [0.92, 0.925, 0.93])  # in percent, to the std's place (0.5)
    assert acc == f"92.5 ± 0.5 [{100 * low:.1f}, {100 * high:.1f}]" and 91 < 100 * low < 100 * high < 94
    # A single seed: a mean, no std or interval, and the table says so.
    single = row(summary, "cifar10", "resnet20")
    assert single["test/acc mean"] == 0.85 and pd.isna(single["test/acc std"]) and pd.isna(single["test/acc ci_low"])
    assert cells.loc[single.name, "runs"] == "1 (single seed: no std)"
    assert cells.loc[single.name, "test accuracy (%)"] == "85"


def welch_by_hand(a: list[float], b: list[float]) -> float:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def test_claims_of_the_known_store(known):
    store, _ = known
    done = results.finished(results.load_runs(EXPERIMENT, store.uri))
    matrices = results.feature_reuse_matrices(done, store.uri)
    assert len(matrices) == 6 and all(len(m) == 3 and m[0].shape == (7, 7) for m in matrices.values())
    judged = verdicts.evaluate_claims(done, matrices)
    claims = {(c.data, c.claim): c for c in judged.claims}
    assert len(claims) == 2 * len(verdicts.CLAIMS)
    # D = k24 (val 0.93), R = resnet20 (val 0.915); c = k12, the only DenseNet smaller than R.
    sel = judged.selections["fashion_mnist"]
    assert (sel.criterion, sel.dense.variant, sel.resnet.variant) == ("val/acc", "densenet_small-k24-c1", "resnet20")
    params = claims["fashion_mnist", verdicts.PARAMS]
    dense, _, resnet = (FASHION[v][1] for v in FASHION)
    shifted = [a + 0.005 for a in dense["test/acc"]]  # non-inferiority against the 0.5-point margin
    # One-sided, in the direction of the estimate: half the two-sided p.
    assert params.p_value == pytest.approx(welch_by_hand(shifted, resnet["test/acc"]) / 2, rel=1e-9)
    assert params.verdict == "inconclusive" and "c = densenet_small-k12-c0.5-B" in params.evidence
    # Tested: the parameters claim and time per FLOP (k24 at 80 MFLOPs and 410 images/s vs 40 MFLOPs
    # at 310/s: 0.030 vs 0.081 s per GFLOP, the DenseNet is cheaper per FLOP, significantly).
    assert judged.families["fashion_mnist"] == [verdicts.PARAMS, verdicts.COMPUTE_FLOP]
    flop = claims["fashion_mnist", verdicts.COMPUTE_FLOP]
    assert flop.verdict == "exploratory" and "leans contradicted" in flop.reason and flop.p_holm == pytest.approx(min(1, 2 * min(flop.p_value,
                                                                                              params.p_value)))
    assert claims["fashion_mnist", verdicts.MEMORY].reason == "accuracy not matched"
    # Trained matrices without the init ones (the control): no test.
    assert claims["fashion_mnist", FIGURE5["c"][0]].reason == "no init matrix recorded (the control)"
    # cifar10, one seed each: nothing supported or contradicted. ResNet-110 with and without
    # augmentation are two configurations, never pooled.
    assert {c.verdict for (data, _), c in claims.items() if data == "cifar10"} <= {"inconclusive", "not comparable"}
    assert claims["cifar10", verdicts.PARAMS].reason == "no smaller DenseNet"  # 800k params vs R's 270k
    flow = claims["cifar10", "stronger gradient flow than a ResNet (init)"]
    assert flow.reason == "no relative gradients of body 3x3 convolutions"


def test_published_figures_need_the_same_data_set_augmentation_depth_and_k(known):
    store, _ = known
    published = results.published_beside_ours(results.finished(results.load_runs(EXPERIMENT, store.uri)))
    got = {(r["model"], r["published"]): r for _, r in published.iterrows()}
    assert set(got) == {
        ("densenet_bc100_k12", "DenseNet-BC (L=100, k=12)"),
        ("resnet110", "ResNet-110 (He et al. 2016)"),
    }
    bc = got["densenet_bc100_k12", "DenseNet-BC (L=100, k=12)"]
    assert bc["published error %"] == 4.51 and bc["published accuracy"] == pytest.approx(0.9549)
    assert bc["our accuracy mean"] == 0.80 and bc["runs"] == 1 and "Table 2" in bc["source"]
    resnet = got["resnet110", "ResNet-110 (He et al. 2016)"]
    assert resnet["published error %"] == 6.61 and resnet["runs"] == 1  # not the C10 run (0.70)
    assert resnet["our accuracy mean"] == 0.83
    table3 = {p.depth: p.error_pct for p in results.PUBLISHED if "Table 3" in p.source}
    assert table3 == {121: 25.02, 169: 23.80, 201: 22.58, 264: 22.15}


def test_numbers_are_rounded_to_their_uncertainty():
    assert tables.stat_text(83.44, 0.8) == "83.4 ± 0.8"
    assert tables.stat_text(81.36, 1.672) == "81.4 ± 1.7"  # two digits when the std starts with 1
    assert tables.stat_text(334.7, 139, 121.7, 828.7) == "330 ± 140 [120, 830]"  # the interval to the same place
    assert tables.stat_text(78.53, 0.6253, 76.94, 80.07) == "78.5 ± 0.6 [76.9, 80.1]"
    assert tables.stat_text(14_310, 12_670) == "14k ± 13k"
    assert tables.stat_text(40_430, 0) == "40.43k"  # the same in every run: no "± 0"
    assert tables.stat_text(0.925, float("nan")) == "0.925"  # one run: no std
    assert tables.numbers(0.02, 0.3, -0.04, 0.6) == ("0.0", "0.3", "0.0", "0.6")  # never "-0.0"


def latex_rows(text: str) -> tuple[int, list[list[str]]]:
    """The column count of a LaTeX tabular and its rows split into cells, after checking its
    structure: one tabular, booktabs rules, every row ends in \\\\ with one cell per column,
    braces balanced, math mode closed, no character pdflatex cannot set as text."""
    lines = text.strip().splitlines()
    assert lines.pop(0) == tables.LATEX_PACKAGES and "\\usepackage{booktabs}" in tables.LATEX_PACKAGES
    spec = re.fullmatch(r"\\begin\{tabular\}\{([lrc]+)\}", lines[0])
    assert spec and lines[-1] == r"\end{tabular}", text[:300]
    assert lines[1] == r"\toprule" and lines[3] == r"\midrule" and lines[-2] == r"\bottomrule"
    columns = len(spec.group(1))
    rows = []
    for line in [lines[2], *lines[4:-2]]:
        assert line.endswith(r"\\"), line
        cells = re.split(r"(?<!\\)&", line.removesuffix(r"\\"))
        assert len(cells) == columns, line
        rows.append([c.strip() for c in cells])
    unescaped = re.sub(r"\\[{}$&%#_]", "", text)
    assert unescaped.count("{") == unescaped.count("}") and unescaped.count("$") % 2 == 0
    assert not set("±θ≥≤×") & set(text)
    return columns, rows


NUMBER = re.compile(r"-?\d+(?:\.\d+)?[kMG]?")


def md_rows(text: str) -> list[list[str]]:
    rows = [re.split(r"(?<!\\)\|", line.strip()[1:-1]) for line in text.splitlines()]
    return [[c.strip() for c in row] for i, row in enumerate(rows) if i != 1]  # the |---| line


def test_paper_tables_write_one_number_format_in_markdown_latex_and_csv(known, tmp_path):
    """The same numbers, in the same format, in every file: md and LaTeX hold the same cells, the
    CSV the same numbers in mean, std, ci_low, ci_high and n columns; report.md's cells too."""
    store, _ = known
    done = results.finished(results.load_runs(EXPERIMENT, store.uri))
    summary = results.summarize(done)
    claims = verdicts.claims_table(verdicts.evaluate_claims(done, results.feature_reuse_matrices(done, store.uri)).claims)
    for name, fmt in (("tex", "latex"), ("md", "md"), ("csv", "csv")):
        (tmp_path / name).mkdir()
        tables.write_tables(summary, claims, tmp_path / name, fmt)
    for table in ("configurations", "claims"):
        columns, rows = latex_rows((tmp_path / "tex" / f"{table}.tex").read_text())
        md = md_rows((tmp_path / "md" / f"{table}.md").read_text())
        assert len(rows) == len(md) and columns == len(md[0])
        for tex_row, md_row in zip(rows, md):
            assert NUMBER.findall(" ".join(tex_row)) == NUMBER.findall(" ".join(md_row))
    csv = pd.read_csv(tmp_path / "csv" / "configurations.csv", dtype=str, keep_default_na=False)
    header, *md = md_rows((tmp_path / "md" / "configurations.md").read_text())
    assert len(csv) == len(md)
    metrics = header[3:]
    assert list(csv.columns) == [*header[:3], *(f"{m} {part}" for m in metrics
                                                for part in ("mean", "std", "ci_low", "ci_high", "n"))]
    for md_row, (_, csv_row) in zip(md, csv.iterrows()):
        for metric, cell in zip(metrics, md_row[3:]):
            shown = cell.split(" (n=")[0]  # md says (n=k) only where fewer runs than the configuration's logged it
            parts = [csv_row[f"{metric} {p}"] for p in ("mean", "std", "ci_low", "ci_high") if csv_row[f"{metric} {p}"]]
            assert NUMBER.findall(shown) == parts, (metric, cell, parts)
            n = int(csv_row[f"{metric} n"])
            assert (f" (n={n})" in cell) == (0 < n < int(csv_row["runs"])) and (cell == "") == (n == 0)
    resnet = csv.set_index("configuration")
    assert resnet.loc["resnet20", "test accuracy (%) mean"].tolist() == ["85", "92.5"]  # cifar10, fashion_mnist
    assert resnet.loc["resnet20", "test accuracy (%) std"].tolist() == ["", "0.5"]
    assert resnet.loc["resnet20", "parameters mean"].tolist() == ["270k", "270k"]  # exact: no "± 0"
    assert resnet.loc["resnet20", "parameters n"].tolist() == ["1", "3"]
    # report.md's per-configuration cells are the paper table's, to the digit (timings may add a CV).
    cells = report.format_summary(summary)
    paper = tables.configuration_table(summary)
    for column in ("test accuracy (%)", "validation accuracy (%)", "parameters", "train images/s"):
        assert [c.split(" (noisy")[0] for c in cells[column]] == paper[column].tolist()
    assert "92.5 ± 0.5 [" in " ".join(paper["test accuracy (%)"])


def method_section(text: str) -> str:
    return text[text.index("## Method\n\n") + len("## Method\n\n"):].strip()


def test_report_cli_writes_the_folder_and_logs_a_report_run_it_then_ignores(known, tmp_path, capsys):
    store, parent = known
    for attempt in range(2):  # the second report must not read the first one's run
        out = tmp_path / f"report{attempt}"
        assert report.main(["--experiment", EXPERIMENT, "--tracking-uri", store.uri, "--out", str(out),
                            "--margin", "0.75", *(["--format", "latex"] if attempt else [])]) == 0
        assert "13 finished runs in 7 configurations, 3 left out" in capsys.readouterr().out
    assert (out / "configurations.tex").is_file() and (out / "claims.tex").is_file()
    text = (out / "report.md").read_text()
    assert has_row(text, "FAILED") and "RuntimeError: boom" in text and has_row(text, "RUNNING")
    assert "single seed, so no std" in text and "1 (single seed: no std)" in text
    assert has_row(text, verdicts.PARAMS, "**inconclusive (no smaller DenseNet)**")
    assert has_row(text, FIGURE5["a"][0], "**inconclusive (no init matrix recorded (the control))**")
    assert "±0.75 percentage points" in text
    # Two validation checks, the last 25-45 points above the first: the parameters claim is not judged.
    assert "not converged: densenet_small-k12-c0.5-B seed 0: gained" in text
    # The gradient files of the known store have no role column: roles read from the layer names.
    assert ("Holm-Bonferroni family (3 tests): stronger gradient flow than a ResNet (init); stronger gradient flow "
            "than a ResNet (after epoch 1); higher compute cost per FLOP.") in text
    # The Method section is the rules of the code, verbatim, with the margin given.
    assert method_section(text) == "\n".join(f"- {line}" for line in report.method_lines(0.75))
    assert [name for name, _ in verdicts.method(0.75)][:2] == ["selection", "comparability"]
    assert "## What this shows" in text and "At most 2 training epoch(s)" in text
    assert has_row(text, "cifar10", "densenet_bc100_k12", "DenseNet-BC (L=100, k=12)", "95.49", "4.51", "80", "1")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert re.findall(r"\]\(([^)]+\.png)\)", text) and sorted(set(re.findall(r"\]\(([^)]+\.png)\)", text))) == pngs
    assert {"feature_reuse_fashion_mnist_densenet_small-k24-c1.png", "knob_effects_fashion_mnist.png",
            "gradient_flow_fashion_mnist.png"} <= set(pngs) and "gradient_flow_cifar10.png" not in pngs
    client = store.client()
    reports = [r for r in store.runs(EXPERIMENT) if r.data.tags.get("report") == "true"]
    assert len(reports) == 3  # the old one and these two
    newest = max(reports, key=lambda r: r.info.start_time)
    assert {a.path for a in client.list_artifacts(newest.info.run_id)} >= {"report.md", "report.html", *pngs}
    assert report.main(["--experiment", "nope", "--tracking-uri", store.uri, "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(SystemExit):
        report.main(["--experiment", EXPERIMENT, "--tracking-uri", store.uri, "--margin", "-1"])
    assert "--margin='-1' is invalid" in capsys.readouterr().err


# --- an image folder without test/, a plan's tables, a search alone ---------------------------


def folder_store(path: Path, accuracy: bool = True) -> Store:
    """FASHION's configurations x 3 seeds on an image folder without test/: no test accuracy, two
    validation checks (none at all unless `accuracy`)."""
    store = Store(path)
    client = store.client()
    experiment_id = client.create_experiment("folder", artifact_location=(path / "artifacts").as_uri())
    for variant, (params, metrics) in FASHION.items():
        for seed in range(3):
            values = {k: v[seed] for k, v in metrics.items() if k not in (record.TEST_ACC, record.VAL_ACC)}
            run_id = add_run(client, experiment_id, variant, params, values, seed, "imagefolder")
            checks = [0.5 + 0.01 * seed, metrics[record.VAL_ACC][seed]] if accuracy else []
            client.log_batch(run_id, metrics=[Metric(record.VAL_ACC, acc, 0, 10 * step + 9)
                                              for step, acc in enumerate(checks)])
    return store


def test_without_a_test_split_figures_and_tables_show_validation_accuracy_labelled(tmp_path):
    """Issue 37: no test/ gave an empty accuracy figure, a knob figure without accuracy and tables
    without an accuracy. Now validation accuracy stands in everywhere, labelled."""
    store = folder_store(tmp_path / "store")
    found = report.write_report("folder", store.uri, tmp_path / "out", table_format="csv")
    label = "validation (no test split)"
    done = found.evidence.done
    summary = results.summarize(done)
    assert results.accuracy_of(summary) == results.accuracy_of(done) == record.VAL_ACC
    cost = figures.plot_accuracy_vs_cost(summary, "imagefolder")
    assert all(ax.has_data() and ax.get_ylabel() == f"accuracy, {label}" for ax in cost.axes[:2])
    assert label in cost._suptitle.get_text()
    knobs = figures.plot_knob_effects(done, "imagefolder")
    assert len(knobs.axes) == 2 * 3 and all(ax.has_data() for ax in knobs.axes)  # accuracy and parameters rows
    assert [ax.get_ylabel() for ax in knobs.axes[::3]] == [f"accuracy, {label}", record.PARAMS]
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"accuracy_vs_cost_imagefolder.png", "knob_effects_imagefolder.png"} <= names
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"| accuracy (%), {label}" in text and "test accuracy (%)" not in text
    assert f"imagefolder: DenseNet variants and baselines, accuracy, {label} against" in text
    assert f"accuracy (%), {label}" in (tmp_path / "out" / "headline.md").read_text()
    csv = pd.read_csv(tmp_path / "out" / "configurations.csv", dtype=str, keep_default_na=False)
    assert csv.loc[csv["configuration"] == "resnet20", f"accuracy (%), {label} mean"].tolist() == ["91.5"]
    # With two seeds, the learning curves' points have no interval (it would span nearly [0, 1]);
    # with three, each stays inside [0, 1].
    two = figures.curve_points(found.evidence.curves[found.evidence.curves["seed"] < 2])
    assert two["ci_low"].isna().all() and (two["runs"] == 2).all()
    three = figures.curve_points(found.evidence.curves)
    assert three["ci_low"].notna().all() and ((three["ci_low"] > 0) & (three["ci_high"] < 1)).all()


def test_no_empty_figure_is_written_where_no_run_logged_an_accuracy(tmp_path):
    store = folder_store(tmp_path / "store", accuracy=False)
    found = report.write_report("folder", store.uri, tmp_path / "out")
    assert figures.plot_accuracy_vs_cost(found.summary, "imagefolder") is None
    knobs = figures.plot_knob_effects(found.evidence.done, "imagefolder")
    assert len(knobs.axes) == 3 and knobs.axes[0].get_ylabel() == record.PARAMS  # the parameters row alone
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "accuracy_vs_cost_imagefolder.png" not in names and "learning_curves_imagefolder.png" not in names
    text = (tmp_path / "out" / "report.md").read_text()
    assert "No figure: no data set has an accuracy and a parameter or FLOP count." in text
    assert "No figure: no data set has a validation accuracy history." in text


def test_a_plans_tables_name_one_data_set_in_every_file(planned, tmp_path):
    """claims.csv named a plan's claims by the plan (`fm4_pair`) where configurations.csv named the
    data set (`imagefolder`)."""
    store, plan, _ = planned
    report.write_report(plan.experiment, store.uri, tmp_path, plan=plan, table_format="csv")
    data = {name: set(pd.read_csv(tmp_path / f"{name}.csv", dtype=str)["data"]) for name in ("configurations", "claims")}
    assert data == {"configurations": {"fashion_mnist"}, "claims": {"fashion_mnist"}} and plan.name != "fashion_mnist"


def test_a_search_alone_gets_a_search_report(tmp_path, capsys):
    """Only an Optuna search's trials in the store: the report is the search's, and says so (it said
    `0 finished runs in 0 configurations`)."""
    from optuna.distributions import CategoricalDistribution, distribution_to_json

    store = Store(tmp_path / "store")
    client = store.client()
    experiment_id = client.create_experiment("search", artifact_location=(tmp_path / "artifacts").as_uri())
    space = {"direction": "maximize", "objective": record.VAL_ACC,
             "params": {"growth_rate": distribution_to_json(CategoricalDistribution([4, 8]))}}
    params, _ = FASHION["densenet_small-k12-c0.5-B"]
    for trial, (k, acc) in enumerate([(4, 0.8), (8, 0.85), (4, 0.81), (8, 0.9)]):
        add_run(client, experiment_id, f"trial-{trial}", {**params, "growth_rate": k}, {record.VAL_ACC: acc}, 0,
                "imagefolder", tags={record.SEARCH_STUDY: "knobs", record.SEARCH_TRIAL: str(trial),
                                     record.SEARCH_SPACE: json.dumps(space),
                                     record.SEARCH_PARAMS: json.dumps({"growth_rate": k})})
    out = tmp_path / "out"
    assert report.main(["--experiment", "search", "--tracking-uri", store.uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "search report: 4 finished trials in 1 search(es), no run outside them, 0 left out" in printed
    text = (out / "report.md").read_text()
    assert text.startswith("# Search report: search") and "### Study `knobs`" in text and "Best: trial 3" in text
    assert "## Results per configuration" not in text and "## Claims" not in text
    assert (out / "search_history_knobs.png").is_file()


def test_report_escapes_every_value_from_the_store(known, tmp_path):
    store, _ = known
    report.write_report(EXPERIMENT, store.uri, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"<img[^>]*onerror", page, re.IGNORECASE)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown as text, not run
    text = (tmp_path / "report.md").read_text()
    assert "<script>" not in text and "<img src=x" not in text and "&lt;img src=x onerror=alert(2)>" in text
    assert "&amp;" not in text  # escaped once


BEACON = "x![t](//evil.example/beacon.png)"  # markdown image syntax in a run name (issue 23, finding 4)
DATA_LINK = "[d](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)"


class Loads(HTMLParser):
    """Every URL-bearing attribute of a page: (tag, attribute, value)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "srcset", "href", "action", "formaction", "poster", "data", "background", "cite"):
                self.urls.append((tag, name, value or ""))


def test_report_html_has_no_element_that_loads_from_outside_it(tmp_path):
    """A run name `x![t](//evil.example/beacon.png)` and an error holding a `data:text/html` link:
    images stay PNG data URIs, links only http(s) addresses (the PNGs are the report's own)."""
    store = Store(tmp_path)
    client = store.client()
    experiment_id = client.create_experiment("beacon", artifact_location=(tmp_path / "artifacts").as_uri())
    params, metrics = FASHION["resnet20"]
    for seed in range(2):
        add_run(client, experiment_id, BEACON, params, {k: v[seed] for k, v in metrics.items()}, seed, "fashion_mnist")
    add_run(client, experiment_id, f"failed {DATA_LINK}", params, {}, 5, "fashion_mnist", status="FAILED",
            tags={"error": f"RuntimeError: see {DATA_LINK} and <//evil.example/x>"})
    report.write_report("beacon", store.uri, tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    loads = Loads()
    loads.feed(page)
    images = [value for tag, name, value in loads.urls if name == "src"]
    assert images and all(v.startswith("data:image/png;base64,") for v in images), [v[:60] for v in images]
    for tag, name, value in loads.urls:
        assert name in ("src", "href"), (tag, name, value)
        if name == "href":
            assert tag == "a" and re.match(r"https?://[^/]", value), value
    assert "evil.example" not in "".join(v for _, _, v in loads.urls) and "data:text" not in page
    assert "x" in page and "failed" in page  # the names are still shown, as text


def test_report_refuses_a_name_that_would_leave_reports_and_never_creates_a_store(known, tmp_path, monkeypatch,
                                                                                 capsys):
    """Issue 23, findings 3, 6 and 7: `--experiment ../../../escaped_exp`, a truncated store, a
    store that does not exist: one line each, exit 2, nothing written."""
    store, _ = known
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert report.main(["--experiment", "../../../escaped_exp", "--tracking-uri", store.uri]) == 2
    assert "error: --experiment='../../../escaped_exp' is invalid" in capsys.readouterr().err
    missing = tmp_path / "none" / "mlflow.db"
    assert report.main(["--experiment", EXPERIMENT, "--tracking-uri", f"sqlite:///{missing}"]) == 2
    err = capsys.readouterr().err
    assert f"there is no MLflow store at {missing}" in err and err.count("\n") == 1
    truncated = tmp_path / "truncated.db"
    truncated.write_bytes((store.path / "mlflow.db").read_bytes()[:200_000])
    assert report.main(["--experiment", EXPERIMENT, "--tracking-uri", f"sqlite:///{truncated}"]) == 2
    err = capsys.readouterr().err
    assert f"{truncated} is not a usable MLflow store" in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "c", "truncated.db"]


def test_report_imports_neither_lightning_nor_torch():
    code = ("import sys, densenet_exp.report, densenet_exp.analysis.figures, densenet_exp.analysis.verdicts; "
            "print(sorted(m for m in ('lightning', 'torch', 'hydra', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    help_ = subprocess.run([sys.executable, "-m", "densenet_exp.report", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert help_.returncode == 0 and "--margin" in help_.stdout


def texts_outside_canvas(fig) -> list[str]:
    """What of `fig` is drawn outside its canvas, by matplotlib's tight bounding boxes: each axes
    (with its title, labels, tick labels and legend), the figure's own texts (suptitle, notes)
    and the whole figure."""
    FigureCanvasAgg(fig).draw()
    renderer, canvas = fig.canvas.get_renderer(), fig.bbox
    parts = [(f"axes {ax.get_title() or ax.get_label()}", ax.get_tightbbox(renderer)) for ax in fig.axes]
    parts += [(t.get_text(), t.get_window_extent(renderer)) for t in [*fig.texts, fig._suptitle] if t is not None]
    scale = fig.dpi
    tight = fig.get_tightbbox(renderer)  # in inches
    parts.append(("the figure", Bbox.from_extents(*(v * scale for v in tight.extents))))
    return [name for name, box in parts if box is not None and (
        box.x0 < canvas.x0 - 1 or box.y0 < canvas.y0 - 1 or box.x1 > canvas.x1 + 1 or box.y1 > canvas.y1 + 1)]


def test_figures_keep_titles_and_labels_on_the_canvas(known):
    store, _ = known
    done = results.finished(results.load_runs(EXPERIMENT, store.uri))
    summary = results.summarize(done)
    matrices = results.feature_reuse_matrices(done, store.uri)
    grads = results.relative_grads(done, store.uri)
    figs = {
        "accuracy": figures.plot_accuracy_vs_cost(summary, "fashion_mnist"),
        "knobs": figures.plot_knob_effects(done, "fashion_mnist"),
        "curves": figures.plot_learning_curves(results.learning_curves(done, store.uri), "fashion_mnist"),
        "grads": figures.plot_relative_grads(grads, "fashion_mnist"),
        "heatmap": run_figures.plot_feature_reuse(next(iter(matrices.values())), "a long title for the heatmap"),
        "run": run_figures.plot_gradient_flow_run(grads[grads["run_id"] == grads["run_id"].iloc[0]], "densenet-s0"),
    }
    for name, fig in figs.items():
        assert fig is not None, name
        assert texts_outside_canvas(fig) == [], name
    # One colour per family in every figure: DenseNet blue, ResNet orange.
    colours = {line.get_label(): line.get_color() for line in figs["grads"].axes[0].lines}
    assert colours["resnet20 (ResNet)"] == figures.FAMILY_STYLE["resnet"][0]
    assert {c for label, c in colours.items() if "DenseNet" in label} == {figures.FAMILY_STYLE["densenet"][0]}
    # Knob effects skip knobs with one level: here all three vary, on cifar10 none does.
    assert len(figs["knobs"].axes) == 2 * 3 and figures.plot_knob_effects(done, "cifar10") is None
    assert figs["heatmap"].axes[0].images[0].get_cmap().name.startswith("viridis")


# --- a real tiny sweep, shared by the report and notebook tests -------------------------------


@pytest.fixture(scope="session")
def tiny_report(tiny_sweep) -> Path:
    out = tiny_sweep.path / "report"
    result = subprocess.run([sys.executable, "-m", "densenet_exp.report", "--experiment", "smoke", "--out", str(out)],
                            cwd=ROOT, env=tiny_sweep.env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 finished runs in 2 configurations, 0 left out" in result.stdout
    return out


def test_report_of_a_real_sweep_writes_every_file_and_embeds_its_images(tiny_report):
    names = {p.name for p in tiny_report.iterdir()}
    # One level per knob: no knob-effect figure. The gradient-flow figure needs relative_grads.csv.
    pngs = {f"{kind}_fashion_mnist.png" for kind in ("accuracy_vs_cost", "learning_curves")}
    written = {"report.md", "report.html", "headline.md", *pngs, "feature_reuse_fashion_mnist_densenet_tiny-k4-c0.5-B.png"}
    assert written <= names <= written | {"gradient_flow_fashion_mnist.png"}
    page = (tiny_report / "report.html").read_text()
    assert "src=\"file" not in page and ".png\"" not in page  # nothing but data URIs
    embedded = [base64.b64decode(s) for s in re.findall(r'<img[^>]*\bsrc="data:image/png;base64,([^"]+)"', page)]
    assert sorted(embedded) == sorted((tiny_report / n).read_bytes() for n in names if n.endswith(".png"))
    text = (tiny_report / "report.md").read_text()
    assert has_row(text, "densenet_tiny", "4", "0.5", "yes", "16", "2", "0, 1")  # depth 1 + 2 * 6 + 2 + 1
    assert has_row(text, "resnet20", "", "", "", "20", "2", "0, 1")
    assert all(has_row(text, claim) for claim in verdicts.CLAIMS)  # one verdict per claim
    assert "needs >= 3 seeds" in text  # two seeds each: nothing is judged


@pytest.mark.slow
def test_report_html_renders_with_its_images_in_headless_chromium(tiny_report, tmp_path):
    """Chromium decodes every embedded PNG (an image that fails to decode has naturalWidth 0) and
    paints the page."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("headless Chromium is needed: apt-get install -y chromium")
    probe = """<script>addEventListener("load", () => { document.body.dataset.images =
      [...document.images].map(i => i.complete && i.naturalWidth > 0 ? i.naturalWidth : 0).join(" "); });</script>"""
    page = tmp_path / "report.html"
    page.write_text((tiny_report / "report.html").read_text().replace("</body>", probe + "</body>"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    widths = re.search(r'data-images="([^"]*)"', dom.stdout)
    assert widths, dom.stderr[-2000:]
    widths = [int(w) for w in widths.group(1).split()]
    pngs = list(tiny_report.glob("*.png"))
    assert len(widths) == len(pngs) and all(w >= 400 for w in widths), widths
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                    "--window-size=1300,3000", (tiny_report / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1300)
    assert (pixels.mean(axis=2) < 0.9).mean() > 0.02, "the page is blank"  # text, tables, plots: about 8%
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.2  # plot lines and markers; text is grey
    assert colourful.mean() > 2e-4, "no coloured plot on the page"


def kernel_python_prefix() -> str:
    """The sys.prefix of the interpreter the `python3` kernel runs (jupyter_client swaps a bare
    `python` in the kernel spec for sys.executable)."""
    from jupyter_client import KernelManager

    command = KernelManager(kernel_name="python3").format_kernel_cmd()
    prefix = subprocess.run([command[0], "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    return prefix.stdout.strip()


def execute_notebook(name: str, uri: str, experiment: str, monkeypatch, plan: Path | None = None):
    """Run notebooks/<name>.ipynb top to bottom in memory on `experiment` of the store at `uri` (with
    a declared `plan`, if given): (the executed notebook, its printed text, printed and shown text)."""
    from nbclient import NotebookClient

    assert kernel_python_prefix() == sys.prefix  # the venv's kernel, not another Python's
    path = ROOT / "notebooks" / f"{name}.ipynb"
    committed = path.read_bytes()  # committed with the study's outputs: executed in memory, never rewritten
    nb = nbformat.reads(committed.decode(), as_version=4)
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        cell.outputs, cell.execution_count = [], None
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DENSENET_EXP_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DENSENET_EXP_EXPERIMENT", experiment)
    if plan is not None:
        monkeypatch.setenv("DENSENET_EXP_PLAN", str(plan))
    # The kernel imports this checkout's package, whichever checkout the venv was installed from.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(ROOT / "notebooks")}}
                   ).execute()  # raises CellExecutionError on the first failing cell
    assert path.read_bytes() == committed
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    shown = outputs + "".join(o.get("data", {}).get(kind, "") for c in nb.cells if c.cell_type == "code"
                              for o in c.outputs for kind in ("text/plain", "text/markdown"))
    assert f"training runs in {experiment!r}" in outputs
    assert "TqdmWarning" not in outputs and "IProgress" not in outputs
    return nb, outputs, shown


@pytest.mark.parametrize("name", ["densenet_vs_resnet", "ablation"])
@pytest.mark.parametrize("store_kind", ["tiny_sweep", "known"])
def test_notebook_runs_top_to_bottom(name, store_kind, request, monkeypatch):
    """Each notebook runs without an error on the real sweep and on the hand-made store (two data
    sets, failed and running runs, single seeds, missing metrics), without a plan: every claim
    exploratory."""
    store, experiment = (request.getfixturevalue("tiny_sweep"), "smoke") if store_kind == "tiny_sweep" \
        else (request.getfixturevalue("known")[0], EXPERIMENT)
    nb, outputs, shown = execute_notebook(name, store.uri, experiment, monkeypatch)
    assert "no declared plan" in outputs
    assert "<NA>" not in shown.split("Group by")[0]  # nothing pooled under a missing knob
    if store_kind == "known" and name == "densenet_vs_resnet":
        # Full numbers: the claims table is not cut at 50 characters.
        assert "c = densenet_small-k12-c0.5-B: 92.50 ± 1.00 % (n=3), 100,000 params; R = resnet20" in shown
    if store_kind == "known" and name == "ablation":
        assert "ranked on val/acc: densenet_small-k24-c1 then resnet20" in outputs
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the ablation notebook skips knob plots when every knob has one level


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A store with a declared plan (test_confirmation's known plan: five confirmation seeds per arm,
    DenseNet non-inferior to ResNet) and one pilot run of the exploration stage."""
    from test_confirmation import build, write_plan

    store = Store(tmp_path_factory.mktemp("planned"))
    plan = write_plan(tmp_path_factory.mktemp("plan"), "planned")
    build(store, plan, {"small": 0.921, "big": 0.920, "plain_a": 0.90, "plain_b": 0.85},
          loss={"small": 0.2, "big": 0.2, "plain_a": 0.2, "plain_b": 0.4})
    client = store.client()
    pilot = add_run(client, client.get_experiment_by_name(plan.experiment).experiment_id, "small-lr",
                    {"model.name": "densenet_bc28_k12", "model.arch": "densenet_cifar", "model.depth": 28},
                    {record.TEST_ACC: 0.95, record.VAL_ACC: 0.95}, 0, "fashion_mnist",
                    tags={record.STUDY_PLAN: plan.name, record.STUDY_STAGE: "exploration", record.STUDY_ARM: "small-lr"})
    return store, plan, pilot


@pytest.mark.parametrize("name", ["densenet_vs_resnet", "ablation"])
def test_notebook_judges_a_declared_plan_on_its_confirmation_runs(name, planned, monkeypatch):
    """With DENSENET_EXP_PLAN the notebooks show the plan's declared claims, judged by the report's
    code on the confirmation runs (here decided), and the pilot run only as exploration."""
    store, plan, pilot = planned
    nb, outputs, shown = execute_notebook(name, store.uri, plan.experiment, monkeypatch, plan=plan.path)
    assert f"declared plan {plan.name!r}" in outputs and "20 confirmation runs judged" in outputs
    assert "the other 1 finished runs (the pilot) are exploration only" in outputs
    found = report.judge(report.load_evidence(plan.experiment, store.uri), verdicts.DEFAULT_MARGIN_PP, plan)
    for claim in found.confirmation.claims:  # the report's labels, word for word
        assert claim.claim in shown and claim.label in shown
    assert any(c.verdict == verdicts.SUPPORTED for c in found.confirmation.claims)
    if name == "densenet_vs_resnet":
        assert "no init matrix recorded" not in shown  # the control is drawn beside the trained matrices
        assert "**stage and plan** (declared claims)" in shown

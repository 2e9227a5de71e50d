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
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from scipy import stats

from conftest import ROOT, Store
from densenet_exp import report, results

# --- a store with known values ---------------------------------------------------------------

EXPERIMENT = "ablation"
KNOBS_NONE = {"growth_rate": None, "compression": None, "bottleneck": None}
# variant -> (params logged by every run, per-seed metrics: one list of seed values per metric)
FASHION = {
    "densenet_small-k12-c0.5-B": (
        {"model.name": "densenet_small", "model.arch": "densenet", "growth_rate": 12, "compression": 0.5,
         "bottleneck": True},
        {"test/acc": [0.915, 0.925, 0.935], "params": [100_000] * 3, "flops_per_image": [20e6] * 3,
         "grad_first_last_ratio": [0.5, 0.6, 0.7], "peak_memory_mb": [200, 210, 220],
         "train_images_per_s": [150, 160, 170], "reuse_early_share": [0.3, 0.35, 0.4]},  # no inference speed
    ),
    "densenet_small-k24-c1": (
        {"model.name": "densenet_small", "model.arch": "densenet", "growth_rate": 24, "compression": 1.0,
         "bottleneck": False},
        {"test/acc": [0.93, 0.94, 0.95], "params": [400_000] * 3, "flops_per_image": [80e6, 80e6, None],
         "grad_first_last_ratio": [0.8, 0.9, 1.0], "peak_memory_mb": [300, 310, 320],
         "train_images_per_s": [400, 410, 420], "infer_images_per_s": [1000, 1100, 1200],
         "reuse_early_share": [0.4, 0.45, 0.5]},
    ),
    "resnet20": (
        {"model.name": "resnet20", "model.arch": "resnet_cifar", **KNOBS_NONE},
        {"test/acc": [0.92, 0.925, 0.93], "params": [270_000] * 3, "flops_per_image": [40e6] * 3,
         "grad_first_last_ratio": [0.2, 0.25, 0.3], "peak_memory_mb": [100, 105, 110],
         "train_images_per_s": [300, 310, 320], "infer_images_per_s": [2000, 2100, 2200]},
    ),
}
# One seed each, outside the sweep; densenet_bc100_k12 and resnet110 match the paper's Table 2.
CIFAR = {
    "densenet_bc100_k12-k12-c0.5-B": (
        {"model.name": "densenet_bc100_k12", "model.arch": "densenet_cifar", "growth_rate": 12, "compression": 0.5,
         "bottleneck": True},
        {"test/acc": [0.80], "params": [800_000], "grad_first_last_ratio": [0.9], "peak_memory_mb": [500],
         "train_images_per_s": [50]},
    ),
    "resnet20": (
        {"model.name": "resnet20", "model.arch": "resnet_cifar", **KNOBS_NONE},
        {"test/acc": [0.85], "params": [270_000], "grad_first_last_ratio": [0.3], "peak_memory_mb": [100],
         "train_images_per_s": [300]},
    ),
    "resnet110": (
        {"model.name": "resnet110", "model.arch": "resnet_cifar", **KNOBS_NONE},
        {"test/acc": [0.83], "params": [1_700_000]},
    ),
}
BLOCKS = [np.full((7, 7), 1.0) for _ in range(3)]  # three blocks of L = 6 layers: uniform share 1/6


def has_row(markdown: str, *cells: str) -> bool:
    """Whether a markdown table row holds these cells side by side (whatever the padding)."""
    pattern = r"\|\s*" + r"\s*\|\s*".join(re.escape(c) for c in cells) + r"\s*\|"
    return re.search(pattern, markdown) is not None


def add_run(client, experiment_id: str, variant: str, params: dict, metrics: dict, seed: int, data: str,
            status: str = "FINISHED", tags: dict | None = None, artifacts: dict | None = None) -> str:
    run = client.create_run(experiment_id, run_name=variant, tags={"variant": variant, "device": "cpu", **(tags or {})})
    run_id = run.info.run_id
    params = {**params, "data.name": data, "data.num_classes": 10, "trainer.max_epochs": 2, "seed": seed}
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items() if v is not None],
                     params=[Param(k, str(v)) for k, v in params.items()])
    with tempfile.TemporaryDirectory() as tmp:
        for path, content in (artifacts or {}).items():
            file = Path(tmp, path)
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(content)
            client.log_artifact(run_id, str(file), str(Path(path).parent))
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


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
            artifacts = {}
            if params["model.arch"] == "densenet":
                artifacts["feature_reuse/matrices.json"] = json.dumps([b.tolist() for b in BLOCKS])
            if seed == 0:
                rows = "\n".join(f"0,{d},layer{d},Conv2d,{0.1 * (d + 1)}" for d in range(5))
                artifacts["gradient_flow/grad_norms.csv"] = "step,depth,layer,kind,grad_norm\n" + rows + "\n"
            run_id = add_run(client, experiment_id, variant, params, {k: v[seed] for k, v in metrics.items()},
                             seed, "fashion_mnist", tags=child, artifacts=artifacts)
            for step, (epoch, acc) in enumerate([(0, 0.5), (1, 0.6 + seed / 100)]):
                client.log_batch(run_id, metrics=[Metric("val/acc", acc, 0, 10 * step + 9),
                                                  Metric("epoch", epoch, 0, 10 * step + 9)])
    dense_params = FASHION["densenet_small-k12-c0.5-B"][0]
    add_run(client, experiment_id, "densenet_small-k12-c0.5-B", dense_params, {"test/acc": 0.1}, 3,
            "fashion_mnist", status="FAILED", tags={**child, "error": "RuntimeError: boom"})
    add_run(client, experiment_id, "densenet_small-k12-c0.5-B", dense_params, {}, 4, "fashion_mnist",
            status="RUNNING", tags=child)
    for variant, (params, metrics) in CIFAR.items():
        add_run(client, experiment_id, variant, params, {k: v[0] for k, v in metrics.items()}, 0, "cifar10")
    add_run(client, experiment_id, "report-old", FASHION["resnet20"][0], {"test/acc": 0.0}, 0, "fashion_mnist",
            tags={"report": "true"})
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
    assert len(runs) == 9 + 2 + 3  # no parent, no report run
    assert sorted(runs.loc[runs["status"] != "FINISHED", "status"]) == ["FAILED", "RUNNING"]
    assert runs.loc[runs["status"] == "FAILED", "error"].item() == "RuntimeError: boom"
    assert len(results.finished(runs)) == 12
    sweep = results.load_runs(EXPERIMENT, store.uri, sweep=parent)
    assert len(sweep) == 11 and set(sweep["data"]) == {"fashion_mnist"}
    resnet = runs[runs["model"] == "resnet20"].iloc[0]
    assert resnet["family"] == "resnet" and pd.isna(resnet["growth_rate"]) and pd.isna(resnet["bottleneck"])
    with pytest.raises(results.ExperimentNotFound, match="no experiment 'nope'"):
        results.load_runs("nope", store.uri)


def test_learning_curves_and_gradient_norms_read_history_and_artifacts(known):
    store, _ = known
    done = results.finished(results.load_runs(EXPERIMENT, store.uri))
    curves = results.learning_curves(done, store.uri)
    assert len(curves) == 2 * 9  # two epochs of the nine fashion_mnist runs; the cifar10 runs logged none
    resnet = curves[curves["variant"] == "resnet20"].sort_values(["seed", "epoch"])
    assert resnet["epoch"].tolist() == [1, 2] * 3
    assert resnet["value"].tolist() == pytest.approx([0.5, 0.6, 0.5, 0.61, 0.5, 0.62])
    norms = results.gradient_norms(done, store.uri)
    assert len(norms) == 3 * 5 and set(norms["family"]) == {"densenet", "resnet"}
    assert norms.groupby("run_id")["relative_depth"].apply(list).map(lambda d: d == [0, 0.25, 0.5, 0.75, 1]).all()


def test_pooling_problems_name_runs_that_differ_in_more_than_the_seed(known):
    store, _ = known
    done = results.finished(results.load_runs(EXPERIMENT, store.uri))
    assert results.pooling_problems(done) == []
    first = done[(done["model"] == "resnet20") & (done["data"] == "fashion_mnist")].iloc[:1]
    problems = results.pooling_problems(pd.concat([done, first.assign(**{"params.trainer.max_epochs": "5"})]))
    assert len(problems) == 2 and all(p.startswith("`resnet20` on fashion_mnist: ") for p in problems)
    assert "(trainer.max_epochs)" in problems[0] and "seed 0 repeated" in problems[1]


def expected_stats(values: list[float]) -> tuple[float, float, float, float]:
    mean, std = statistics.mean(values), statistics.stdev(values)
    half = stats.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))
    return mean, std, mean - half, mean + half


def test_summary_gives_mean_std_and_t_interval_over_seeds(known):
    store, _ = known
    everything = sorted({m for _, metrics in FASHION.values() for m in metrics} | set(results.SUMMARY_METRICS))
    summary = results.summarize(results.finished(results.load_runs(EXPERIMENT, store.uri)), everything)
    assert len(summary) == 3 + 3  # data sets never pooled: resnet20 has a row on each
    for variant, (params, metrics) in FASHION.items():
        got = row(summary, "fashion_mnist", params["model.name"], params["growth_rate"])
        assert got["runs"] == 3 and got["seeds"] == "0, 1, 2" and got["variant"] == variant
        for metric, values in metrics.items():
            values = [v for v in values if v is not None]
            mean, std, low, high = expected_stats(values)
            assert got[f"{metric} n"] == len(values)
            assert got[f"{metric} mean"] == pytest.approx(mean, rel=1e-12)
            assert got[f"{metric} std"] == pytest.approx(std, rel=1e-12, abs=1e-12)
            assert got[f"{metric} ci_low"] == pytest.approx(low, rel=1e-12)
            assert got[f"{metric} ci_high"] == pytest.approx(high, rel=1e-12)
    # A missing metric is NaN with n = 0 (a blank cell), a partly missing one counts its runs.
    small = row(summary, "fashion_mnist", "densenet_small", 12)
    assert small["infer_images_per_s n"] == 0 and pd.isna(small["infer_images_per_s mean"])
    cells = report.format_summary(summary)
    assert cells.loc[small.name, "inference images/s"] == ""
    assert cells.loc[row(summary, "fashion_mnist", "densenet_small", 24).name, "FLOPs / image"] == "80M ± 0 (n=2)"
    acc = cells.loc[row(summary, "fashion_mnist", "resnet20").name, "test accuracy"]
    mean, std, low, high = expected_stats([0.92, 0.925, 0.93])
    assert acc == f"{mean:.4g} ± {std:.4g} [{low:.4g}, {high:.4g}]"
    # A single seed: a mean, no std or interval, and the table says so.
    single = row(summary, "cifar10", "resnet20")
    assert single["test/acc mean"] == 0.85 and pd.isna(single["test/acc std"]) and pd.isna(single["test/acc ci_low"])
    assert cells.loc[single.name, "runs"] == "1 (single seed: no std)"
    assert cells.loc[single.name, "test accuracy"] == "0.85"


def welch_by_hand(a: list[float], b: list[float]) -> float:
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


def test_claims_get_the_verdicts_their_rules_give(known):
    store, _ = known
    done = results.finished(results.load_runs(EXPERIMENT, store.uri))
    matrices = results.feature_reuse_matrices(done, store.uri)
    assert len(matrices) == 6 and all(len(m) == 3 and m[0].shape == (7, 7) for m in matrices.values())
    claims = {(c.data, c.claim): c for c in results.evaluate_claims(done, matrices)}
    assert len(claims) == 2 * len(results.RULES)
    verdicts = {key: c.verdict for key, c in claims.items()}
    dense, dense_big, resnet = (FASHION[v][1] for v in FASHION)
    # D = densenet k24 (0.94), R = resnet20 (0.925 ± 0.005). The k12 DenseNet has fewer parameters
    # than R and 0.925 >= 0.925 - 0.005, not significantly below: supported.
    assert verdicts["fashion_mnist", "fewer parameters for the same accuracy"] == "supported"
    params_claim = claims["fashion_mnist", "fewer parameters for the same accuracy"]
    assert "densenet_small-k12-c0.5-B" in params_claim.evidence
    assert params_claim.p_value == pytest.approx(welch_by_hand(dense["test/acc"], resnet["test/acc"]), rel=1e-9)
    # Gradient ratio 0.9 ± 0.1 vs 0.25 ± 0.05: higher, p < 0.05.
    p = welch_by_hand(dense_big["grad_first_last_ratio"], resnet["grad_first_last_ratio"])
    assert p < 0.05 and claims["fashion_mnist", "stronger gradient flow"].p_value == pytest.approx(p, rel=1e-9)
    assert verdicts["fashion_mnist", "stronger gradient flow"] == "supported"
    # Early share 0.45 ± 0.05 against 1/6 (three blocks of six layers): one-sample t-test.
    share = dense_big["reuse_early_share"]
    t = (statistics.mean(share) - 1 / 6) / (statistics.stdev(share) / math.sqrt(3))
    assert claims["fashion_mnist", "feature reuse"].p_value == pytest.approx(2 * stats.t.sf(t, 2), rel=1e-9)
    assert verdicts["fashion_mnist", "feature reuse"] == "supported"
    assert verdicts["fashion_mnist", "higher memory cost"] == "supported"
    # 410 images/s against the ResNet's 310: the DenseNet trains faster here, significantly.
    assert verdicts["fashion_mnist", "higher compute cost"] == "contradicted"
    assert welch_by_hand(dense_big["train_images_per_s"], resnet["train_images_per_s"]) < 0.05
    # cifar10, one seed each: no DenseNet is smaller than resnet20 (0.85), which matches the DenseNet
    # (0.80) with fewer parameters: contradicted. Comparisons need two seeds: inconclusive.
    assert verdicts["cifar10", "fewer parameters for the same accuracy"] == "contradicted"
    for claim in ("stronger gradient flow", "higher memory cost", "higher compute cost"):
        assert verdicts["cifar10", claim] == "inconclusive"
        assert claims["cifar10", claim].test == "single seed: no test"
    assert verdicts["cifar10", "feature reuse"] == "inconclusive"
    assert "no feature_reuse/matrices.json" in claims["cifar10", "feature reuse"].evidence


def test_directional_rule_edge_cases():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])
    assert results.directional(a, b, higher=True)[0] == "inconclusive"  # p = 1
    assert results.directional(np.array([5.0]), b, higher=True)[:2] == ("inconclusive", "single seed: no test")
    assert results.directional(np.array([]), b, higher=True)[:2] == ("inconclusive", "metric missing")
    constant = np.array([4.0, 4.0])  # no spread on either side: the means decide
    assert results.directional(constant, np.array([3.0, 3.0]), higher=True)[0] == "supported"
    assert results.directional(constant, np.array([3.0, 3.0]), higher=False)[0] == "contradicted"
    assert results.directional(constant, np.array([4.0, 4.0]), higher=True)[0] == "inconclusive"


def test_published_figures_are_keyed_by_preset_data_set_and_knobs(known):
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
    assert got["resnet110", "ResNet-110 (He et al. 2016)"]["published error %"] == 6.61
    table3 = {p.model: p.error_pct for p in results.PUBLISHED if "Table 3" in p.source}
    assert table3 == {"densenet121": 25.02, "densenet169": 23.80, "densenet201": 22.58, "densenet264": 22.15}


def test_report_cli_writes_the_folder_and_logs_a_report_run_it_then_ignores(known, tmp_path, capsys):
    store, parent = known
    for attempt in range(2):  # the second report must not read the first one's run
        out = tmp_path / f"report{attempt}"
        assert report.main(["--experiment", EXPERIMENT, "--tracking-uri", store.uri, "--out", str(out)]) == 0
        assert "12 finished runs in 6 configurations, 2 left out" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert has_row(text, "FAILED") and "RuntimeError: boom" in text and has_row(text, "RUNNING")
    assert "single seed, so no std" in text and "1 (single seed: no std)" in text
    assert has_row(text, "fashion_mnist", "higher compute cost", "**contradicted**")
    assert has_row(text, "cifar10", "fewer parameters for the same accuracy", "**contradicted**")
    for rule in results.RULES.values():
        assert rule in text
    assert "DenseNet-BC (L=100, k=12)" in text and "4.51" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert re.findall(r"\]\(([^)]+\.png)\)", text) and sorted(set(re.findall(r"\]\(([^)]+\.png)\)", text))) == pngs
    assert "feature_reuse_fashion_mnist_densenet_small-k24-c1.png" in pngs and "gradient_flow_cifar10.png" not in pngs
    client = store.client()
    reports = [r for r in store.runs(EXPERIMENT) if r.data.tags.get("report") == "true"]
    assert len(reports) == 3  # the old one and these two
    newest = max(reports, key=lambda r: r.info.start_time)
    assert {a.path for a in client.list_artifacts(newest.info.run_id)} >= {"report.md", "report.html", *pngs}
    assert report.main(["--experiment", "nope", "--tracking-uri", store.uri, "--out", str(tmp_path / "x")]) == 2


# --- a real tiny sweep, shared by the report and notebook tests -------------------------------


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Store:
    """DenseNet and ResNet, two seeds each, on a slice of Fashion-MNIST (about two minutes)."""
    store = Store(tmp_path_factory.mktemp("tiny_sweep"))
    result = store.run("experiment=smoke", "model=densenet_tiny,resnet20", "seed=0,1", multirun=True, out="sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    return store


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
    figures = {f"{kind}_fashion_mnist.png" for kind in
               ("accuracy_vs_cost", "main_effects", "interactions", "learning_curves", "gradient_flow")}
    assert names == {"report.md", "report.html", *figures, "feature_reuse_fashion_mnist_densenet_tiny-k4-c0.5-B.png"}
    page = (tiny_report / "report.html").read_text()
    assert "src=\"file" not in page and ".png\"" not in page  # nothing but data URIs
    embedded = [base64.b64decode(s) for s in re.findall(r'<img[^>]*\bsrc="data:image/png;base64,([^"]+)"', page)]
    assert sorted(embedded) == sorted((tiny_report / n).read_bytes() for n in names if n.endswith(".png"))
    text = (tiny_report / "report.md").read_text()
    assert has_row(text, "densenet_tiny", "4", "0.5", "yes", "2", "0, 1")
    assert has_row(text, "resnet20", "", "", "", "2", "0, 1")
    assert len(re.findall(r"\|\s*fashion_mnist\s*\|", text)) == len(results.RULES)  # one verdict per claim


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
    assert len(widths) == 6 and all(w >= 400 for w in widths), widths
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


@pytest.mark.parametrize("name", ["densenet_vs_resnet", "ablation"])
@pytest.mark.parametrize("store_kind", ["tiny_sweep", "known"])
def test_notebook_runs_top_to_bottom(name, store_kind, request, monkeypatch):
    """Each notebook runs without an error on the real sweep and on the hand-made store (two data
    sets, failed and running runs, single seeds, missing metrics)."""
    from nbclient import NotebookClient

    store, experiment = (request.getfixturevalue("tiny_sweep"), "smoke") if store_kind == "tiny_sweep" \
        else (request.getfixturevalue("known")[0], EXPERIMENT)
    assert kernel_python_prefix() == sys.prefix  # the venv's kernel, not another Python's
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "DENSENET_EXP_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.setenv("DENSENET_EXP_EXPERIMENT", experiment)
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(ROOT / "notebooks")}}
                   ).execute()  # raises CellExecutionError on the first failing cell
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"training runs in {experiment!r}" in outputs
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3

"""A sweep's results read back from MLflow: runs as a pandas table, means and 95% intervals over
seeds per configuration, the DenseNet paper's claims judged on them, and the paper's published
figures to set beside ours.

    runs = load_runs("ablation", "sqlite:///mlflow.db")     # every training run, any status
    done = finished(runs)
    summary = summarize(done)                               # one row per configuration
    claims = evaluate_claims(done, feature_reuse_matrices(done, uri))

A configuration is (data set, model, k, theta, bottleneck): its runs differ only in the seed.
Runs on different data sets are never pooled.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from scipy import stats

CONFIG = ["data", "model", "growth_rate", "compression", "bottleneck"]
# The per-configuration table: metric -> what the report calls it.
SUMMARY_METRICS = {
    "test/acc": "test accuracy",
    "params": "parameters",
    "flops_per_image": "FLOPs / image",
    "peak_memory_mb": "peak memory (MB)",
    "train_images_per_s": "train images/s",
    "infer_images_per_s": "inference images/s",
}
CONFIDENCE = 0.95  # of the intervals over seeds
ALPHA = 0.05  # significance level of every test
FAMILY_NAMES = {"densenet": "DenseNet", "resnet": "ResNet", "plain": "plain net (no shortcuts)"}


# --- runs ------------------------------------------------------------------------------------


def model_family(arch: object) -> str:
    """'densenet', 'resnet', 'plain' or the architecture itself (see densenet_exp.models)."""
    arch = str(arch)
    for family in ("densenet", "resnet", "plain"):
        if arch.startswith(family):
            return family
    return arch


class ExperimentNotFound(LookupError):
    pass


def load_runs(experiment: str, tracking_uri: str, sweep: str | None = None) -> pd.DataFrame:
    """Every training run of `experiment` (of one sweep if `sweep` is its parent run id), whatever
    its status; sweep parent runs and report runs are left out.

    One row per run: run_id, variant, status, error, the configuration (CONFIG columns; k, theta
    and B are NA for ResNets), family, arch, seed, device, epochs, one column per metric (its last
    value, NaN where the run lacks it) and the raw `params.*` strings for any other filter.
    Raises ExperimentNotFound when the experiment does not exist.
    """
    client = MlflowClient(tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ExperimentNotFound(f"no experiment {experiment!r} in {tracking_uri} (experiments: {known})")
    mlflow.set_tracking_uri(tracking_uri)  # mlflow.search_runs reads the global store
    raw = mlflow.search_runs(
        experiment_names=[experiment], filter_string=f"tags.sweep_id = '{sweep}'" if sweep else ""
    )
    tags = ["sweep", "report", "variant", "mlflow.runName", "error", "device"]
    params = ["data.name", "data.num_classes", "model.name", "model.arch", "growth_rate", "compression", "bottleneck",
              "seed", "trainer.max_epochs"]
    needed = ["run_id", "status", "start_time", *(f"tags.{t}" for t in tags), *(f"params.{p}" for p in params)]
    raw = raw.reindex(columns=list(dict.fromkeys([*needed, *raw.columns])))
    raw = raw[(raw["tags.sweep"] != "parent") & (raw["tags.report"] != "true")].reset_index(drop=True)
    param = lambda key: raw[f"params.{key}"]  # noqa: E731
    number = lambda key: pd.to_numeric(param(key), errors="coerce")  # noqa: E731 ("None" -> NaN)
    runs = pd.DataFrame({
        "run_id": raw["run_id"].astype(str),  # object dtype even when empty, for merges
        "variant": raw["tags.variant"].fillna(raw["tags.mlflow.runName"]).fillna(param("model.name")),
        "status": raw["status"],
        "error": raw["tags.error"],
        "data": param("data.name"),
        "model": param("model.name").fillna(param("model.arch")),
        "growth_rate": number("growth_rate").astype("Int64"),
        "compression": number("compression"),
        "bottleneck": param("bottleneck").map({"True": True, "False": False}).astype("boolean"),
        "family": param("model.arch").map(model_family, na_action="ignore"),
        "arch": param("model.arch"),
        "seed": number("seed").astype("Int64"),
        "num_classes": number("data.num_classes").astype("Int64"),
        "epochs": number("trainer.max_epochs").astype("Int64"),
        "device": raw["tags.device"],
        "start_time": raw["start_time"],
    })
    metrics = raw.filter(regex=r"^metrics\.").rename(columns=lambda c: c.removeprefix("metrics."))
    params = raw.filter(regex=r"^params\.")
    return pd.concat([runs, metrics, params], axis=1).sort_values(["data", "variant", "seed"], ignore_index=True)


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs the analysis uses: FINISHED ones (failed, killed and running runs are left out)."""
    return runs[runs["status"] == "FINISHED"]


def pooling_problems(runs: pd.DataFrame) -> list[str]:
    """What is wrong with pooling each configuration's runs over seeds: runs that differ in more
    than the seed (e.g. two epoch budgets) or repeat a seed (a rerun counted twice)."""
    problems = []
    for key, group in runs.groupby(CONFIG, dropna=False, sort=True):
        name = f"`{group['variant'].iloc[0]}` on {key[0]}"
        params = group.filter(regex=r"^params\.(?!seed$|tracking\.)")
        varying = [c.removeprefix("params.") for c in params if params[c].nunique(dropna=False) > 1]
        if varying:
            problems.append(f"{name}: runs differ in more than the seed ({', '.join(varying)}); pooled anyway")
        repeated = sorted(group["seed"][group["seed"].duplicated()].dropna().unique())
        if repeated:
            problems.append(f"{name}: seed {', '.join(map(str, repeated))} repeated; the repeats are pooled as if "
                            "independent, which understates the spread")
    return problems


# --- aggregation over seeds ------------------------------------------------------------------


def t_half_width(std: pd.Series | float, n: pd.Series | float) -> pd.Series | float:
    """Half width of the CONFIDENCE interval of a mean from n values (t-distribution, n-1 degrees
    of freedom); NaN for fewer than two values."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return stats.t.ppf((1 + CONFIDENCE) / 2, np.asarray(n) - 1) * std / np.sqrt(n)


def summarize(runs: pd.DataFrame, metrics: Iterable[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """One row per configuration of `runs` (pass finished runs): the CONFIG columns, family,
    variant, `runs` (how many), `seeds`, epochs, and for each metric `<metric> mean`, `std`, `n`
    (runs that logged it), `ci_low`, `ci_high`. std and the interval need two values: with one
    they are NaN. A metric no run logged gives NaN columns, not an error."""
    metrics = list(metrics)
    runs = runs.reindex(columns=list(dict.fromkeys([*runs.columns, *CONFIG, *metrics])))
    grouped = runs.groupby(CONFIG, dropna=False, sort=True)
    table = grouped.agg(
        family=("family", "first"),
        variant=("variant", "first"),
        runs=("run_id", "size"),
        seeds=("seed", lambda s: ", ".join(str(v) for v in sorted(s.dropna()))),
        epochs=("epochs", lambda s: ", ".join(str(v) for v in sorted(s.dropna().unique()))),
    )
    for metric in metrics:
        values = grouped[metric].agg(["mean", "std", "count"])
        half = t_half_width(values["std"], values["count"])
        table[f"{metric} mean"] = values["mean"]
        table[f"{metric} std"] = values["std"]
        table[f"{metric} n"] = values["count"]
        table[f"{metric} ci_low"] = values["mean"] - half
        table[f"{metric} ci_high"] = values["mean"] + half
    return table.reset_index()


# --- artifacts and metric histories ----------------------------------------------------------


def _download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path | None:
    """The artifact `path` of a run, downloaded under dst, or None when the run has none."""
    folder, _, _ = path.rpartition("/")
    if path not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
        return None
    return Path(client.download_artifacts(run_id, path, str(dst)))


def learning_curves(runs: pd.DataFrame, tracking_uri: str, metric: str = "val/acc") -> pd.DataFrame:
    """The per-epoch history of `metric` of each run: columns run_id, epoch (counted from 1),
    value, plus the run's CONFIG, variant and seed."""
    client = MlflowClient(tracking_uri)
    rows = []
    for run_id in runs["run_id"]:
        # Lightning logs the 0-based epoch at each step it logs; a resumed run may log a step twice.
        epochs: dict[int, int] = {}
        for m in client.get_metric_history(run_id, "epoch"):
            epochs[m.step] = max(epochs.get(m.step, 0), int(m.value) + 1)
        by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, metric),
                                                   key=lambda m: (m.step, m.timestamp))}
        for i, (step, value) in enumerate(sorted(by_step.items()), 1):
            rows.append({"run_id": run_id, "epoch": epochs.get(step, i), "value": value})
    curves = pd.DataFrame(rows, columns=["run_id", "epoch", "value"])
    return curves.merge(runs[["run_id", *CONFIG, "variant", "seed"]], on="run_id")


def gradient_norms(runs: pd.DataFrame, tracking_uri: str) -> pd.DataFrame:
    """The gradient-flow probe's `grad_norms.csv` of each run that has one (step, depth, layer,
    kind, grad_norm) plus run_id, CONFIG, family, variant and `relative_depth` (depth over the
    run's deepest layer: 0 = first conv, 1 = classifier), so nets of different depth share an axis."""
    client = MlflowClient(tracking_uri)
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in runs["run_id"]:
            path = _download(client, run_id, "gradient_flow/grad_norms.csv", Path(tmp, run_id))
            if path is not None:
                frame = pd.read_csv(path).assign(run_id=run_id)
                frames.append(frame.assign(relative_depth=frame["depth"] / max(frame["depth"].max(), 1)))
    columns = ["run_id", "step", "depth", "relative_depth", "layer", "kind", "grad_norm"]
    norms = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return norms[columns].merge(runs[["run_id", *CONFIG, "family", "variant"]], on="run_id")


def feature_reuse_matrices(runs: pd.DataFrame, tracking_uri: str) -> dict[str, list[np.ndarray]]:
    """{run_id: one matrix per dense block} from each run's `feature_reuse/matrices.json` (null
    read back as NaN); runs without it (ResNets, probe off) are absent."""
    client = MlflowClient(tracking_uri)
    matrices = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in runs["run_id"]:
            path = _download(client, run_id, "feature_reuse/matrices.json", Path(tmp, run_id))
            if path is not None:
                matrices[run_id] = [np.array(m, dtype=float) for m in json.loads(path.read_text())]
    return matrices


def mean_matrices(per_run: Sequence[list[np.ndarray]]) -> list[np.ndarray]:
    """Element-wise mean over runs of one configuration (same block shapes), block by block."""
    return [np.mean(np.stack(blocks), axis=0) for blocks in zip(*per_run)]


def uniform_early_share(matrices: Sequence[np.ndarray]) -> float:
    """The `reuse_early_share` a block would show if its last layer weighed all its sources
    alike: 1/L for a block of L layers (L sources), averaged over blocks."""
    return float(np.mean([1 / (m.shape[0] - 1) for m in matrices]))


# --- claims ----------------------------------------------------------------------------------


@dataclass
class Claim:
    """One claim of the paper judged on one data set's runs."""

    claim: str
    data: str
    verdict: str  # supported, contradicted or inconclusive
    evidence: str
    test: str  # the significance test and its result, or why there is none
    p_value: float | None = None


@dataclass
class Config:
    """The finished runs of one configuration."""

    variant: str
    family: str
    runs: pd.DataFrame

    def values(self, metric: str) -> np.ndarray:
        if metric not in self.runs:
            return np.array([])
        values = self.runs[metric].to_numpy(float)
        return values[np.isfinite(values)]

    def mean(self, metric: str) -> float:
        v = self.values(metric)
        return float(v.mean()) if len(v) else np.nan

    def std(self, metric: str) -> float:
        """Sample standard deviation over seeds; 0 for a single seed (used as a tolerance)."""
        v = self.values(metric)
        return float(v.std(ddof=1)) if len(v) > 1 else 0.0

    def describe(self, metric: str, fmt: str = ".4g") -> str:
        v = self.values(metric)
        if not len(v):
            return f"{self.variant}: no {metric}"
        spread = f" ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else " (single seed)"
        return f"{self.variant}: {metric} {v.mean():{fmt}}{spread}"


def welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    """Welch's two-sided t-test (t, p) of a against b; None without two values on each side or
    when neither varies (a test needs a spread)."""
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return None
    # From the summary statistics: the same test, without scipy's precision warning when one side is constant.
    result = stats.ttest_ind_from_stats(
        a.mean(), a.std(ddof=1), len(a), b.mean(), b.std(ddof=1), len(b), equal_var=False
    )
    return float(result.statistic), float(result.pvalue)


DIRECTIONAL_RULE = (
    f"With two or more seeds on each side, Welch's t-test (two-sided) decides: supported when the "
    f"difference has the claimed sign and p < {ALPHA}, contradicted when it has the other sign and "
    f"p < {ALPHA}, inconclusive otherwise. A metric that does not vary over seeds on either side is "
    f"compared by its means (equal: inconclusive). With a single seed on either side there is no "
    f"test: inconclusive."
)


def _by_sign(signed_diff: float) -> str:
    return "supported" if signed_diff > 0 else "contradicted"


def directional(a: np.ndarray, b: np.ndarray | float, higher: bool) -> tuple[str, str, float | None]:
    """DIRECTIONAL_RULE for the claim 'a is higher (or lower) than b' -> (verdict, test, p).
    A float b is a fixed reference: a one-sample t-test then replaces Welch's."""
    sign = 1 if higher else -1
    fixed = not isinstance(b, np.ndarray)
    if not len(a) or (not fixed and not len(b)):
        return "inconclusive", "metric missing", None
    if len(a) < 2 or (not fixed and len(b) < 2):
        return "inconclusive", "single seed: no test", None
    diff = a.mean() - (b if fixed else b.mean())
    if np.ptp(a) == 0 and (fixed or np.ptp(b) == 0):  # no spread (params, FLOPs): the means decide
        if diff == 0:
            return "inconclusive", "no spread over seeds, equal means", None
        return _by_sign(sign * diff), "no spread over seeds: means compared", None
    if fixed:
        result = stats.ttest_1samp(a, b)
        t, p, name = float(result.statistic), float(result.pvalue), f"one-sample t-test against {b:.4g} (n = {len(a)})"
    else:
        (t, p), name = welch(a, b), f"Welch's t-test (n = {len(a)}, {len(b)})"
    text = f"{name}: t = {t:.3g}, p = {p:.3g}"
    if p < ALPHA:
        return _by_sign(sign * diff), text, p
    return "inconclusive", f"{text}; not significant at {ALPHA}", p


def matches_accuracy(a: Config, b: Config, metric: str = "test/acc") -> bool:
    """a is as accurate as b: a's mean is at least b's mean minus b's standard deviation over
    seeds (b's mean itself for a single seed), and a is not significantly less accurate
    (Welch's two-sided p < ALPHA with a's mean below b's, tested with two or more seeds each)."""
    va, vb = a.values(metric), b.values(metric)
    if not len(va) or not len(vb):
        return False
    test = welch(va, vb)
    significantly_below = test is not None and va.mean() < vb.mean() and test[1] < ALPHA
    return va.mean() >= vb.mean() - b.std(metric) and not significantly_below


RULES = {
    "fewer parameters for the same accuracy": (
        "R = the most accurate ResNet, D = the most accurate DenseNet (highest mean test accuracy). "
        "X matches Y's accuracy when X's mean test accuracy is at least Y's mean minus Y's standard "
        "deviation over seeds (Y's mean itself with a single seed) and, with two or more seeds each, "
        f"Welch's t-test does not find X less accurate (two-sided p < {ALPHA}). Supported: a DenseNet "
        "with fewer mean parameters than R matches R (the one with fewest parameters is named). "
        "Contradicted: none does, and a ResNet with fewer parameters than D matches D. Inconclusive: "
        "neither (smaller nets of both families are less accurate). The test compares the named pair."
    ),
    "stronger gradient flow": (
        "D vs R on `grad_first_last_ratio` (the first layer's weight-gradient norm over the last "
        "layer's, mean over recorded steps; vanishing gradients make it small), claimed higher for D, "
        "by the directional rule."
    ),
    "feature reuse": (
        "D's `reuse_early_share` (the share of its input weight the last layer of each block puts on "
        "the block input, mean over blocks) against the share uniform weighting gives (1/L for a "
        "block of L layers, mean over blocks, from `feature_reuse/matrices.json`), claimed higher: "
        f"early features are used throughout a block. One-sample t-test: supported when above with "
        f"p < {ALPHA}, contradicted when below with p < {ALPHA}, inconclusive otherwise, with a single "
        "seed or without the matrices."
    ),
    "higher memory cost": (
        "D vs R on `peak_memory_mb` (GPU: peak allocated; CPU: growth of the process's peak resident "
        "memory during fit, 0 for a job whose process had peaked before), claimed higher for D, by the "
        "directional rule."
    ),
    "higher compute cost": (
        "D vs R on `train_images_per_s` (training throughput), claimed lower for D: a DenseNet is "
        "slower to train per image; by the directional rule."
    ),
}


def _configs(runs: pd.DataFrame) -> list[Config]:
    return [Config(str(g["variant"].iloc[0]), str(g["family"].iloc[0]), g)
            for _, g in runs.groupby(CONFIG, dropna=False, sort=True)]


def _most_accurate(configs: list[Config]) -> Config | None:
    scored = [c for c in configs if len(c.values("test/acc"))]
    return max(scored, key=lambda c: c.mean("test/acc")) if scored else None


def _params_claim(data: str, dense: list[Config], resnets: list[Config], d: Config, r: Config) -> Claim:
    name = "fewer parameters for the same accuracy"
    acc = lambda c: f"{c.describe('test/acc')}, {c.mean('params'):,.0f} params"  # noqa: E731
    smaller_dense = sorted((c for c in dense if c.mean("params") < r.mean("params") and matches_accuracy(c, r)),
                           key=lambda c: c.mean("params"))
    smaller_resnets = sorted((c for c in resnets if c.mean("params") < d.mean("params") and matches_accuracy(c, d)),
                             key=lambda c: c.mean("params"))
    if smaller_dense:
        pair, verdict = (smaller_dense[0], r), "supported"
        evidence = f"{acc(smaller_dense[0])} matches the most accurate ResNet {acc(r)}"
    elif smaller_resnets:
        pair, verdict = (smaller_resnets[0], d), "contradicted"
        evidence = f"ResNet {acc(smaller_resnets[0])} matches the most accurate DenseNet {acc(d)} with fewer parameters"
    else:
        pair, verdict = (d, r), "inconclusive"
        evidence = f"no smaller net matches the other family's best: DenseNet {acc(d)}; ResNet {acc(r)}"
    a, b = (c.values("test/acc") for c in pair)
    test = welch(a, b)
    if test:
        text = f"Welch's t-test on test accuracy (n = {len(a)}, {len(b)}): t = {test[0]:.3g}, p = {test[1]:.3g}"
    else:
        text = "single seed: no test" if min(len(a), len(b)) < 2 else "no spread over seeds: no test"
    return Claim(name, data, verdict, evidence, text, test[1] if test else None)


def _compare_claim(name: str, data: str, d: Config, r: Config, metric: str, higher: bool, note: str = "") -> Claim:
    verdict, test, p = directional(d.values(metric), r.values(metric), higher)
    evidence = f"{d.describe(metric)} vs {r.describe(metric)}{note}"
    return Claim(name, data, verdict, evidence, test, p)


def _reuse_claim(data: str, d: Config, matrices: dict[str, list[np.ndarray]]) -> Claim:
    name = "feature reuse"
    own = [matrices[i] for i in d.runs["run_id"] if i in matrices]
    if not own:
        return Claim(name, data, "inconclusive", f"{d.variant}: no feature_reuse/matrices.json", "no test")
    uniform = uniform_early_share(own[0])
    verdict, test, p = directional(d.values("reuse_early_share"), uniform, higher=True)
    evidence = f"{d.describe('reuse_early_share', '.3f')}; uniform weighting would give {uniform:.3f}"
    return Claim(name, data, verdict, evidence, test, p)


def _missing(name: str, data: str, what: str) -> Claim:
    return Claim(name, data, "inconclusive", f"{what} with a test accuracy on {data}", "no test")


def evaluate_claims(runs: pd.DataFrame, matrices: dict[str, list[np.ndarray]] | None = None) -> list[Claim]:
    """Judge each claim in RULES on each data set of `runs` (finished runs), DenseNet against the
    ResNet baseline. `matrices` from feature_reuse_matrices. A data set without both families gets
    inconclusive verdicts that say what is missing."""
    claims = []
    for key, group in runs.groupby("data", sort=True):
        data, configs = str(key), _configs(group)
        dense = [c for c in configs if c.family == "densenet"]
        resnets = [c for c in configs if c.family == "resnet"]
        d, r = _most_accurate(dense), _most_accurate(resnets)
        claims.append(_reuse_claim(data, d, matrices or {}) if d else _missing("feature reuse", data, "no DenseNet"))
        if d is None or r is None:
            missing = "no DenseNet" if d is None else "no ResNet baseline"
            claims += [_missing(name, data, missing) for name in RULES if name != "feature reuse"]
            continue
        plain = "".join(f"; plain: {c.describe('grad_first_last_ratio')}" for c in configs if c.family == "plain")
        both = pd.concat([d.runs, r.runs])
        zeros = int(((both["device"] == "cpu") & (both.get("peak_memory_mb") == 0)).sum())
        cpu_note = f"; {zeros} CPU runs read 0 (their process had peaked before)" if zeros else ""
        claims += [
            _params_claim(data, dense, resnets, d, r),
            _compare_claim("stronger gradient flow", data, d, r, "grad_first_last_ratio", True, plain),
            _compare_claim("higher memory cost", data, d, r, "peak_memory_mb", True, cpu_note),
            _compare_claim("higher compute cost", data, d, r, "train_images_per_s", False),
        ]
    order = list(RULES)
    return sorted(claims, key=lambda c: (c.data, order.index(c.claim)))


def claims_table(claims: Sequence[Claim]) -> pd.DataFrame:
    return pd.DataFrame([vars(c) for c in claims], columns=["data", "claim", "verdict", "evidence", "test", "p_value"])


# --- published figures -----------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedResult:
    """A published error rate of a model preset (conf/model) on a data set. The knobs (None:
    not a DenseNet) and the class count must match too: densenet_bc100_k12 with k=24, theta=1 and
    no bottleneck is the paper's DenseNet (L=100, k=24)."""

    model: str
    data: str
    num_classes: int
    growth_rate: int | None
    compression: float | None
    bottleneck: bool | None
    error_pct: float
    name: str
    source: str


_T2 = "Huang et al. 2017, Table 2 (C10+/C100+: crop and flip augmentation, 300 epochs)"
_T3 = "Huang et al. 2017, Table 3 (ImageNet val, single crop, 90 epochs)"
_TV = "torchvision model docs (ImageNet val acc@1)"
PUBLISHED = [
    PublishedResult("densenet_l40_k12", "cifar10", 10, 12, 1.0, False, 5.24, "DenseNet (L=40, k=12)", _T2),
    PublishedResult("densenet_bc100_k12", "cifar10", 10, 12, 1.0, False, 4.10, "DenseNet (L=100, k=12)", _T2),
    PublishedResult("densenet_bc100_k12", "cifar10", 10, 24, 1.0, False, 3.74, "DenseNet (L=100, k=24)", _T2),
    PublishedResult("densenet_bc100_k12", "cifar10", 10, 12, 0.5, True, 4.51, "DenseNet-BC (L=100, k=12)", _T2),
    PublishedResult("densenet_bc100_k12", "cifar100", 100, 12, 0.5, True, 22.27, "DenseNet-BC (L=100, k=12)", _T2),
    PublishedResult("resnet110", "cifar10", 10, None, None, None, 6.61, "ResNet-110 (He et al. 2016)", _T2),
    PublishedResult("resnet110", "cifar100", 100, None, None, None, 27.22,
                    "ResNet-110 (as reported by Huang et al. 2016, stochastic depth)", _T2),
    PublishedResult("densenet121", "imagefolder", 1000, 32, 0.5, True, 25.02, "DenseNet-121 top-1", _T3),
    PublishedResult("densenet169", "imagefolder", 1000, 32, 0.5, True, 23.80, "DenseNet-169 top-1", _T3),
    PublishedResult("densenet201", "imagefolder", 1000, 32, 0.5, True, 22.58, "DenseNet-201 top-1", _T3),
    PublishedResult("densenet264", "imagefolder", 1000, 32, 0.5, True, 22.15, "DenseNet-264 top-1", _T3),
    PublishedResult("resnet18", "imagefolder", 1000, None, None, None, 100 - 69.76, "ResNet-18 top-1", _TV),
    PublishedResult("resnet50", "imagefolder", 1000, None, None, None, 100 - 76.13, "ResNet-50 top-1", _TV),
    PublishedResult("resnet18", "fashion_mnist", 10, None, None, None, 100 - 94.9, "ResNet18",
                    "Fashion-MNIST README benchmark (submitted, not verified by its maintainers)"),
]


def _matches_published(runs: pd.DataFrame, pub: PublishedResult) -> pd.Series:
    match = runs["model"].eq(pub.model) & runs["data"].eq(pub.data) & runs["num_classes"].eq(pub.num_classes)
    for knob in ("growth_rate", "compression", "bottleneck"):
        value = getattr(pub, knob)
        match &= runs[knob].isna() if value is None else runs[knob].eq(value)
    return match.fillna(False).astype(bool)


def published_beside_ours(runs: pd.DataFrame) -> pd.DataFrame:
    """Each PUBLISHED result some of `runs` (finished) match, beside our test accuracy over
    seeds: one row per match, with our epochs (the published recipes train far longer)."""
    rows = []
    for pub in PUBLISHED:
        match = runs[_matches_published(runs, pub)]
        ours = match["test/acc"].dropna() if "test/acc" in match else pd.Series(dtype=float)
        if not len(ours):
            continue
        rows.append({
            "data": pub.data, "model": pub.model, "published": pub.name,
            "published accuracy": 1 - pub.error_pct / 100, "published error %": pub.error_pct,
            "our accuracy mean": ours.mean(), "our accuracy std": ours.std() if len(ours) > 1 else np.nan,
            "runs": len(ours), "our epochs": ", ".join(str(e) for e in sorted(match["epochs"].dropna().unique())),
            "source": pub.source,
        })
    return pd.DataFrame(rows, columns=["data", "model", "published", "published accuracy", "published error %",
                                       "our accuracy mean", "our accuracy std", "runs", "our epochs", "source"])

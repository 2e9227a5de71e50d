"""The DenseNet paper's claims judged on a sweep's finished runs, data set by data set.

    judged = evaluate_claims(done, matrices, margin_pp=0.5)   # done: results.finished(...)
    judged.claims, judged.selections

Every rule is stated once, as text next to the code that applies it; `method(margin_pp)` returns
those texts in order and the report prints them verbatim in its Method section. The margin of
"the same accuracy" is declared before the data are read (default DEFAULT_MARGIN_PP, the
report's --margin). No selection ever looks at test accuracy; every test needs MIN_SEEDS seeds
per side; the claims of one data set form one Holm-Bonferroni family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from .results import CONFIG, FAMILY_NAMES
from . import record

ALPHA = 0.05  # family-wise error rate of each data set's claims (Holm)
MIN_SEEDS = 3  # per side, for every test
DEFAULT_MARGIN_PP = 0.5  # of "the same accuracy", percentage points of accuracy
NOISY_CV = 0.10  # throughput whose coefficient of variation over seeds exceeds this is not judged
DEPTH_RATIO = 1.5  # "equal(ish) depth": the deeper net at most this many times the shallower
SPREAD_FRACTION = 0.5  # feature reuse (a), (b): early sources keep at least this share of uniform
NEAR_CHANCE_PP = 10  # accuracy within this many points of chance: a warning
FEW_EPOCHS = 10  # fewer training epochs: a warning on the claims about trained nets

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_COMPARABLE = "supported", "contradicted", "inconclusive", "not comparable"


@dataclass
class Claim:
    """One claim of the paper judged on one data set's runs.

    verdict: supported, contradicted, inconclusive or not comparable; `reason` says why it is
    not one of the first two. A claim with a test has its raw `p_value`, the Holm-adjusted
    `p_holm` over its data set's family, and `direction` (+1: the estimate lies on the claimed
    side, -1: the other side)."""

    data: str
    claim: str
    verdict: str
    evidence: str
    test: str
    reason: str = ""
    p_value: float | None = None
    p_holm: float | None = None
    direction: int = 0

    @property
    def label(self) -> str:
        return f"{self.verdict} ({self.reason})" if self.reason else self.verdict


@dataclass
class Config:
    """The finished runs of one configuration (they differ only in the seed)."""

    variant: str
    family: str
    runs: pd.DataFrame

    def values(self, metric: str) -> np.ndarray:
        if metric not in self.runs:
            return np.array([])
        values = pd.to_numeric(self.runs[metric], errors="coerce").to_numpy(float)
        return values[np.isfinite(values)]

    def mean(self, metric: str) -> float:
        v = self.values(metric)
        return float(v.mean()) if len(v) else np.nan

    @property
    def depth(self) -> float:
        depth = self.runs["depth"].dropna() if "depth" in self.runs else pd.Series(dtype=float)
        return float(depth.iloc[0]) if len(depth) else np.nan

    def describe(self, metric: str, fmt: str = ".4g", scale: float = 1.0, unit: str = "") -> str:
        v = self.values(metric) * scale
        if not len(v):
            return f"{self.variant}: no {metric}"
        spread = f" ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else ""
        return f"{self.variant}: {v.mean():{fmt}}{spread}{unit} (n={len(v)})"


def configs_of(runs: pd.DataFrame) -> list[Config]:
    return [Config(str(g["variant"].iloc[0]), str(g["family"].iloc[0]), g)
            for _, g in runs.groupby(CONFIG, dropna=False, sort=True)]


# --- model selection -------------------------------------------------------------------------

SELECTION_RULE = (
    "D and R are the DenseNet and the ResNet configuration with the highest mean validation accuracy "
    "(`val/acc` at the last epoch, the weights that are tested) over seeds on each data set; only their test "
    "accuracy is reported and compared. Where any run of the data set has no validation split (param "
    "`data.val_size` = 0, or no `val/acc`), every configuration of that data set is selected on the lowest "
    "mean last-epoch training loss (`train/loss`) instead, and the report says so. Test accuracy never "
    "selects anything."
)


def has_validation(runs: pd.DataFrame) -> pd.Series:
    """Per run: it held out a validation split (data.val_size not 0) and logged `val/acc`."""
    val = pd.to_numeric(runs[record.VAL_ACC], errors="coerce") if record.VAL_ACC in runs else pd.Series(np.nan, runs.index)
    size = runs["val_size"] if "val_size" in runs else pd.Series(pd.NA, runs.index)
    return val.notna() & size.ne(0).fillna(True).astype(bool)


def selection_criterion(runs: pd.DataFrame) -> tuple[str, str]:
    """SELECTION_RULE's criterion for one data set's runs: (record.VAL_ACC, "") or
    (record.TRAIN_LOSS, why)."""
    without = runs[~has_validation(runs)]
    if without.empty:
        return record.VAL_ACC, ""
    names = ", ".join(sorted(without["variant"].astype(str).unique()))
    return record.TRAIN_LOSS, (f"{len(without)} run(s) have no validation split ({names}): selected on the lowest "
                          "mean last-epoch training loss, not on validation accuracy")


def best_by(configs: Sequence[Config], metric: str) -> Config | None:
    """The configuration with the best mean `metric` (lowest for a loss, else highest)."""
    scored = [c for c in configs if len(c.values(metric))]
    if not scored:
        return None
    pick = min if metric.endswith("loss") else max
    return pick(scored, key=lambda c: c.mean(metric))


@dataclass
class Selection:
    """D and R of one data set, how they were chosen, and what test accuracy would have chosen."""

    data: str
    criterion: str
    reason: str
    dense: Config | None
    resnet: Config | None
    dense_by_test: Config | None
    resnet_by_test: Config | None

    def notes(self) -> list[str]:
        notes = [f"{self.data}: {self.reason}"] if self.reason else []
        for role, picked, by_test in (("D", self.dense, self.dense_by_test), ("R", self.resnet, self.resnet_by_test)):
            if picked is None:
                continue
            text = f"{self.data}: {role} = `{picked.variant}` (mean {self.criterion} {picked.mean(self.criterion):.4g})"
            if by_test is not None and by_test is not picked:
                text += (f"; the highest mean test accuracy would have picked `{by_test.variant}` "
                         f"({by_test.mean(record.TEST_ACC):.4f} vs {picked.mean(record.TEST_ACC):.4f}), which selection "
                         "on test data would have favoured: not used")
            notes.append(text)
        return notes


def select(data: str, runs: pd.DataFrame) -> Selection:
    """SELECTION_RULE on one data set's finished runs."""
    criterion, reason = selection_criterion(runs)
    configs = configs_of(runs)
    fam = lambda name: [c for c in configs if c.family == name]  # noqa: E731
    return Selection(data, criterion, reason, best_by(fam("densenet"), criterion), best_by(fam("resnet"), criterion),
                     best_by(fam("densenet"), record.TEST_ACC), best_by(fam("resnet"), record.TEST_ACC))


# --- comparability ---------------------------------------------------------------------------

# label -> how to read it from a run (a params.* or tags.* column, or a function of the run).
RECIPE_PARAMS = ["data.name", "data.num_classes", "data.train_size", "data.val_size", "data.test_size",
                 "data.split_seed", "data.image_size", "data.augment", "data.batch_size", "trainer.max_epochs",
                 "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "loss.label_smoothing"]
RECIPE_PREFIXES = ["optim."]
COMPARABILITY_RULE = (
    "Two configurations are compared only when all their runs share the recipe: "
    f"{', '.join(f'`{p}`' for p in RECIPE_PARAMS)}, every `optim.*` param (optimizer and schedule), the "
    "precision (tag `precision`, else param `trainer.precision`), the device (tag `device`) and the code "
    "version (tag `git_commit`); the model, the DenseNet knobs and the seed may differ. A key one run lacks "
    "counts as a value of its own. Otherwise the claim is \"not comparable\" and names the keys that differ. "
    "Claims on training speed also need the same `parallel_jobs` tag (jobs sharing the cores while timing; "
    "1 where not recorded) and the same `cpu_threads` tag on every run."
)
TIMING_TAGS = {record.PARALLEL_JOBS: "1", record.CPU_THREADS: None}


def _column(runs: pd.DataFrame, name: str, default: str | None = None) -> pd.Series:
    values = runs[name].astype("string") if name in runs else pd.Series(pd.NA, runs.index, dtype="string")
    return values.fillna(default) if default is not None else values


def recipe(runs: pd.DataFrame, timing: bool = False) -> pd.DataFrame:
    """COMPARABILITY_RULE's keys of each run, as strings ("(not recorded)" where missing)."""
    keys = {p: _column(runs, f"params.{p}") for p in RECIPE_PARAMS}
    for column in sorted(c for c in runs if c.startswith("params.")):
        if any(column.removeprefix("params.").startswith(p) for p in RECIPE_PREFIXES):
            keys[column.removeprefix("params.")] = _column(runs, column)
    keys["precision"] = _column(runs, f"tags.{record.PRECISION}").fillna(_column(runs, "params.trainer.precision"))
    keys["device"] = _column(runs, f"tags.{record.DEVICE}")
    keys["git_commit"] = _column(runs, f"tags.{record.GIT_COMMIT}")
    if timing:
        keys.update({tag: _column(runs, f"tags.{tag}", default) for tag, default in TIMING_TAGS.items()})
    return pd.DataFrame(keys, index=runs.index).fillna("(not recorded)")


def recipe_differences(*configs: Config, timing: bool = False) -> list[str]:
    """The recipe keys on which the runs of `configs` disagree, each with its values."""
    runs = pd.concat([c.runs for c in configs])
    table = recipe(runs, timing)
    return [f"{key}: {', '.join(sorted(table[key].unique()))}" for key in table if table[key].nunique() > 1]


# --- tests -----------------------------------------------------------------------------------

SEEDS_RULE = (
    f"Every test needs at least {MIN_SEEDS} seeds (runs) on each side; with fewer the claim is "
    f"\"inconclusive (needs >= {MIN_SEEDS} seeds)\". One seed never gives supported or contradicted."
)
DIRECTIONAL_RULE = (
    "A claim that one side is higher (or lower) is judged by Welch's two-sided t-test (one-sample t-test "
    "against a fixed reference) of the claimed difference: supported when the estimate lies on the claimed "
    "side and the Holm-adjusted p < α, contradicted when it lies on the other side and the adjusted p < α, "
    "inconclusive otherwise. Metrics that span orders of magnitude (relative gradients, memory, time per "
    "image or per FLOP) are tested on the log scale. A metric that does not vary over seeds on either side "
    "cannot be tested: inconclusive, except for exact figures (memory), which are compared directly."
)
HOLM_RULE = (
    f"The claims of one data set that have a test form one family; Holm-Bonferroni keeps its family-wise "
    f"error rate at α = {ALPHA}: with m tests and raw p-values sorted p(1) <= ... <= p(m), the adjusted "
    "p(i) is the running maximum of min(1, (m - i + 1) p(i)). The claims table prints raw and adjusted "
    "p-values and names the family."
)


def equivalence_rule(margin_pp: float) -> str:
    return (
        f"Two configurations have the same accuracy when two one-sided Welch tests (TOST) of their test "
        f"accuracies both reject a difference of ±{margin_pp:g} percentage points (the margin, declared "
        f"before the data are read: report --margin) at α = {ALPHA}, with at least {MIN_SEEDS} seeds each; "
        "the TOST p-value is the larger of the two. Not showing a difference is never taken for the same "
        "accuracy."
    )


def seeds_short(*sides: np.ndarray) -> str:
    """SEEDS_RULE: '' when every side has MIN_SEEDS values, else the inconclusive reason."""
    if all(len(s) >= MIN_SEEDS for s in sides):
        return ""
    return f"needs >= {MIN_SEEDS} seeds"


def holm(p_values: Sequence[float]) -> list[float]:
    """HOLM_RULE: Holm-Bonferroni adjusted p-values, in the order given."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.empty(len(p))
    running = 0.0
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def tost(a: np.ndarray, b: np.ndarray, margin: float) -> tuple[float, float, float] | None:
    """equivalence_rule's TOST of a against b: (p, p_lower, p_upper), p_lower testing H0: mean(a)
    - mean(b) <= -margin, p_upper H0: >= +margin; None when neither side varies."""
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return None
    lower = stats.ttest_ind(a + margin, b, equal_var=False, alternative="greater").pvalue
    upper = stats.ttest_ind(a - margin, b, equal_var=False, alternative="less").pvalue
    return float(max(lower, upper)), float(lower), float(upper)


def welch(a: np.ndarray, b: np.ndarray | float, shift: float = 0.0) -> tuple[float, float, str] | None:
    """DIRECTIONAL_RULE's test: Welch's two-sided t-test of mean(a) + shift against mean(b), or a
    one-sample t-test when b is a fixed reference -> (t, p, description); None without spread."""
    fixed = not isinstance(b, np.ndarray)
    if np.ptp(a) == 0 and (fixed or np.ptp(b) == 0):
        return None
    if fixed:
        result = stats.ttest_1samp(a + shift, b)
        name = f"one-sample t-test against {b:.4g} (n = {len(a)})"
    else:
        result = stats.ttest_ind(a + shift, b, equal_var=False)
        name = f"Welch's t-test (n = {len(a)}, {len(b)})"
    return float(result.statistic), float(result.pvalue), f"{name}: t = {result.statistic:.3g}, p = {result.pvalue:.3g}"


def directional(data: str, name: str, a: np.ndarray, b: np.ndarray | float, higher: bool, evidence: str,
                shift: float = 0.0) -> Claim:
    """DIRECTIONAL_RULE for 'a (+ shift) is higher (or lower) than b', before Holm: a claim with
    its raw p and direction, or inconclusive without enough seeds or spread."""
    sides = (a,) if not isinstance(b, np.ndarray) else (a, b)
    if not all(len(s) for s in sides):
        return Claim(data, name, INCONCLUSIVE, evidence, "no test", "metric missing")
    short = seeds_short(*sides)
    if short:
        counts = ", ".join(str(len(s)) for s in sides)
        return Claim(data, name, INCONCLUSIVE, evidence, f"no test ({counts} seeds)", short)
    result = welch(a, b, shift)
    if result is None:
        return Claim(data, name, INCONCLUSIVE, evidence, "no test", "no spread over seeds")
    t, p, text = result
    sign = (1 if higher else -1) * (1 if t > 0 else -1)
    return Claim(data, name, INCONCLUSIVE, evidence, text, p_value=p, direction=sign)


def decide(claims: list[Claim]) -> list[str]:
    """HOLM_RULE then DIRECTIONAL_RULE over one data set's claims (in place): fills p_holm and the
    verdict of every claim with a test; returns the family (claim names) that was corrected."""
    tested = [c for c in claims if c.p_value is not None]
    for claim, adjusted in zip(tested, holm([c.p_value for c in tested])):
        claim.p_holm = adjusted
        if adjusted < ALPHA and claim.direction:
            claim.verdict, claim.reason = (SUPPORTED if claim.direction > 0 else CONTRADICTED), ""
        else:
            claim.verdict, claim.reason = INCONCLUSIVE, f"not significant after Holm, p = {adjusted:.3g}"
    return [c.claim for c in tested]


# --- claim: fewer parameters for the same accuracy -------------------------------------------

PARAMS = "fewer parameters for the same accuracy"


def params_rule(margin_pp: float) -> str:
    return (
        "c = the DenseNet configuration with fewer mean parameters than R that the selection rule ranks first "
        "(validation, never test). Claim: c is at least as accurate as R (more accurate also counts), i.e. the "
        f"test-accuracy difference c - R exceeds -{margin_pp:g} points: the directional rule on that difference "
        f"shifted by the margin (Welch of c + {margin_pp:g} pp against R). Contradicted: c is worse than R by "
        "more than the margin. Inconclusive without such a DenseNet. The evidence also gives the TOST "
        "equivalence of c and R, which decides whether the pair has matched accuracy for the cost claims."
    )


@dataclass
class Pair:
    """The DenseNet c and the ResNet R of the parameters claim, and whether their accuracy matches."""

    dense: Config
    resnet: Config
    matched: bool
    note: str


def _acc(c: Config) -> str:
    return f"{c.describe(record.TEST_ACC, '.2f', 100, ' %')}, {c.mean(record.PARAMS):,.0f} params"


def params_claim(data: str, sel: Selection, configs: list[Config], margin_pp: float) -> tuple[Claim, Pair | None]:
    r = sel.resnet
    smaller = [c for c in configs if c.family == "densenet" and c.mean(record.PARAMS) < r.mean(record.PARAMS)]
    c = best_by(smaller, sel.criterion)
    if c is None:
        evidence = f"no DenseNet with fewer parameters than R = {_acc(r)}"
        return Claim(data, PARAMS, INCONCLUSIVE, evidence, "no test", "no smaller DenseNet"), None
    evidence = f"c = {_acc(c)}; R = {_acc(r)}"
    differ = recipe_differences(c, r)
    if differ:
        return Claim(data, PARAMS, NOT_COMPARABLE, evidence, "no test", "; ".join(differ)), None
    a, b = c.values(record.TEST_ACC), r.values(record.TEST_ACC)
    margin = margin_pp / 100
    claim = directional(data, PARAMS, a, b, True, evidence, shift=margin)
    equivalent = tost(a, b, margin) if not seeds_short(a, b) and len(a) and len(b) else None
    if equivalent is None:
        note = "TOST: no test"
    else:
        p, low, high = equivalent
        note = (f"TOST within ±{margin_pp:g} pp: p = {p:.3g} (lower {low:.3g}, upper {high:.3g}): "
                + ("same accuracy" if p < ALPHA else "same accuracy not shown"))
        claim.evidence += f"; difference {round(100 * (a.mean() - b.mean()), 2) + 0.0:+.2f} pp"  # no -0.00
    claim.test += f"; {note}"
    return claim, Pair(c, r, equivalent is not None and equivalent[0] < ALPHA, note)


# --- claims: stronger gradient flow ----------------------------------------------------------
GRADIENT_PHASES = dict(zip(record.GRADIENT_PHASES, ("init", "after epoch 1")))  # phase -> words
GRADIENT_PHASES = {"init": "init", "epoch1": "after epoch 1"}
GRADIENT_RULE = (
    "For each comparison family F (the plain net without shortcuts first, ResNet second): F* is the deepest F "
    f"configuration that has a DenseNet configuration within {DEPTH_RATIO:g}x its depth (else the deepest F "
    "configuration), D* the DenseNet configuration closest to it in depth (conv and linear layers; ties go to "
    f"the selection rule's order); depths more than {DEPTH_RATIO:g}x apart are not comparable. Metric: "
    "`grad/early_rel_<phase>`, the mean relative gradient ||grad|| / ||weight|| of the layers at relative "
    "depth <= 0.25, at initialization (first optimizer step) and after the first epoch. The claim is against "
    "vanishing gradients, so it applies only where F* shows them: the geometric mean over seeds of F*'s "
    "`grad/early_over_late_<phase>` (early over late layers, relative depth >= 0.75) below 1; otherwise "
    "inconclusive, saying what F* shows instead. Then D* higher than F* by the directional rule on the log "
    "scale."
)


def _closest(configs: list[Config], depth: float) -> Config | None:
    known = [c for c in configs if np.isfinite(c.depth)]
    return min(known, key=lambda c: abs(np.log(c.depth / depth))) if known else None


def gradient_claims(data: str, sel: Selection, configs: list[Config]) -> list[Claim]:
    ranked = sorted([c for c in configs if c.family == "densenet"],
                    key=lambda c: -c.mean(sel.criterion) if sel.criterion == record.VAL_ACC else c.mean(sel.criterion))
    claims = []
    for family in ("plain", "resnet"):
        others = [c for c in configs if c.family == family and np.isfinite(c.depth)]
        matched = [c for c in others if (d := _closest(ranked, c.depth)) is not None
                   and max(d.depth, c.depth) <= DEPTH_RATIO * min(d.depth, c.depth)]
        other = max(matched or others, key=lambda c: c.depth) if others else None
        dense = _closest(ranked, other.depth) if other is not None else None
        for phase, when in GRADIENT_PHASES.items():
            name = f"stronger gradient flow than a {'plain net' if family == 'plain' else 'ResNet'} ({when})"
            metric = record.early_relative_gradient(phase)
            if other is None or dense is None:
                missing = FAMILY_NAMES[family] if other is None else "DenseNet of known depth"
                claims.append(Claim(data, name, INCONCLUSIVE, f"no {missing} on {data}", "no test", "nothing to compare"))
                continue
            evidence = (f"{metric}: {dense.describe(metric, '.3g')} at depth {dense.depth:g} vs "
                        f"{other.describe(metric, '.3g')} at depth {other.depth:g}")
            if max(dense.depth, other.depth) > DEPTH_RATIO * min(dense.depth, other.depth):
                reason = f"depth {dense.depth:g} vs {other.depth:g}"
                claims.append(Claim(data, name, NOT_COMPARABLE, evidence, "no test", reason))
                continue
            differ = recipe_differences(dense, other)
            if differ:
                claims.append(Claim(data, name, NOT_COMPARABLE, evidence, "no test", "; ".join(differ)))
                continue
            if not len(dense.values(metric)) or not len(other.values(metric)):
                claims.append(Claim(data, name, INCONCLUSIVE, evidence, "no test", f"no {metric} logged"))
                continue
            ratio = other.values(record.early_over_late_gradient(phase))
            if not len(ratio):
                claims.append(Claim(data, name, INCONCLUSIVE, evidence, "no test",
                                    f"no {record.early_over_late_gradient(phase)} for {other.variant}"))
                continue
            early_over_late = float(np.exp(np.log(ratio).mean()))  # geometric mean over seeds
            if early_over_late >= 1:  # the baseline has no vanishing gradient to alleviate
                what = "exploding" if early_over_late > 10 else "no decay"
                reason = (f"{other.variant} shows no vanishing gradient: its early layers get {early_over_late:.3g}x "
                          f"the late layers' relative gradient ({what})")
                claims.append(Claim(data, name, INCONCLUSIVE, evidence, "no test", reason))
                continue
            a, b = dense.values(metric), other.values(metric)
            logged = (np.log10(a), np.log10(b)) if (a > 0).all() and (b > 0).all() else (a, b)
            claim = directional(data, name, *logged, True, evidence)
            claim.test = claim.test.replace("t-test", "t-test on log10", 1)
            claims.append(claim)
    return claims


# --- claims: feature reuse (the paper's Figure 5) --------------------------------------------

# Observation -> (claim name, metric the probe logs, reference ratio, claimed higher).
FIGURE5 = {
    "a": ("feature reuse (a): layers use early features", record.REUSE_EARLY_OVER_UNIFORM, SPREAD_FRACTION, True),
    "b": ("feature reuse (b): transitions use the whole block", record.REUSE_TRANSITION_EARLY_OVER_UNIFORM,
          SPREAD_FRACTION, True),
    "c": ("feature reuse (c): transition outputs get less weight", record.REUSE_TRANSITION_OUTPUT_OVER_UNIFORM, 1.0,
          False),
    "d": ("feature reuse (d): classifier concentrates on late features", record.REUSE_CLASSIFIER_LATE_OVER_UNIFORM,
          1.0, True),
}
FIGURE5_RULE = (
    "From each run's `feature_reuse/matrices.json` (per block, rows = sources s = 0..L with 0 the block "
    "input, columns = layers 1..L then the transition or classifier; cell = mean |weight| per input map), each "
    "column is turned into shares of its sum over the sources that can feed it; uniform weighting gives each of "
    "a target's n sources 1/n. Each observation is a ratio to what uniform weighting gives, per run, averaged "
    "over the cells named: "
    "(a) layers spread their weight over many inputs, early layers included: the share of layer l (l >= 3) on "
    "sources 1..floor(l/2), plus the block input in block 1 only, over its uniform share; claimed at least "
    f"{SPREAD_FRACTION:g} (spread means early sources keep a good part of a uniform share); "
    "(b) transitions spread their weight over the whole block: the share of each transition on layers "
    f"1..floor(L/2) of its block over its uniform share; claimed at least {SPREAD_FRACTION:g}; "
    "(c) in blocks 2 and later the transition output (the block input) gets below-average weight: its share "
    "in layers 2..L over 1/l; claimed below 1; "
    "(d) the classifier concentrates on the last layers: its share on the later floor(L/2) layers of the last "
    "block over their uniform share; claimed above 1. "
    "Each by a one-sample t-test of D's runs against the reference (directional rule); uniform weighting "
    "therefore bears out (a) and (b), which say weight is spread, and leaves (c) and (d) inconclusive."
)


def figure5_ratios(matrices: Sequence[np.ndarray]) -> dict[str, float]:
    """FIGURE5_RULE's ratios of one run's matrices, keyed by FIGURE5's metric names; a ratio the
    blocks are too short (or too few) for is absent."""
    shares = [m / np.nansum(m, axis=0) for m in matrices]
    early, transition, on_input = [], [], []
    for b, share in enumerate(shares):
        num_layers = share.shape[0] - 1
        for layer in range(3, num_layers + 1):  # layer l reads sources 0..l-1, in column l-1
            sources = [*range(1, layer // 2 + 1), *([0] if b == 0 else [])]
            early.append(share[sources, layer - 1].sum() / (len(sources) / layer))
        if b < len(shares) - 1 and num_layers >= 2:
            sources = list(range(1, num_layers // 2 + 1))
            transition.append(share[sources, -1].sum() / (len(sources) / (num_layers + 1)))
        if b > 0:
            on_input += [share[0, layer - 1] * layer for layer in range(2, num_layers + 1)]
    ratios = {"a": early, "b": transition, "c": on_input}
    last, num_layers = shares[-1], shares[-1].shape[0] - 1
    if num_layers >= 2:
        late = list(range(num_layers - num_layers // 2 + 1, num_layers + 1))
        ratios["d"] = [last[late, -1].sum() / (len(late) / (num_layers + 1))]
    return {FIGURE5[k][1]: float(np.mean(v)) for k, v in ratios.items() if v}


def reuse_claims(data: str, d: Config | None, matrices: dict[str, list[np.ndarray]]) -> list[Claim]:
    if d is None:
        return [Claim(data, name, INCONCLUSIVE, f"no DenseNet on {data}", "no test", "nothing to judge")
                for name, *_ in FIGURE5.values()]
    own = [figure5_ratios(matrices[i]) for i in d.runs["run_id"] if i in matrices]
    claims = []
    for name, metric, reference, higher in FIGURE5.values():
        values = np.array([r[metric] for r in own if metric in r])
        if not own or not len(values):
            why = f"no {record.FEATURE_REUSE_MATRICES}" if not own else "blocks too short or too few for it"
            claims.append(Claim(data, name, INCONCLUSIVE, f"D = {d.variant}: {why}", "no test", "not measured"))
            continue
        spread = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""
        evidence = f"D = {d.variant}: ratio to uniform {values.mean():.3f}{spread} (n={len(values)}); reference {reference:g}"
        claims.append(directional(data, name, values, float(reference), higher, evidence))
    return claims


# --- claims: memory and compute cost ---------------------------------------------------------

MEMORY = "higher memory cost at matched accuracy"
MEMORY_RULE = (
    "On the pair (c, R) of the parameters claim, only when TOST shows their accuracy is the same: "
    "`memory/train_step_mb` (bytes saved for backward in one training step at the run's batch size, plus "
    "parameters, gradients and optimizer state, in MiB) divided by param `data.batch_size`, claimed higher "
    "for c. The figure is exact (the same for every seed): compared directly when neither side varies, else "
    "by the directional rule on the log scale. `peak_memory_mb` (process history) is never used."
)
COMPUTE = "higher compute cost at matched accuracy"
COMPUTE_FLOP = "higher compute cost per FLOP"
COMPUTE_RULE = (
    "Training time per image (1 / `train_images_per_s`) of c vs R, the pair of the parameters claim, only "
    "when TOST shows their accuracy is the same; and time per FLOP (1 / (`train_images_per_s` x "
    "`flops_per_image`)) of D vs R. Both claimed higher for the DenseNet, by the directional rule on the log "
    "scale. Runs must share the timing tags (comparability rule), and throughput whose coefficient of "
    f"variation over seeds exceeds {NOISY_CV:.0%} on either side is flagged as noisy and not judged."
)


def _unmatched(data: str, name: str, pair: Pair | None) -> Claim | None:
    if pair is None:
        return Claim(data, name, INCONCLUSIVE, "no (c, R) pair from the parameters claim", "no test", "no pair")
    if not pair.matched:
        evidence = f"c = {pair.dense.variant}, R = {pair.resnet.variant}; {pair.note}"
        return Claim(data, name, INCONCLUSIVE, evidence, "no test", "accuracy not matched")
    return None


def memory_claim(data: str, pair: Pair | None) -> Claim:
    blocked = _unmatched(data, MEMORY, pair)
    if blocked:
        return blocked
    per_image = {}
    for side in (pair.dense, pair.resnet):
        runs = side.runs.reindex(columns=[record.TRAIN_STEP_MB, "batch_size"])
        values = (pd.to_numeric(runs[record.TRAIN_STEP_MB], errors="coerce")
                  / pd.to_numeric(runs["batch_size"], errors="coerce")).to_numpy(float)
        per_image[side.variant] = values[np.isfinite(values)]
    a, b = per_image[pair.dense.variant], per_image[pair.resnet.variant]
    evidence = "; ".join(f"{v}: {x.mean():.4g} MiB/image (n={len(x)})" if len(x) else f"{v}: no memory/train_step_mb"
                         for v, x in per_image.items())
    if not len(a) or not len(b):
        return Claim(data, MEMORY, INCONCLUSIVE, evidence, "no test", "metric missing")
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        if a[0] == b[0]:
            return Claim(data, MEMORY, INCONCLUSIVE, evidence, "exact figures, equal", "equal")
        verdict = SUPPORTED if a[0] > b[0] else CONTRADICTED
        return Claim(data, MEMORY, verdict, evidence, f"exact figures compared directly: ratio {a[0] / b[0]:.3g}")
    claim = directional(data, MEMORY, np.log(a), np.log(b), True, evidence)
    claim.test = claim.test.replace("t-test", "t-test on log", 1)
    return claim


def _timing_blocked(data: str, name: str, evidence: str, *sides: Config) -> Claim | None:
    differ = recipe_differences(*sides, timing=True)
    if differ:
        return Claim(data, name, NOT_COMPARABLE, evidence, "no test", "; ".join(differ))
    noisy = [f"{s.variant} CV {np.std(v, ddof=1) / np.mean(v):.0%}" for s in sides
             if len(v := s.values(record.TRAIN_IMAGES_PER_S)) > 1 and np.std(v, ddof=1) / np.mean(v) > NOISY_CV]
    if noisy:
        return Claim(data, name, INCONCLUSIVE, evidence, "no test",
                     f"noisy throughput: {', '.join(noisy)} > {NOISY_CV:.0%}")
    return None


def compute_claims(data: str, sel: Selection, pair: Pair | None) -> list[Claim]:
    claims = []
    blocked = _unmatched(data, COMPUTE, pair)
    if blocked:
        claims.append(blocked)
    else:
        c, r = pair.dense, pair.resnet
        evidence = (f"{c.describe('train_images_per_s', '.4g', 1, ' train images/s')} vs "
                    f"{r.describe('train_images_per_s', '.4g', 1, ' train images/s')}")
        claims.append(_timing_blocked(data, COMPUTE, evidence, c, r) or _log_claim(
            data, COMPUTE, -np.log(c.values(record.TRAIN_IMAGES_PER_S)), -np.log(r.values(record.TRAIN_IMAGES_PER_S)),
            evidence))
    d, r = sel.dense, sel.resnet
    per_flop = {s.variant: 1e9 / (s.values(record.TRAIN_IMAGES_PER_S) * s.mean(record.FLOPS_PER_IMAGE)) for s in (d, r)}
    evidence = "; ".join(f"{v}: {x.mean():.4g} s per GFLOP (n={len(x)})" if len(x) and np.isfinite(x).all()
                         else f"{v}: no throughput or FLOPs" for v, x in per_flop.items())
    a, b = per_flop[d.variant], per_flop[r.variant]
    if not (len(a) and len(b) and np.isfinite(a).all() and np.isfinite(b).all()):
        claims.append(Claim(data, COMPUTE_FLOP, INCONCLUSIVE, evidence, "no test", "metric missing"))
    else:
        claims.append(_timing_blocked(data, COMPUTE_FLOP, evidence, d, r)
                      or _log_claim(data, COMPUTE_FLOP, np.log(a), np.log(b), evidence))
    return claims


def _log_claim(data: str, name: str, a: np.ndarray, b: np.ndarray, evidence: str) -> Claim:
    claim = directional(data, name, a, b, True, evidence)
    claim.test = claim.test.replace("t-test", "t-test on log", 1)
    return claim


# --- all claims, and what they show ----------------------------------------------------------

CLAIMS = [PARAMS, *(f"stronger gradient flow than a {f} ({w})" for f in ("plain net", "ResNet")
                    for w in GRADIENT_PHASES.values()),
          *(v[0] for v in FIGURE5.values()), MEMORY, COMPUTE, COMPUTE_FLOP]


@dataclass
class Judgement:
    """evaluate_claims' result: the claims (CLAIMS order per data set), each data set's
    selection and Holm family, and the warnings the conclusion carries."""

    claims: list[Claim] = field(default_factory=list)
    selections: dict[str, Selection] = field(default_factory=dict)
    families: dict[str, list[str]] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    margin_pp: float = DEFAULT_MARGIN_PP


def evaluate_claims(runs: pd.DataFrame, matrices: dict[str, list[np.ndarray]] | None = None,
                    margin_pp: float = DEFAULT_MARGIN_PP) -> Judgement:
    """Judge every claim in CLAIMS on each data set of `runs` (finished runs), by the rules of
    `method(margin_pp)`. `matrices` from results.feature_reuse_matrices."""
    judged = Judgement(margin_pp=margin_pp)
    for key, group in runs.groupby("data", sort=True):
        data, configs = str(key), configs_of(group)
        sel = select(data, group)
        judged.selections[data] = sel
        claims = reuse_claims(data, sel.dense, matrices or {}) + gradient_claims(data, sel, configs)
        if sel.dense is None or sel.resnet is None:
            missing = "no DenseNet" if sel.dense is None else "no ResNet baseline"
            claims += [Claim(data, n, INCONCLUSIVE, f"{missing} on {data}", "no test", "nothing to compare")
                       for n in (PARAMS, MEMORY, COMPUTE, COMPUTE_FLOP)]
        else:
            claim, pair = params_claim(data, sel, configs, margin_pp)
            claims += [claim, memory_claim(data, pair), *compute_claims(data, sel, pair)]
        judged.families[data] = decide(claims)
        judged.claims += sorted(claims, key=lambda c: CLAIMS.index(c.claim))
        judged.warnings[data] = warnings(sel, group)
    return judged


CONCLUSION_RULE = (
    f"The conclusion lists the claims each data set supports and contradicts, and warns when D's or R's mean "
    f"test accuracy is within {NEAR_CHANCE_PP} points of chance (1 / classes) or the runs trained fewer than "
    f"{FEW_EPOCHS} epochs (the paper's comparisons are at 300 epochs on CIFAR): the verdicts on accuracy, "
    "feature reuse, matched-accuracy cost and post-epoch-1 gradients then describe barely trained nets."
)


def warnings(sel: Selection, runs: pd.DataFrame) -> list[str]:
    """CONCLUSION_RULE's warnings for one data set."""
    notes = []
    classes = pd.to_numeric(runs.get("num_classes"), errors="coerce").dropna()
    for role, config in (("D", sel.dense), ("R", sel.resnet)):
        if config is None or not len(classes):
            continue
        chance, acc = 1 / float(classes.iloc[0]), config.mean(record.TEST_ACC)
        if np.isfinite(acc) and acc <= chance + NEAR_CHANCE_PP / 100:
            notes.append(f"{role} = `{config.variant}` is near chance level (test accuracy {acc:.3f}, chance "
                         f"{chance:.3f}): its verdicts say little about trained networks.")
    epochs = pd.to_numeric(runs.get("epochs"), errors="coerce").dropna()
    if len(epochs) and epochs.max() < FEW_EPOCHS:
        notes.append(f"At most {int(epochs.max())} training epoch(s): too few for the accuracy, feature-reuse and "
                     "matched-accuracy cost claims (the paper trains 300 epochs on CIFAR).")
    return notes


def conclusion(judged: Judgement) -> list[str]:
    """CONCLUSION_RULE: one paragraph per data set, generated from the verdicts."""
    lines = []
    for data in sorted(judged.selections):
        claims = [c for c in judged.claims if c.data == data]
        pick = lambda v: [c.claim for c in claims if c.verdict == v]  # noqa: E731
        supported, contradicted = pick(SUPPORTED), pick(CONTRADICTED)
        open_ = len(claims) - len(supported) - len(contradicted)
        text = f"**{data}**: "
        text += f"supported: {'; '.join(supported)}. " if supported else "no claim supported. "
        text += f"Contradicted: {'; '.join(contradicted)}. " if contradicted else "None contradicted. "
        if open_:
            text += f"{open_} of {len(claims)} claims inconclusive or not comparable"
            short = sum("seeds" in c.reason for c in claims)
            text += f" ({short} for want of >= {MIN_SEEDS} seeds per side)." if short else "."
        lines.append(text + "".join(f" Warning: {w}" for w in judged.warnings.get(data, [])))
    return lines


def method(margin_pp: float = DEFAULT_MARGIN_PP) -> list[tuple[str, str]]:
    """Every rule the verdicts apply, as (name, text), in the order the report prints them."""
    from .results import INTERVAL_RULE, PUBLISHED_RULE

    return [
        ("selection", SELECTION_RULE),
        ("comparability", COMPARABILITY_RULE),
        ("seeds", SEEDS_RULE),
        ("same accuracy (equivalence)", equivalence_rule(margin_pp)),
        ("directional rule", DIRECTIONAL_RULE),
        ("multiple comparisons", HOLM_RULE),
        (PARAMS, params_rule(margin_pp)),
        ("stronger gradient flow", GRADIENT_RULE),
        ("feature reuse (Figure 5)", FIGURE5_RULE),
        (MEMORY, MEMORY_RULE),
        ("higher compute cost", COMPUTE_RULE),
        ("conclusion", CONCLUSION_RULE),
        ("intervals", INTERVAL_RULE),
        ("published figures", PUBLISHED_RULE),
    ]


def claims_table(claims: Sequence[Claim]) -> pd.DataFrame:
    """The claims as a table: data, claim, verdict (with its reason), evidence, test, raw and
    Holm-adjusted p."""
    rows = [{"data": c.data, "claim": c.claim, "verdict": c.label, "evidence": c.evidence, "test": c.test,
             "p": c.p_value, "p (Holm)": c.p_holm} for c in claims]
    return pd.DataFrame(rows, columns=["data", "claim", "verdict", "evidence", "test", "p", "p (Holm)"])


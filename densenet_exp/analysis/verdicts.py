"""The DenseNet paper's claims read on a sweep's finished runs without a declared plan:
exploratory verdicts, data set by data set.

    judged = evaluate_claims(done, matrices, margin_pp=0.5, init=init, grads=grads, curves=curves)
    judged.claims, judged.selections

Runs chosen on the same runs that judge them keep the winner's curse (D and R are the best of
their families on validation, and validation and test errors correlate over seeds), so nothing
here is ever "supported" or "contradicted": a claim that would be decided reads "exploratory
(chosen on these runs; leans ...)". Decided verdicts come only from a declared plan judged on
fresh seeds (the claim engine, densenet_exp/claims/), which shares the measurement rules below: the
convergence gate, feature reuse against the net's own initialization, gradients on the body's
3x3 convolutions. Every rule is stated once, as text next to the code that applies it; `method`
returns those texts in order and the report prints them verbatim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import record
from . import stats
from ..measures.figure5 import FIGURE5, RATIOS_RULE, figure5_ratios, share_change, short_blocks
from ..plan import CONVERGENCE_KEYS
from .results import CONFIG, FAMILY_NAMES

ALPHA = 0.05  # one-sided, family-wise over each data set's claims (Holm)
MIN_SEEDS = stats.MIN_SEEDS
DEFAULT_MARGIN_PP = 0.5  # of "the same accuracy", percentage points of accuracy
NOISY_CV = 0.10  # throughput whose coefficient of variation over seeds exceeds this is not judged
DEPTH_RATIO = 1.5  # "equal(ish) depth": the deeper net at most this many times the shallower
MIN_REUSE_LAYERS = 6  # feature reuse is read only on blocks with at least this many layers
KEEP_FRACTION = 0.5  # (a), (b): early sources keep at least this share of their weight at init
MOVED = 0.1  # (a), (b) need training to have moved the shares: mean |log(trained / init)| at least this
NEAR_CHANCE_PP = 10  # accuracy within this many points of chance: a warning
FEW_EPOCHS = 10  # fewer training epochs: a warning on the claims about trained nets

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_COMPARABLE = "supported", "contradicted", "inconclusive", "not comparable"
EXPLORATORY = "exploratory"


@dataclass
class Claim:
    """One claim of the paper judged on one data set's runs.

    verdict: supported, contradicted, inconclusive or not comparable; `reason` says why it is
    not one of the first two. A claim with a test has its raw `p_value`, the Holm-adjusted
    `p_holm` over its data set's family, and `direction` (+1: the estimate lies on the claimed
    side, -1: the other side). A declared plan's claim is one test of the plan's fixed family
    (`in_family`), or an exact comparison outside it; `gates` are checks run after the family is
    decided, each returning why the claim cannot stand (e.g. costs at matched accuracy need the
    equivalence supported) or None."""

    data: str
    claim: str
    verdict: str
    evidence: str
    test: str
    reason: str = ""
    p_value: float | None = None
    p_holm: float | None = None
    direction: int = 0
    in_family: bool = True
    gates: list = field(default_factory=list, repr=False, compare=False)
    budget: tuple | None = field(default=None, repr=False, compare=False)  # (smaller, larger, margin_pp) of a pair

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
RECIPE_PARAMS = ["data.name", "data.num_classes", "data.train_size", "data.val_size", "data.test_size", "speed.compile",
                 "data.image_size", "data.augment", "data.batch_size", "trainer.max_epochs",
                 "trainer.accumulate_grad_batches", "trainer.gradient_clip_val", "loss.label_smoothing"]
RECIPE_PREFIXES = ["optim."]
COMPARABILITY_RULE = (
    "Two configurations are compared only when all their runs share the recipe: "
    f"{', '.join(f'`{p}`' for p in RECIPE_PARAMS)}, every `optim.*` param (optimizer and schedule), the "
    "precision (tag `precision`, else param `trainer.precision`), the device (tag `device`) and the code "
    "version (tag `git_commit`); the model, the DenseNet knobs and the seed may differ, and so may "
    "`data.split_seed`, a seed of the train/validation split (a plan's confirmation runs draw it with the seed). A key one run lacks "
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
    f"\"inconclusive (needs >= {MIN_SEEDS} seeds per side)\". One seed never gives a verdict."
)
DIRECTIONAL_RULE = (
    "A claim that one side is higher (or lower) is tested one-sided in each direction (Welch's t-test over seeds; "
    "a one-sample t-test against a fixed reference), both by statsmodels; the smaller p-value, with its direction, "
    "enters the Holm family. Metrics that span orders of magnitude (relative gradients, memory, time per image or "
    "per FLOP) are tested on the log scale. A metric that does not vary over seeds on either side cannot be "
    "tested: inconclusive, except for exact figures (memory), which are compared directly."
)
EXPLORATORY_RULE = (
    "Without a declared plan judged on fresh seeds, D, R and c are chosen on the very runs that would judge them, "
    "which keeps the winner's curse (validation and test accuracy move together over seeds). So no claim here is "
    "supported or contradicted: one that the tests would decide reads \"exploratory (chosen on these runs; leans "
    "supported/contradicted, p (Holm) = ...)\". Declare a plan and run its confirmation stage for verdicts "
    "(`python -m densenet_exp.study`)."
)


def equivalence_rule(margin_pp: float) -> str:
    return (
        f"Two configurations have the same accuracy when TOST (statsmodels `ttost_ind`, two one-sided Welch tests) of "
        f"their test accuracies rejects a difference of ±{margin_pp:g} percentage points (the margin, declared "
        f"before the data are read: report --margin) at α = {ALPHA}, with at least {MIN_SEEDS} seeds each. Not "
        "showing a difference is never taken for the same accuracy."
    )


def one_sided(claim: Claim, p_claimed: float | None, p_opposite: float | None, test: str) -> Claim:
    """DIRECTIONAL_RULE: `claim` with the smaller of its two one-sided p-values and that side's
    direction (Holm decides later); "no spread over seeds" when neither could be computed."""
    if p_claimed is None or p_opposite is None:
        claim.test, claim.reason = test, claim.reason or "no spread over seeds"
        return claim
    claim.p_value, claim.direction = (p_claimed, 1) if p_claimed <= p_opposite else (p_opposite, -1)
    claim.test = f"{test}: p = {p_claimed:.3g} in the claimed direction, {p_opposite:.3g} in the opposite"
    return claim


def directional(data: str, name: str, a: np.ndarray, b: np.ndarray | float, higher: bool, evidence: str,
                shift: float = 0.0, scale: str = "") -> Claim:
    """DIRECTIONAL_RULE for 'a (+ shift) is higher (or lower) than b', before Holm; `scale` names a
    transform already applied (e.g. "log"). Inconclusive without enough seeds or spread."""
    fixed = not isinstance(b, np.ndarray)
    sides = (a,) if fixed else (a, b)
    claim = Claim(data, name, INCONCLUSIVE, evidence, "no test")
    if not all(len(side) for side in sides):
        claim.reason = "metric missing"
        return claim
    short = stats.seeds_short(*sides)
    if short:
        claim.test, claim.reason = f"no test ({', '.join(str(len(side)) for side in sides)} seeds)", short
        return claim
    up, down = ("larger", "smaller") if higher else ("smaller", "larger")
    if fixed:
        p = lambda alt: stats.one_sample_one_sided(a + shift, b, alt)  # noqa: E731
        test = f"one-sample t-test{f' on {scale}' if scale else ''} against {b:.4g} (n = {len(a)})"
    else:
        p = lambda alt: stats.welch_one_sided(a + shift, b, alt)  # noqa: E731
        test = f"Welch's t-test{f' on {scale}' if scale else ''} (n = {len(a)}, {len(b)})"
    return one_sided(claim, p(up), p(down), test)


def decide(claims: list[Claim], alpha: float = ALPHA) -> list[str]:
    """stats.HOLM_RULE then DIRECTIONAL_RULE over one family of claims (in place): fills p_holm and
    the verdict of every claim with a test; returns the family (claim names) that was corrected."""
    tested = [c for c in claims if c.p_value is not None]
    for claim, adjusted in zip(tested, stats.holm([c.p_value for c in tested])):
        claim.p_holm = adjusted
        if adjusted < alpha and claim.direction:
            claim.verdict, claim.reason = (SUPPORTED if claim.direction > 0 else CONTRADICTED), ""
        else:
            claim.verdict, claim.reason = INCONCLUSIVE, f"not significant after Holm, p = {adjusted:.3g}"
    return [c.claim for c in tested]


def exploratory(claims: list[Claim]) -> None:
    """EXPLORATORY_RULE (in place): a decided verdict becomes exploratory, saying how it leans."""
    for claim in claims:
        if claim.verdict in (SUPPORTED, CONTRADICTED):
            claim.verdict, claim.reason = EXPLORATORY, (f"chosen on these runs; leans {claim.verdict}"
                                                        + (f", p (Holm) = {claim.p_holm:.3g}" if claim.p_holm
                                                           is not None else ""))


# --- convergence -----------------------------------------------------------------------------

def convergence_rule(rule: Mapping[str, float] = CONVERGENCE_KEYS) -> str:
    return (
        f"A run has converged when `{rule['metric']}` gained less than {rule['max_gain_pp']:g} percentage points "
        f"over the last max(1, round({rule['last_fraction']:g} n)) of its n validation checks. A claim about trained "
        "accuracy, cost at matched accuracy or trained feature weights needs every run of its configurations "
        "converged, else it is \"inconclusive (not converged: ...)\" naming the runs and their gains. Claims at "
        "initialization (gradients) and at a fixed budget (degradation) do not need convergence."
    )


def convergence_gain(values: Sequence[float], last_fraction: float) -> tuple[float, int]:
    """(gain in percentage points over the last window of validation checks, window length)."""
    window = max(1, round(last_fraction * len(values)))
    if len(values) <= window:
        return float("nan"), window
    # Rounded far below one image of a validation split: metrics are logged as float32, and a gain
    # of exactly the declared bound must not fall on either side of it by rounding error.
    return round(100 * (values[-1] - values[-1 - window]), 4), window


def not_converged(runs: pd.DataFrame, curves: pd.DataFrame | None,
                  rule: Mapping[str, float] = CONVERGENCE_KEYS) -> list[str]:
    """convergence_rule's offenders among `runs`, as "<variant> seed <s>: gained X pp over ...";
    nothing when no curves were read (the caller then cannot gate on convergence)."""
    if curves is None:
        return []
    reasons = ((run, window_reason(curves.loc[curves["run_id"] == run["run_id"], "value"].to_list(), rule))
               for _, run in runs.iterrows())
    return [f"{run['variant']} seed {run['seed']}: {why}" for run, why in reasons if why]


def window_reason(values: Sequence[float], rule: Mapping[str, float]) -> str:
    """convergence_rule on one run's validation checks: '' when it converged, else why not (the one
    wording the exploratory verdicts and a declared plan's claims both print)."""
    gain, window = convergence_gain(values, rule["last_fraction"])
    if not np.isfinite(gain):
        return f"{len(values)} validation check(s), too few to tell"
    if gain >= rule["max_gain_pp"]:
        return f"gained {gain:.2f} pp over its last {window} of {len(values)} validation checks"
    return ""


def converged_or_reason(claim: Claim, runs: Sequence[pd.DataFrame], curves: pd.DataFrame | None,
                        rule: Mapping[str, float] = CONVERGENCE_KEYS) -> bool:
    """Sets claim.reason and returns False when a run of `runs` has not converged."""
    late = [r for side in runs for r in not_converged(side, curves, rule)]
    if late:
        claim.reason = "not converged: " + "; ".join(late[:3]) + (f"; and {len(late) - 3} more" if len(late) > 3 else "")
    return not late


# --- claim: fewer parameters for the same accuracy -------------------------------------------

PARAMS = "fewer parameters for the same accuracy"


def params_rule(margin_pp: float) -> str:
    return (
        "c = the DenseNet configuration with fewer mean parameters than R that the selection rule ranks first "
        "(validation, never test). Claim: c is at least as accurate as R, i.e. non-inferior within the margin: "
        f"one-sided Welch test of H0 mean(c) - mean(R) <= -{margin_pp:g} points (statsmodels `ttest_ind`, "
        f"`value=-{margin_pp / 100:g}`); its mirror (c worse by more than the margin) is the opposite direction. "
        "Both need converged runs. The evidence also gives the TOST equivalence of c and R, which decides whether "
        "the pair has matched accuracy for the cost claims."
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


def params_claim(data: str, sel: Selection, configs: list[Config], margin_pp: float,
                 curves: pd.DataFrame | None = None) -> tuple[Claim, Pair | None]:
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
    claim = Claim(data, PARAMS, INCONCLUSIVE, evidence, "no test")
    if len(a) and len(b):
        claim.evidence += f"; difference {round(100 * (a.mean() - b.mean()), 2) + 0.0:+.2f} pp"  # no -0.00
    converged = converged_or_reason(claim, (c.runs, r.runs), curves)
    equivalent = stats.tost(a, b, margin) if not stats.seeds_short(a, b) and converged else None
    note = "TOST: no test" if equivalent is None else (
        f"TOST within ±{margin_pp:g} pp: p = {equivalent:.3g}: "
        + ("same accuracy" if equivalent < ALPHA else "same accuracy not shown"))
    pair = Pair(c, r, equivalent is not None and equivalent < ALPHA, note)
    if not converged:
        return claim, pair
    claim = directional(data, PARAMS, a, b, True, claim.evidence, shift=margin)
    claim.test += f"; non-inferiority within {margin_pp:g} pp; {note}"
    return claim, pair


# --- claims: stronger gradient flow ----------------------------------------------------------
PHASE_WORDS = dict(zip(record.GRADIENT_PHASES, ("init", "after epoch 1")))  # gradient phase -> words
EARLY, LATE = 0.25, 0.75  # positions among a run's body convolutions
GRADIENT_RULE = (
    "Layers: the body's 3x3 convolutions only (role `body` in `gradient_flow/relative_grads.csv`: no stem, "
    "transition, 1x1 bottleneck, shortcut or classifier), in every family, so that like is compared with like. "
    f"Early = the first quarter of them (position <= {EARLY:g} in the run's body order), late = the last quarter "
    f"(>= {LATE:g}); metric: the mean relative gradient ||grad|| / ||weight|| of the early ones, at the first "
    "optimizer step and after the first epoch. For each comparison family F (plain net first, ResNet second): F* "
    f"is the deepest F configuration with a DenseNet configuration within {DEPTH_RATIO:g}x its depth (else the "
    "deepest), D* the DenseNet configuration closest to it in depth (ties by the selection order); depths more "
    f"than {DEPTH_RATIO:g}x apart are not comparable. The claim is against vanishing gradients, so it applies only "
    "where F* shows them on the same layer set: the geometric mean over seeds of F*'s early / late below 1; "
    "otherwise inconclusive, saying what F* shows. Then D* higher than F* by the directional rule on log10."
)


def body_gradients(grads: pd.DataFrame, phase: str) -> pd.DataFrame:
    """Per run, GRADIENT_RULE's early and late mean relative gradient of the body 3x3 convolutions
    at `phase` (rows of results.relative_grads with a `role`): index run_id, columns early, late."""
    rows = grads[(grads["phase"] == phase) & (grads["role"] == record.BODY_ROLE)] if "role" in grads else grads.iloc[:0]
    out = {}
    for run_id, g in rows.groupby("run_id", sort=False):
        values = g.sort_values("depth")["relative_grad"].to_numpy(float)
        position = np.arange(len(values)) / max(len(values) - 1, 1)
        out[run_id] = {"early": values[position <= EARLY].mean(), "late": values[position >= LATE].mean()}
    return pd.DataFrame.from_dict(out, orient="index", columns=["early", "late"])


def _closest(configs: list[Config], depth: float) -> Config | None:
    known = [c for c in configs if np.isfinite(c.depth)]
    return min(known, key=lambda c: abs(np.log(c.depth / depth))) if known else None


def gradient_pair(family: str, ranked: list[Config], configs: list[Config]) -> tuple[Config | None, Config | None]:
    """GRADIENT_RULE's (F*, D*) for one comparison family (None where there is none)."""
    others = [c for c in configs if c.family == family and np.isfinite(c.depth)]
    matched = [c for c in others if (d := _closest(ranked, c.depth)) is not None
               and max(d.depth, c.depth) <= DEPTH_RATIO * min(d.depth, c.depth)]
    other = max(matched or others, key=lambda c: c.depth) if others else None
    return other, (_closest(ranked, other.depth) if other is not None else None)


def gradient_claim(data: str, name: str, dense: Config, other: Config, body: pd.DataFrame) -> Claim:
    """GRADIENT_RULE for one pair at one phase, from body_gradients' table."""
    d, o = body.reindex(dense.runs["run_id"]).dropna(), body.reindex(other.runs["run_id"]).dropna()
    claim = Claim(data, name, INCONCLUSIVE, f"{dense.variant} (depth {dense.depth:g}) vs {other.variant} (depth "
                                            f"{other.depth:g})", "no test")
    if max(dense.depth, other.depth) > DEPTH_RATIO * min(dense.depth, other.depth):
        claim.verdict, claim.reason = NOT_COMPARABLE, f"depth {dense.depth:g} vs {other.depth:g}"
        return claim
    differ = recipe_differences(dense, other)
    if differ:
        claim.verdict, claim.reason = NOT_COMPARABLE, "; ".join(differ)
        return claim
    if not len(d) or not len(o):
        claim.reason = "no relative gradients of body 3x3 convolutions"
        return claim
    ratio = float(np.exp(np.log(o["early"] / o["late"]).mean()))  # geometric mean over seeds
    claim.evidence += (f": early body-conv relative gradient {d['early'].mean():.3g} vs {o['early'].mean():.3g}; "
                       f"{other.variant} early/late {ratio:.3g}")
    if ratio >= 1:  # the baseline has no vanishing gradient to alleviate
        what = "exploding" if ratio > 10 else "no decay"
        claim.reason = (f"{other.variant} shows no vanishing gradient on its body 3x3 convolutions: early layers get "
                        f"{ratio:.3g}x the late layers' relative gradient ({what})")
        return claim
    return directional(data, name, np.log10(d["early"].to_numpy()), np.log10(o["early"].to_numpy()), True,
                       claim.evidence, scale="log10")


def gradient_claims(data: str, sel: Selection, configs: list[Config], grads: pd.DataFrame | None) -> list[Claim]:
    ranked = sorted([c for c in configs if c.family == "densenet"],
                    key=lambda c: -c.mean(sel.criterion) if sel.criterion == record.VAL_ACC else c.mean(sel.criterion))
    grads = grads if grads is not None else pd.DataFrame(columns=["run_id", "phase", "role"])
    claims = []
    for family in ("plain", "resnet"):
        other, dense = gradient_pair(family, ranked, configs)
        for phase, when in PHASE_WORDS.items():
            name = f"stronger gradient flow than a {'plain net' if family == 'plain' else 'ResNet'} ({when})"
            if other is None or dense is None:
                missing = FAMILY_NAMES[family] if other is None else "DenseNet of known depth"
                claims.append(Claim(data, name, INCONCLUSIVE, f"no {missing} on {data}", "no test", "nothing to compare"))
            else:
                claims.append(gradient_claim(data, name, dense, other, body_gradients(grads, phase)))
    return claims


# --- claims: feature reuse (the paper's Figure 5) --------------------------------------------

# Observation -> (claim name, metric the probe logs, reference ratio, claimed higher).
def figure5_rule(min_layers: int = MIN_REUSE_LAYERS, keep: float = KEEP_FRACTION) -> str:
    return (
        "From each run's `feature_reuse/matrices.json` and `feature_reuse/matrices_init.json` (the same matrices at "
        "step 0, before any update: the control). " + RATIOS_RULE + " With He initialization every source gets about "
        "the same weight per map, so every ratio starts near 1: an observation is about what training changed. Per "
        "run, the change log(trained / init) of each ratio is judged against the paper's direction: (a) early sources "
        f"and (b) the block's early layers in a transition keep at least {keep:g} of their weight at init; (c) "
        "training lowers the weight on transition outputs; (d) training moves the classifier's weight to late "
        f"features. Only blocks with at least {min_layers} layers count (others are named as skipped), trained runs "
        "must have converged, and an untrained net (no change) is inconclusive. (a) and (b) say the weight stays "
        "spread, which an untrained net shows too: they are judged only where training moved the matrices, the mean "
        f"|log(trained / init)| of every cell's share at least {MOVED:g} in every run."
    )


FIGURE5_RULE = figure5_rule()
REUSE_DIRECTIONS = {  # observation -> (claimed change of log(trained / init), its words)
    "a": ("keep", "early sources keep at least {keep:g} of their weight at init"),
    "b": ("keep", "transitions keep at least {keep:g} of their weight on the block's early layers"),
    "c": ("lower", "training lowers the weight on transition outputs"),
    "d": ("higher", "training moves the classifier's weight to late features"),
}


def reuse_change_claims(data: str, variant: str, runs: pd.DataFrame, matrices: Mapping[str, list[np.ndarray]],
                        init: Mapping[str, list[np.ndarray]], curves: pd.DataFrame | None,
                        min_layers: int = MIN_REUSE_LAYERS, keep: float = KEEP_FRACTION,
                        rule: Mapping[str, float] = CONVERGENCE_KEYS) -> list[Claim]:
    """FIGURE5_RULE for one DenseNet configuration's runs: one claim per observation, in FIGURE5's
    order, each with the paired change from the run's own initialization (before Holm)."""
    ids = [i for i in runs["run_id"] if i in matrices and i in init]
    skipped = short_blocks(matrices[ids[0]], min_layers) if ids else []
    note = f"blocks {', '.join(map(str, skipped))} skipped (< {min_layers} layers)" if skipped else ""
    claims = []
    for key, (direction, words) in REUSE_DIRECTIONS.items():
        claim = Claim(data, FIGURE5[key][0], INCONCLUSIVE, variant, "no test")
        claims.append(claim)
        if not ids:
            what = record.FEATURE_REUSE_MATRICES if not any(i in matrices for i in runs["run_id"]) else \
                record.FEATURE_REUSE_MATRICES_INIT
            claim.evidence, claim.reason = f"{variant}: no {what}", "not measured" if what == \
                record.FEATURE_REUSE_MATRICES else "no init matrix recorded (the control)"
            continue
        pairs = [(figure5_ratios(init[i], min_layers).get(FIGURE5[key][1]),
                  figure5_ratios(matrices[i], min_layers).get(FIGURE5[key][1])) for i in ids]
        pairs = [p for p in pairs if p[0] is not None and p[1] is not None and min(p) > 0]
        if not pairs:
            claim.evidence, claim.reason = f"{variant}: {note or 'no block long enough for it'}", "not measured"
            continue
        before, after = np.array(pairs).T
        change = np.log(after / before)
        claim.evidence = (f"{variant} ({words.format(keep=keep)}): ratio to uniform {before.mean():.3f} at init -> "
                          f"{after.mean():.3f} trained (trained / init {np.exp(change.mean()):.3f}, n={len(change)})"
                          + (f"; {note}" if note else ""))
        if stats.seeds_short(change):
            claim.reason = stats.seeds_short(change)
            continue
        if not converged_or_reason(claim, (runs,), curves, rule):
            continue
        if np.ptp(change) == 0:
            claim.reason = "training did not change the ratio (the same at init)"
            continue
        moved = min(share_change(init[i], matrices[i], min_layers) for i in ids)
        if direction == "keep" and not moved >= MOVED:
            claim.reason = (f"the matrices barely moved from init (mean |log(trained / init)| {moved:.3f} < {MOVED:g} in "
                            "some run): a spread that training did not change says nothing about reuse")
            continue
        reference = float(np.log(keep)) if direction == "keep" else 0.0
        up = stats.one_sample_one_sided(change, reference, "larger")
        down = stats.one_sample_one_sided(change, reference, "smaller")
        one_sided(claim, *((down, up) if direction == "lower" else (up, down)),
                  f"one-sample t-test of log(trained / init) against {reference:.3g} (n = {len(change)})")
    return claims


def reuse_claims(data: str, d: Config | None, matrices: Mapping[str, list[np.ndarray]],
                 init: Mapping[str, list[np.ndarray]], curves: pd.DataFrame | None = None) -> list[Claim]:
    if d is None:
        return [Claim(data, name, INCONCLUSIVE, f"no DenseNet on {data}", "no test", "nothing to judge")
                for name, _ in FIGURE5.values()]
    return reuse_change_claims(data, f"D = {d.variant}", d.runs, matrices, init, curves)


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
    return directional(data, MEMORY, np.log(a), np.log(b), True, evidence, scale="log")


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
        evidence = (f"{c.describe(record.TRAIN_IMAGES_PER_S, '.4g', 1, ' train images/s')} vs "
                    f"{r.describe(record.TRAIN_IMAGES_PER_S, '.4g', 1, ' train images/s')}")
        claims.append(_timing_blocked(data, COMPUTE, evidence, c, r) or directional(
            data, COMPUTE, -np.log(c.values(record.TRAIN_IMAGES_PER_S)), -np.log(r.values(record.TRAIN_IMAGES_PER_S)),
            True, evidence, scale="log"))
    d, r = sel.dense, sel.resnet
    per_flop = {s.variant: 1e9 / (s.values(record.TRAIN_IMAGES_PER_S) * s.mean(record.FLOPS_PER_IMAGE)) for s in (d, r)}
    evidence = "; ".join(f"{v}: {x.mean():.4g} s per GFLOP (n={len(x)})" if len(x) and np.isfinite(x).all()
                         else f"{v}: no throughput or FLOPs" for v, x in per_flop.items())
    a, b = per_flop[d.variant], per_flop[r.variant]
    if not (len(a) and len(b) and np.isfinite(a).all() and np.isfinite(b).all()):
        claims.append(Claim(data, COMPUTE_FLOP, INCONCLUSIVE, evidence, "no test", "metric missing"))
    else:
        claims.append(_timing_blocked(data, COMPUTE_FLOP, evidence, d, r)
                      or directional(data, COMPUTE_FLOP, np.log(a), np.log(b), True, evidence, scale="log"))
    return claims


# --- all claims, and what they show ----------------------------------------------------------

CLAIMS = [PARAMS, *(f"stronger gradient flow than a {f} ({w})" for f in ("plain net", "ResNet")
                    for w in PHASE_WORDS.values()),
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


def evaluate_claims(runs: pd.DataFrame, matrices: Mapping[str, list[np.ndarray]] | None = None,
                    margin_pp: float = DEFAULT_MARGIN_PP, init: Mapping[str, list[np.ndarray]] | None = None,
                    grads: pd.DataFrame | None = None, curves: pd.DataFrame | None = None) -> Judgement:
    """Judge every claim in CLAIMS on each data set of `runs` (finished runs), by the rules of
    `method(margin_pp)`, then label them exploratory (EXPLORATORY_RULE). From results: `matrices`
    and `init` (feature_reuse_matrices, trained and at init), `grads` (relative_grads with layer
    roles), `curves` (learning_curves of val/acc, for the convergence gate)."""
    judged = Judgement(margin_pp=margin_pp)
    for key, group in runs.groupby("data", sort=True):
        data, configs = str(key), configs_of(group)
        sel = select(data, group)
        judged.selections[data] = sel
        claims = reuse_claims(data, sel.dense, matrices or {}, init or {}, curves)
        claims += gradient_claims(data, sel, configs, grads)
        if sel.dense is None or sel.resnet is None:
            missing = "no DenseNet" if sel.dense is None else "no ResNet baseline"
            claims += [Claim(data, n, INCONCLUSIVE, f"{missing} on {data}", "no test", "nothing to compare")
                       for n in (PARAMS, MEMORY, COMPUTE, COMPUTE_FLOP)]
        else:
            claim, pair = params_claim(data, sel, configs, margin_pp, curves)
            claims += [claim, memory_claim(data, pair), *compute_claims(data, sel, pair)]
        judged.families[data] = decide(claims)
        exploratory(claims)
        judged.claims += sorted(claims, key=lambda c: CLAIMS.index(c.claim))
        judged.warnings[data] = warnings(sel, group, curves)
    return judged


CONCLUSION_RULE = (
    "The conclusion counts the claims each data set leans towards (exploratory: none is decided without a plan), "
    f"names the runs that had not converged, and warns when D's or R's mean test accuracy is within {NEAR_CHANCE_PP} "
    f"points of chance (1 / classes) or the runs trained fewer than {FEW_EPOCHS} epochs (the paper's comparisons are "
    "at 300 epochs on CIFAR)."
)


def warnings(sel: Selection, runs: pd.DataFrame, curves: pd.DataFrame | None = None) -> list[str]:
    """CONCLUSION_RULE's warnings for one data set."""
    notes = [EXPLORATORY_RULE.split(": one that")[0] + "."]
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
    late = not_converged(runs, curves)
    if late:
        notes.append(f"{len(late)} of {len(runs)} runs had not converged by the convergence rule (e.g. {late[0]}).")
    return notes


def conclusion(judged: Judgement) -> list[str]:
    """CONCLUSION_RULE: one paragraph per data set, generated from the verdicts."""
    lines = []
    for data in sorted(judged.selections):
        claims = [c for c in judged.claims if c.data == data]
        leaning = lambda v: [c.claim for c in claims if c.reason.startswith(f"chosen on these runs; leans {v}")]  # noqa: E731
        supported, contradicted = leaning(SUPPORTED), leaning(CONTRADICTED)
        open_ = len(claims) - len(supported) - len(contradicted)
        text = f"**{data}** (exploratory, nothing decided): "
        text += f"leans supported: {'; '.join(supported)}. " if supported else "no claim leans supported. "
        text += f"Leans contradicted: {'; '.join(contradicted)}. " if contradicted else "None leans contradicted. "
        if open_:
            text += f"{open_} of {len(claims)} claims inconclusive or not comparable"
            short = sum("seeds" in c.reason for c in claims)
            text += f" ({short} for want of >= {MIN_SEEDS} seeds per side)." if short else "."
        lines.append(text + "".join(f" Warning: {w}" for w in judged.warnings.get(data, [])))
    return lines


def method(margin_pp: float = DEFAULT_MARGIN_PP) -> list[tuple[str, str]]:
    """Every rule the verdicts apply, as (name, text), in the order the report prints them."""
    from .results import ACCURACY_RULE, INTERVAL_RULE, PUBLISHED_RULE

    return [
        ("selection", SELECTION_RULE),
        ("comparability", COMPARABILITY_RULE),
        ("exploratory", EXPLORATORY_RULE),
        ("seeds", SEEDS_RULE),
        ("convergence", convergence_rule()),
        ("same accuracy (equivalence)", equivalence_rule(margin_pp)),
        ("directional rule", DIRECTIONAL_RULE),
        ("multiple comparisons", stats.HOLM_RULE),
        (PARAMS, params_rule(margin_pp)),
        ("stronger gradient flow", GRADIENT_RULE),
        ("feature reuse (Figure 5)", FIGURE5_RULE),
        (MEMORY, MEMORY_RULE),
        ("higher compute cost", COMPUTE_RULE),
        ("conclusion", CONCLUSION_RULE),
        ("intervals", INTERVAL_RULE),
        ("accuracy shown", ACCURACY_RULE),
        ("published figures", PUBLISHED_RULE),
    ]


def claims_table(claims: Sequence[Claim]) -> pd.DataFrame:
    """The claims as a table: data, claim, verdict (with its reason), evidence, test, raw and
    Holm-adjusted p."""
    rows = [{"data": c.data, "claim": c.claim, "verdict": c.label, "evidence": c.evidence, "test": c.test,
             "p": c.p_value, "p (Holm)": c.p_holm} for c in claims]
    return pd.DataFrame(rows, columns=["data", "claim", "verdict", "evidence", "test", "p", "p (Holm)"])


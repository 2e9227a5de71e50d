"""A declared plan's claims (densenet_exp/plan.py) judged on its confirmation runs alone.

    judged = judge_plan(plan, runs, curves, matrices, init_matrices, grads)
    judged.claims, judged.arms, judged.notes

Only runs tagged with the plan's name and the confirmation stage count, on the plan's declared
seeds, which no selection looked at (the pilot chose on other seeds). Every rule is stated once
as text beside the code that applies it; `rules(plan)` returns them for the report's Method
section. Nothing here imports torch or Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import record
from . import stats
from ..plan import DeclaredClaim, Plan
from .verdicts import (
    CONTRADICTED,
    FIGURE5_RULE,
    GRADIENT_RULE,
    INCONCLUSIVE,
    NOT_COMPARABLE,
    SUPPORTED,
    Claim,
    Config,
    body_gradients,
    convergence_gain,
    convergence_rule,
    decide,
    one_sided,
    recipe_differences,
    reuse_change_claims,
)

# --- which runs count ------------------------------------------------------------------------

STAGE_RULE = (
    "Claims are judged only on runs tagged with the plan's name and stage `confirmation`, on the plan's declared "
    "seeds; exploration runs (the pilot, on other seeds) never enter a verdict. Each run carries the SHA-256 of the "
    "plan file as it was when the run started (tag `study_plan_hash`): a hash other than the plan's now means the "
    "plan changed after that run started, and the report says so."
)


@dataclass
class Arm:
    """The confirmation runs of one arm: those kept, and why the others are out."""

    name: str
    runs: pd.DataFrame
    missing_seeds: list[int] = field(default_factory=list)
    near_chance: list[str] = field(default_factory=list)
    not_converged: list[str] = field(default_factory=list)
    gains: dict[str, float] = field(default_factory=dict)  # run_id -> gain over the last window (pp)

    def values(self, metric: str, runs: pd.DataFrame | None = None) -> np.ndarray:
        runs = self.runs if runs is None else runs
        if metric not in runs:
            return np.array([])
        v = pd.to_numeric(runs[metric], errors="coerce").to_numpy(float)
        return v[np.isfinite(v)]

    @property
    def trained(self) -> pd.DataFrame:
        """Runs that did not end near chance (the claims on trained nets use these)."""
        near = {s.split(":")[0] for s in self.near_chance}
        return self.runs[~self.runs["seed"].astype(str).map(lambda s: f"seed {s}" in near)]

    def describe(self, metric: str, scale: float = 1.0, fmt: str = ".2f", unit: str = "") -> str:
        v = self.values(metric) * scale
        if not len(v):
            return f"{self.name}: no {metric}"
        sd = f" ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else ""
        return f"{self.name}: {v.mean():{fmt}}{sd}{unit} (n={len(v)})"

    def config(self) -> Config:
        return Config(self.name, str(self.runs["family"].iloc[0]) if len(self.runs) else "", self.runs)


def confirmation_runs(plan: Plan, runs: pd.DataFrame) -> pd.DataFrame:
    """STAGE_RULE: the plan's confirmation runs that finished, on its declared seeds."""
    tag = lambda name: runs.get(f"tags.{name}", pd.Series(pd.NA, runs.index))  # noqa: E731
    keep = (tag(record.STUDY_PLAN).eq(plan.name) & tag(record.STUDY_STAGE).eq("confirmation")
            & runs["status"].eq("FINISHED"))
    return runs[keep.fillna(False).astype(bool)]


def planned_seeds(plan: Plan, runs: pd.DataFrame) -> dict[str, int]:
    """variant -> how many seeds the plan declares for the confirmation arm its runs belong to."""
    arms = runs.get(f"tags.{record.STUDY_ARM}", pd.Series(pd.NA, runs.index))
    return {variant: len(plan.seeds_of("confirmation", arm)) for variant, arm in zip(runs["variant"], arms)
            if arm in plan.arms["confirmation"]}


def arms_of(plan: Plan, runs: pd.DataFrame, curves: pd.DataFrame) -> dict[str, Arm]:
    """Each confirmation arm's runs, with convergence (from `curves`, results.learning_curves of the
    plan's metric) and near-chance runs named."""
    conv = plan.convergence
    arms = {}
    arm_tag = runs.get(f"tags.{record.STUDY_ARM}", pd.Series(pd.NA, runs.index))
    for name in plan.arms["confirmation"]:
        declared = plan.seeds_of("confirmation", name)
        mine = runs[arm_tag.eq(name).fillna(False).astype(bool) & runs["seed"].isin(declared)]
        arm = Arm(name, mine, missing_seeds=sorted(set(declared) - set(mine["seed"].dropna().astype(int))))
        for _, run in mine.iterrows():
            values = curves.loc[curves["run_id"] == run["run_id"], "value"].to_list()
            gain, window = convergence_gain(values, conv["last_fraction"])
            arm.gains[run["run_id"]] = gain
            if not np.isfinite(gain) or gain >= conv["max_gain_pp"]:
                what = "too few validation checks" if not np.isfinite(gain) else (
                    f"gained {gain:.2f} pp over its last {window} of {len(values)} validation checks")
                arm.not_converged.append(f"seed {run['seed']}: {what}")
            chance = 1 / float(run["num_classes"]) if pd.notna(run.get("num_classes")) else np.nan
            acc = pd.to_numeric(pd.Series([run.get(record.TEST_ACC)]), errors="coerce").iloc[0]
            if np.isfinite(chance) and pd.notna(acc) and acc <= chance + conv["near_chance_pp"] / 100:
                arm.near_chance.append(f"seed {run['seed']}: test accuracy {acc:.3f}, chance {chance:.3f}")
        arms[name] = arm
    return arms


# --- the claims ------------------------------------------------------------------------------


def _gate(claim: Claim, arms: Sequence[Arm], converged: bool = True) -> Claim | None:
    """The claim marked inconclusive (with its reason) when an arm lacks seeds or did not converge."""
    for arm in arms:
        if len(arm.trained) < stats.MIN_SEEDS:
            claim.reason = (f"{arm.name} has {len(arm.trained)} usable runs: {stats.seeds_short(np.zeros(0))}"
                            + (f" (seeds {', '.join(map(str, arm.missing_seeds))} not finished)" if arm.missing_seeds
                               else ""))
            return claim
    if converged:
        late = [f"{a.name} {s}" for a in arms for s in a.not_converged]
        if late:
            claim.reason = "not converged: " + "; ".join(late)
            return claim
    return None


def undeclared_differences(plan: Plan, *arms: Arm) -> list[str]:
    """The recipe keys on which the arms' runs disagree (verdicts.COMPARABILITY_RULE), less those the
    plan sets per arm (e.g. the learning rate chosen per family in the pilot): those are declared."""
    declared = {o.split("=", 1)[0].lstrip("+") for a in arms for o in plan.arms["confirmation"][a.name]}
    return [d for d in recipe_differences(*(a.config() for a in arms)) if d.split(":", 1)[0] not in declared]


def fewer_params_claim(plan: Plan, c: DeclaredClaim, arms: Mapping[str, Arm]) -> Claim:
    small, large = arms[c["smaller"]], arms[c["larger"]]
    margin = c["margin_pp"] / 100
    a, b = small.values(record.TEST_ACC, small.trained), large.values(record.TEST_ACC, large.trained)
    p_small, p_large = small.values(record.PARAMS), large.values(record.PARAMS)
    factor = p_large.mean() / p_small.mean() if len(p_small) and len(p_large) else float("nan")
    evidence = (f"{small.describe(record.TEST_ACC, 100, unit=' %')} with {p_small.mean():,.0f} parameters; "
                f"{large.describe(record.TEST_ACC, 100, unit=' %')} with {p_large.mean():,.0f}; {factor:.2f}x fewer")
    claim = Claim(plan.name, c.name, INCONCLUSIVE, evidence, "no test")
    if len(a) and len(b):
        claim.evidence += f"; difference {100 * (a.mean() - b.mean()):+.2f} pp (margin {c['margin_pp']:g})"
    if _gate(claim, (small, large), converged=False):
        return claim
    if not factor >= c["min_param_factor"]:
        claim.verdict, claim.reason = NOT_COMPARABLE, f"{factor:.2f}x fewer parameters, below the declared " \
                                                      f"{c['min_param_factor']:g}x"
        return claim
    differ = undeclared_differences(plan, small, large)
    if differ:
        claim.verdict, claim.reason = NOT_COMPARABLE, "; ".join(differ)
        return claim
    if _gate(claim, (small, large)):
        return claim
    return one_sided(claim, stats.welch_one_sided(a, b, "larger", -margin),
                   stats.welch_one_sided(a, b, "smaller", -margin),
                   f"one-sided Welch non-inferiority within {c['margin_pp']:g} pp (n = {len(a)}, {len(b)})")


def power_evidence(plan: Plan, c: DeclaredClaim, arms: Mapping[str, Arm], tests: int) -> str:
    """stats.POWER_RULE's line for a fewer_params claim: the power its seeds had, at the alpha Holm's
    first step leaves each of the family's `tests` tests, and the seeds 80% power needed there."""
    small, large = arms[c["smaller"]], arms[c["larger"]]
    a, b = small.values(record.TEST_ACC, small.trained), large.values(record.TEST_ACC, large.trained)
    sd, margin, alpha = stats.pooled_sd(a, b), c["margin_pp"] / 100, stats.holm_first_alpha(plan.alpha, tests)
    power = stats.power(sd, margin, len(a), len(b), alpha)
    if not np.isfinite(power):
        return ""
    return (f"; power {power:.2f} at the seed SD seen ({100 * sd:.2f} pp, n = {len(a)}, {len(b)}) and alpha "
            f"{alpha:.3g} (Holm's first step over {tests} test{'s' if tests != 1 else ''}), 80% power needs "
            f"{stats.seeds_for_power(sd, margin, alpha)} seeds per side")


def matched_cost_claims(plan: Plan, c: DeclaredClaim, arms: Mapping[str, Arm]) -> list[Claim]:
    """Same accuracy (TOST), then, only where it holds, FLOPs and train-step memory per image as
    exact figures (they do not vary over seeds)."""
    small, large = arms[c["smaller"]], arms[c["larger"]]
    margin = c["margin_pp"] / 100
    a, b = small.values(record.TEST_ACC, small.trained), large.values(record.TEST_ACC, large.trained)
    same = Claim(plan.name, f"{small.name} and {large.name} reach the same test accuracy (within ±{c['margin_pp']:g} pp)",
                 INCONCLUSIVE, f"{small.describe(record.TEST_ACC, 100, unit=' %')}; "
                               f"{large.describe(record.TEST_ACC, 100, unit=' %')}", "no test")
    differ = undeclared_differences(plan, small, large)
    if differ:
        same.verdict, same.reason = NOT_COMPARABLE, "; ".join(differ)
    elif not _gate(same, (small, large)):
        p = stats.tost(a, b, margin)
        if p is None:
            same.reason = "no spread over seeds"
        else:
            same.p_value, same.direction = p, 1
            same.test = f"TOST, two one-sided Welch tests (n = {len(a)}, {len(b)}): p = {p:.3g}"
    costs = []
    for metric, words, fewer in ((record.FLOPS_PER_IMAGE, "fewer FLOPs per image", True),
                                 (record.TRAIN_STEP_MB, "more train-step memory per image", False)):
        per_image = [s.values(metric) / (s.values("batch_size") if metric == record.TRAIN_STEP_MB else 1)
                     for s in (small, large)]
        x, y = per_image
        claim = Claim(plan.name, f"{small.name} needs {words} than {large.name} at matched accuracy", INCONCLUSIVE,
                      "; ".join(f"{s.name}: {v.mean():.4g}" + (" MiB" if metric == record.TRAIN_STEP_MB else "")
                                for s, v in zip((small, large), per_image) if len(v)), "no test")
        if len(x) and len(y) and np.ptp(x) == 0 and np.ptp(y) == 0:
            ratio = x[0] / y[0]
            claim.evidence += f"; ratio {ratio:.3g}"
            holds = ratio < 1 if fewer else ratio > 1
            claim.test = "exact figures (the same for every seed), compared directly once the accuracy matches"
            claim.verdict = SUPPORTED if holds else CONTRADICTED  # provisional: needs `same` supported
        costs.append(claim)
    return [same, *costs]


def degradation_claim(plan: Plan, c: DeclaredClaim, arms: Mapping[str, Arm]) -> Claim:
    shallow, deep = arms[c["shallow"]], arms[c["deep"]]
    x, y = deep.values(record.TRAIN_LOSS), shallow.values(record.TRAIN_LOSS)
    evidence = f"final training loss {deep.describe(record.TRAIN_LOSS, fmt='.4f')} vs " \
               f"{shallow.describe(record.TRAIN_LOSS, fmt='.4f')}"
    if len(x) and len(y) and (x > 0).all() and (y > 0).all():
        evidence += f"; ratio {np.exp(np.log(x).mean() - np.log(y).mean()):.3g} (geometric means)"
    claim = Claim(plan.name, c.name, INCONCLUSIVE, evidence, "no test")
    if _gate(claim, (shallow, deep), converged=False):
        return claim
    if not ((x > 0).all() and (y > 0).all()):
        claim.reason = "a training loss <= 0 has no log"
        return claim
    lx, ly = np.log(x), np.log(y)
    if c["control"]:
        return one_sided(claim, stats.welch_one_sided(lx, ly, "larger"), stats.welch_one_sided(lx, ly, "smaller"),
                       f"one-sided Welch on log loss, deeper higher (n = {len(x)}, {len(y)})")
    bound = np.log(1 + c["margin"])
    return one_sided(claim, stats.welch_one_sided(lx, ly, "smaller", bound), stats.welch_one_sided(lx, ly, "larger", bound),
                   f"one-sided Welch on log loss, deeper below {1 + c['margin']:g}x the shallower (n = {len(x)}, "
                   f"{len(y)})")


def feature_reuse_claims(plan: Plan, c: DeclaredClaim, arms: Mapping[str, Arm],
                         matrices: Mapping[str, list[np.ndarray]], init: Mapping[str, list[np.ndarray]],
                         curves: pd.DataFrame) -> list[Claim]:
    arm = arms[c["arm"]]
    if len(arm.trained) < stats.MIN_SEEDS:
        claim = Claim(plan.name, f"feature reuse of {arm.name}", INCONCLUSIVE, "", "no test")
        return [_gate(claim, (arm,)) or claim]
    claims = reuse_change_claims(plan.name, arm.name, arm.trained, matrices, init, curves, c["min_layers"],
                                 c["keep_fraction"], plan.convergence)
    for claim in claims:
        claim.claim = f"{claim.claim} [{arm.name}]"
    return claims


def gradient_claim(plan: Plan, c: DeclaredClaim, arms: Mapping[str, Arm], grads: pd.DataFrame) -> Claim:
    dense, base = arms[c["dense"]], arms[c["baseline"]]
    per_run = body_gradients(grads, c["phase"])
    side = lambda arm: per_run.reindex(arm.runs["run_id"]).dropna()  # noqa: E731
    d, b = side(dense), side(base)
    claim = Claim(plan.name, c.name, INCONCLUSIVE, "", "no test")
    if not len(d) or not len(b):
        claim.evidence, claim.reason = "no relative_grads.csv with layer roles", "not measured"
        return claim
    ratio = float(np.exp(np.log(b["early"] / b["late"]).mean()))
    claim.evidence = (f"early body-conv relative gradient {d['early'].mean():.3g} ({dense.name}) vs "
                      f"{b['early'].mean():.3g} ({base.name}); {base.name} early/late {ratio:.3g} (geometric mean)")
    if _gate(claim, (dense, base), converged=False):
        return claim
    if ratio >= 1:
        claim.reason = f"{base.name} shows no vanishing gradient on its body 3x3 convolutions (early/late {ratio:.3g})"
        return claim
    x, y = np.log10(d["early"].to_numpy()), np.log10(b["early"].to_numpy())
    return one_sided(claim, stats.welch_one_sided(x, y, "larger"), stats.welch_one_sided(x, y, "smaller"),
                   f"one-sided Welch on log10 (n = {len(x)}, {len(y)})")


# --- all claims ------------------------------------------------------------------------------

@dataclass
class Confirmation:
    plan: Plan
    claims: list[Claim]
    arms: dict[str, Arm]
    family: list[str]
    notes: list[str]


def judge_plan(plan: Plan, runs: pd.DataFrame, curves: pd.DataFrame, matrices: Mapping[str, list[np.ndarray]],
               init: Mapping[str, list[np.ndarray]], grads: pd.DataFrame) -> Confirmation:
    """Every declared claim of `plan` on its confirmation runs among `runs` (results.load_runs of
    the plan's experiment); curves of the convergence metric, matrices trained and at init, and
    relative gradients with layer roles from results."""
    mine = confirmation_runs(plan, runs)
    curves = curves[curves["run_id"].isin(mine["run_id"])]
    arms = arms_of(plan, mine, curves)
    claims: list[Claim] = []
    gated: list[tuple[Claim, list[Claim]]] = []  # a claim, and the claims that need it supported
    controls: list[Claim] = []
    declared_of: list[tuple[DeclaredClaim, Claim]] = []  # fewer_params claims: their power follows the family
    for c in plan.claims:
        if c.kind == "fewer_params":
            claims.append(fewer_params_claim(plan, c, arms))
            declared_of.append((c, claims[-1]))
        elif c.kind == "matched_cost":
            same, *costs = matched_cost_claims(plan, c, arms)
            claims += [same, *costs]
            gated.append((same, costs))
        elif c.kind == "degradation":
            claims.append(degradation_claim(plan, c, arms))
            (controls if c["control"] else []).append(claims[-1])
        elif c.kind == "feature_reuse":
            claims += feature_reuse_claims(plan, c, arms, matrices, init, curves)
        elif c.kind == "gradient_flow":
            claims.append(gradient_claim(plan, c, arms, grads))
    provisional = {id(c): c.verdict for _, costs in gated for c in costs}
    for _, costs in gated:
        for c in costs:
            c.verdict = INCONCLUSIVE
    family = decide(claims, plan.alpha)
    for c, claim in declared_of:
        claim.evidence += power_evidence(plan, c, arms, max(1, len(family)))
    for same, costs in gated:
        for c in costs:
            if same.verdict == SUPPORTED and provisional[id(c)] != INCONCLUSIVE:
                c.verdict, c.reason = provisional[id(c)], ""
            elif not c.reason:
                c.reason = f"accuracy not matched ({same.reason or same.verdict})"
    # "Trains as well when deeper" is judged only where the control family degraded.
    failed = [c for c in controls if c.verdict != SUPPORTED]
    reason = (f"the control failed: {failed[0].claim} is {failed[0].label}" if failed
              else "" if controls else "no control family declared")
    needing = {d.name for d in plan.claims if d.kind == "degradation" and not d["control"]}
    for c in claims:
        if c.claim in needing and reason:
            c.verdict, c.reason = INCONCLUSIVE, reason
    return Confirmation(plan, claims, arms, family, notes(plan, runs, mine, arms))


def notes(plan: Plan, runs: pd.DataFrame, mine: pd.DataFrame, arms: Mapping[str, Arm]) -> list[str]:
    """What a reader must know before the verdicts: plan changes, missing seeds, runs left out,
    which sources of variation the seeds varied."""
    lines = []
    hashes = mine.get(f"tags.{record.STUDY_PLAN_HASH}", pd.Series(dtype=str))
    other = mine[hashes.ne(plan.hash).fillna(True).astype(bool)]
    if len(mine):
        first = pd.to_datetime(mine["start_time"]).min()
        lines.append(f"{len(mine)} confirmation runs; the first started {first:%Y-%m-%d %H:%M} UTC.")
    if len(other):
        lines.append(f"The plan file changed after confirmation runs started: {len(other)} of {len(mine)} ran under "
                     f"another version (sha256 {', '.join(sorted({str(h)[:12] for h in hashes[other.index]}))}; now "
                     f"{plan.hash[:12]}).")
    elif len(mine):
        lines.append(f"Every confirmation run started under this plan file (sha256 {plan.hash[:12]}).")
    for arm in arms.values():
        if arm.missing_seeds:
            lines.append(f"{arm.name}: seeds {', '.join(map(str, arm.missing_seeds))} have no finished run.")
        for what in arm.near_chance:
            lines.append(f"{arm.name} {what}: left out of the claims on trained nets (near chance).")
    varied = ["weight initialization and batch order (`seed`)"]
    if "params.data.split_seed" in mine and mine["params.data.split_seed"].nunique() > 1:
        varied.append("the train/validation split (`data.split_seed` follows the seed)")
    lines.append("The seeds varied " + " and ".join(varied) + "; the test set is fixed.")
    return lines


def rules(plan: Plan) -> list[tuple[str, str]]:
    """Every rule judge_plan applies, as (name, text), in the order the report prints them."""
    return [
        ("stage and plan", STAGE_RULE),
        ("convergence", convergence_rule(plan.convergence) + " A run whose test accuracy ends within "
                        f"{plan.convergence['near_chance_pp']:g} points of chance (1 / classes) is left out of the "
                        "claims on trained nets and named."),
        ("one-sided tests", stats.ONE_SIDED_RULE + f" Here alpha = {plan.alpha:g}."),
        ("non-inferiority and equivalence", stats.NON_INFERIORITY_RULE),
        ("multiple comparisons", stats.HOLM_RULE),
        ("power", stats.POWER_RULE),
        ("fewer parameters", "The smaller arm must have at least the declared factor fewer parameters than the larger "
                             "(else not comparable), the same recipe (the comparability rule, except the keys the "
                             "plan sets per arm, such as the learning rate chosen per family in the pilot), "
                             "converged runs, and be non-inferior in test accuracy within the declared margin."),
        ("cost at matched accuracy", "Only when TOST shows the pair's test accuracies equivalent within the margin "
                                     "(after Holm): FLOPs per image and train-step memory per image (`memory/"
                                     "train_step_mb` over `data.batch_size`) compared as exact figures. Throughput "
                                     "is measured by the bench on an idle machine as same-run ratios, not here."),
        ("degradation", "He et al. 2016, Fig. 1: the final training loss of the deeper arm of a family against the "
                        "shallower, same recipe and budget, on the log scale. The control family (plain nets) must "
                        "degrade (deeper higher, supported) for the other families' \"trains as well when deeper\" "
                        "(deeper below (1 + margin) x the shallower) to be judged; else those are inconclusive."),
        ("feature reuse", FIGURE5_RULE.replace("Only blocks with at least 6 layers", "Only blocks with at least "
                                                                              "the plan's min_layers layers")),
        ("gradient flow", GRADIENT_RULE.split("For each comparison family")[0] + "The plan names the DenseNet and "
                          "the baseline; the baseline must show vanishing gradients on that layer set (geometric "
                          "mean of early / late below 1) for the claim to be tested."),
    ]

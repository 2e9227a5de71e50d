"""What the claim kinds judge: a plan's confirmation runs, grouped by arm, with the gates every
kind shares (enough seeds, converged, comparable recipes) and the accuracy comparison of two arms,
within seed where the plan is paired. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import record
from ..analysis import stats
from ..analysis.verdicts import CONTRADICTED, INCONCLUSIVE, SUPPORTED, Claim, Config, recipe_differences, window_reason
from ..plan import Plan

STAGE_RULE = (
    "Claims are judged only on runs tagged with the plan's name and stage `confirmation`, on the plan's declared "
    "seeds; exploration runs (the pilot, on other seeds) never enter a verdict. Each run carries the SHA-256 of the "
    "plan file as it was when the run started (tag `study_plan_hash`): a hash other than the plan's now means the "
    "plan changed after that run started, and the report says so."
)


SETTLED_RULE = (
    "Settled (a plan that declares `settled`): a run's final learning-rate phase is its validation checks after "
    "the recipe's last learning-rate drop, less the first (it still holds the drop's own jump; the last third of its "
    "checks where the schedule has no drops); every run needs at least `min_checks` of them, and the arm's rise over "
    "the phase, the mean over its runs of the least-squares slope of the metric on the checks' positions in epochs "
    "times the phase's length, must be under `tolerance_pp` (declared from the pilot's seed SD, e.g. half of it; "
    "the mean over seeds keeps one noisy run from deciding). A claim about trained nets needs its arms settled, "
    "else it is \"inconclusive (not converged: ...)\" naming the arm, its rise and its runs'."
)


def phase_rise(curve: pd.DataFrame) -> tuple[float, int]:
    """SETTLED_RULE's (rise in percentage points over the final phase, checks in it) of one run's
    curve (results.learning_curves rows: epoch positions, values, lr_drops)."""
    curve = curve.sort_values("epoch")
    drops = curve["lr_drops"].iloc[0] if "lr_drops" in curve and len(curve) else ()
    phase = curve[curve["epoch"] > max(drops)] if drops else curve.iloc[-max(1, len(curve) // 3):]
    phase = phase.iloc[1:]  # the first check after a drop still holds the drop's own jump
    if len(phase) < 2:
        return float("nan"), len(phase)
    x, y = phase["epoch"].to_numpy(float), 100 * phase["value"].to_numpy(float)
    slope = np.polyfit(x, y, 1)[0]
    return round(float(slope * (x[-1] - x[0])), 4), len(phase)


@dataclass
class Arm:
    """The confirmation runs of one arm: those kept, and why the others are out."""

    name: str
    runs: pd.DataFrame
    missing_seeds: list[int] = field(default_factory=list)
    near_chance: list[str] = field(default_factory=list)
    not_converged: list[str] = field(default_factory=list)

    def values(self, metric: str, runs: pd.DataFrame | None = None) -> np.ndarray:
        runs = self.runs if runs is None else runs
        if metric not in runs:
            return np.array([])
        v = pd.to_numeric(runs[metric], errors="coerce").to_numpy(float)
        return v[np.isfinite(v)]

    def by_seed(self, metric: str) -> pd.Series:
        """`metric` of the trained runs, indexed by seed (for within-seed comparisons)."""
        runs = self.trained.drop_duplicates("seed")  # one run a seed (the report's once rule keeps the first)
        return pd.Series(pd.to_numeric(runs[metric], errors="coerce").to_numpy(float),
                         index=runs["seed"].astype(int).to_numpy()).dropna() if metric in runs else pd.Series(dtype=float)

    @property
    def trained(self) -> pd.DataFrame:
        """Runs that did not end near chance (the claims on trained nets use these)."""
        near = {s.split(":")[0] for s in self.near_chance}
        return self.runs[~self.runs["seed"].astype(str).map(lambda s: f"seed {s}" in near)]

    def cost(self, metric: str) -> float:
        """An exact per-net figure (parameters, FLOPs): the same for every seed; NaN if missing."""
        v = self.values(metric)
        return float(v[0]) if len(v) else float("nan")

    def describe(self, metric: str, scale: float = 1.0, fmt: str = ".2f", unit: str = "") -> str:
        v = self.values(metric) * scale
        if not len(v):
            return f"{self.name}: no {metric}"
        sd = f" ± {v.std(ddof=1):{fmt}}" if len(v) > 1 else ""
        return f"{self.name}: {v.mean():{fmt}}{sd}{unit} (n={len(v)})"

    def config(self) -> Config:
        return Config(self.name, str(self.runs["family"].iloc[0]) if len(self.runs) else "", self.runs)


def confirmation_runs(plan: Plan, runs: pd.DataFrame, stage: str = "confirmation") -> pd.DataFrame:
    """STAGE_RULE: the plan's confirmation runs that finished (or those of another `stage`)."""
    tag = lambda name: runs.get(f"tags.{name}", pd.Series(pd.NA, runs.index))  # noqa: E731
    keep = (tag(record.STUDY_PLAN).eq(plan.name) & tag(record.STUDY_STAGE).eq(stage)
            & runs["status"].eq("FINISHED"))
    return runs[keep.fillna(False).astype(bool)]


BUDGET_RULE = (
    "A plan may declare a `budget` stage: confirmation arms again, with the overrides of a larger training budget "
    "(e.g. twice the epochs), on fresh seeds. For each pair claim on two of those arms, the difference of mean test "
    "accuracy at that budget is compared with the confirmation's: a move of less than half the claim's margin leaves "
    "the verdict as stated; a larger move, or fewer than the minimum seeds finished on either arm, makes a decided "
    "verdict read \"holds at this budget only\". Descriptive: no test, outside the family.")


def budget_check(plan: Plan, runs: pd.DataFrame, arms: dict[str, Arm], claims: list[Claim]) -> None:
    """BUDGET_RULE on the decided `claims` (in place): `runs` holds the plan's runs of every stage,
    `arms` the confirmation arms."""
    budget = plan.arms["budget"]
    if not budget:
        return
    done = confirmation_runs(plan, runs, "budget")
    for claim in claims:
        if claim.budget is None or not all(arm in budget for arm in claim.budget[:2]):
            continue
        small, large, margin = claim.budget
        longer = [Arm(arm, done[done[f"tags.{record.STUDY_ARM}"].eq(arm) & done["seed"].isin(plan.seeds_of("budget", arm))]
                      .sort_values("start_time", kind="stable").drop_duplicates("seed"))  # one run a seed
                  for arm in (small, large)]
        a, b = (arm.values(record.TEST_ACC) for arm in longer)
        extra = " ".join(budget[small][len(plan.arms["confirmation"][small]):])
        if min(len(a), len(b)) < stats.MIN_SEEDS:
            why = f"the budget stage ({extra}) has {len(a)} and {len(b)} finished seeds, fewer than {stats.MIN_SEEDS}"
        else:
            before = 100 * (arms[small].values(record.TEST_ACC, arms[small].trained).mean()
                            - arms[large].values(record.TEST_ACC, arms[large].trained).mean())
            after = 100 * (a.mean() - b.mean())
            claim.evidence += (f"; budget check ({extra}; {len(a)}, {len(b)} seeds): difference {after:+.2f} pp, "
                               f"moved {after - before:+.2f} pp")
            if abs(after - before) < margin / 2:
                continue
            why = f"at {extra} the difference moved {after - before:+.2f} pp, half the margin is {margin / 2:g}"
        if claim.verdict in (SUPPORTED, CONTRADICTED):
            claim.reason = f"holds at this budget only: {why}"


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
        rises = {}
        for _, run in mine.iterrows():
            curve = curves[curves["run_id"] == run["run_id"]]
            if plan.settled:
                rises[run["seed"]], checks = phase_rise(curve)
                what = (f"{checks} validation checks in its final phase, fewer than {plan.settled['min_checks']:g}"
                        if checks < plan.settled["min_checks"] else "")
            else:
                what = converged_or_reason(conv, curve)
            if what:
                arm.not_converged.append(f"seed {run['seed']}: {what}")
            # Near chance by the last validation check, never by the test accuracy the claims
            # compare: leaving runs out on the outcome itself would bias the comparison.
            chance = 1 / float(run["num_classes"]) if pd.notna(run.get("num_classes")) else np.nan
            last = curve.sort_values("epoch")["value"].iloc[-1] if len(curve) else np.nan
            if np.isfinite(chance) and np.isfinite(last) and last <= chance + conv["near_chance_pp"] / 100:
                arm.near_chance.append(f"seed {run['seed']}: last validation accuracy {last:.3f}, chance {chance:.3f}")
        if plan.settled and rises and not arm.not_converged:
            rise = float(np.mean(list(rises.values())))
            if not rise < plan.settled["tolerance_pp"]:
                arm.not_converged.append(f"rose {rise:.2f} pp over its final phase (mean of its runs: "
                                         + ", ".join(f"seed {s} {r:+.2f}" for s, r in rises.items())
                                         + f"), tolerance {plan.settled['tolerance_pp']:g}")
        arms[name] = arm
    return arms


def converged_or_reason(conv, curve: pd.DataFrame) -> str:
    """verdicts.convergence_rule (a plan without `settled`): '' or why the run has not converged."""
    return window_reason(curve["value"].to_list(), conv)


def gate(claim: Claim, arms: list[Arm], converged: bool = True) -> Claim | None:
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


@dataclass
class Accuracy:
    """Test accuracy of arm a against arm b: independent sides, or per-seed differences (paired)."""

    a: np.ndarray
    b: np.ndarray
    diff: np.ndarray | None  # per-seed a - b on the seeds both finished (paired plans), else None

    @property
    def n(self) -> str:
        return f"{len(self.diff)} seed pairs" if self.diff is not None else f"n = {len(self.a)}, {len(self.b)}"

    @property
    def too_few(self) -> str:
        """Why a paired test cannot run: fewer seeds that both arms finished than stats.MIN_SEEDS."""
        if self.diff is not None and len(self.diff) < stats.MIN_SEEDS:
            return f"{len(self.diff)} seeds finished by both arms, fewer than {stats.MIN_SEEDS} pairs"
        return ""

    def one_sided(self, alternative: str, value: float = 0.0) -> float | None:
        if self.diff is not None:
            return stats.paired_one_sided(self.diff, alternative, value)
        return stats.welch_one_sided(self.a, self.b, alternative, value)

    def tost(self, margin: float) -> float | None:
        return stats.paired_tost(self.diff, margin) if self.diff is not None else stats.tost(self.a, self.b, margin)

    @property
    def words(self) -> str:
        return "paired t-test on per-seed differences" if self.diff is not None else "Welch"


def accuracy(plan: Plan, a: Arm, b: Arm) -> Accuracy:
    """stats.PAIRED_RULE where the plan is paired, else two independent sides."""
    x, y = a.by_seed(record.TEST_ACC), b.by_seed(record.TEST_ACC)
    diff = None
    if plan.paired:
        both = x.index.intersection(y.index)
        diff = (x[both] - y[both]).to_numpy(float)
    return Accuracy(x.to_numpy(float), y.to_numpy(float), diff)


VARIANCE_RULE = (
    "Where every run of a pair logged its test predictions (`predictions/test.csv`), the arm difference's "
    "uncertainty is split as Bouthillier et al. (MLSys 2021) advise: the seed part, the standard error over seeds "
    "(initialization, batch order and split), and the test-set part, the standard error of the mean per-image "
    "difference of correctness (each image's correctness averaged over an arm's seeds, paired over the same test "
    "images; within seed where the plan is paired); the interval printed, difference ± t x the root of their summed "
    "squares (t on the seeds' degrees of freedom), holds both, approximately: averaging correctness over seeds counts "
    "part of the seed noise twice. It is descriptive: the declared tests stay the ones over seeds."
)


def variance_split(ctx, a: Arm, b: Arm, acc: Accuracy) -> str:
    """VARIANCE_RULE's evidence for a - b (`acc`: accuracy(plan, a, b)), or '' where a run lacks its
    predictions."""
    if not ctx.predictions or any(arm.runs.empty for arm in (a, b)):
        return ""
    ids = [list(arm.trained["run_id"]) for arm in (a, b)]
    if not all(ids) or not all(i in ctx.predictions for side in ids for i in side):
        return ""
    frames = [[ctx.predictions[i] for i in side] for side in ids]
    target = frames[0][0]["target"].to_numpy()
    if any(len(f) != len(target) or not (f["target"].to_numpy() == target).all() for side in frames for f in side):
        return "; test predictions not over one test set (no variance split)"
    correct = [np.mean([(f["predicted"].to_numpy() == target) for f in side], axis=0) for side in frames]
    per_image = correct[0] - correct[1]
    test_se = per_image.std(ddof=1) / np.sqrt(len(per_image))
    from scipy.stats import t

    if acc.diff is not None:  # paired: the seed part is the per-seed differences' SE
        seed_se, dof, diff = float(acc.diff.std(ddof=1) / np.sqrt(len(acc.diff))), len(acc.diff) - 1, acc.diff.mean()
    else:
        x, y = acc.a, acc.b
        seed_se = float(np.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))) if min(len(x), len(y)) > 1 else np.nan
        dof, diff = len(x) + len(y) - 2, x.mean() - y.mean()
    total = float(np.hypot(seed_se, test_se))
    q = float(t.ppf(0.975, dof)) if dof > 0 else float("nan")  # t, not 1.96: few seeds
    return (f"; over seeds and {len(per_image):,} test images: difference {100 * diff:+.2f} pp, approximate 95% "
            f"interval [{100 * (diff - q * total):+.2f}, {100 * (diff + q * total):+.2f}] (seed SE {100 * seed_se:.2f}, "
            f"test-set SE {100 * test_se:.2f} pp)")


def paired_problems(plan: Plan, runs: pd.DataFrame) -> list[str]:
    """For a paired plan: the seeds whose arms did not share their split (data.split_seed and sizes)."""
    if not plan.paired or not len(runs):
        return []
    keys = [f"params.{k}" for k in ("data.split_seed", "data.train_size", "data.val_size") if f"params.{k}" in runs]
    problems = []
    for seed, group in runs.groupby("seed"):
        differ = [k.removeprefix("params.") for k in keys if group[k].astype(str).nunique(dropna=False) > 1]
        if differ:
            problems.append(f"seed {seed}: the arms ran on different splits ({', '.join(differ)} differ)")
    return problems


def notes(plan: Plan, mine: pd.DataFrame, arms: Mapping[str, Arm]) -> list[str]:
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
    unpaired = paired_problems(plan, mine)
    lines += unpaired
    varied = ["weight initialization and batch order (`seed`)"]
    if "params.data.split_seed" in mine and mine["params.data.split_seed"].nunique() > 1:
        varied.append("the train/validation split (`data.split_seed` follows the seed)")
    lines.append("The seeds varied " + " and ".join(varied) + "; the test set is fixed."
                 + (" Paired: the arms of a seed shared its split and batch order." if plan.paired and not unpaired
                    else ""))
    return lines


def inconclusive(plan: Plan, name: str, evidence: str = "") -> Claim:
    """A claim of the plan before its test: inconclusive, no test yet."""
    return Claim(plan.name, name, INCONCLUSIVE, evidence, "no test")

"""A study plan: what a study will run and which claims it will judge, declared before the runs
that judge them (the confirmation stage) exist.

    plan = load_plan("docs/results/fmnist_decisive/plan.yaml")
    plan.jobs("confirmation")        # [Job(arm, seed, overrides)], seeds outer
    plan.hash                        # of the file's bytes; every run of the plan is tagged with it

A plan has two stages. *Exploration* (the pilot) runs whatever arms it lists, on seeds that the
confirmation never uses: learning rates, epochs, timings and the seed SD are chosen there, and
no verdict ever comes from it. *Confirmation* runs the declared arms on fresh seeds; the report
judges the declared claims on those runs alone. Every run of a stage starts from the plan's
`recipe` overrides, then its arm's, then its seed (which also draws the train/validation split
so seeds vary data sampling as well as initialization and order: Bouthillier et al., MLSys 2021).

Claims are read here as their kind and keys only: each claim kind is one module of the claim
engine (densenet_exp/claims/), which owns its keys, their defaults and checks, its tests and its
judge; `densenet_exp.claims.load_plan` is this loader plus those checks. `paired: true` declares
that the arms share each seed's split and batch order (every arm of a seed runs with the same
`seed` and `data.split_seed`), so the engine may compare them within seed; `procedure` names how
the plan's fixed family of tests is corrected (`holm`, or `fixed_sequence` in the declared order).

Nothing here imports torch, Lightning or MLflow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import record
from .checks import is_number, require
from .config import load_yaml

# `budget`: the confirmation arms again at a larger training budget on fresh seeds (claims/evidence.py,
# BUDGET_RULE), optional.
STAGES = ("exploration", "confirmation", "budget")
PROCEDURES = ("holm", "fixed_sequence")
# What a paired plan's arms must share per seed: the seed (initialization draws and batch order,
# training/data.py seeds its sampler from it) and the train/validation split.
PAIRED_SOURCES = ("seed", "data.split_seed", "data.train_size", "data.val_size")
CONVERGENCE_KEYS = {"metric": record.VAL_ACC, "last_fraction": 0.2, "max_gain_pp": 0.3, "near_chance_pp": 10.0}
# The settled rule (claims/evidence.py, SETTLED_RULE): declared in place of the convergence rule's window.
SETTLED_KEYS = {"min_checks": 3, "tolerance_pp": None}


@dataclass(frozen=True)
class Job:
    """One run of a stage: the arm's name, the seed and the overrides `densenet_exp.run` gets."""

    arm: str
    seed: int
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class DeclaredClaim:
    """One claim of the plan: its kind and its keys (the engine's load_plan fills the kind's defaults)."""

    kind: str
    keys: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.keys[key]


@dataclass(frozen=True)
class Plan:
    path: Path
    hash: str
    name: str
    experiment: str
    description: str
    recipe: tuple[str, ...]
    alpha: float
    convergence: Mapping[str, Any]
    seeds: Mapping[str, tuple[int, ...]]  # stage -> seeds
    arms: Mapping[str, Mapping[str, tuple[str, ...]]]  # stage -> arm -> overrides
    arm_seeds: Mapping[str, Mapping[str, tuple[int, ...]]] = field(default_factory=dict)  # arms with their own seeds
    claims: tuple[DeclaredClaim, ...] = field(default=())
    paired: bool = False
    procedure: str = "holm"
    settled: Mapping[str, Any] | None = None  # SETTLED_KEYS where the plan declares the settled rule
    convergence_declared: bool = False  # the plan names its `convergence` window (else the defaults)

    def seeds_of(self, stage: str, arm: str) -> tuple[int, ...]:
        return self.arm_seeds.get(stage, {}).get(arm, self.seeds[stage])

    def jobs(self, stage: str) -> list[Job]:
        """Every run of `stage`, seeds outer (a stage cut short still has every arm)."""
        require("--stage", stage, stage in STAGES, " or ".join(STAGES))
        of_arm = {arm: set(self.seeds_of(stage, arm)) for arm in self.arms[stage]}  # linear in seeds
        seeds = sorted(set().union(*of_arm.values()))
        return [Job(arm, seed, (*self.recipe, *overrides, f"seed={seed}", f"data.split_seed={seed}",
                                f"study.plan={self.path}", f"study.stage={stage}", f"study.arm={arm}"))
                for seed in seeds for arm, overrides in self.arms[stage].items() if seed in of_arm[arm]]

    def describe(self) -> list[str]:
        """The plan as the report and `study show` print it."""
        lines = [f"plan `{self.name}` ({self.path}, sha256 {self.hash[:12]}): {self.description}".rstrip(": "),
                 f"recipe: {' '.join(self.recipe) or '(defaults)'}; MLflow experiment `{self.experiment}`"]
        for stage in (s for s in STAGES if s != "budget" or self.arms["budget"]):
            arms = "; ".join(f"{a}: {' '.join(o)}" + (f" (seeds {', '.join(map(str, self.seeds_of(stage, a)))})"
                                                       if a in self.arm_seeds.get(stage, {}) else "")
                             for a, o in self.arms[stage].items())
            lines.append(f"{stage}: seeds {', '.join(map(str, self.seeds[stage])) or 'per arm'}; arms {arms or 'none'}")
        c = self.convergence
        lines.append(f"settled: {c['metric']} rose less than {self.settled['tolerance_pp']:g} pp over the final "
                     f"learning-rate phase, read on at least {self.settled['min_checks']:g} validation checks"
                     if self.settled else
                     f"convergence: {c['metric']} gained less than {c['max_gain_pp']:g} pp over the last "
                     f"{c['last_fraction']:.0%} of its validation checks")
        lines[-1] += f"; trained nets: last validation check more than {c['near_chance_pp']:g} pp above chance"
        lines.append(f"alpha: {self.alpha:g} one-sided, family-wise over the plan's declared tests ("
                     + ("Holm" if self.procedure == "holm" else "a fixed sequence, in the declared order") + ")"
                     + ("; paired: arms share each seed's split and batch order" if self.paired else ""))
        return lines


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _overrides(key: str, value: Any) -> tuple[str, ...]:
    ok = isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value)
    require(key, value, ok, "a list of KEY=VALUE overrides")
    return tuple(value)


def _seeds(key: str, value: Any) -> tuple[int, ...]:
    ok = isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                   for v in value) and len(set(value)) == len(value)
    require(key, value, ok, "a list of distinct integers >= 0")
    return tuple(value)


def _claim(i: int, raw: Any) -> DeclaredClaim:
    """A claim as declared: a mapping with a `kind`; the engine checks the kind and its keys."""
    require(f"claims[{i}]", raw, isinstance(raw, dict) and isinstance(raw.get("kind"), str),
            "a mapping with a kind and that kind's keys")
    return DeclaredClaim(raw["kind"], {k: v for k, v in raw.items() if k != "kind"})


def require_declared_rule(plan: Plan) -> None:
    """A confirmation with claims starts only under a rule the plan names: `settled` (the final
    learning-rate phase, issue 30) or the older `convergence` window, declared on purpose. Plans
    whose confirmation started before this rule keep the defaults they were judged under."""
    require("settled", None, not plan.claims or plan.settled is not None or plan.convergence_declared,
            "declared before a confirmation starts: settled: {min_checks: 3, tolerance_pp: <half the seed SD>} "
            "(reads the whole final learning-rate phase), or convergence: {...} to keep the older window rule")


def load_plan(path: str | Path) -> Plan:
    """The plan at `path`, checked: InvalidValue (one line: key, value, what is allowed) otherwise."""
    path = Path(path)
    require("study.plan", str(path), path.is_file(), "a study plan file (YAML)")
    raw = load_yaml(path, "study.plan")
    require("study.plan", str(path), isinstance(raw, dict), "a YAML mapping with name, recipe, stages and claims")
    allowed = ("name", "experiment", "description", "recipe", "alpha", "convergence", "settled", "paired", "procedure",
               *STAGES, "claims")
    for key in raw:
        require(f"plan key {key}", raw[key], key in allowed, f"one of {', '.join(allowed)}")
    name = raw.get("name")
    require("name", name, isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum(),
            "a plan name of letters, digits, - and _")
    alpha = raw.get("alpha", 0.05)
    require("alpha", alpha, is_number(alpha) and 0 < alpha < 0.5, "a number in (0, 0.5)")
    convergence = {**CONVERGENCE_KEYS, **(raw.get("convergence") or {})}
    for key in convergence:
        require(f"convergence.{key}", convergence[key], key in CONVERGENCE_KEYS, f"one of {', '.join(CONVERGENCE_KEYS)}")
    for key in ("last_fraction", "max_gain_pp", "near_chance_pp"):
        value = convergence[key]
        ok = is_number(value) and value >= 0 and (key != "last_fraction" or 0 < value <= 1)
        require(f"convergence.{key}", value, ok, "a number in (0, 1]" if key == "last_fraction" else "a number >= 0")
    settled = None
    if raw.get("settled") is not None:
        require("settled", raw["settled"], isinstance(raw["settled"], dict), "a mapping of " + ", ".join(SETTLED_KEYS))
        settled = {**SETTLED_KEYS, **raw["settled"]}
        for key, value in settled.items():
            require(f"settled.{key}", value, key in SETTLED_KEYS, f"one of {', '.join(SETTLED_KEYS)}")
            require(f"settled.{key}", value, is_number(value) and value > 0, "a number > 0 (tolerance_pp is required)")
    seeds, arms, arm_seeds = {}, {}, {}
    for stage in STAGES:
        section = raw.get(stage) or {}
        require(stage, section, isinstance(section, dict) and set(section) <= {"seeds", "arms"},
                "a mapping with seeds and arms")
        seeds[stage] = _seeds(f"{stage}.seeds", section.get("seeds", [])) if section.get("seeds") else ()
        stage_arms = section.get("arms") or {}
        require(f"{stage}.arms", stage_arms, isinstance(stage_arms, dict), "a mapping of arm name -> overrides")
        arms[stage], arm_seeds[stage] = {}, {}
        for arm, spec in stage_arms.items():
            # An arm is its overrides, or {overrides: [...], seeds: [...]} to run on other seeds than the stage's.
            if isinstance(spec, dict):
                require(f"{stage}.arms.{arm}", spec, set(spec) <= {"overrides", "seeds"}, "overrides and seeds")
                arm_seeds[stage][str(arm)] = _seeds(f"{stage}.arms.{arm}.seeds", spec.get("seeds"))
                spec = spec.get("overrides")
            arms[stage][str(arm)] = _overrides(f"{stage}.arms.{arm}", spec)
    used = {stage: set(seeds[stage]).union(*arm_seeds[stage].values()) for stage in STAGES}
    overlap = used["exploration"] & used["confirmation"]
    require("confirmation.seeds", sorted(overlap), not overlap, "seeds the exploration stage did not use")
    overlap = used["budget"] & (used["exploration"] | used["confirmation"])
    require("budget.seeds", sorted(overlap), not overlap, "seeds neither the exploration nor the confirmation used")
    for arm, overrides in arms["budget"].items():  # the same arm, trained longer: its overrides, then the budget's
        own = arms["confirmation"].get(arm)
        require(f"budget.arms.{arm}", " ".join(overrides), own is not None and overrides[:len(own)] == own
                and len(overrides) > len(own), "a confirmation arm's name and overrides, followed by the budget's "
                "own (e.g. trainer.max_epochs)")
    claims = tuple(_claim(i, c) for i, c in enumerate(raw.get("claims") or []))
    paired, procedure = raw.get("paired", False), raw.get("procedure", "holm")
    require("paired", paired, isinstance(paired, bool), "true or false")
    require("procedure", procedure, procedure in PROCEDURES, " or ".join(PROCEDURES))
    if paired:  # the arms of a seed must see the same split and batch order: no arm may set its own
        for arm, overrides in arms["confirmation"].items():
            own = [o for o in overrides if o.split("=", 1)[0].lstrip("+") in PAIRED_SOURCES]
            require(f"confirmation.arms.{arm}", " ".join(own), not own,
                    f"no override of {', '.join(PAIRED_SOURCES)} in a paired plan (the arms share each seed's)")
    return Plan(path=path, hash=file_hash(path), name=name, experiment=str(raw.get("experiment", name)),
                description=" ".join(str(raw.get("description", "")).split()),
                recipe=_overrides("recipe", raw.get("recipe", [])), alpha=float(alpha), convergence=convergence,
                seeds=seeds, arms=arms, arm_seeds=arm_seeds, claims=claims, paired=paired, procedure=procedure,
                settled=settled, convergence_declared=raw.get("convergence") is not None)

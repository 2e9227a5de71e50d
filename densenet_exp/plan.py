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

Claim kinds (each with its own keys; see CLAIM_KEYS): `fewer_params` (the smaller net is
non-inferior in test accuracy within `margin_pp`, with at least `min_param_factor` x fewer
parameters), `matched_cost` (memory and FLOPs of that pair, where their accuracy is equivalent),
`degradation` (the deeper arm of a family trains to a final training loss no worse than the
shallower one; `control: true` marks the family that must degrade for the others to be judged),
`feature_reuse` (Figure 5's observations (a)-(d) on one DenseNet arm, as changes from its
initialization) and `gradient_flow` (a DenseNet's early relative gradient against a baseline's,
on the body's 3x3 convolutions only).

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

STAGES = ("exploration", "confirmation")
CLAIM_KEYS: dict[str, dict[str, Any]] = {  # kind -> {key: default (None: required)}
    "fewer_params": {"smaller": None, "larger": None, "margin_pp": None, "min_param_factor": 2.0},
    "matched_cost": {"smaller": None, "larger": None, "margin_pp": None},
    "degradation": {"family": None, "shallow": None, "deep": None, "margin": 0.1, "control": False},
    "feature_reuse": {"arm": None, "min_layers": 6, "keep_fraction": 0.5},
    "gradient_flow": {"dense": None, "baseline": None, "phase": "init"},
}
# The tests each claim kind puts in the plan's Holm family (feature_reuse: Figure 5's observations (a)-(d));
# a plan sizes its seeds at alpha / Plan.tests, the level Holm's first step holds a test to.
TESTS_PER_CLAIM = {"fewer_params": 1, "matched_cost": 1, "degradation": 1, "feature_reuse": 4, "gradient_flow": 1}
CONVERGENCE_KEYS = {"metric": record.VAL_ACC, "last_fraction": 0.2, "max_gain_pp": 0.3, "near_chance_pp": 10.0}


@dataclass(frozen=True)
class Job:
    """One run of a stage: the arm's name, the seed and the overrides `densenet_exp.run` gets."""

    arm: str
    seed: int
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class DeclaredClaim:
    """One claim of the plan: its kind, the keys of that kind (defaults filled in), and its name."""

    kind: str
    keys: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.keys[key]

    @property
    def arms(self) -> list[str]:
        return [v for k, v in self.keys.items() if k in ("smaller", "larger", "shallow", "deep", "arm", "dense",
                                                       "baseline")]

    @property
    def name(self) -> str:
        k = self.keys
        return {
            "fewer_params": lambda: f"{k['smaller']} as accurate as {k['larger']} with >= {k['min_param_factor']:g}x "
                                    f"fewer parameters (margin {k['margin_pp']:g} pp)",
            "matched_cost": lambda: f"cost of {k['smaller']} against {k['larger']} at matched accuracy",
            "degradation": lambda: (f"{k['family']}: {k['deep']} " + ("trains worse than " if k["control"] else
                                    "trains as well as ") + f"{k['shallow']} (final training loss)"),
            "feature_reuse": lambda: f"feature reuse of {k['arm']} (Figure 5, change from initialization)",
            "gradient_flow": lambda: f"{k['dense']} has stronger early gradients than {k['baseline']} ({k['phase']})",
        }[self.kind]()


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

    @property
    def tests(self) -> int:
        """The tests its declared claims put in the Holm family (TESTS_PER_CLAIM)."""
        return sum(TESTS_PER_CLAIM[c.kind] for c in self.claims)

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
        for stage in STAGES:
            arms = "; ".join(f"{a}: {' '.join(o)}" + (f" (seeds {', '.join(map(str, self.seeds_of(stage, a)))})"
                                                       if a in self.arm_seeds.get(stage, {}) else "")
                             for a, o in self.arms[stage].items())
            lines.append(f"{stage}: seeds {', '.join(map(str, self.seeds[stage])) or 'per arm'}; arms {arms or 'none'}")
        c = self.convergence
        lines.append(f"convergence: {c['metric']} gained less than {c['max_gain_pp']:g} pp over the last "
                     f"{c['last_fraction']:.0%} of its validation checks, and ended more than {c['near_chance_pp']:g} "
                     "pp above chance")
        lines.append(f"alpha: {self.alpha:g} one-sided, family-wise over the claims (Holm)")
        lines += [f"claim {i}: {c.name}" for i, c in enumerate(self.claims, 1)]
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


def _claim(i: int, raw: Any, arms: Mapping[str, Any]) -> DeclaredClaim:
    where = f"claims[{i}]"
    require(where, raw, isinstance(raw, dict) and raw.get("kind") in CLAIM_KEYS,
            f"a mapping whose kind is one of {', '.join(CLAIM_KEYS)}")
    spec = CLAIM_KEYS[raw["kind"]]
    for key in raw:
        require(f"{where}.{key}", raw[key], key == "kind" or key in spec, f"one of the keys {', '.join(spec)}")
    keys = {k: raw.get(k, default) for k, default in spec.items()}
    for key, value in keys.items():
        require(f"{where}.{key}", value, value is not None, "a value (required)")
    claim = DeclaredClaim(raw["kind"], keys)
    for arm in claim.arms:
        require(f"{where}", arm, arm in arms, f"an arm of the confirmation stage ({', '.join(arms)})")
    for key in ("margin_pp", "min_param_factor", "margin", "keep_fraction"):
        if key in keys:
            require(f"{where}.{key}", keys[key], is_number(keys[key]) and keys[key] > 0, "a number > 0")
    return claim


def load_plan(path: str | Path) -> Plan:
    """The plan at `path`, checked: InvalidValue (one line: key, value, what is allowed) otherwise."""
    path = Path(path)
    require("study.plan", str(path), path.is_file(), "a study plan file (YAML)")
    raw = load_yaml(path, "study.plan")
    require("study.plan", str(path), isinstance(raw, dict), "a YAML mapping with name, recipe, stages and claims")
    allowed = ("name", "experiment", "description", "recipe", "alpha", "convergence", *STAGES, "claims")
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
    explored = set(seeds["exploration"]).union(*arm_seeds["exploration"].values())
    overlap = explored & set(seeds["confirmation"]).union(*arm_seeds["confirmation"].values())
    require("confirmation.seeds", sorted(overlap), not overlap, "seeds the exploration stage did not use")
    claims = tuple(_claim(i, c, arms["confirmation"]) for i, c in enumerate(raw.get("claims") or []))
    return Plan(path=path, hash=file_hash(path), name=name, experiment=str(raw.get("experiment", name)),
                description=" ".join(str(raw.get("description", "")).split()),
                recipe=_overrides("recipe", raw.get("recipe", [])), alpha=float(alpha), convergence=convergence,
                seeds=seeds, arms=arms, arm_seeds=arm_seeds, claims=claims)

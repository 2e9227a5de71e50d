"""Each declared (arm, seed) of a plan's confirmation counted once, on a run of the arm's own config.

    kept, left_out = one_per_declared(plan, runs)   # runs: results.load_runs of the plan's experiment

A second run of one declared job (two runners on one plan, a job trained again) would count its
seed twice; a run tagged with an arm but trained with other overrides would pool another
configuration into the arm's evidence. Both are left out, by name, before anything is judged.
Nothing here imports torch or Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from .. import record
from ..config import flatten
from ..identity import config_key
from ..plan import Plan

ONCE_RULE = (
    "Each declared (arm, seed) counts once: of its finished confirmation runs that have the arm's config (the "
    "config key its recipe and overrides compose to, with the settings the harness resolves per machine, `auto`, "
    "as the run resolved them), the first started is kept. A second run of the same (arm, seed), a run whose config "
    "is not its arm's, and a run on a seed or arm the plan does not declare are left out and named. (Runs that "
    "predate the config_key tag are checked for duplicates only.)"
)


def arm_key(arm_config: Mapping, params: Mapping[str, str]) -> str:
    """The config key of a run of the arm whose resolved config is `arm_config`, where the run's
    logged `params` supply what the harness resolved per machine (`auto`: accelerator, precision,
    deterministic; a key `auto` drops, such as trainer.benchmark off a GPU, stays dropped)."""
    flat = flatten(arm_config)
    for key, value in list(flat.items()):
        if value == "auto":
            if key in params:
                flat[key] = params[key]
            else:
                del flat[key]
    return config_key(flat)


def one_per_declared(plan: Plan, runs: pd.DataFrame, arm_configs: Mapping[str, Mapping] | None = None
                     ) -> tuple[pd.DataFrame, list[str]]:
    """ONCE_RULE over the plan's FINISHED confirmation runs among `runs`; every other row passes.
    `arm_configs`: arm -> its resolved config (validate.arm_config; composed here when not given).
    Returns (the rows kept, one line per run left out, naming it and why)."""
    tag = lambda name: runs.get(f"tags.{name}", pd.Series(pd.NA, runs.index)).astype("string")  # noqa: E731
    mine = (tag(record.STUDY_PLAN).eq(plan.name) & tag(record.STUDY_STAGE).eq("confirmation")
            & runs["status"].eq("FINISHED")).fillna(False).astype(bool)
    if not mine.any():
        return runs, []
    # Runs that predate the config_key tag (hand-written or older stores) log too little of their
    # config to compare with the arm's: they are checked for duplicates only.
    tagged = tag(record.CONFIG_KEY).notna()
    if arm_configs is None and (mine & tagged).any():
        from ..validate import arm_config

        arm_configs = {arm: arm_config(plan, "confirmation", arm) for arm in plan.arms["confirmation"]}
    params = [c for c in runs.columns if c.startswith("params.")]
    left_out: dict[str, str] = {}  # run_id -> why
    kept: dict[tuple[str, int], str] = {}  # (arm, seed) -> the run kept
    for _, run in runs[mine].sort_values("start_time", kind="stable").iterrows():
        arm, seed, run_id = run[f"tags.{record.STUDY_ARM}"], _seed(run), run["run_id"]
        about = f"run {run_id} (arm {arm}, seed {seed})"
        if arm not in plan.arms["confirmation"] or seed not in plan.seeds_of("confirmation", arm):
            left_out[run_id] = f"{about}: not a declared (arm, seed) of the confirmation"
            continue
        logged = {c.removeprefix("params."): run[c] for c in params if isinstance(run[c], str)}
        expected = arm_key(arm_configs[arm], logged) if tagged[run.name] else run["config_key"]
        # The tag holds the key by the identity table of the code that trained the run; a later
        # reclassification (speed.compile became recipe) changes keys, so the run's logged params
        # keyed by today's table count too.
        if expected not in (run["config_key"], config_key(logged)):
            left_out[run_id] = (f"{about}: its config (key {run['config_key']}) is not the arm's as the plan declares "
                                f"it now (key {expected})")
        elif (arm, seed) in kept:
            left_out[run_id] = f"{about}: a second finished run of this declared job (run {kept[arm, seed]} is kept)"
        else:
            kept[arm, seed] = run_id
    lines = [f"Left out of the claims, {why}." for why in left_out.values()]
    return runs[~runs["run_id"].isin(left_out)], lines


def _seed(run: pd.Series) -> int | None:
    seed = pd.to_numeric(pd.Series([run.get("seed")]), errors="coerce").iloc[0]
    return None if pd.isna(seed) else int(seed)

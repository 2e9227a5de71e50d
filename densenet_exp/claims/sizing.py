"""`study estimate`'s sizing: before the runs, the power of every test in the plan's fixed family
with its declared seeds, at the level the family's procedure holds a single test to (alpha / k
under Holm, alpha in a fixed sequence), and the seeds 80% power needs there. The seed SD is
`--sd`, else the pooled SD of test accuracy over the pilot's runs on the claim's arms' recipes
(analysis.estimate.exploration_sd). Kinds without a power model (degradation, feature reuse,
gradient flow) are listed as such. Torch-free.
"""

from __future__ import annotations

import sys

import pandas as pd

from ..analysis.estimate import exploration_sd, print_estimate as print_time
from ..plan import Plan
from . import KINDS, name, named_arms, tests


def sizing(plan: Plan, uri: str, sd_pp: float | None) -> pd.DataFrame:
    k = tests(plan)
    rows = []
    for c in plan.claims:
        kind = KINDS[c.kind]
        row = {"claim": name(c)}
        if not hasattr(kind, "size"):
            rows.append({**row, "test": f"{kind.tests(c.keys)} test(s), no power model"})
            continue
        sd = sd_pp if sd_pp is not None else 100 * exploration_sd(plan, uri, [arm for _, arm in named_arms(kind, c.keys)])
        sized = kind.size(plan, c.keys, sd, k)
        rows.append({**row, "test": sized["test"], "seed SD (pp)": round(sd, 3),
                     "alpha": f"{sized['alpha']:.3g} ({'Holm, k = ' + str(k) if plan.procedure == 'holm' else 'fixed sequence'})",
                     "seeds": sized["seeds"], "power": round(sized["power"], 3),
                     "seeds for 80% power": sized["seeds for 80% power"]})
    table = pd.DataFrame(rows)
    if plan.procedure == "fixed_sequence" and "power" in table:
        # A test in a fixed sequence is reached only when every earlier one rejects.
        table["power to reach and reject"] = table["power"].astype(float).cumprod(skipna=False).round(3)
    return table


REACH_RULE = ("Fixed sequence: each test is tested at alpha, but only once every earlier test has rejected, so a "
              "later test's chance to be decided is its power times the earlier tests' (\"power to reach and "
              "reject\", multiplied as if independent; tests on shared runs are positively correlated, so it is "
              "likely higher). A claim without a power model ends the chain (blank).")


def print_estimate(plan: Plan, uri: str, jobs: int, sd_pp: float | None = None) -> int:
    sized = sizing(plan, uri, sd_pp)
    if len(sized):
        print(f"family: {tests(plan)} declared tests ({plan.procedure})")
        print(sized.to_markdown(index=False))
        if plan.procedure == "fixed_sequence":
            print(REACH_RULE)
        if "seed SD (pp)" in sized and sized["seed SD (pp)"].isna().any():
            print("no seed SD for some claims: give --sd PP, or explore their arms on two seeds or more", file=sys.stderr)
    return print_time(plan, uri, jobs)

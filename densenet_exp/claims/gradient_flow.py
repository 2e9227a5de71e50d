"""`gradient_flow`: a DenseNet's early relative gradient against a baseline's, on the body's 3x3
convolutions only, at `phase` (init or epoch1). One test."""

from __future__ import annotations

import numpy as np

from ..analysis import stats
from ..analysis.verdicts import GRADIENT_RULE, Claim, body_gradients, one_sided
from .evidence import gate, inconclusive

KIND = "gradient_flow"
KEYS = {"dense": None, "baseline": None, "phase": "init"}
ARM_KEYS = ("dense", "baseline")
POSITIVE = ()
PHASES = ("init", "epoch1")


def tests(k) -> int:
    return 1


def name(k) -> str:
    return f"{k['dense']} has stronger early gradients than {k['baseline']} ({k['phase']})"


def check(where: str, k) -> None:
    from ..checks import require

    require(f"{where}.phase", k["phase"], k["phase"] in PHASES, " or ".join(PHASES))


def rule(k) -> tuple[str, str]:
    return ("gradient flow", GRADIENT_RULE.split("For each comparison family")[0] + "The plan names the DenseNet and "
            "the baseline; the baseline must show vanishing gradients on that layer set (geometric mean of early / "
            "late below 1) for the claim to be tested.")


def judge(ctx, k) -> list[Claim]:
    dense, base = ctx.arms[k["dense"]], ctx.arms[k["baseline"]]
    per_run = body_gradients(ctx.grads, k["phase"])
    side = lambda arm: per_run.reindex(arm.runs["run_id"]).dropna()  # noqa: E731
    d, b = side(dense), side(base)
    claim = inconclusive(ctx.plan, name(k))
    if not len(d) or not len(b):
        claim.evidence, claim.reason = "no relative_grads.csv with layer roles", "not measured"
        return [claim]
    ratio = float(np.exp(np.log(b["early"] / b["late"]).mean()))
    claim.evidence = (f"early body-conv relative gradient {d['early'].mean():.3g} ({dense.name}) vs "
                      f"{b['early'].mean():.3g} ({base.name}); {base.name} early/late {ratio:.3g} (geometric mean)")
    if gate(claim, [dense, base], converged=False):
        return [claim]
    if ratio >= 1:
        claim.reason = f"{base.name} shows no vanishing gradient on its body 3x3 convolutions (early/late {ratio:.3g})"
        return [claim]
    x, y = np.log10(d["early"].to_numpy()), np.log10(b["early"].to_numpy())
    return [one_sided(claim, stats.welch_one_sided(x, y, "larger"), stats.welch_one_sided(x, y, "smaller"),
                      f"one-sided Welch on log10 (n = {len(x)}, {len(y)})")]

"""The like-for-like gradient measure of one net (relative_grads.csv rows): each layer's role in
its architecture, the body layers, and the early/late summary the gradient-flow probe logs and
the report pools. Torch-free: probes/gradient_flow.py and analysis/ both import it."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .. import record

GRADIENT_EARLY, GRADIENT_LATE = 0.25, 0.75  # positions among the body layers that bound "early" and "late"
GRADIENT_LAYER_RULE = (
    "Gradient measures use the body's 3x3 convolutions only (role `body`: DenseNet's 3x3 conv of each dense "
    "layer, both convs of a ResNet or plain basic block, the 3x3 conv of a bottleneck block), never the stem "
    "conv, 1x1 bottleneck, transition, shortcut convs or the classifier, so that like is compared with like "
    f"across families. A body layer's position runs from 0 (first body conv) to 1 (last body conv); the early "
    f"layers are those at position <= {GRADIENT_EARLY}, the late ones at >= {GRADIENT_LATE}."
)

_DENSE_LAYER = re.compile(r"(?P<block>(?:.*\.)?denseblock\d+\.denselayer\d+)\.conv(?P<conv>[12])")
_RESNET_BLOCK = re.compile(r"(?P<block>(?:.*\.)?layer\d+\.\d+)\.(?:conv(?P<conv>[123])|(?P<shortcut>downsample\.0))")
_DENSE_STEM = re.compile(r"(?:.*\.)?features\.conv0")
_TRANSITION = re.compile(r"(?:.*\.)?transition\d+\.conv")


def roles_from_layer_names(layers: Sequence[str], kinds: Sequence[str]) -> list[str | None]:
    """The role (record.LAYER_ROLES) of each layer of one net, read from its module names and kinds
    as relative_grads.csv lists them, for files written before the probe recorded roles; None where
    the name fits no family here. The probe itself derives roles from the module structure
    (densenet_exp.probes.gradient_flow.layer_roles); on the models of densenet_exp.models both agree:

    - any Linear: classifier;
    - DenseNet: `features.conv0` stem, `transition<i>.conv` transition; a dense layer's `conv1` is
      the 1x1 bottleneck when the layer also has a `conv2` (DenseNet-B), else its 3x3 conv (body);
      `conv2` body;
    - CIFAR ResNet, plain net and torchvision ResNet: the top-level `conv1` stem; in block
      `layer<s>.<b>`, `conv1` and `conv2` body when the block has no `conv3` (basic block); with a
      `conv3` (bottleneck block), `conv2` body, `conv1` and `conv3` bottleneck; `downsample.0`
      shortcut.
    """
    layers = [str(name) for name in layers]
    present = set(layers)
    roles: list[str | None] = []
    for name, kind in zip(layers, kinds):
        dense, block = _DENSE_LAYER.fullmatch(name), _RESNET_BLOCK.fullmatch(name)
        if kind == "Linear":
            role = "classifier"
        elif name == "conv1" or _DENSE_STEM.fullmatch(name):
            role = "stem"
        elif _TRANSITION.fullmatch(name):
            role = "transition"
        elif dense:
            bottleneck = dense["conv"] == "1" and f"{dense['block']}.conv2" in present
            role = "bottleneck" if bottleneck else "body"
        elif block and block["shortcut"]:
            role = "shortcut"
        elif block:
            has_conv3 = f"{block['block']}.conv3" in present
            role = "bottleneck" if has_conv3 and block["conv"] in ("1", "3") else "body"
        else:
            role = None
        roles.append(role)
    return roles


def _nets(table: pd.DataFrame) -> list[tuple[object, pd.DataFrame]]:
    """`table`'s rows split into one net's record of one phase each (by run_id and phase, where present)."""
    keys = [c for c in ("run_id", "phase") if c in table]
    return list(table.groupby(keys, sort=False)) if keys else [(None, table)]


def assign_roles(grads: pd.DataFrame) -> pd.DataFrame:
    """`grads` (relative_grads.csv rows, of one run or with a run_id column) with the role of each row
    that has none filled in by `roles_from_layer_names`, net by net; rows with a role keep it."""
    grads = grads.assign(role=grads["role"].astype(object) if "role" in grads else None)
    missing = grads[grads["role"].isna()]
    for _, rows in _nets(missing) if len(missing) else []:
        grads.loc[rows.index, "role"] = pd.Series(roles_from_layer_names(rows["layer"], rows["kind"]),
                                                  index=rows.index, dtype=object)
    return grads


def body_layers(grads: pd.DataFrame) -> pd.DataFrame:
    """The body rows (record.BODY_ROLE) of `grads`, roles filled in where missing (assign_roles), with
    `body_depth`: the layer's position among its net's body layers in forward order, 0 = first body
    conv, 1 = last (0 for a single one)."""
    body = assign_roles(grads)
    body = body[body["role"] == record.BODY_ROLE]
    parts = [rows.sort_values("depth").assign(body_depth=np.arange(len(rows)) / max(len(rows) - 1, 1))
             for _, rows in _nets(body)]
    return pd.concat(parts) if parts else body.assign(body_depth=pd.Series(dtype=float))


def body_gradient_summary(table: pd.DataFrame) -> dict[str, float]:
    """Per phase of one net's relative_grads.csv rows (GRADIENT_LAYER_RULE): `grad/early_rel_<phase>`,
    the mean relative gradient of the body layers at position <= GRADIENT_EARLY, and
    `grad/early_over_late_<phase>`, that mean over the mean of those at position >= GRADIENT_LATE
    (NaN when either set is empty or the late mean is 0)."""
    metrics = {}
    body = body_layers(table)
    for phase in table["phase"].drop_duplicates():
        rows = body[body["phase"] == phase]
        early = rows.loc[rows["body_depth"] <= GRADIENT_EARLY, "relative_grad"].mean()
        late = rows.loc[rows["body_depth"] >= GRADIENT_LATE, "relative_grad"].mean()
        metrics[record.early_relative_gradient(phase)] = float(early)
        metrics[record.early_over_late_gradient(phase)] = float(early / late) if late else float("nan")
    return metrics

"""The values a config key may take and the DenseNet knobs' checks, named once and torch-free: the config
checks (validate.py) run before torch, Lightning or MLflow load, so bad input is rejected in
about a second. models.ARCHITECTURES and classifier.OPTIMIZERS map the same names to what they
build; tests/test_config.py checks that they match these lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .checks import is_number, require, require_int
from .config import DENSENET_KNOBS

# models/__init__.py ARCHITECTURES: the constructor of each
ARCHITECTURES = ("densenet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
                 "densenet_cifar", "resnet18", "resnet34", "resnet50", "resnet_cifar", "plain_cifar")
STEMS = ("imagenet", "cifar")  # the first layers: 7x7 stride 2 and max-pool, or one 3x3 conv
# A dense block's training step (models/densenet.py): "plain", each layer's batch norm on its own;
# "shared_stats", each source channel's batch statistics once per step (models/stats.py).
IMPLS = ("plain", "shared_stats")
# classifier.py OPTIMIZERS: the torch class of each
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("constant", "multistep", "cosine", "onecycle")
DATA_SETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
AUGMENTATIONS = ("none", "flip", "crop", "crop_flip")
# The training images of each built-in set with a fixed size, before the validation split.
TRAIN_IMAGES = {"fashion_mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000}


def train_images(data: Mapping[str, Any]) -> int | None:
    """The images a run of a TRAIN_IMAGES set trains on: the set less `data.val_size`, at most
    `data.train_size`; None for other data (synthetic, image folders), whose size the set does not fix."""
    if data.get("name") not in TRAIN_IMAGES:
        return None
    total = TRAIN_IMAGES[data["name"]] - int(data.get("val_size") or 0)
    return min(total, int(data["train_size"])) if data.get("train_size") else total

# The config checks and the DenseNet constructor call these same functions, so `growth_rate=0`
# reads the same from the command line and from `DenseNet(growth_rate=0)`.
def check_growth_rate(growth_rate: object) -> None:
    require_int("growth_rate", growth_rate, 1)


def check_compression(compression: object) -> None:
    require("compression", compression, is_number(compression) and 0 < compression <= 1, "a number in (0, 1]")


def check_bottleneck(bottleneck: object) -> None:
    require("bottleneck", bottleneck, isinstance(bottleneck, bool), "true or false")


KNOB_CHECKS = dict(zip(DENSENET_KNOBS, (check_growth_rate, check_compression, check_bottleneck)))

"""The values a config key may take and the DenseNet knobs' checks, named once and torch-free: the config
checks (validate.py) run before torch, Lightning or MLflow load, so bad input is rejected in
about a second. models.ARCHITECTURES and classifier.OPTIMIZERS map the same names to what they
build; tests/test_config.py checks that they match these lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    """The images a run trains on: of a TRAIN_IMAGES set, the set less `data.val_size`, at most
    `data.train_size`; of an image folder, its train/ images (counted in `data.root`) less
    `data.val_size` (null: its own val/ validates); None for synthetic data."""
    if data.get("name") == "imagefolder":
        from .datafiles import read_image_folder

        return read_image_folder(data["root"]).images["train"] - int(data.get("val_size") or 0)
    if data.get("name") not in TRAIN_IMAGES:
        return None
    total = TRAIN_IMAGES[data["name"]] - int(data.get("val_size") or 0)
    return min(total, int(data["train_size"])) if data.get("train_size") else total


def train_batches(cfg: Mapping[str, Any]) -> int | None:
    """Training batches (optimizer steps) per epoch and rank that a resolved config plans, or None
    where the config does not fix the training set's size (an image folder: its count would make
    `speed.compile: auto`, a part of the recipe, follow files added to the folder) or lacks the batch size."""
    data, trainer = cfg.get("data") or {}, cfg.get("trainer") or {}
    if data.get("name") == "imagefolder":
        return None
    images = data.get("train_size") if data.get("name") == "synthetic" else train_images(data)
    if not images or not data.get("batch_size"):
        return None
    devices = trainer.get("devices")
    ranks = devices if isinstance(devices, int) and devices > 0 and "ddp" in str(trainer.get("strategy", "")) else 1
    batches = images // ranks // data["batch_size"]  # training batches are whole (drop_last)
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, float) and limit <= 1.0:
        return int(batches * limit)
    if isinstance(limit, int) and limit > 0:
        return min(batches, limit)
    return batches


def milestone_epochs(fractions: Sequence[float], epochs: int) -> list[int]:
    """The epochs after which a multistep schedule drops the learning rate: `optim.milestones` are
    fractions of the run (the paper: 50% and 75% of the epochs), each at least the first epoch."""
    return [max(1, round(f * epochs)) for f in fractions]

# The config checks and the DenseNet constructor call these same functions, so `growth_rate=0`
# reads the same from the command line and from `DenseNet(growth_rate=0)`.
def check_growth_rate(growth_rate: object) -> None:
    require_int("growth_rate", growth_rate, 1)


def check_compression(compression: object) -> None:
    require("compression", compression, is_number(compression) and 0 < compression <= 1, "a number in (0, 1]")


def check_bottleneck(bottleneck: object) -> None:
    require("bottleneck", bottleneck, isinstance(bottleneck, bool), "true or false")


KNOB_CHECKS = dict(zip(DENSENET_KNOBS, (check_growth_rate, check_compression, check_bottleneck)))

"""Model families of the harness and `build_model`, the one entry the training code calls."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from torch import nn

from ..checks import InvalidValue, require
from ..config import DENSENET_KNOBS, is_densenet
from .densenet import (
    KNOB_CHECKS,
    DenseBlock,
    DenseLayer,
    DenseNet,
    Transition,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_cifar,
)
from .resnet import CifarResNet, plain_cifar, resnet_cifar, torchvision_resnet

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "densenet": DenseNet,
    "densenet121": densenet121,
    "densenet161": densenet161,
    "densenet169": densenet169,
    "densenet201": densenet201,
    "densenet264": densenet264,
    "densenet_cifar": densenet_cifar,
    "resnet18": partial(torchvision_resnet, "resnet18"),
    "resnet34": partial(torchvision_resnet, "resnet34"),
    "resnet50": partial(torchvision_resnet, "resnet50"),
    "resnet_cifar": resnet_cifar,
    "plain_cifar": plain_cifar,
}

def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the model a config describes: ``arch`` names the family or preset, every other key
    is passed to it (``name`` is only the config's label and is dropped)."""
    kwargs = dict(cfg)
    arch = kwargs.pop("arch", None)
    kwargs.pop("name", None)
    require("model.arch", arch, isinstance(arch, str) and arch in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}")
    if "block_config" in kwargs and kwargs["block_config"] is not None:
        kwargs["block_config"] = tuple(kwargs["block_config"])
    try:
        return ARCHITECTURES[arch](**kwargs)
    except ValueError as err:  # the constructor names its argument; the config key is model.<argument>
        raise InvalidValue(f"model.{err}") from err
    except TypeError as err:  # an option this architecture does not take
        raise InvalidValue(f"model: {err}") from err


__all__ = [
    "ARCHITECTURES",
    "DENSENET_KNOBS",
    "CifarResNet",
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "KNOB_CHECKS",
    "Transition",
    "build_model",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "densenet_cifar",
    "is_densenet",
    "plain_cifar",
    "resnet_cifar",
    "torchvision_resnet",
]

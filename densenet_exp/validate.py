"""Checks on a composed config, run before anything trains or touches the tracking store.

Each failure is one `ConfigError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import Any

from .classifier import OPTIMIZERS, SCHEDULERS
from .data import AUGMENTATIONS, FASHION_MNIST_HELP, find_fashion_mnist
from .models import ARCHITECTURES

DATA_SETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _require(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


def _int_at_least(key: str, value: Any, low: int) -> None:
    _require(key, value, _is_int(value) and value >= low, f"an integer >= {low}")


def validate_knobs(cfg: Mapping[str, Any]) -> None:
    """The top-level DenseNet knobs; null means "the model preset's value"."""
    k, theta, b = cfg.get("growth_rate"), cfg.get("compression"), cfg.get("bottleneck")
    _require("growth_rate", k, k is None or (_is_int(k) and k >= 1), "an integer >= 1 (or null for the preset's)")
    _require(
        "compression",
        theta,
        theta is None or (_is_number(theta) and 0 < theta <= 1),
        "a number in (0, 1] (or null for the preset's)",
    )
    _require("bottleneck", b, b is None or isinstance(b, bool), "true or false (or null for the preset's)")
    _int_at_least("seed", cfg.get("seed"), 0)


def validate_data(data: Mapping[str, Any]) -> None:
    name = data.get("name")
    _require("data.name", name, name in DATA_SETS, f"one of {', '.join(DATA_SETS)}")
    _int_at_least("data.batch_size", data.get("batch_size"), 1)
    if data.get("eval_batch_size") is not None:
        _int_at_least("data.eval_batch_size", data.get("eval_batch_size"), 1)
    _int_at_least("data.val_size", data.get("val_size", 0), 0)
    _int_at_least("data.num_workers", data.get("num_workers", 0), 0)
    for key in ("train_size", "test_size"):
        if data.get(key) is not None:
            _int_at_least(f"data.{key}", data.get(key), 1)
    augment = data.get("augment", "none")
    _require("data.augment", augment, augment in AUGMENTATIONS, f"one of {', '.join(AUGMENTATIONS)}")
    root = Path(str(data.get("root"))).expanduser() if data.get("root") else None
    download = bool(data.get("download", False))
    if name == "fashion_mnist" and not download:
        _require("data.root", str(root), root is not None and find_fashion_mnist(root) is not None, FASHION_MNIST_HELP)
    elif name in ("cifar10", "cifar100") and not download:
        _require("data.root", str(root), root is not None and root.is_dir(), "an existing folder, or data.download=true")
    elif name == "imagefolder":
        ok = root is not None and (root / "train").is_dir() and (root / "val").is_dir()
        _require("data.root", str(root), ok, "a folder with train/ and val/ class folders")


def validate_optim(optim: Mapping[str, Any]) -> None:
    name = optim.get("name")
    _require("optim.name", name, name in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}")
    lr = optim.get("lr")
    _require("optim.lr", lr, _is_number(lr) and lr > 0, "a number > 0")
    wd = optim.get("weight_decay", 0.0)
    _require("optim.weight_decay", wd, _is_number(wd) and wd >= 0, "a number >= 0")
    if name == "sgd":
        m = optim.get("momentum", 0.0)
        _require("optim.momentum", m, _is_number(m) and 0 <= m < 1, "a number in [0, 1)")
    sched = optim.get("scheduler", "constant")
    _require("optim.scheduler", sched, sched in SCHEDULERS, f"one of {', '.join(SCHEDULERS)}")
    if sched == "multistep":
        ms = optim.get("milestones")
        ok = isinstance(ms, (list, tuple)) and all(_is_number(f) and 0 < f < 1 for f in ms)
        _require("optim.milestones", ms, ok, "a list of fractions of the epochs, each in (0, 1)")


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError on the first bad value of a resolved run config."""
    validate_knobs(cfg)
    arch = cfg["model"].get("arch")
    _require("model.arch", arch, arch in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}")
    validate_data(cfg["data"])
    validate_optim(cfg["optim"])
    _int_at_least("trainer.max_epochs", cfg["trainer"].get("max_epochs"), 1)
    speed = cfg.get("speed", {})
    cl = speed.get("channels_last", "auto")
    _require("speed.channels_last", cl, cl == "auto" or isinstance(cl, bool), "auto, true or false")
    keep = speed.get("keep_freed_memory", "auto")
    _require("speed.keep_freed_memory", keep, keep == "auto" or isinstance(keep, bool), "auto, true or false")
    compile_ = speed.get("compile", False)
    _require("speed.compile", compile_, isinstance(compile_, bool), "true or false")
    if cfg.get("cpu_threads") is not None:
        _int_at_least("cpu_threads", cfg["cpu_threads"], 1)
    ls = cfg.get("loss", {}).get("label_smoothing", 0.0)
    _require("loss.label_smoothing", ls, _is_number(ls) and 0 <= ls < 1, "a number in [0, 1)")

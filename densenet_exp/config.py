"""The run config as plain data, torch-free and light (`--help` imports it): where the config
files are (CONF_DIR), the ablation's three DenseNet knobs (named here, once), the resolved config
of a composed one (knobs folded into the model) and its flat params (identity.py hashes it)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CONFIG_FILE = CONF_DIR / "config.yaml"  # the run config's defaults

# The three knobs of the ablation; only DenseNet architectures take them.
DENSENET_KNOBS = ("growth_rate", "compression", "bottleneck")


def is_densenet(arch: str) -> bool:
    return arch.startswith("densenet")


def apply_knobs(cfg: dict[str, Any]) -> None:
    """Fold the top-level knobs into a DenseNet's model config (null keeps the preset's value)
    and write the effective values back, so every run records the k, theta and B it trained.
    Other architectures have no such knobs: theirs are recorded as null."""
    model = cfg["model"]
    densenet = is_densenet(str(model.get("arch", "")))
    for knob in DENSENET_KNOBS:
        if densenet:
            if cfg.get(knob) is not None:
                model[knob] = cfg[knob]
            cfg[knob] = model.get(knob)
        else:
            cfg[knob] = None


# What a default experiment's name is made of (default_experiment): a sweep that varies one of
# these must name its experiment, or its jobs would land apart.
EXPERIMENT_NAMED_FROM = ("data", "data.name", "data.root", "experiment")


def default_experiment(data: Mapping[str, Any], preset: str | None) -> str:
    """The MLflow experiment of a run whose tracking.experiment is null: the data set, an image
    folder's own folder name and the experiment preset, e.g. `imagefolder-pets`,
    `fashion_mnist-smoke`, so runs for one question land together and apart from other questions'
    (a preset that names its experiment, as the shipped ones do, keeps that name)."""
    parts = [str(data["name"])]
    if data["name"] == "imagefolder":
        parts.append(Path(str(data["root"])).expanduser().resolve().name)
    if preset:
        parts.append(preset)
    return re.sub(r"[^A-Za-z0-9_. -]", "_", "-".join(parts))[:200]  # a safe name (checks.SAFE_NAME)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """A composed config as plain data: interpolations resolved, Hydra's own section dropped and
    the DenseNet knobs folded into the model (apply_knobs)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    apply_knobs(plain)
    return plain


MAX_YAML_BYTES = 1 << 20  # a plan or config file: a few kilobytes
MAX_YAML_ALIASES = 20  # each alias copies a node: a "billion laughs" file nests copies of copies


def load_yaml(path: Path, key: str) -> Any:
    """The YAML file at `path` (named `key` in messages), read safely: no bigger than
    MAX_YAML_BYTES and with at most MAX_YAML_ALIASES aliases (counted on the parser's events,
    before anything is built), else InvalidValue in one line. libyaml's loader where installed."""
    import yaml

    from .checks import InvalidValue, require

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    size = path.stat().st_size
    require(key, f"{path} ({size} bytes)", size <= MAX_YAML_BYTES, f"a YAML file of at most {MAX_YAML_BYTES} bytes")
    text = path.read_text()
    try:
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=loader))
        require(key, str(path), aliases <= MAX_YAML_ALIASES, f"a YAML file with at most {MAX_YAML_ALIASES} aliases "
                f"(*name; it has {aliases})")
        return yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as err:
        raise InvalidValue(f"{key}={path} is not valid YAML: {str(err).splitlines()[0][:300]}") from None


def compose_config(overrides: list[str]) -> DictConfig:
    """The config of one job, composed from CONF_DIR as `densenet_exp.run` would (Hydra, no torch).
    Inside a running Hydra app (a job checking its plan's arm) through the app's own Hydra,
    which composes from the same folder; elsewhere through a Hydra of its own."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [o for o in overrides if not o.startswith("hydra.")]
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def composed(overrides: list[str]) -> dict[str, Any]:
    """compose_config's config resolved, as written (knobs not folded in)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config(overrides), resolve=True)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"growth_rate": 12}} -> {"model.growth_rate": 12}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat

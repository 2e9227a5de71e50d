"""What makes two runs the same configuration: everything in the resolved config that changes the
model or the recipe. `config_key` hashes it, leaving out the seed (repeats of a configuration
differ only in it) and the bookkeeping that changes neither (where the run is tracked, threads,
loader processes, speed settings that keep the numbers, the probes that measure it, how often
it prints): KEY_CLASSES below. It keeps the model's structure (`block_config` included), the data's identity (an
image folder's resolved root and content fingerprint; a built-in set is its name), image size,
class count and the whole recipe. Each run carries it as tag `config_key`; results.load_runs
derives it from the logged params of runs that predate the tag, and the report never pools runs
with different keys. Light to import: the report reads it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from .config import flatten

# Every flattened config key is of one class, by its own entry or its longest prefix entry (ending
# in "."): the one table `config_key`, the run hash and the report's comparability all read. A
# configuration is its architecture, recipe and data; the seed and the bookkeeping are not.
# Compiled kernels and the precision round differently, so `speed.compile` and `trainer.precision`
# are recipe; channels-last and kept freed memory only change speed. tests/test_config_keys.py
# fails when a key of any config group has no class here.
# How the machine in front of you runs a job (threads, side-by-side jobs, loader processes) is its
# own class: chosen from the core count, so a resume on another machine or with another `--jobs`
# must find the same run (config_hash leaves it out too).
ARCHITECTURE, RECIPE, DATA, SEED, BOOKKEEPING_CLASS = "architecture", "recipe", "data", "seed", "bookkeeping"
MACHINE = "machine"
KEY_CLASSES = {
    "model.": ARCHITECTURE, "growth_rate": ARCHITECTURE, "compression": ARCHITECTURE, "bottleneck": ARCHITECTURE,
    "optim.": RECIPE, "loss.": RECIPE, "trainer.": RECIPE, "speed.compile": RECIPE,
    "data.": DATA,
    "seed": SEED, "data.split_seed": SEED,
    "cpu_threads": MACHINE, "parallel_jobs": MACHINE, "data.num_workers": MACHINE,
    "data.eval_batch_size": BOOKKEEPING_CLASS, "data.download": BOOKKEEPING_CLASS,
    "trainer.enable_progress_bar": BOOKKEEPING_CLASS, "trainer.enable_model_summary": BOOKKEEPING_CLASS,
    "trainer.log_every_n_steps": BOOKKEEPING_CLASS, "trainer.num_sanity_val_steps": BOOKKEEPING_CLASS,
    "speed.": BOOKKEEPING_CLASS, "tracking.": BOOKKEEPING_CLASS, "probes.": BOOKKEEPING_CLASS,
    "study.": BOOKKEEPING_CLASS,  # the plan, stage and arm that label a run
}


def key_class(key: str) -> str | None:
    """KEY_CLASSES' class of flattened config key `key`; None when it has none."""
    if key in KEY_CLASSES:
        return KEY_CLASSES[key]
    prefixes = [p for p in KEY_CLASSES if p.endswith(".") and key.startswith(p)]
    return KEY_CLASSES[max(prefixes, key=len)] if prefixes else None


PARAM_LENGTH = 250  # Lightning's MLflow logger cuts param values to this many characters


def shapes_result(key: str, data_name: str) -> bool:
    """Whether flattened config key `key` is part of a configuration (see the module's docstring):
    architecture, recipe or data, or a key of no class (kept: an unknown key may shape the result).
    A built-in data set is named, wherever its files are; an image folder is its root."""
    if key_class(key) in (SEED, BOOKKEEPING_CLASS, MACHINE):
        return False
    return not (key == "data.root" and data_name != "imagefolder")


def configuration(params: Mapping[str, Any]) -> dict[str, str]:
    """The params of a configuration: flattened config keys -> values as MLflow stores them."""
    data_name = str(params.get("data.name"))
    return {k: str(v)[:PARAM_LENGTH] for k, v in params.items() if shapes_result(k, data_name)}


def _digest(value: Any, length: int) -> str:
    """The first `length` hex digits of the SHA-256 of `value` as sorted JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def config_hash(cfg: Mapping[str, Any]) -> str:
    """The run hash of resolved config `cfg`: a short, stable hash of the whole config but where it
    is tracked and the MACHINE keys. Unlike config_key it keeps the seed and the bookkeeping (probes,
    printing): a run resumes, or is skipped as finished, only under this hash."""
    kept = {k: v for k, v in flatten(cfg).items() if not k.startswith("tracking.") and key_class(k) != MACHINE}
    return _digest(kept, 16)


def older_config_hash(cfg: Mapping[str, Any]) -> str:
    """The run hash before commit f1c8f87 (2026-12-07), which kept the MACHINE keys: a run killed
    under it still resumes (and is re-tagged with config_hash)."""
    return _digest({k: v for k, v in cfg.items() if k != "tracking"}, 16)


def config_key(params: Mapping[str, Any]) -> str:
    """A short hash of `configuration(params)`: `params` flattened (a run's logged params) or a
    resolved config (nested)."""
    flat = flatten(params) if any(isinstance(v, Mapping) for v in params.values()) else params
    return _digest(configuration(flat), 12)

"""What makes two runs the same configuration: everything in the resolved config that changes the
model or the recipe. `config_key` hashes it, leaving out the seed (repeats of a configuration
differ only in it) and the bookkeeping that changes neither (where the run is tracked, threads,
loader processes, speed settings that keep the numbers, the probes that measure it, how often
it prints). It keeps the model's structure (`block_config` included), the data's identity (an
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

# Flattened config keys (and key prefixes) that do not change the trained model or its recipe.
BOOKKEEPING = ("seed", "cpu_threads", "data.num_workers", "data.eval_batch_size", "data.download",
               "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
               "trainer.num_sanity_val_steps", "data.split_seed", "parallel_jobs")
BOOKKEEPING_PREFIXES = ("tracking.", "speed.", "probes.", "study.")  # study.*: the plan, stage and arm that label a run
PARAM_LENGTH = 250  # Lightning's MLflow logger cuts param values to this many characters


def shapes_result(key: str, data_name: str) -> bool:
    """Whether flattened config key `key` is part of a configuration (see the module's docstring).
    A built-in data set is named, wherever its files are; an image folder is its root."""
    if key in BOOKKEEPING or key.startswith(BOOKKEEPING_PREFIXES):
        return False
    return not (key == "data.root" and data_name != "imagefolder")


def configuration(params: Mapping[str, Any]) -> dict[str, str]:
    """The params of a configuration: flattened config keys -> values as MLflow stores them."""
    data_name = str(params.get("data.name"))
    return {k: str(v)[:PARAM_LENGTH] for k, v in params.items() if shapes_result(k, data_name)}


def config_key(params: Mapping[str, Any]) -> str:
    """A short hash of `configuration(params)`: `params` flattened (a run's logged params) or a
    resolved config (nested)."""
    flat = flatten(params) if any(isinstance(v, Mapping) for v in params.values()) else params
    text = json.dumps(configuration(flat), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]

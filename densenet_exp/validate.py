"""Checks on a composed config, run before anything trains or touches the tracking store.

Each failure is one `ConfigError` line naming the key, the value and what is allowed, raised
through densenet_exp.checks.require (the one place that message is written). Torch-free, as are
the modules it reads (options, datafiles): run.py checks a job's config before torch, Lightning
or MLflow load, so bad input is rejected in about a second (tools/startup-time measures it).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from .checks import InvalidValue, is_int, is_number, require, require_int, require_name
from .datafiles import FASHION_MNIST_HELP, LAYOUT, find_fashion_mnist, read_image_folder, stem_for
from .config import EXPERIMENT_NAMED_FROM, default_experiment, flatten, resolved_config
from .identity import config_key, configuration
from .options import (ARCHITECTURES, AUGMENTATIONS, DATA_SETS, KNOB_CHECKS, OPTIMIZERS, SCHEDULERS, STEMS,
                      TRAIN_IMAGES, train_images)

NATIVE_SIZE = {"fashion_mnist": 28, "cifar10": 32, "cifar100": 32}  # in-memory sets are not resized
# Keys the code reads that not every config file defines, so `+key=value` may add them. Model and
# probe options are checked by their builders, trainer keys against lightning.Trainer.
ADDABLE_KEYS = (
    "cpu_threads", "data.download", "data.eval_batch_size", "data.split_seed", "data.augment", "data.num_workers",
    "data.train_size", "data.test_size", "data.val_size", "optim.momentum", "optim.nesterov", "optim.weight_decay",
    "optim.milestones", "optim.gamma", "optim.pct_start", "loss.label_smoothing",
)
CONFIG_GROUPS = ("model", "data", "trainer", "optim", "probes", "experiment", "hparams_search")


# A config value that cannot work: the one error class of densenet_exp.checks, so the model
# constructors' errors and these read alike and `except ConfigError` catches both.
ConfigError = InvalidValue


def validate_knobs(cfg: Mapping[str, Any]) -> None:
    """The top-level DenseNet knobs, by the model's own checks; null means "the preset's value"."""
    for knob, check in KNOB_CHECKS.items():
        if cfg.get(knob) is not None:
            check(cfg[knob])
    require_int("seed", cfg.get("seed"), 0)


def validate_data(data: Mapping[str, Any]) -> None:
    """The keys of the `data` group this data set uses (what ImageDataModule reads)."""
    name = data.get("name")
    require("data.name", name, name in DATA_SETS, f"one of {', '.join(DATA_SETS)}")
    require_int("data.batch_size", data.get("batch_size"), 1)
    if data.get("eval_batch_size") is not None:
        require_int("data.eval_batch_size", data.get("eval_batch_size"), 1)
    root = Path(str(data.get("root"))).expanduser() if data.get("root") else None
    if name == "imagefolder":
        validate_image_folder(data)
        return
    # In-memory sets: the images' own size, batches indexed in the main process.
    size = data.get("image_size")
    if name in NATIVE_SIZE:
        require("data.image_size", size, size == NATIVE_SIZE[name], f"{NATIVE_SIZE[name]}, the size of {name}'s images")
    else:
        require_int("data.image_size", size, 1)
    workers = data.get("num_workers")
    require("data.num_workers", workers, workers == 0, "0 for an in-memory data set (workers would only add copies)")
    require_int("data.val_size", data.get("val_size"), 0)
    require_int("data.split_seed", data.get("split_seed"), 0)
    for key in ("train_size", "test_size"):
        if data.get(key) is not None or name == "synthetic":
            require_int(f"data.{key}", data.get(key), 1)
    augment = data.get("augment")
    require("data.augment", augment, augment in AUGMENTATIONS, f"one of {', '.join(AUGMENTATIONS)}")
    if name == "synthetic":
        require_int("data.seed", data.get("seed"), 0)
        return
    download = data.get("download")
    require("data.download", download, isinstance(download, bool), "true or false")
    if name == "fashion_mnist" and not download:
        require("data.root", str(root), root is not None and find_fashion_mnist(root) is not None, FASHION_MNIST_HELP)
    elif name in ("cifar10", "cifar100") and not download:
        require("data.root", str(root), root is not None and root.is_dir(), "an existing folder, or data.download=true")


def require_root(data: DictConfig) -> None:
    if OmegaConf.is_missing(data, "root") or not data.get("root"):
        require("data.root", data._get_node("root")._value(), False, LAYOUT)


def fill_experiment(cfg: DictConfig, preset: str | None, swept: Iterable[str] = ()) -> None:
    """A null tracking.experiment named from the data set and the preset (config.default_experiment).
    A sweep (`swept`: the keys it varies) over what that name is made of must name one."""
    if cfg.tracking.get("experiment") is not None:
        return
    varied = [key for key in swept if key in EXPERIMENT_NAMED_FROM]
    require("tracking.experiment", None, not varied,
            f"a name for this sweep, which varies {', '.join(varied)}: its jobs would land in different experiments")
    if cfg.data.get("name") == "imagefolder":
        require_root(cfg.data)
    with open_dict(cfg.tracking):
        cfg.tracking.experiment = default_experiment(cfg.data, preset)


def fill_image_folder(data: DictConfig) -> None:
    """An image folder's settings that are null, read from its files (datafiles.read_image_folder):
    the class count, the image size, the model stem that suits it and, without a val/ folder, a
    tenth of train/ held out for validation. The root is recorded resolved and, as
    `data.fingerprint`, a hash of its images' names and sizes: both are part of the run's
    configuration (a different folder is a different data set)."""
    require_root(data)
    facts = read_image_folder(data.root)
    with open_dict(data):
        data.root, data.fingerprint = str(facts.root), facts.fingerprint
    if data.get("num_classes") is None:
        data.num_classes = len(facts.classes)
    if data.get("image_size") is None:
        data.image_size = facts.image_size
    if data.get("stem") is None and is_int(data.image_size):
        data.stem = stem_for(data.image_size)
    if data.get("val_size") is None and "val" not in facts.images:
        data.val_size = max(1, facts.images["train"] // 10)


def validate_image_folder(data: Mapping[str, Any]) -> None:
    """An image folder's settings, as fill_image_folder left them, against what the folder holds."""
    facts = read_image_folder(data["root"])
    require("data.fingerprint", data.get("fingerprint"), data.get("fingerprint") == facts.fingerprint,
            f"{facts.fingerprint}, the folder's own (the harness writes it)")
    classes = len(facts.classes)
    count = data.get("num_classes")
    require("data.num_classes", count, is_int(count) and count >= classes,
            f"at least the {classes} class folders of train/ (null: their number)")
    require_int("data.image_size", data.get("image_size"), 1)
    stem = data.get("stem")
    require("data.stem", stem, stem in STEMS, f"one of {', '.join(STEMS)} (null: by image size)")
    val = data.get("val_size")
    if "val" in facts.images:
        require("data.val_size", val, val is None, "null: the folder has its own val/ folder")
    else:
        require_int("data.val_size", val, 0)
    require_int("data.split_seed", data.get("split_seed"), 0)
    if data.get("num_workers") is not None:
        require_int("data.num_workers", data.get("num_workers"), 0)
    for key in ("augment", "train_size", "test_size", "download"):  # augmentation follows the image size
        require(f"data.{key}", data.get(key), key not in data, "no such key for imagefolder (nothing reads it)")


def validate_batch_fits(cfg: Mapping[str, Any]) -> None:
    """At least one training batch per process: with none, nothing trains and nothing validates."""
    data = cfg["data"]
    name, batch = data.get("name"), data.get("batch_size")
    val = data["val_size"] or 0  # null: an image folder's own val/ folder
    more = "raise data.train_size"
    if name in (*TRAIN_IMAGES, "imagefolder"):
        total = train_images(data)
        if name == "imagefolder":
            more = "add images to train/" + (" or lower data.val_size" if val else "")
    else:
        total = int(data.get("train_size") or 0) - val
    require("data.val_size", val, total > 0, f"fewer than the {total + val} training images, leaving some to train on")
    trainer = cfg["trainer"]
    devices = trainer.get("devices")
    world = (devices if is_int(devices) and "ddp" in str(trainer.get("strategy", "")) else 1) * int(
        trainer.get("num_nodes") or 1)
    per_process = total // max(1, world)
    where = f"{per_process} images per process" if world > 1 else f"{per_process} images"
    require("data.batch_size", batch, batch <= per_process,
            f"at most the training set's size ({where}): lower data.batch_size or {more}")


def validate_tracking(tracking: Mapping[str, Any]) -> None:
    require_name("tracking.experiment", tracking.get("experiment"))
    for key in ("heartbeat_s", "owner_timeout_s"):
        value = tracking.get(key)
        # The heartbeat thread waits heartbeat_s between beats: the longest wait threading allows.
        ok = is_number(value) and 0 < value <= threading.TIMEOUT_MAX
        require(f"tracking.{key}", value, ok, f"a number of seconds > 0 and at most {threading.TIMEOUT_MAX:.0f}")
    require("tracking.owner_timeout_s", tracking["owner_timeout_s"],
             tracking["owner_timeout_s"] >= 2 * tracking["heartbeat_s"], "at least twice tracking.heartbeat_s")
    for key, value in (tracking.get("http") or {}).items():
        ok = value is None or (is_number(value) and value >= 0)
        require(f"tracking.http.{key}", value, ok, "a number >= 0 (or null for MLflow's default)")


def check_added_keys(overrides: Iterable[str], trainer_arguments: Callable[[], Collection[str]]) -> None:
    """Reject `+key=value` overrides that add a key nothing reads (a typo would otherwise train the
    default config under a new config hash). `trainer_arguments` (training/trainer_keys.py) names
    the Trainer's arguments, asked only for a `+trainer.` override: this module imports no Lightning."""
    for override in overrides:
        if not override.startswith("+"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        section, _, rest = key.partition(".")
        if "/" in key or key.startswith(("hydra.", "model.", "probes.")) or key in (*ADDABLE_KEYS, *CONFIG_GROUPS):
            continue
        if section == "trainer" and rest in trainer_arguments():
            continue
        raise ConfigError(f"{override}: nothing reads key {key!r}: remove it or fix its name (keys that + may add: "
                          f"{', '.join(ADDABLE_KEYS)}, trainer.<lightning.Trainer argument>, model.<model option>)")


def check_output_folder(key: str, path: Any) -> None:
    """An output folder (hydra.run.dir, hydra.sweep.dir) this process can create and write."""
    folder = Path(str(path)).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(path)!r} cannot be created: {existing} is not a writable folder; "
                          f"set {key} to a folder you can write")
    try:  # what Hydra does next, with a traceback; permissions do not tell for /proc and the like
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{key}={str(path)!r} cannot be created ({err.strerror}); set {key} to a folder you "
                          "can write") from None


_new_output_folders: set[str] = set()


def output_folder_was_new(path: Any) -> bool:
    """Whether this launch created the run's output folder (so that bad input may remove it)."""
    return str(Path(str(path)).absolute()) in _new_output_folders


class OutputFolderCheck(Callback):
    """Hydra callback: check the run's output folder before Hydra creates it (with a traceback),
    and note whether it is new: a refused launch removes only a folder it created."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(str(config.hydra.run.dir)).absolute()
        if not folder.exists():
            _new_output_folders.add(str(folder))
        try:
            check_output_folder("hydra.run.dir", config.hydra.run.dir)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None  # SystemExit passes through Hydra's callback runner


def validate_optim(optim: Mapping[str, Any]) -> None:
    """The keys of the `optim` group this optimizer and schedule use; conf/optim/*.yaml holds their
    values (the code has no defaults of its own), so a key missing here is named as None."""
    name = optim.get("name")
    require("optim.name", name, name in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}")
    lr = optim.get("lr")
    require("optim.lr", lr, is_number(lr) and math.isfinite(lr) and lr > 0, "a finite number > 0")
    wd = optim.get("weight_decay")
    require("optim.weight_decay", wd, is_number(wd) and wd >= 0, "a number >= 0")
    if name == "sgd":
        m, nesterov = optim.get("momentum"), optim.get("nesterov")
        require("optim.momentum", m, is_number(m) and 0 <= m < 1, "a number in [0, 1)")
        require("optim.nesterov", nesterov, isinstance(nesterov, bool), "true or false")
    sched = optim.get("scheduler")
    require("optim.scheduler", sched, sched in SCHEDULERS, f"one of {', '.join(SCHEDULERS)}")
    if sched == "multistep":
        ms, gamma = optim.get("milestones"), optim.get("gamma")
        ok = isinstance(ms, (list, tuple)) and all(is_number(f) and 0 < f < 1 for f in ms)
        require("optim.milestones", ms, ok, "a list of fractions of the epochs, each in (0, 1)")
        require("optim.gamma", gamma, is_number(gamma) and 0 < gamma <= 1, "a number in (0, 1]")
    elif sched == "onecycle":
        pct = optim.get("pct_start")
        require("optim.pct_start", pct, is_number(pct) and 0 < pct < 1, "a number in (0, 1)")


def validate_study(cfg: Mapping[str, Any]) -> None:
    """A run of a declared plan: the plan reads, the stage and arm are the plan's, and a
    confirmation run's seed is one of the plan's confirmation seeds."""
    from .plan import STAGES, load_plan

    study = cfg.get("study") or {}
    if study.get("plan") is None:
        for key in ("stage", "arm"):
            require(f"study.{key}", study.get(key), study.get(key) is None, "null without study.plan")
        return
    plan = load_plan(study["plan"])
    stage = study.get("stage")
    require("study.stage", stage, stage in STAGES, " or ".join(STAGES))
    arms = plan.arms[stage]
    require("study.arm", study.get("arm"), study.get("arm") in arms, f"an arm of the plan's {stage} ({', '.join(arms)})")
    seeds = plan.seeds_of(stage, study["arm"])
    require("seed", cfg["seed"], cfg["seed"] in seeds, f"one of the plan's {stage} seeds of this arm {list(seeds)}")


def arm_config(plan: Any, stage: str, arm: str) -> dict[str, Any]:
    """The resolved config (as checked_config gives it) that `arm` of `plan`'s `stage` composes to:
    the plan's recipe, then the arm's overrides, with its first seed (the seed is not part of a
    configuration)."""
    from .config import compose_config

    job = next(j for j in plan.jobs(stage) if j.arm == arm)
    cfg = compose_config(list(job.overrides))
    if cfg.data.get("name") == "imagefolder":
        fill_image_folder(cfg.data)
    return resolved_config(cfg)


def check_arm_config(cfg: Mapping[str, Any]) -> None:
    """A run tagged with a plan's arm has exactly that arm's config (its identity.config_key):
    any other override would pool another configuration into the arm's evidence."""
    from .plan import load_plan

    study = cfg.get("study") or {}
    if study.get("plan") is None:
        return
    expected = arm_config(load_plan(study["plan"]), study["stage"], study["arm"])
    if config_key(cfg) == config_key(expected):
        return
    mine, arms = configuration(flatten(cfg)), configuration(flatten(expected))
    differ = [f"{k}={mine.get(k, '(unset)')} (the arm's: {arms.get(k, '(unset)')})"
              for k in sorted(set(mine) | set(arms)) if mine.get(k) != arms.get(k)]
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    require("study.arm", study["arm"], False, f"a run of that arm's config (config key {config_key(expected)}), but "
            f"this run's differs in {'; '.join(differ[:3])}{more}: drop the overrides the plan does not set, or run "
            "it without study.plan")


def checked_config(cfg: DictConfig, overrides: Iterable[str], trainer_arguments: Callable[[], Collection[str]],
                   preset: str | None = None) -> dict[str, Any]:
    """The job's config as plain data, checked: an image folder's null settings read from its
    files, a null experiment named (fill_experiment; `preset`: the experiment preset chosen), the
    DenseNet knobs folded into the model (config.resolved_config), every value checked.
    Raises ConfigError on the first bad value or `+key` that nothing reads."""
    check_added_keys(overrides, trainer_arguments)
    if cfg.data.get("name") == "imagefolder":
        fill_image_folder(cfg.data)
    fill_experiment(cfg, preset)
    plain = resolved_config(cfg)
    validate_config(plain)
    check_arm_config(plain)
    return plain


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError on the first bad value of a resolved run config."""
    validate_knobs(cfg)
    arch = cfg["model"].get("arch")
    require("model.arch", arch, arch in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}")
    validate_data(cfg["data"])
    classes = cfg["model"].get("num_classes", cfg["data"]["num_classes"])
    require("model.num_classes", classes, classes == cfg["data"]["num_classes"],
            f"data.num_classes ({cfg['data']['num_classes']}), the classes the data has")
    validate_batch_fits(cfg)
    validate_tracking(cfg["tracking"])
    validate_optim(cfg["optim"])
    require_int("trainer.max_epochs", cfg["trainer"].get("max_epochs"), 1)
    if cfg["trainer"].get("max_steps") is not None:  # Lightning's -1: no limit
        require_int("trainer.max_steps", cfg["trainer"]["max_steps"], -1)
        require("trainer.max_steps", cfg["trainer"]["max_steps"], cfg["trainer"]["max_steps"] != 0,
                "-1 (no limit) or an integer >= 1")
    speed = cfg.get("speed", {})
    for key in ("channels_last", "keep_freed_memory", "compile"):
        value = speed.get(key, "auto")
        require(f"speed.{key}", value, value == "auto" or isinstance(value, bool), "auto, true or false")
    if cfg.get("cpu_threads") is not None:
        require_int("cpu_threads", cfg["cpu_threads"], 1)
    if cfg.get("parallel_jobs") is not None:
        require_int("parallel_jobs", cfg["parallel_jobs"], 1)
    validate_study(cfg)
    ls = cfg.get("loss", {}).get("label_smoothing", 0.0)
    require("loss.label_smoothing", ls, is_number(ls) and 0 <= ls < 1, "a number in [0, 1)")

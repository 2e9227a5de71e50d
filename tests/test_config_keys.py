"""Every key of every config file is read by the code (or feeds, by interpolation, a key that is).

Each option of each config group is composed with the defaults for the rest, and the resolved
config is handed, as a dict that logs every key read, to what the harness builds from it before
training: validate_config, apply_knobs, choose_speed, build_model, build_probes, ImageDataModule,
ImageClassifier with its optimizer and schedule, lightning.Trainer's arguments and the tracking
checks. A leaf no code reads fails the test. The `tracking` keys read only once a store is open
(uri, resume, skip_finished, log_checkpoint) are checked by name in the code that opens it.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT
from densenet_exp.training.classifier import ImageClassifier
from densenet_exp.training.data import ImageDataModule, has_validation_split
from densenet_exp.models import build_model
from densenet_exp.probes import build_probes
from densenet_exp.config import apply_knobs
from densenet_exp.training.speed import choose_speed
from densenet_exp.runs.store import bound_http_waits
from densenet_exp.training.trainer_keys import trainer_arguments
from densenet_exp.validate import ConfigError, check_added_keys, fill_experiment, fill_image_folder, validate_config

CONF = ROOT / "conf"
GROUPS = ("model", "data", "trainer", "optim", "probes", "experiment", "hparams_search")
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
# Read by run.train once the store is open (no store here): each must be read by name there.
STORE_PHASE = ("uri", "resume", "skip_finished", "log_checkpoint")


class ReadLog(dict):
    """A config section that records the dotted path of every key read from it (`[]`, `get`, a
    loop over its items or values, and copies such as `dict(x)` or `**x`, which hand every key
    on). Nested sections log into the same set."""

    def __init__(self, data: dict, prefix: str = "", reads: set[str] | None = None) -> None:
        self.prefix, self.reads = prefix, reads if reads is not None else set()
        super().__init__({k: ReadLog(v, f"{prefix}{k}.", self.reads) if isinstance(v, dict) else v
                          for k, v in data.items()})

    def __getitem__(self, key: str) -> Any:
        self.reads.add(self.prefix + str(key))
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def items(self):  # a loop over the items uses every value
        return [(key, self[key]) for key in self.keys()]

    def values(self):
        return [self[key] for key in self.keys()]

    def __iter__(self):  # a subclass's own __iter__ makes dict(x) and **x go through __getitem__
        return super().__iter__()


def leaves(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        out |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key}
    return out


def interpolated(node: Any) -> set[str]:
    """The keys another key of the unresolved config refers to, as `${data.channels}`."""
    text = OmegaConf.to_yaml(node, resolve=False)
    return set(re.findall(r"\$\{([a-zA-Z_][\w.]*)\}", text))


def compose_option(group: str | None, option: str | None, tmp_path, *extra: str) -> tuple[dict, set[str]]:
    overrides = [f"{group}={option}", *extra] if group else list(extra)
    if option == "imagefolder":
        from PIL import Image

        for split in ("train", "val"):
            for label in ("a", "b"):
                (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
                for i in range(2):
                    Image.new("RGB", (8, 8)).save(tmp_path / split / label / f"{i}.png")
        overrides += [f"data.root={tmp_path}", "data.batch_size=2"]
    if option == "gpu" and not torch.cuda.is_available():
        overrides.append("trainer.accelerator=cpu")  # the other keys of trainer=gpu still go to the Trainer
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if option == "imagefolder":
        fill_image_folder(cfg.data)  # what the folder says: class count, image size, stem, fingerprint
    fill_experiment(cfg, option if group == "experiment" else None)  # a null experiment, named as a job names it
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    if plain["data"]["name"] in ("cifar10", "cifar100"):
        plain["data"]["root"] = str(tmp_path)  # an existing folder stands in for the data set's
    return plain, interpolated(cfg)


def unread_keys(plain: dict, refs: set[str]) -> set[str]:
    """Hand `plain` (a resolved config) to what run.train builds from it; return the leaves that
    nothing read and no interpolation refers to."""
    cfg = ReadLog(plain)
    apply_knobs(cfg)
    validate_config(cfg)
    speed = choose_speed(cfg)
    build_probes(cfg["probes"])
    with torch.device("meta"):  # the model's shapes without its weights: fast for the ImageNet presets
        model = build_model(cfg["model"])
    module = ImageClassifier(model, num_classes=cfg["data"]["num_classes"], optim=cfg["optim"],
                             label_smoothing=cfg["loss"]["label_smoothing"], channels_last=speed.channels_last,
                             compile=cfg["speed"]["compile"])
    # The optimizer and its schedule, as Lightning asks for them, with a stand-in for the trainer.
    module._trainer = SimpleNamespace(max_epochs=cfg["trainer"]["max_epochs"], estimated_stepping_batches=10)
    module.configure_optimizers()
    ImageDataModule(cfg["data"], seed=cfg["seed"])
    has_validation_split(cfg["data"])
    L.Trainer(**cfg["trainer"], logger=False, enable_checkpointing=False)
    tracking = cfg["tracking"]
    bound_http_waits(tracking["http"])
    source = "\n".join(p.read_text() for p in (ROOT / "densenet_exp").rglob("*.py"))
    for key in STORE_PHASE:
        if re.search(rf"(tracking|\[\"tracking\"\])\[\"{key}\"\]", source):
            tracking[key]  # noqa: B018 (read by name where the store is open)
    return {leaf for leaf in leaves(plain) if leaf not in cfg.reads | refs}


def own_keys(group: str, option: str) -> set[str]:
    """The leaves a config file sets: under its group's package, or where it says (`@package _global_`)."""
    data = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
    data.pop("defaults", None)
    data.pop("hydra", None)
    is_global = "@package _global_" in (CONF / group / f"{option}.yaml").read_text()
    return leaves(data) if is_global else {f"{group}.{leaf}" for leaf in leaves(data)}


@pytest.fixture(autouse=True)
def _restore_http_env(monkeypatch):
    for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "BACKOFF_JITTER", "TIMEOUT"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)


def test_every_key_of_the_entry_config_is_read(tmp_path):
    plain, refs = compose_option(None, None, tmp_path)
    assert unread_keys(plain, refs) == set()


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_key_of_every_config_option_is_read(group, option, tmp_path):
    """Each file of each group, with the defaults for the rest: none of the keys it sets goes unread
    (a key such as data.stem, read by the models that have a stem, is judged with the default model)."""
    plain, refs = compose_option(group, option, tmp_path)
    assert unread_keys(plain, refs) & own_keys(group, option) == set()


def test_the_check_finds_a_key_that_nothing_reads(tmp_path):
    plain, refs = compose_option("experiment", "smoke", tmp_path, "+data.colour=red", "+optim.beta=0.5")
    assert unread_keys(plain, refs) == {"data.colour", "optim.beta"}


def test_only_keys_that_something_reads_may_be_added():
    check_added_keys(["+trainer.gradient_clip_val=1.0", "+data.download=true", "+model.drop_rate=0.1", "seed=1"],
                     trainer_arguments)
    with pytest.raises(ConfigError, match=r"\+\+trainer.not_an_argument=1: nothing reads"):
        check_added_keys(["++trainer.not_an_argument=1"], trainer_arguments)


def flat_keys(plain: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in plain.items():
        out |= flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return out


@pytest.mark.parametrize("group, option", [(None, None), *OPTIONS], ids=["entry", *(f"{g}={o}" for g, o in OPTIONS)])
def test_every_config_key_has_one_identity_class(group, option, tmp_path):
    """identity.KEY_CLASSES classifies every key of every config option (architecture, recipe, data,
    seed or bookkeeping): a new key without a class fails here, before it is silently hashed."""
    from densenet_exp.identity import key_class

    plain, _ = compose_option(group, option, tmp_path)
    assert {k for k in flat_keys(plain) if key_class(k) is None} == set()


def test_runs_that_differ_only_in_compile_or_precision_are_two_configurations():
    from densenet_exp.identity import config_key

    base = {"model.name": "resnet20", "optim.lr": "0.1", "trainer.precision": "bf16-mixed", "speed.compile": "True",
            "seed": "1", "speed.channels_last": "True", "tracking.experiment": "x"}
    assert config_key({**base, "speed.compile": "False"}) != config_key(base)
    assert config_key({**base, "trainer.precision": "32-true"}) != config_key(base)
    # ...while the seed, the store and a speed switch that keeps the numbers are not the configuration.
    assert config_key({**base, "seed": "2", "tracking.experiment": "y", "speed.channels_last": "False"}) == \
        config_key(base)

"""Config composition: every preset composes, validates and builds; the top-level knobs steer
DenseNets only; helpers that name runs and hash configs behave."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import ROOT
from densenet_exp.job import variant_name
from densenet_exp.config import apply_knobs
from densenet_exp.models import DenseNet, build_model
from densenet_exp.run import ddp_rank_argv
from densenet_exp.config import flatten
from densenet_exp.identity import config_hash
from densenet_exp.validate import ConfigError, fill_experiment, validate_config

MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def composed(*overrides: str) -> dict:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    fill_experiment(cfg, None)  # as a job names a run's null experiment (validate.checked_config)
    plain = OmegaConf.to_container(cfg, resolve=True)
    apply_knobs(plain)
    return plain


@pytest.mark.parametrize("model", MODELS)
def test_every_model_preset_composes_and_builds(model):
    cfg = composed(f"model={model}")
    validate_config(cfg)
    net = build_model(cfg["model"])
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last.out_features == 10
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1  # grayscale data, no resizing
    if sum(p.numel() for p in net.parameters()) < 2_000_000:  # the ImageNet-size presets are too slow here
        assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = composed(f"experiment={experiment}")
    assert cfg["tracking"]["experiment"] == experiment
    assert cfg["model"]["arch"]


def test_knobs_override_the_preset_and_are_recorded():
    cfg = composed("model=densenet121", "growth_rate=12", "bottleneck=false")
    assert cfg["model"]["growth_rate"] == 12 and cfg["model"]["bottleneck"] is False
    assert cfg["compression"] == 0.5  # null knob: the preset's value is recorded
    assert variant_name(cfg) == "densenet121-k12-c0.5"
    assert variant_name(composed("model=densenet_bc100_k12")) == "densenet_bc100_k12-k12-c0.5-B"
    resnet = composed("model=resnet18", "growth_rate=12")
    assert resnet["growth_rate"] is None and "growth_rate" not in resnet["model"]
    assert variant_name(resnet) == "resnet18"


def test_ablation_experiment_sweeps_the_grid():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=ablation"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    grid = 1
    for values in params.values():
        grid *= len(str(values).split(","))
    assert grid == 3 * 2 * 2 * 3


def test_config_hash_ignores_tracking_but_not_knobs():
    cfg = composed("experiment=smoke")
    same = composed("experiment=smoke", "tracking.experiment=other")
    other = composed("experiment=smoke", "growth_rate=8")
    assert config_hash(cfg) == config_hash(same) != config_hash(other)


def test_config_hash_leaves_out_how_the_machine_runs_a_job_but_keeps_its_seed_and_probes():
    """A study resumed with another --jobs (other threads), or on a machine with more cores, finds
    its run; a run of another seed or other probes is another run."""
    cfg = composed("experiment=smoke", "cpu_threads=2", "parallel_jobs=1")
    machine = composed("experiment=smoke", "cpu_threads=1", "parallel_jobs=2", "data.num_workers=1")
    assert config_hash(cfg) == config_hash(machine)
    for other in (["seed=5"], ["probes=none"], ["trainer.max_epochs=7"]):
        assert config_hash(composed("experiment=smoke", "cpu_threads=2", "parallel_jobs=1", *other)) != config_hash(cfg)


def test_the_older_hash_is_the_one_committed_runs_carry():
    """older_config_hash must reproduce the tag of every run logged before the machine keys left
    the hash, or a run killed under older code would not resume."""
    import gzip
    import json

    import yaml

    from densenet_exp.identity import older_config_hash

    rows = [json.loads(line) for line in gzip.open(ROOT / "docs/results/fmnist_pair/runs.jsonl.gz", "rt")]
    assert rows
    for row in rows:
        cfg = yaml.safe_load(row["artifacts"]["config.yaml"])
        assert older_config_hash(cfg) == row["tags"]["config_hash"] != config_hash(cfg)


def test_the_configuration_key_leaves_out_the_seed_and_bookkeeping_but_nothing_that_shapes_the_model():
    from densenet_exp.identity import config_key

    base = composed("experiment=smoke")
    same = [composed("experiment=smoke", *o) for o in (["seed=4"], ["tracking.experiment=other"], ["cpu_threads=1"],
                                                        ["probes=none"], ["data.root=/elsewhere/fashion-mnist"])]
    differ = [composed("experiment=smoke", *o) for o in (["model.block_config=[4,4]"], ["optim.lr=0.01"],
                                                          ["data.val_size=64"], ["trainer.max_epochs=3"])]
    assert {config_key(c) for c in same} == {config_key(base)}
    assert len({config_key(c) for c in differ} | {config_key(base)}) == len(differ) + 1
    # A run's logged params (values as MLflow stores them) give the same key as its config.
    params = {k: str(v) for k, v in flatten(base).items()}
    assert config_key(params) == config_key(base)


def test_flatten_nests_keys_with_dots():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": None}


def test_validation_names_key_value_and_allowed():
    cfg = composed("experiment=smoke")
    cfg["optim"]["scheduler"] = "sometimes"
    with pytest.raises(ConfigError, match=r"optim.scheduler='sometimes' is invalid: expected one of constant"):
        validate_config(cfg)


@pytest.mark.parametrize("knob, bad", [("growth_rate", 0), ("compression", 1.5), ("bottleneck", "yes")])
def test_bad_knob_reads_the_same_from_the_config_and_from_the_model(knob, bad):
    cfg = composed("experiment=smoke", f"{knob}={bad}")
    with pytest.raises(ConfigError) as from_config:
        validate_config(cfg)
    with pytest.raises(ValueError) as from_library:
        DenseNet(**{knob: bad})
    message = str(from_config.value)
    assert message == str(from_library.value)
    assert message.startswith(f"{knob}={bad!r} is invalid: expected ") and "\n" not in message


def test_the_invalid_value_message_is_written_once():
    """Every "is invalid" line of the package comes from densenet_exp.checks.require."""
    hits = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "densenet_exp").rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if "is invalid: expected" in line]
    assert len(hits) == 1 and hits[0].startswith("densenet_exp/checks.py:"), hits


def test_ddp_ranks_rerun_only_their_own_job():
    argv = ["run.py", "-m", "growth_rate=12,32", "hydra.run.dir=x"]
    job = json.dumps(["growth_rate=32", "hydra.run.dir=/out/1"])
    assert ddp_rank_argv(argv, {}) == argv
    assert ddp_rank_argv(argv, {"LOCAL_RANK": "0", "DENSENET_EXP_JOB_ARGS": job}) == argv
    child = ddp_rank_argv(argv, {"LOCAL_RANK": "1", "DENSENET_EXP_JOB_ARGS": job})
    assert "-m" not in child and "growth_rate=32" in child and "hydra.run.dir=/out/1" in child


def test_optuna_search_space_parses_into_distributions():
    import optuna
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from densenet_exp.search import distribution

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.densenet_exp_search.OptunaSweeper"
    parser = OverridesParser.create()
    dists = {o.get_key_element(): distribution(o) for o in parser.parse_overrides(
        [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])}
    assert dists["growth_rate"] == optuna.distributions.CategoricalDistribution([8, 12, 16, 24, 32])
    assert dists["compression"] == optuna.distributions.FloatDistribution(0.25, 1.0)
    assert dists["optim.lr"] == optuna.distributions.FloatDistribution(0.01, 0.5, log=True)
    (plain,) = parser.parse_overrides(["x=growth_rate"])
    with pytest.raises(ValueError, match="hydra.sweeper.params.x"):
        distribution(plain)


def test_a_search_composes_with_an_experiment_and_keeps_its_study_beside_the_run_store(tmp_path):
    import optuna

    from densenet_exp.search import OptunaSweeper, launched, storage_url, study_name

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        plain = compose("config", overrides=["experiment=smoke"])
        searched = compose("config", overrides=["experiment=smoke", "hparams_search=optuna"])
    for key in ("model", "trainer", "optim", "tracking"):  # the experiment's, not replaced by the preset
        assert searched[key] == plain[key], key
    # A value fixed on the command line takes its key out of the search space.
    sweeper = OptunaSweeper(params={"growth_rate": "choice(8, 12)", "compression": "interval(0.25, 1.0)"})
    space, fixed = sweeper.search_space(["experiment=smoke", "growth_rate=12", "optim.lr=interval(0.01, 0.1)"])
    assert set(space) == {"compression", "optim.lr"} and fixed == ["experiment=smoke", "growth_rate=12"]
    # The same command finds the same study; another search space is another study.
    assert study_name("smoke", space, fixed) == study_name("smoke", dict(reversed(space.items())), fixed[::-1])
    assert study_name("smoke", space, fixed) != study_name("smoke", space, [*fixed, "seed=3"])
    assert storage_url(None, f"sqlite:///{tmp_path}/mlflow.db") == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    assert storage_url("postgresql://db/optuna", "http://127.0.0.1:5000") == "postgresql://db/optuna"
    with pytest.raises(ConfigError, match="hydra.sweeper.storage=None is invalid: expected an Optuna storage URL"):
        storage_url(None, "http://127.0.0.1:5000")
    # Floats are launched rounded (names read compression 0.734), never outside their bounds.
    dist = optuna.distributions.FloatDistribution(0.25, 1.0)
    assert launched(0.7344205847999921, dist) == 0.734 and launched(0.99996, dist) == 1.0
    assert launched(0.2500001, optuna.distributions.FloatDistribution(0.25001, 1.0)) == 0.25001
    assert launched(12, optuna.distributions.CategoricalDistribution([8, 12])) == 12


def test_slurm_launcher_defaults(monkeypatch):
    monkeypatch.setenv("SLURM_PARTITION", "gpu-a100")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu-a100" and launcher.tasks_per_node == 4 and launcher.timeout_min == 240
    # Jobs run on other machines: checked here, skipped (if FINISHED) on their node; warned before the limit.
    assert not launcher.jobs_run_here and launcher.additional_parameters.signal == "USR1@120"


def test_slurm_local_launcher_asks_for_one_cpu_no_gpu_and_a_warning_before_the_limit():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm_local"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.densenet_exp_slurm.SlurmLauncher" and launcher.jobs_run_here
    assert (launcher.partition, launcher.cpus_per_task, launcher.gpus_per_node) == ("local", 1, None)
    assert launcher.additional_parameters.signal == "USR1@60" and launcher.stderr_to_stdout


def test_the_light_option_lists_name_what_the_code_builds():
    """validate.py checks names against options.py (torch-free); the builders must agree with it."""
    from densenet_exp.training import classifier
    from densenet_exp import models, options

    assert options.ARCHITECTURES == tuple(models.ARCHITECTURES)
    assert options.OPTIMIZERS == tuple(classifier.OPTIMIZERS)

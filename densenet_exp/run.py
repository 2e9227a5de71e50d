"""Train one configuration, or sweep many with `-m`, tracked in MLflow.

    python -m densenet_exp.run                                    # one run, embedded defaults
    python -m densenet_exp.run experiment=quickstart              # what `make run` runs
    python -m densenet_exp.run -m experiment=smoke growth_rate=12,32

Order of work in a job: compose and validate the config (bad input stops here, before any run
exists), build model and data, check the store, close runs whose owner is gone, then resume or
create this job's run by the ownership rule (densenet_exp/ownership.py), train, test, close it.

Exit codes: 0 done; 1 a failure (a sweep: some job failed); 2 bad input; 3 refused, a run of
this config has a live owner; 75 the tracking server stayed unreachable; 130 / 143 stopped by
Ctrl-C / SIGTERM (the run is KILLED and the same command resumes it).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from omegaconf import DictConfig, OmegaConf

from . import stopping
from .checkpoints import LastCheckpoint
from .console import job_label, record_job, swept_labels
from .claim import CLAIM_ENV, choose_run
from .classifier import ImageClassifier
from .data import ImageDataModule, has_validation_split
from .models import DENSENET_KNOBS, build_model, is_densenet
from .ownership import Busy, Heartbeat, OwnerLock, close_orphans
from .probes import build_probes
from .progress import job_callbacks
from .run_logger import RunLogger
from .speed import choose_speed, keep_freed_memory
from .store import StoreConfigError, StoreUnreachable, bound_http_waits, prepare_store, unreachable
from .tracking import (
    UNSENT_FILE,
    adopt_into_sweep,
    close_run,
    config_hash,
    ensure_experiment,
    find_finished_run,
    flatten,
    git_state,
    parent_run_id,
    record_failed_job,
    resolved_config,
    retry_locked,
    runs_of_config,
    system_facts,
    tracking_uri,
)
from .validate import ConfigError, check_added_keys, output_folder_was_new, validate_config

log = logging.getLogger("densenet_exp")

# Third-party notices that say nothing about the run: an advert, a deprecation inside Lightning,
# and a hint about per-step logging, which the harness does not do.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging interval")
# The checkpoint folder holds the owner's lock file (ownership.py); stale checkpoints are set aside.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
JOB_ARGS_ENV = "DENSENET_EXP_JOB_ARGS"
EXIT_BAD_INPUT, EXIT_BUSY, EXIT_STORE_DOWN = 2, 3, 75


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


def variant_name(cfg: dict[str, Any], swept: list[str] | tuple[str, ...] = ()) -> str:
    """`densenet121-k12-c0.5-B`: the model and the knobs it was trained with, then the labels of
    any other knobs its sweep varies (`swept`, e.g. ["lr0.05"])."""
    name = cfg["model"].get("name") or cfg["model"]["arch"]
    if cfg.get("growth_rate") is not None:
        name += f"-k{cfg['growth_rate']}-c{float(cfg['compression']):g}" + ("-B" if cfg["bottleneck"] else "")
    return "-".join([name, *swept])


def run_name(variant: str, cfg: dict[str, Any]) -> str:
    """`densenet121-k12-c0.5-B-s0`: the variant and the seed, so repeats differ in MLflow's table."""
    return f"{variant}-s{cfg['seed']}"


def parallel_jobs(hc: Any) -> int:
    """How many jobs of this sweep run side by side on this machine: a joblib launcher's n_jobs
    (-1 or less: one per core), else 1."""
    launcher = hc.get("launcher") or {}
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return 1
    jobs = int(launcher.get("n_jobs") or 1)
    return (os.cpu_count() or 1) if jobs < 1 else jobs


def cpu_threads(configured: int | None, hc: Any) -> int | None:
    """Torch threads for this job: the configured number, else a share of the cores when jobs run
    side by side (two jobs of two threads each on two cores stall each other badly), else torch's
    default (None)."""
    if configured:
        return int(configured)
    jobs = parallel_jobs(hc)
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def create_run(
    client: MlflowClient, experiment_id: str, plain: dict[str, Any], hc: Any, root: Path, lock: OwnerLock
) -> str:
    """A new MLflow run for this job, tagged with its variant, config hash, overrides, output
    folder, git state, owner and, in a sweep, its parent run."""
    variant = variant_name(plain, swept_labels(hc))
    out_dir = Path(hc.runtime.output_dir).resolve()
    ckpt_dir = lock.path.parent
    tags = {
        MLFLOW_RUN_NAME: run_name(variant, plain),
        "variant": variant,
        "config_hash": config_hash(plain),
        # Jobs that shared the cores while timing must not be compared with jobs that had them alone.
        "parallel_jobs": str(parallel_jobs(hc)),
        "seed": str(plain["seed"]),
        "overrides": " ".join(hc.overrides.task),
        "output_dir": str(out_dir),
        "checkpoint_dir": str(ckpt_dir),
        **git_state(root),
        **lock.tags(),
    }
    if hc.mode == RunMode.MULTIRUN:
        tags.update({"sweep_job": str(hc.job.num), "sweep_dir": str(Path(hc.sweep.dir).resolve())})
        parent = parent_run_id(Path(hc.sweep.dir))
        if parent:
            tags.update({MLFLOW_PARENT_RUN_ID: parent, "sweep_id": parent})
    run = retry_locked(lambda: client.create_run(experiment_id, tags=tags))
    return run.info.run_id


def record_new_run(
    client: MlflowClient, run_id: str, logger: RunLogger, trainer: L.Trainer, plain: dict, tags: dict[str, str]
) -> None:
    """What a new run records before training: system facts and `tags`, flattened params, config YAML."""
    facts = {**system_facts(str(trainer.strategy.root_device)), **tags}
    retry_locked(lambda: client.log_batch(run_id, tags=[RunTag(k, v) for k, v in facts.items()]))
    logger.log_hyperparams(flatten(plain))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(OmegaConf.to_yaml(plain))
        client.log_artifact(run_id, str(path))


def resume_command() -> str:
    return shlex.join(["python", "-m", "densenet_exp.run", *sys.argv[1:]])


def skipped(client: MlflowClient, plain: dict[str, Any], finished: Any, hc: Any) -> dict[str, Any]:
    """A sweep job whose config already has a FINISHED run: report that run, train nothing, and
    count it as a job of this sweep if its own sweep never finished."""
    adopt_into_sweep(client, finished, Path(hc.sweep.dir), hc.job.num, finished=True)
    metrics = finished.data.metrics
    log.info(f"{variant_name(plain)}: skipped, already FINISHED as MLflow run {finished.info.run_id} "
             f"(test accuracy {metrics.get('test/acc', float('nan')):.4f}); tracking.skip_finished=false trains it "
             "again")
    return {"variant": variant_name(plain), "test_acc": metrics.get("test/acc"), "val_acc": metrics.get("val/acc"),
            "run_id": finished.info.run_id}


def train(cfg: DictConfig, hc: Any) -> dict[str, Any]:
    """Run one job of the harness; returns its summary."""
    # Lightning's package gives itself a console handler; Hydra's (terminal and run.log) already
    # take its lines, which would otherwise print twice.
    logging.getLogger("lightning").handlers.clear()
    started = time.perf_counter()
    stopping.raise_if_stopped()  # Ctrl-C between two jobs of a sweep
    root = Path(hc.runtime.cwd)
    plain = resolved_config(cfg)
    apply_knobs(plain)
    validate_config(plain)
    check_added_keys(hc.overrides.task)
    speed = choose_speed(plain)  # resolves trainer.accelerator/precision/deterministic `auto` in plain
    variant = variant_name(plain, swept_labels(hc))
    L.seed_everything(plain["seed"], workers=True, verbose=False)
    threads = cpu_threads(plain.get("cpu_threads"), hc)
    if threads:
        torch.set_num_threads(threads)
    freed = keep_freed_memory(speed.keep_freed_memory)
    try:
        probes = build_probes(plain.get("probes"))
        model = build_model(plain["model"])
    except ValueError as err:
        raise ConfigError(str(err)) from err
    module = ImageClassifier(
        model,
        num_classes=plain["data"]["num_classes"],
        optim=plain["optim"],
        label_smoothing=plain["loss"]["label_smoothing"],
        channels_last=speed.channels_last,
        compile=plain["speed"]["compile"],
    )
    datamodule = ImageDataModule(plain["data"], seed=plain["seed"])
    # Lightning starts DDP ranks > 0 by re-running this command: tell them which job to run.
    os.environ[JOB_ARGS_ENV] = json.dumps([*hc.overrides.task, f"hydra.run.dir={hc.runtime.output_dir}"])

    tracking = plain["tracking"]
    uri = tracking_uri(tracking["uri"], root)
    bound_http_waits(tracking["http"])
    prepare_store(uri, "tracking.uri" if tracking["uri"] else "MLFLOW_TRACKING_URI")
    client = MlflowClient(uri)
    chief = rank_zero_only.rank == 0  # only rank 0 writes to MLflow
    experiment_id = ensure_experiment(client, tracking["experiment"])
    if chief:
        close_orphans(client, experiment_id, tracking["owner_timeout_s"])
    previous = runs_of_config(client, experiment_id, config_hash(plain))
    finished = find_finished_run(previous)
    if hc.mode == RunMode.MULTIRUN and tracking["skip_finished"] and finished is not None:
        record_job(hc, finished.info.run_id, skipped=True)
        return skipped(client, plain, finished, hc)
    claimed = choose_run(client, experiment_id, previous, plain, hc, chief,
                         create=lambda lock: create_run(client, experiment_id, plain, hc, root, lock))
    run_id, ckpt_dir = claimed.run_id, claimed.ckpt_dir
    if chief:
        record_job(hc, run_id)
    os.environ[CLAIM_ENV] = claimed.to_env()
    unsent = Path(hc.runtime.output_dir) / UNSENT_FILE
    logger = RunLogger(experiment_name=tracking["experiment"], tracking_uri=uri, run_id=run_id, unsent=unsent)
    heartbeat = Heartbeat(client, run_id, tracking["heartbeat_s"]) if chief else None
    trainer: L.Trainer | None = None
    error: BaseException | None = None
    try:
        if chief and claimed.resumed:
            logger.load_history(client)  # an epoch redone after a kill is not logged twice
        # Without a validation split (data.val_size=0, e.g. the paper's final runs on all 50k
        # images) nothing validates: only the last checkpoint is kept, and the test, as always,
        # runs on the last epoch's weights.
        validated = has_validation_split(plain["data"])
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch}", monitor="val/acc" if validated else None,
                                     mode="max", save_top_k=1 if validated else 0, save_last=False)
        about = f"{run_name(variant, plain)}: MLflow run {run_id} in experiment {tracking['experiment']!r}"
        choices = {"channels_last": speed.channels_last, "keep_freed_memory": freed}
        trainer = L.Trainer(
            **plain["trainer"], **({} if validated else {"limit_val_batches": 0}), logger=logger,
            use_distributed_sampler=False,
            callbacks=[checkpoint, LastCheckpoint(ckpt_dir), stopping.StopAtNextStep(), *probes,
                       *job_callbacks(plain, job_label(hc), about, choices)],
            default_root_dir=hc.runtime.output_dir,  # where Lightning's SLURM requeue writes its checkpoint
        )
        if chief and not claimed.recorded:
            record_new_run(client, run_id, logger, trainer, plain, speed.tags())
        trainer.fit(module, datamodule=datamodule, ckpt_path=claimed.ckpt_path, weights_only=True)
        # test() resets callback_metrics
        val_acc = float(trainer.callback_metrics["val/acc"]) if validated else None
        results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        kept = checkpoint.best_model_path or str(ckpt_dir / "last.ckpt")  # last: no validation split
        if chief and tracking["log_checkpoint"] and Path(kept).is_file():
            client.log_artifact(run_id, kept, "checkpoints")
    except BaseException as err:
        error = err
        if unreachable(err) and not isinstance(err, StoreUnreachable):
            raise StoreUnreachable(uri, unsent) from err
        raise stopping.as_stopped(err) or err
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if chief:
            where = f" at epoch {trainer.current_epoch}, step {trainer.global_step}" if trainer is not None else ""
            close_run(client, run_id, error, unsent, where)
            if error is not None and stopping.as_stopped(error):
                print(f"{stopping.as_stopped(error).reason}{where}: MLflow run {run_id} is KILLED; resume it with: "
                      f"{resume_command()}", file=sys.stderr, flush=True)
        if claimed.lock is not None:
            claimed.lock.release()
    summary = {
        "variant": variant,
        "test_acc": float(results["test/acc"]),
        "val_acc": val_acc,
        "params": sum(p.numel() for p in model.parameters()),
        "wall_s": time.perf_counter() - started,
        "run_id": run_id,
    }
    if chief:
        log.info(
            f"{run_name(variant, plain)}: test accuracy {summary['test_acc']:.4f}, {summary['params'] / 1e6:.3f}M "
            f"parameters, {summary['wall_s']:.1f} s, MLflow run {run_id}"
        )
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the final validation accuracy: the objective of a hyperparameter search."""
    hc = HydraConfig.get()
    stopping.install()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        return train(cfg, hc)["val_acc"]
    except StoreUnreachable as err:
        # The rest of a sweep would wait on the same server: stop here, with one line.
        if multirun:
            record_failed_job(Path(hc.sweep.dir), hc.job.num, list(hc.overrides.task), err)
        print(f"error: {err.advice()}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STORE_DOWN)
    except Exception as err:
        if multirun:
            # One failed job must not stop the sweep; SweepParentRun reports it at the end.
            record_failed_job(Path(hc.sweep.dir), hc.job.num, list(hc.overrides.task), err)
            log.error("job #%s failed: %s: %s", hc.job.num, type(err).__name__, err)
            return None
        if isinstance(err, ConfigError | StoreConfigError | Busy):
            # Nothing was created but Hydra's output folder: remove it (if this launch made it).
            if output_folder_was_new(hc.runtime.output_dir):
                shutil.rmtree(hc.runtime.output_dir, ignore_errors=True)
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BUSY if isinstance(err, Busy) else EXIT_BAD_INPUT)
        raise


def ddp_rank_argv(argv: list[str], env: dict[str, str]) -> list[str]:
    """Lightning re-runs the command line for DDP ranks > 0. Under `-m` that would start the whole
    sweep again in each rank (a known Hydra and Lightning pitfall), so such a rank runs only
    the job that started it, in that job's output folder."""
    job_args = env.get(JOB_ARGS_ENV)
    if job_args is None or env.get("LOCAL_RANK", "0") == "0":
        return argv
    return [argv[0], *json.loads(job_args), "hydra.output_subdir=null", f"hydra.job.name=rank{env['LOCAL_RANK']}"]


if __name__ == "__main__":
    sys.argv = ddp_rank_argv(sys.argv, dict(os.environ))
    main()

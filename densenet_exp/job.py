"""One job of the harness, in the order it happens:

1. `compose`   resolve the config, fold in the DenseNet knobs, check every value (bad input stops
               here, before any run exists) and choose the speed settings;
2. `build`     seed, threads and allocator, then model, Lightning module, data and probes;
3. `open_run`  check the store, close runs whose owner is gone, then skip (a FINISHED twin in a
               sweep), resume (a KILLED run) or create this job's MLflow run by the ownership rule
               (ownership.py, claim.py);
4. `fit_and_test`  train, select on validation data, test once;
5. `close`     mark the run FINISHED, FAILED or KILLED, release its owner lock, print how to
               resume after a stop.

`run.py` is the Hydra entry point that calls `train` and turns its errors into exit codes.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from omegaconf import DictConfig, OmegaConf, open_dict

from . import record
from .runs import stopping
from .runs.checkpoints import LastCheckpoint, prune_best
from .runs.claim import CLAIM_ENV, RunClaim, choose_run
from .training.classifier import ImageClassifier
from .runs.console import job_label, jobs_after, resume_command, swept_labels
from .training.data import ImageDataModule, choose_loading, has_validation_split, usable_cores
from .config import default_experiment, flatten
from .identity import config_hash, config_key, older_config_hash
from .models import build_model
from .runs.ownership import Heartbeat, OwnerLock, close_orphans
from .plan import load_plan
from .probes import build_probes
from .training.progress import job_callbacks
from .runs.run_logger import RunLogger
from .training.trainer_keys import trainer_arguments
from .training.speed import Speed, choose_speed, keep_freed_memory
from .runs.store import StoreUnreachable, bound_http_waits, prepare_store, retry_locked, tracking_uri, unreachable
from .runs.sweep_folder import parent_run_id, record_job
from .runs.tracking import (
    UNSENT_FILE,
    adopt_into_sweep,
    close_run,
    ensure_experiment,
    find_finished_run,
    git_state,
    runs_of_config,
    system_facts,
)
from .validate import ConfigError, checked_config

log = logging.getLogger("densenet_exp")


# -- names -----------------------------------------------------------------------------------

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


def joblib_launcher(hc: Any) -> Any:
    """The job's launcher config where it is hydra-joblib-launcher's (cpu_parallel, gpu_shared), else None."""
    launcher = hc.get("launcher") or {}
    return launcher if "joblib" in str(launcher.get("_target_", "")).lower() else None


def parallel_jobs(hc: Any, configured: int | None = None) -> int:
    """How many jobs run side by side on this machine: the configured number (`parallel_jobs`, as
    the study runner sets it), else a joblib launcher's n_jobs (-1 or less: one per core), else 1."""
    if configured:
        return int(configured)
    launcher = joblib_launcher(hc)
    if launcher is None:
        return 1
    jobs = int(launcher.get("n_jobs") or 1)
    return usable_cores() if jobs < 1 else jobs


def in_joblib_worker(hc: Any) -> bool:
    """Whether the job runs in a worker process of joblib's default backend, loky (not in threads)."""
    launcher = joblib_launcher(hc)
    return launcher is not None and launcher.get("backend") in (None, "loky") and launcher.get("prefer") != "threads"


def job_cores(hc: Any, jobs_configured: int | None = None) -> int:
    """The cores this job may use: a SLURM job's allocation, else this process's, shared among the
    jobs that run side by side. A SLURM job gets the cores it asked for, but torch counts the
    node's: where nothing binds the job to its cores (task/none, as on tools/slurm-local), its
    threads and loader processes would take them all."""
    allocated = os.environ.get("SLURM_CPUS_PER_TASK")
    return max(1, int(allocated or usable_cores()) // parallel_jobs(hc, jobs_configured))


def cpu_threads(configured: int | None, hc: Any, jobs_configured: int | None = None) -> int | None:
    """Torch threads for this job: the configured number, else its share of the cores when jobs run
    side by side (two jobs of two threads each on two cores stall each other badly) or under SLURM
    (job_cores), else torch's default (None)."""
    if configured:
        return int(configured)
    if parallel_jobs(hc, jobs_configured) > 1 or os.environ.get("SLURM_CPUS_PER_TASK"):
        return job_cores(hc, jobs_configured)
    return None


def study_tags(study: dict[str, Any]) -> dict[str, str]:
    """The plan, its hash when the run started, the stage and the arm of a run of a declared study."""
    if study.get("plan") is None:
        return {}
    plan = load_plan(study["plan"])
    return {record.STUDY_PLAN: plan.name, record.STUDY_PLAN_HASH: plan.hash, record.STUDY_STAGE: study["stage"],
            record.STUDY_ARM: study["arm"]}


# -- 1. compose ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One job as compose works it out, once, and hands it down: the checked config as plain data,
    its speed settings, variant name (read from the sweep's plan) and config hash, and Hydra's
    runtime facts (`hc`: overrides, mode, output and sweep folders, job number)."""

    plain: dict[str, Any]
    speed: Speed
    variant: str
    config_hash: str
    older_hash: str  # identity.older_config_hash: finds a run killed before the hash left out threads
    hc: Any


def compose(cfg: DictConfig, hc: Any) -> Job:
    """The job's config as plain data, checked, with its `auto` speed settings resolved, its
    variant name and its config hash."""
    plain = checked_config(cfg, hc.overrides.task, trainer_arguments, hc.runtime.choices.get("experiment"))
    speed = choose_speed(plain)  # resolves trainer.accelerator/precision/deterministic `auto` in plain
    return Job(plain, speed, variant_name(plain, swept_labels(hc)), config_hash(plain),
               older_config_hash(plain), hc)


# -- 2. build --------------------------------------------------------------------------------

@dataclass
class Built:
    """What the job trains, on what, with which probes; whether freed memory is kept (speed.py)."""

    module: ImageClassifier
    datamodule: ImageDataModule
    probes: list[L.Callback]
    kept_freed_memory: bool


def build(job: Job) -> Built:
    """Seed, threads and allocator first (they shape everything after), then the parts."""
    plain, speed, hc = job.plain, job.speed, job.hc
    L.seed_everything(plain["seed"], workers=True, verbose=False)
    threads = cpu_threads(plain.get("cpu_threads"), hc, plain.get("parallel_jobs"))
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
    loading = choose_loading(plain["data"], job_cores(hc, plain.get("parallel_jobs")), in_joblib_worker(hc))
    return Built(module, ImageDataModule(plain["data"], seed=plain["seed"], loading=loading), probes, freed)


# -- 3. open the run -------------------------------------------------------------------------

@dataclass
class OpenRun:
    """The job's MLflow run as it trains: store client, claim (run id, checkpoints, owner lock),
    Lightning logger, file of figures the store could not take, owner heartbeat."""

    client: MlflowClient
    uri: str
    claim: RunClaim
    logger: RunLogger
    unsent: Path
    heartbeat: Heartbeat | None
    chief: bool  # rank 0: the only rank that writes to MLflow


def open_store(plain: dict[str, Any], root: Path) -> tuple[MlflowClient, str, str]:
    """A client for a store that exists and is migrated (created under a file lock if new), in
    which runs whose owner is gone are closed (by rank 0)."""
    tracking = plain["tracking"]
    uri = tracking_uri(tracking["uri"], root)
    bound_http_waits(tracking["http"])
    prepare_store(uri, "tracking.uri" if tracking["uri"] else "MLFLOW_TRACKING_URI")
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, tracking["experiment"])
    if rank_zero_only.rank == 0:
        close_orphans(client, experiment_id, tracking["owner_timeout_s"])
    return client, uri, experiment_id


def finished_twin(client: MlflowClient, experiment_id: str, job: Job) -> Any:
    """In a sweep with tracking.skip_finished, a FINISHED run of the same config (else None)."""
    if job.hc.mode != RunMode.MULTIRUN or not job.plain["tracking"]["skip_finished"]:
        return None
    return find_finished_run(runs_of_config(client, experiment_id, job.config_hash, job.older_hash))


def skipped(client: MlflowClient, job: Job, finished: Any) -> dict[str, Any]:
    """Report a sweep job's FINISHED twin, train nothing, and count it as a job of this sweep if
    its own sweep never finished."""
    plain, hc = job.plain, job.hc
    adopt_into_sweep(client, finished, Path(hc.sweep.dir), hc.job.num, finished=True)
    record_job(hc, finished.info.run_id, skipped=True)
    metrics = finished.data.metrics
    log.info(f"{variant_name(plain)}: skipped, already FINISHED as MLflow run {finished.info.run_id} "
             f"(test accuracy {metrics.get(record.TEST_ACC, float('nan')):.4f}); tracking.skip_finished=false trains it "
             "again")
    return {"variant": variant_name(plain), "test_acc": metrics.get(record.TEST_ACC), "val_acc": metrics.get(record.VAL_ACC),
            "run_id": finished.info.run_id}


def create_run(client: MlflowClient, experiment_id: str, job: Job, root: Path, lock: OwnerLock) -> str:
    """A new MLflow run for this job, tagged with its variant, config hash and key, overrides,
    output folder, git state, owner and, in a sweep, its parent run."""
    plain, variant, hc = job.plain, job.variant, job.hc
    tags = {
        MLFLOW_RUN_NAME: run_name(variant, plain),
        record.VARIANT: variant,
        record.CONFIG_HASH: job.config_hash,
        record.CONFIG_KEY: config_key(plain),  # what its repeats over seeds share
        # Jobs that shared the cores while timing must not be compared with jobs that had them alone.
        record.PARALLEL_JOBS: str(parallel_jobs(hc, plain.get("parallel_jobs"))),
        record.SEED: str(plain["seed"]),
        record.OVERRIDES: " ".join(hc.overrides.task),
        record.OUTPUT_DIR: str(Path(hc.runtime.output_dir).resolve()),
        record.CHECKPOINT_DIR: str(lock.path.parent),
        **git_state(root),
        **lock.tags(),
        **study_tags(plain["study"]),
    }
    if hc.mode == RunMode.MULTIRUN:
        tags.update({record.SWEEP_JOB: str(hc.job.num), record.SWEEP_DIR: str(Path(hc.sweep.dir).resolve())})
        parent = parent_run_id(Path(hc.sweep.dir))
        if parent:
            tags.update({MLFLOW_PARENT_RUN_ID: parent, record.SWEEP_ID: parent})
    return retry_locked(lambda: client.create_run(experiment_id, tags=tags)).info.run_id


def open_run(client: MlflowClient, uri: str, experiment_id: str, job: Job) -> OpenRun:
    """Refuse, resume or create this job's run (the ownership rule), and its logger."""
    hc = job.hc
    tracking = job.plain["tracking"]
    chief = rank_zero_only.rank == 0
    root = Path(hc.runtime.cwd)
    previous = runs_of_config(client, experiment_id, job.config_hash, job.older_hash)
    claim = choose_run(client, experiment_id, previous, job.plain,
                       job.config_hash, hc, chief, create=lambda lock: create_run(client, experiment_id, job, root, lock))
    if chief and any(r.info.run_id == claim.run_id and r.data.tags.get(record.CONFIG_HASH) != job.config_hash
                     for r in previous):  # a run of the older hash resumes under today's
        retry_locked(lambda: client.set_tag(claim.run_id, record.CONFIG_HASH, job.config_hash))
    if chief:
        record_job(hc, claim.run_id)
    os.environ[CLAIM_ENV] = claim.to_env()  # DDP ranks that Lightning starts take rank 0's choice
    unsent = Path(hc.runtime.output_dir) / UNSENT_FILE
    logger = RunLogger(experiment_name=tracking["experiment"], tracking_uri=uri, run_id=claim.run_id, unsent=unsent)
    heartbeat = Heartbeat(client, claim.run_id, tracking["heartbeat_s"]) if chief else None
    return OpenRun(client, uri, claim, logger, unsent, heartbeat, chief)


def record_new_run(run: OpenRun, trainer: L.Trainer, plain: dict[str, Any], tags: dict[str, str]) -> None:
    """What a new run records before training: system facts and `tags`, flattened params, config YAML."""
    facts = {**system_facts(str(trainer.strategy.root_device)), **tags}
    run_id = run.claim.run_id
    retry_locked(lambda: run.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in facts.items()]))
    run.logger.log_hyperparams(flatten(plain))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / record.CONFIG_YAML
        path.write_text(OmegaConf.to_yaml(plain))
        run.client.log_artifact(run_id, str(path))


# -- 4. fit and test -------------------------------------------------------------------------

def cluster_plugins() -> list[Any]:
    """Under SLURM, Lightning's SLURMEnvironment without its requeue on SIGUSR1: the harness stops
    on that signal itself (stopping.py) and resumes from its own epoch-end checkpoint, which
    Lightning's mid-epoch `hpc_ckpt` and requeue would bypass."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def make_trainer(job: Job, built: Built, run: OpenRun) -> tuple[L.Trainer, ModelCheckpoint]:
    """The Trainer and the checkpoint it keeps: the best on validation accuracy. Without a
    validation split (data.val_size=0, e.g. the paper's final runs on all 50k images) nothing
    validates and only the last epoch's checkpoint is kept (LastCheckpoint)."""
    plain, variant, speed, hc = job.plain, job.variant, job.speed, job.hc
    validated = has_validation_split(plain["data"])
    checkpoint = ModelCheckpoint(dirpath=run.claim.ckpt_dir, filename="best-{epoch}",
                                 monitor=record.VAL_ACC if validated else None, mode="max",
                                 save_top_k=1 if validated else 0, save_last=False)
    name = run_name(variant, plain)
    experiment = plain["tracking"]["experiment"]
    about = f"{name}: MLflow run {run.claim.run_id} in experiment {experiment!r}"
    if experiment == default_experiment(plain["data"], hc.runtime.choices.get("experiment")):
        about += " (named from the data set; tracking.experiment=NAME chooses one)"
    choices = {"channels_last": speed.channels_last, "keep_freed_memory": built.kept_freed_memory}
    trainer = L.Trainer(
        **plain["trainer"], **({} if validated else {"limit_val_batches": 0}), logger=run.logger,
        use_distributed_sampler=False, plugins=cluster_plugins(),
        callbacks=[checkpoint, LastCheckpoint(run.claim.ckpt_dir, run.claim.run_id, job.config_hash),
                   stopping.StopAtNextStep(), *built.probes,
                   *job_callbacks(plain, job_label(hc), about, choices, jobs_after(hc) / parallel_jobs(hc),
                                 name=name)],
        default_root_dir=hc.runtime.output_dir,
    )
    return trainer, checkpoint


def fit_and_test(job: Job, built: Built, run: OpenRun, trainer: L.Trainer,
                 checkpoint: ModelCheckpoint) -> tuple[float | None, float | None]:
    """Train, then test the final weights once (the paper's protocol: a fixed schedule, no early
    stopping); `best-*.ckpt`, chosen on validation accuracy, is kept and logged for reloading.
    A run stopped after training (during or before its test) resumes from `last.ckpt` of its
    last epoch: `fit` restores the final weights and trains nothing, and the test runs.
    Data without a held-out test set (an image folder without test/) is not tested: the
    validation images chose the model and never stand in for a test set.
    Returns (last validation accuracy or None, test accuracy or None)."""
    plain = job.plain
    validated = has_validation_split(plain["data"])
    if run.chief and run.claim.resumed:
        run.logger.load_history(run.client)  # an epoch redone after a kill is not logged twice
    if run.chief and not run.claim.recorded:
        record_new_run(run, trainer, plain, {**job.speed.tags(), **built.datamodule.loading.tags()})
    trainer.fit(built.module, datamodule=built.datamodule, ckpt_path=run.claim.ckpt_path, weights_only=True)
    val_acc = last_logged(run, trainer, record.VAL_ACC) if validated else None  # test() resets callback_metrics
    if run.chief and (checkpoint.best_model_path or not validated):  # one best checkpoint, or none without validation
        prune_best(run.claim.ckpt_dir, {Path(checkpoint.best_model_path)} if validated else set())
    test_acc = None
    if built.datamodule.has_test_set:
        test_acc = float(trainer.test(built.module, datamodule=built.datamodule, verbose=False)[0][record.TEST_ACC])
    kept = checkpoint.best_model_path or str(run.claim.ckpt_dir / "last.ckpt")
    if run.chief and plain["tracking"]["log_checkpoint"] and Path(kept).is_file():
        run.client.log_artifact(run.claim.run_id, kept, record.CHECKPOINTS_DIR)
    return val_acc, test_acc


def last_logged(run: OpenRun, trainer: L.Trainer, key: str) -> float | None:
    """The last value of metric `key`: as this fit computed it, else (a run resumed after its
    training ended validates nothing) as the run's history holds it."""
    value = trainer.callback_metrics.get(key)
    if value is not None:
        return float(value)
    logged = retry_locked(lambda: run.client.get_run(run.claim.run_id)).data.metrics.get(key)
    return None if logged is None else float(logged)


# -- 5. close --------------------------------------------------------------------------------

def close(run: OpenRun, trainer: L.Trainer | None, error: BaseException | None) -> None:
    """FINISHED, FAILED (with the traceback) or KILLED (with the reason, and how to resume)."""
    if run.heartbeat is not None:
        run.heartbeat.stop()
    if run.chief:
        where = f" at epoch {trainer.current_epoch}, step {trainer.global_step}" if trainer is not None else ""
        close_run(run.client, run.claim.run_id, error, run.unsent, where)
        stopped = stopping.as_stopped(error) if error is not None else None
        if stopped:
            print(f"{stopped.reason}{where}: MLflow run {run.claim.run_id} is KILLED; resume it with: "
                  f"{resume_command(sys.argv)}", file=sys.stderr, flush=True)
    if run.claim.lock is not None:
        run.claim.lock.release()


# -- before a launcher queues the job elsewhere ----------------------------------------------

def before_queueing(cfg: DictConfig, resolves_here: bool) -> dict[str, Any] | None:
    """For a launcher whose jobs wait in a queue (hydra_plugins/densenet_exp_slurm): check the
    job's composed config (ConfigError: bad input, before anything is queued) and, where the jobs
    run on this machine (so `auto` settings resolve here as in the job, and so does the config
    hash), the summary of a FINISHED twin in the store, which makes queuing it needless (the job
    is counted in the sweep as `skipped` counts it); else None."""
    hc, task = cfg.hydra, cfg.copy()
    with open_dict(task):
        del task["hydra"]  # as Hydra hands a job its config
    if not resolves_here:
        checked_config(task, hc.overrides.task, trainer_arguments, hc.runtime.choices.get("experiment"))
        return None
    job = compose(task, hc)
    client, _, experiment_id = open_store(job.plain, Path(hc.runtime.cwd))
    twin = finished_twin(client, experiment_id, job)
    return None if twin is None else skipped(client, job, twin)


# -- the job ---------------------------------------------------------------------------------

def train(cfg: DictConfig, hc: Any) -> dict[str, Any]:
    """Run one job of the harness; returns its summary."""
    # Lightning gives its loggers a console handler of their own (and stops their records from
    # reaching Hydra's) if it is imported before Hydra sets up logging, as in a job that submitit
    # unpickles: Hydra's handlers (console filter, run.log) take its lines instead.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    started = time.perf_counter()
    stopping.raise_if_stopped()  # Ctrl-C between two jobs of a sweep
    job = compose(cfg, hc)
    plain, variant = job.plain, job.variant
    built = build(job)
    client, uri, experiment_id = open_store(plain, Path(hc.runtime.cwd))
    twin = finished_twin(client, experiment_id, job)
    if twin is not None:
        return skipped(client, job, twin)
    run = open_run(client, uri, experiment_id, job)
    trainer: L.Trainer | None = None
    error: BaseException | None = None
    try:
        trainer, checkpoint = make_trainer(job, built, run)
        val_acc, test_acc = fit_and_test(job, built, run, trainer, checkpoint)
    except BaseException as err:
        error = err
        if unreachable(err) and not isinstance(err, StoreUnreachable):
            raise StoreUnreachable(uri, run.unsent) from err
        raise stopping.as_stopped(err) or err
    finally:
        close(run, trainer, error)
    summary = {
        "variant": variant,
        "test_acc": test_acc,
        "val_acc": val_acc,
        "params": sum(p.numel() for p in built.module.model.parameters()),
        "wall_s": time.perf_counter() - started,
        "run_id": run.claim.run_id,
    }
    if run.chief:
        tested = "no held-out test set" if test_acc is None else f"test accuracy {test_acc:.4f}"
        log.info(f"{run_name(variant, plain)}: {tested}, {summary['params'] / 1e6:.3f}M "
                 f"parameters, {summary['wall_s']:.1f} s, MLflow run {run.claim.run_id}")
    return summary

"""The run record: every name a run writes to MLflow, and the report, notebooks and harness read
back, defined once. Writers (job.py, tracking.py, classifier.py, probes/) and readers
(results.py, verdicts.py, report.py, console.py) import these names; none spells them out.

`REPORT_READS` lists what the report and notebooks read; tests/test_record.py trains a smoke run
of each model family and checks that each of those names is written, so a renamed metric fails a
test instead of becoming a silent column of NaN.
"""

from __future__ import annotations

from .config import DENSENET_KNOBS

# -- metrics ---------------------------------------------------------------------------------
# classifier.py, once per epoch (test once, at the end)
TRAIN_LOSS = "train/loss"
TRAIN_ACC = "train/acc"
LEARNING_RATE = "lr"
VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"
TEST_LOSS = "test/loss"
TEST_ACC = "test/acc"
TEST_ACC_TOP5 = "test/acc_top5"  # only with more than five classes
TEST_IMAGES = "test/images"  # how many images the test counted (every one, once)

# probes/size_cost.py
PARAMS = "params"
MACS_PER_IMAGE = "macs_per_image"
FLOPS_PER_IMAGE = "flops_per_image"
TRAIN_IMAGES_PER_S = "train_images_per_s"
INFER_IMAGES_PER_S = "infer_images_per_s"
EPOCH_TIME_S = "epoch_time_s"
PEAK_MEMORY_MB = "peak_memory_mb"  # the process's peak RSS: depends on its history, no verdict uses it
ACTIVATIONS_MB = "memory/activations_mb"  # bytes saved for backward in one training step
TRAIN_STEP_MB = "memory/train_step_mb"  # ... plus parameters, gradients and optimizer state
# The same figure for each implementation of the model, measured eagerly on copies at the first
# step (a model with one implementation logs "plain" only): a memory claim compares like with like.
TRAIN_STEP_MB_BY_IMPL = {"plain": "memory/train_step_mb_plain",
                         "memory_efficient": "memory/train_step_mb_memory_efficient"}
GPU_STEP_PEAK_MB = "memory/gpu_step_peak_mb"  # GPU only: allocator peak over one step

# probes/gradient_flow.py, per phase (GRADIENT_PHASES): the first optimizer step, and after epoch 1
GRADIENT_PHASES = ("init", "epoch1")


def early_relative_gradient(phase: str) -> str:
    """Mean ||grad|| / ||weight|| of the early body layers (BODY_ROLE; position <= 0.25 among them)."""
    return f"grad/early_rel_{phase}"


def early_over_late_gradient(phase: str) -> str:
    """That mean over the same mean of the late body layers (position >= 0.75 among them)."""
    return f"grad/early_over_late_{phase}"


# probes/feature_reuse.py: Figure 5 summaries (observations (a)-(d) of the paper)
REUSE_EARLY_OVER_UNIFORM = "reuse/early_over_uniform"
REUSE_TRANSITION_EARLY_OVER_UNIFORM = "reuse/transition_early_over_uniform"
REUSE_TRANSITION_OUTPUT_OVER_UNIFORM = "reuse/transition_output_over_uniform"
REUSE_CLASSIFIER_LATE_OVER_UNIFORM = "reuse/classifier_late_over_uniform"

# -- artifacts -------------------------------------------------------------------------------
CONFIG_YAML = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
ERROR_TRACEBACK = "error_traceback.txt"
FEATURE_REUSE_DIR = "feature_reuse"
FEATURE_REUSE_MATRICES = f"{FEATURE_REUSE_DIR}/matrices.json"
GRADIENT_FLOW_DIR = "gradient_flow"
RELATIVE_GRADS = f"{GRADIENT_FLOW_DIR}/relative_grads.csv"
# Each test image's label and the run's predicted class, in the test set's fixed order (one CSV row
# per image): the paired comparison of two arms over the same images, and the test set's own
# sampling variance (claims/evidence.py).
TEST_PREDICTIONS = "predictions/test.csv"
# The same Figure 5 matrices at step 0 (before any update): the control every reuse claim is judged against.
FEATURE_REUSE_MATRICES_INIT = f"{FEATURE_REUSE_DIR}/matrices_init.json"
# relative_grads.csv: one row per conv or linear layer and phase.
RELATIVE_GRADS_COLUMNS = ("phase", "step", "depth", "relative_depth", "layer", "kind", "role", "grad_norm",
                          "weight_norm", "relative_grad")
# A layer's role in its architecture, so that like is compared with like across families.
LAYER_ROLES = ("stem", "body", "bottleneck", "transition", "shortcut", "classifier")
BODY_ROLE = "body"  # the body's 3x3 convolutions: the layer set of every gradient measure

# -- tags ------------------------------------------------------------------------------------
VARIANT = "variant"  # the run name without the seed: what repeats share
CONFIG_KEY = "config_key"  # of the resolved config minus the seed: runs that may be pooled share it
CONFIG_HASH = "config_hash"  # of the resolved config: runs of one config share it
SEED = "seed"
OVERRIDES = "overrides"
OUTPUT_DIR = "output_dir"
CHECKPOINT_DIR = "checkpoint_dir"
GIT_COMMIT = "git_commit"
GIT_DIRTY = "git_dirty"
DEVICE = "device"
PARALLEL_JOBS = "parallel_jobs"  # jobs that shared the machine's cores while this one trained
CPU_THREADS = "cpu_threads"
LOADER_WORKERS = "loader_workers"  # loader processes of the run's data (training/data.py, choose_loading)
LOADER_WORKERS_REASON = "loader_workers_reason"
CPU_CAPABILITY = "cpu_capability"  # as torch reports it (e.g. AVX512, AVX2)
PRECISION = "precision"  # as chosen (trainer.precision may say auto)
PRECISION_REASON = "precision_reason"
ACCELERATOR = "accelerator"
ERROR = "error"  # the exception of a FAILED run, one line
# sweeps
SWEEP = "sweep"  # "parent" on a sweep's parent run
SWEEP_ID = "sweep_id"  # the parent run id, on each child
SWEEP_JOB = "sweep_job"
SWEEP_DIR = "sweep_dir"
PREVIOUS_SWEEP_IDS = "previous_sweep_ids"  # sweeps a resumed or skipped run belonged to before
# studies (a declared plan, densenet_exp/plan.py)
STUDY_PLAN = "study_plan"  # the plan's name
STUDY_PLAN_HASH = "study_plan_hash"  # of the plan file's bytes when the run started
STUDY_STAGE = "study_stage"  # exploration or confirmation
STUDY_ARM = "study_arm"  # the plan's name for this run's configuration
# hyperparameter search (search.py): on each trial's run
SEARCH_STUDY = "search_study"  # the Optuna study's name
SEARCH_TRIAL = "search_trial"  # the trial's number in it
SEARCH_SPACE = "search_space"  # JSON: direction, objective (a metric) and each parameter's Optuna distribution
SEARCH_PARAMS = "search_params"  # JSON: the values the trial was launched with
SEARCH_OVERRIDES = "search_overrides"  # JSON: the job's overrides, for training it again (search.py --top)
# the report's own run
REPORT = "report"
REPORT_SWEEP_ID = "report_sweep_id"
# ownership (ownership.py)
OWNER = "owner"  # host:pid of the process that trains the run
OWNER_LOCK = "owner_lock"  # the lock file that process holds
OWNER_HEARTBEAT = "owner_heartbeat"  # unix time of the owner's last sign of life
OWNER_SLURM_JOB = "owner_slurm_job"  # SLURM job id and restart count of the owner
STOP_REASON = "stop_reason"  # why a run or sweep was stopped or closed (KILLED)
RESUMED_AFTER = "resumed_after"  # the stop reason of the attempt a resumed run continues
# export.py
SOURCE_RUN_ID = "source_run_id"  # on a run loaded from an export: its id in the store it was first saved from

# -- what the report and the notebooks read ------------------------------------------------
# Params are the flattened config keys (conf/); results.load_runs reads these.
RUN_PARAMS = (
    "data.name", "data.num_classes", "data.batch_size", "data.val_size", "data.augment", "model.name",
    "model.arch", *DENSENET_KNOBS, "seed", "trainer.max_epochs",
)
# Read where a preset has them (the depth of a named or block-configured model).
RUN_PARAMS_OPTIONAL = ("model.depth", "model.block_config", "trainer.precision")
REPORT_READS = {
    "metrics": (VAL_ACC, TEST_ACC, TRAIN_LOSS, PARAMS, FLOPS_PER_IMAGE, TRAIN_STEP_MB, TRAIN_STEP_MB_BY_IMPL["plain"],
                TRAIN_IMAGES_PER_S,
                INFER_IMAGES_PER_S, *(early_relative_gradient(p) for p in GRADIENT_PHASES),
                *(early_over_late_gradient(p) for p in GRADIENT_PHASES)),
    "tags": (VARIANT, DEVICE, PARALLEL_JOBS, PRECISION, GIT_COMMIT),
    "params": RUN_PARAMS,
    "artifacts": (RELATIVE_GRADS,),
}
# DenseNets only: feature reuse is measured on dense blocks (the Figure 5 verdicts are computed from
# the matrices, not from the reuse/ metrics, which a block too short for an observation lacks).
REPORT_READS_DENSENET = {"artifacts": (FEATURE_REUSE_MATRICES, FEATURE_REUSE_MATRICES_INIT),
                         "metrics": (TRAIN_STEP_MB_BY_IMPL["memory_efficient"],)}

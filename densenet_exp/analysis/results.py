"""A sweep's results read back from MLflow: runs as a pandas table, means and 95% intervals over
seeds per configuration, the probes' artifacts, and the paper's published figures to set beside
ours. The claims are judged in densenet_exp.analysis.verdicts.

    runs = load_runs("ablation", "sqlite:///mlflow.db")     # every training run, any status
    done = finished(runs)
    summary = summarize(done)                               # one row per configuration

A configuration is everything that changes the model or the recipe (its `config_key`,
densenet_exp.identity): its runs differ only in the seed. Runs on different data sets, or that
differ in anything but the seed, are never pooled. Nothing here imports torch or Lightning, and
MLflow and SciPy only when used (the report's --help answers at once).
"""

from __future__ import annotations

import ast
import json
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import record
from ..checks import OneLineError
from ..config import DENSENET_KNOBS
from ..options import milestone_epochs, train_batches
from ..measures.gradients import assign_roles
from ..identity import config_key, configuration

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# A configuration: what its rows are named by, then the key that tells apart any two that differ
# in anything but the seed (a block_config, an image folder, a learning rate).
CONFIG = ["data", "model", *DENSENET_KNOBS, "config_key"]
MLFLOW_RUN_NAME = "mlflow.runName"  # mlflow.utils.mlflow_tags.MLFLOW_RUN_NAME
# The per-configuration table: metric -> what the report calls it.
SUMMARY_METRICS = {
    record.VAL_ACC: "validation accuracy",
    record.TEST_ACC: "test accuracy",
    record.PARAMS: "parameters",
    record.FLOPS_PER_IMAGE: "FLOPs / image",
    record.TRAIN_STEP_MB: "train-step memory (MiB)",
    record.TRAIN_IMAGES_PER_S: "train images/s",
    record.INFER_IMAGES_PER_S: "inference images/s",
}
CONFIDENCE = 0.95  # of the intervals over seeds
# With two values a 95% t-interval has t = 12.7: on an accuracy it spans nearly [0, 1] and says
# nothing, so an interval needs three.
MIN_INTERVAL_N = 3
NO_TEST_SPLIT = "validation (no test split)"
ACCURACY_RULE = (
    "Accuracy in the figures and tables is test accuracy. Where no run of a data set logged one (an image folder "
    f"without test/), validation accuracy stands in, labelled \"{NO_TEST_SPLIT}\": those images chose the "
    "model (its epoch, learning rate or configuration), so it reads high."
)
FAMILY_NAMES = {"densenet": "DenseNet", "resnet": "ResNet", "plain": "plain net (no shortcuts)"}
# MLflow run ids are hex; anything else (quotes above all) would go into a filter string.
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


# --- runs ------------------------------------------------------------------------------------


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient  # seconds of import: only once a store is read

    return MlflowClient(tracking_uri)


def model_family(arch: object) -> str:
    """'densenet', 'resnet', 'plain' or the architecture itself (see densenet_exp.models)."""
    arch = str(arch)
    for family in ("densenet", "resnet", "plain"):
        if arch.startswith(family):
            return family
    return arch


def network_depth(arch: object, depth: object, block_config: object, bottleneck: object) -> float:
    """Conv and linear layers on the longest path, as the papers count them (DenseNet-BC-100,
    ResNet-110): `model.depth` where the preset has one, the number in a named preset
    (densenet121, resnet18), else first conv + dense layers (two convs each with bottleneck) +
    transitions + classifier from `model.block_config`. NaN when unknown."""
    number = pd.to_numeric(pd.Series([depth]), errors="coerce").iloc[0]
    if pd.notna(number):
        return float(number)
    named = re.fullmatch(r"(?:densenet|resnet)(\d+)", str(arch))
    if named:
        return float(named.group(1))
    try:
        blocks = [int(b) for b in ast.literal_eval(str(block_config))]
    except (ValueError, SyntaxError, TypeError):
        return float("nan")
    per_layer = 2 if str(bottleneck) == "True" else 1
    return float(1 + per_layer * sum(blocks) + len(blocks) - 1 + 1)


class ExperimentNotFound(OneLineError, LookupError):
    pass


class InvalidRunId(OneLineError, ValueError):
    pass


def check_run_id(value: str, what: str = "--sweep") -> str:
    """`value` if it looks like an MLflow run id; else InvalidRunId in one line (it goes into a
    search filter, so a quote must never reach it)."""
    if not RUN_ID.fullmatch(value):
        raise InvalidRunId(f"{what}={value!r} is not a run id: expected the sweep's parent run id "
                         "(letters, digits, - and _, e.g. 3f2a9c0e1b7d4e5f8a6b2c1d0e9f8a7b)")
    return value


def check_run_times(client: MlflowClient, experiment: str) -> None:
    """InvalidValue naming the first run of `experiment` whose start or end time is not a number
    of milliseconds (an older `export load` stored any value it was given)."""
    from ..checks import require

    exp = client.get_experiment_by_name(experiment)
    for run in client.search_runs([exp.experiment_id], max_results=50_000):
        for key in ("start_time", "end_time"):
            value = getattr(run.info, key)
            require(f"{key} of run {run.info.run_id} in experiment {experiment!r}", value,
                    value is None or isinstance(value, int), "milliseconds since 1970: delete the run "
                    f"(`mlflow runs delete --run-id {run.info.run_id}`) and load it again with `export load`")


def load_runs(experiment: str, tracking_uri: str, sweep: str | None = None) -> pd.DataFrame:
    """Every training run of `experiment` (of one sweep if `sweep` is its parent run id), whatever
    its status; sweep parent runs and report runs are left out.

    One row per run: run_id, variant, status, error, the configuration (CONFIG columns; k, theta
    and B are NA for ResNets), family, arch, depth, seed, device, epochs, batch_size, val_size,
    augment, parallel_jobs (1 where not recorded), one column per metric (its last value, NaN
    where the run lacks it) and the raw `params.*` and `tags.*` strings for the recipe checks and
    any other filter. Raises ExperimentNotFound when the experiment does not exist, InvalidRunId
    for a malformed sweep id.
    """
    if sweep is not None:
        check_run_id(sweep)
    client = _client(tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ExperimentNotFound(f"no experiment {experiment!r} in {tracking_uri} (experiments: {known})")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)  # mlflow.search_runs reads the global store
    try:
        raw = mlflow.search_runs(
            experiment_names=[experiment], filter_string=f"tags.{record.SWEEP_ID} = '{sweep}'" if sweep else ""
        )
    except ValueError:  # pandas could not read a time: a run whose times are not numbers
        check_run_times(client, experiment)
        raise
    tags = [record.SWEEP, record.REPORT, record.VARIANT, MLFLOW_RUN_NAME, record.ERROR, record.DEVICE,
            record.PARALLEL_JOBS, record.CONFIG_KEY, record.SEARCH_STUDY, record.SEARCH_TRIAL]
    params = [*record.RUN_PARAMS, *record.RUN_PARAMS_OPTIONAL]
    needed = ["run_id", "status", "start_time", *(f"tags.{t}" for t in tags), *(f"params.{p}" for p in params)]
    raw = raw.reindex(columns=list(dict.fromkeys([*needed, *raw.columns])))
    raw = raw[(raw[f"tags.{record.SWEEP}"] != "parent") & (raw[f"tags.{record.REPORT}"] != "true")].reset_index(drop=True)
    param = lambda key: raw[f"params.{key}"]  # noqa: E731
    number = lambda key: pd.to_numeric(param(key), errors="coerce")  # noqa: E731 ("None" -> NaN)
    depth = [network_depth(*row) for row in zip(param("model.arch"), param("model.depth"),
                                                param("model.block_config"), param("bottleneck"))]
    # Runs that predate the config_key tag: the same key, from the params they logged.
    derived = pd.Series([config_key(params) for params in logged_params(raw)], index=raw.index, dtype=object)
    runs = pd.DataFrame({
        "run_id": raw["run_id"].astype(str),  # object dtype even when empty, for merges
        "variant": raw[f"tags.{record.VARIANT}"].fillna(raw[f"tags.{MLFLOW_RUN_NAME}"]).fillna(param("model.name")),
        "status": raw["status"],
        "error": raw[f"tags.{record.ERROR}"],
        "data": param("data.name"),
        "model": param("model.name").fillna(param("model.arch")),
        "growth_rate": number("growth_rate").astype("Int64"),
        "compression": number("compression"),
        "bottleneck": param("bottleneck").map({"True": True, "False": False}).astype("boolean"),
        "config_key": raw[f"tags.{record.CONFIG_KEY}"].fillna(derived),
        "family": param("model.arch").map(model_family, na_action="ignore"),
        "arch": param("model.arch"),
        "depth": pd.Series(depth, dtype=float).astype("Int64"),
        "seed": number("seed").astype("Int64"),
        "num_classes": number("data.num_classes").astype("Int64"),
        "epochs": number("trainer.max_epochs").astype("Int64"),
        "batch_size": number("data.batch_size").astype("Int64"),
        "val_size": number("data.val_size").astype("Int64"),
        "augment": param("data.augment"),
        "device": raw[f"tags.{record.DEVICE}"],
        "parallel_jobs": pd.to_numeric(raw[f"tags.{record.PARALLEL_JOBS}"], errors="coerce").fillna(1).astype("Int64"),
        "start_time": raw["start_time"],
        "search_study": raw[f"tags.{record.SEARCH_STUDY}"],  # a trial of a hyperparameter search (else NaN)
    })
    metrics = raw.filter(regex=r"^metrics\.").rename(columns=lambda c: c.removeprefix("metrics."))
    strings = raw.filter(regex=r"^(params|tags)\.")
    return pd.concat([runs, metrics, strings], axis=1).sort_values(["data", "variant", "seed"], ignore_index=True)


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs the analysis uses: FINISHED ones (failed, killed and running runs are left out)."""
    return runs[runs["status"] == "FINISHED"]


def logged_params(runs: pd.DataFrame) -> list[dict[str, str]]:
    """Each run's params as it logged them (a `params.*` column it lacks is left out)."""
    columns = [c for c in runs.columns if c.startswith("params.")]
    return [{c.removeprefix("params."): v for c, v in zip(columns, row) if isinstance(v, str)}
            for row in runs[columns].itertuples(index=False)]


def differences(runs: pd.DataFrame) -> dict[str, str]:
    """config_key -> what sets the configuration apart from the others of the same name on the same
    data set ("model.block_config=[4, 4]; data.root=/data/a"), or "" when no other shares its name.
    Names collide where a knob outside the name varies (a block_config, an image folder)."""
    out: dict[str, str] = {}
    for _, same_name in runs.groupby(["data", "variant"], dropna=False, sort=True):
        firsts = same_name.drop_duplicates("config_key")
        settings = {key: configuration(params) for key, params in zip(firsts["config_key"], logged_params(firsts))}
        names = sorted({name for cfg in settings.values() for name in cfg})
        varying = [n for n in names if len({cfg.get(n) for cfg in settings.values()}) > 1] if len(settings) > 1 else []
        for key, cfg in settings.items():
            out[key] = "; ".join(f"{n}={cfg.get(n, '(not logged)')}" for n in varying)
    return out


def pooling_problems(runs: pd.DataFrame) -> list[str]:
    """What the report says about pooling over seeds: configurations that share a name but differ
    in more than the seed (kept apart; `differences` says how) and seeds repeated within one
    configuration (a rerun counted twice)."""
    problems = []
    for (data, variant), group in runs.groupby(["data", "variant"], dropna=False, sort=True):
        keys = group["config_key"].nunique()
        if keys > 1:
            varying = sorted({part.split("=", 1)[0] for key in group["config_key"].unique()
                              for part in differences(group)[key].split("; ") if part})
            problems.append(f"`{variant}` on {data}: {keys} configurations share this name; they differ in "
                            f"{', '.join(varying)} and are kept apart (column `differs`)")
    for _, group in runs.groupby(CONFIG, dropna=False, sort=True):
        repeated = sorted(group["seed"][group["seed"].duplicated()].dropna().unique())
        if repeated:
            problems.append(f"`{group['variant'].iloc[0]}` on {group['data'].iloc[0]}: seed "
                            f"{', '.join(map(str, repeated))} repeated; the repeats are pooled as if independent, "
                            "which understates the spread")
    return problems


# --- hyperparameter searches ------------------------------------------------------------------


def search_trials(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The finished trials of each Optuna search in `runs` (search.py tags them): study name ->
    one row per trial, in trial order: trial, objective (the study's metric), one column per
    searched parameter (the launched value), run_id, variant. Attributes `direction`, `objective`
    and `distributions` (parameter -> Optuna distribution as JSON) describe the study."""
    studies = {}
    trials = runs[runs["search_study"].notna()] if "search_study" in runs else runs.iloc[:0]
    for name, group in trials.groupby("search_study", sort=True):
        space = json.loads(group[f"tags.{record.SEARCH_SPACE}"].iloc[0])
        params = pd.DataFrame([json.loads(p) for p in group[f"tags.{record.SEARCH_PARAMS}"]], index=group.index)
        table = pd.concat([pd.DataFrame({
            "trial": pd.to_numeric(group[f"tags.{record.SEARCH_TRIAL}"]).astype(int),
            "objective": group[space["objective"]] if space["objective"] in group else np.nan,
        }), params, group[["run_id", "variant"]]], axis=1).sort_values("trial", ignore_index=True)
        table.attrs.update(direction=space["direction"], objective=space["objective"], distributions=space["params"])
        studies[str(name)] = table
    return studies


def param_importances(trials: pd.DataFrame) -> dict[str, float]:
    """How much each searched parameter explains the objective over these trials (Optuna's default
    evaluator, on an in-memory study rebuilt from them); {} with fewer than two trials or no
    spread in the objective."""
    import optuna

    done = trials.dropna(subset=["objective"])
    if len(done) < 2 or done["objective"].nunique() < 2:
        return {}
    distributions = {k: optuna.distributions.json_to_distribution(v) for k, v in trials.attrs["distributions"].items()}
    study = optuna.create_study(direction=trials.attrs["direction"])
    for _, row in done.iterrows():
        params = {k: row[k].item() if hasattr(row[k], "item") else row[k] for k in distributions}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=float(row["objective"])))
    return optuna.importance.get_param_importances(study)


# --- aggregation over seeds ------------------------------------------------------------------

INTERVAL_RULE = (
    f"Intervals are {CONFIDENCE:.0%} t-intervals over seeds (n − 1 degrees of freedom) computed on a scale "
    "that respects the metric's range and mapped back: the logit scale for accuracies (in (0, 1)), the log "
    "scale for metrics that are positive in every run (parameters, FLOPs, memory, throughput, relative "
    "gradients), the plain scale otherwise. So an interval never leaves the metric's range; it brackets the "
    "back-transformed mean (the geometric mean on the log scale). Fewer than "
    f"{MIN_INTERVAL_N} values (with two, t = 12.7 makes an accuracy's interval nearly [0, 1]), or no spread, give "
    "no interval."
)


def scale_of(metric: str, values: np.ndarray) -> str:
    """'logit', 'log' or 'linear': the scale INTERVAL_RULE computes `metric`'s interval on."""
    if re.search(r"(^|/)acc(_top5)?$", metric) and len(values) and ((values >= 0) & (values <= 1)).all():
        return "logit"
    if len(values) and (values > 0).all():
        return "log"
    return "linear"


_SCALES = {
    "logit": (lambda v: np.log(v / (1 - v)), lambda z: 1 / (1 + np.exp(-z))),
    "log": (np.log, np.exp),
    "linear": (lambda v: v, lambda z: z),
}


def interval(values: Sequence[float] | np.ndarray, metric: str) -> tuple[float, float]:
    """The CONFIDENCE interval of INTERVAL_RULE for the finite `values` of `metric`; (NaN, NaN)
    with fewer than MIN_INTERVAL_N values or no spread."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < MIN_INTERVAL_N or np.ptp(v) == 0:
        return float("nan"), float("nan")
    scale = scale_of(metric, v)
    forward, back = _SCALES[scale]
    if scale == "logit":
        v = np.clip(v, 1e-6, 1 - 1e-6)  # an accuracy of exactly 0 or 1 has no logit
    z = forward(v)
    from scipy import stats

    half = stats.t.ppf((1 + CONFIDENCE) / 2, len(z) - 1) * z.std(ddof=1) / np.sqrt(len(z))
    return float(back(z.mean() - half)), float(back(z.mean() + half))


def accuracy_of(rows: pd.DataFrame) -> str:
    """ACCURACY_RULE's metric for `rows` of one data set (runs, or a summarize() table):
    record.TEST_ACC where any row has one, else record.VAL_ACC."""
    column = f"{record.TEST_ACC} mean" if f"{record.TEST_ACC} mean" in rows else record.TEST_ACC
    return record.TEST_ACC if column in rows and rows[column].notna().any() else record.VAL_ACC


def accuracy_label(metric: str) -> str:
    """How figures name ACCURACY_RULE's metric."""
    return "test accuracy" if metric == record.TEST_ACC else f"accuracy, {NO_TEST_SPLIT}"


def summarize(runs: pd.DataFrame, metrics: Iterable[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """One row per configuration of `runs` (pass finished runs): the CONFIG columns, family,
    variant, `differs` (what sets it apart from configurations of the same name, see
    `differences`), depth, `runs` (how many), `seeds`, epochs, and for each metric `<metric> mean`,
    `std`, `cv` (std over mean), `n` (runs that logged it), `ci_low`, `ci_high` (INTERVAL_RULE).
    std needs two values: with one it is NaN. A metric no run logged gives NaN columns."""
    metrics = list(metrics)
    runs = runs.reindex(columns=list(dict.fromkeys([*runs.columns, *CONFIG, "depth", *metrics])))
    grouped = runs.groupby(CONFIG, dropna=False, sort=True)
    table = grouped.agg(
        family=("family", "first"),
        variant=("variant", "first"),
        depth=("depth", "first"),
        runs=("run_id", "size"),
        seeds=("seed", lambda s: ", ".join(str(v) for v in sorted(s.dropna()))),
        epochs=("epochs", lambda s: ", ".join(str(v) for v in sorted(s.dropna().unique()))),
    )
    table["differs"] = table.index.get_level_values("config_key").map(differences(runs)).fillna("") if len(runs) else []
    for metric in metrics:
        values = grouped[metric].agg(["mean", "std", "count"])
        bounds = grouped[metric].agg(lambda s: interval(s.to_numpy(float), metric))
        table[f"{metric} mean"] = values["mean"]
        table[f"{metric} std"] = values["std"]
        table[f"{metric} cv"] = values["std"] / values["mean"].abs()
        table[f"{metric} n"] = values["count"]
        table[f"{metric} ci_low"] = [b[0] for b in bounds]
        table[f"{metric} ci_high"] = [b[1] for b in bounds]
    return table.reset_index()


# --- artifacts and metric histories ----------------------------------------------------------


def _download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path | None:
    """The artifact `path` of a run, downloaded under dst, or None when the run has none."""
    folder, _, _ = path.rpartition("/")
    if path not in {a.path for a in client.list_artifacts(run_id, folder or None)}:
        return None
    return Path(client.download_artifacts(run_id, path, str(dst)))


def run_config(params: Mapping[str, str]) -> dict[str, Any]:
    """A run's resolved config again from its logged params (config.flatten of it, as strings):
    nested, each value read back as the Python literal it was ("128" -> 128, "None" -> None,
    "[0.34, 0.67]" -> a list); a value that is no literal ("cpu") stays a string."""
    cfg: dict[str, Any] = {}
    for key, text in params.items():
        *parents, leaf = key.split(".")
        node = cfg
        for parent in parents:
            node = node.setdefault(parent, {})
        try:
            node[leaf] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            node[leaf] = text
    return cfg


def check_epochs(steps: Sequence[int], cfg: Mapping[str, Any]) -> list[float]:
    """Each validation check's position in epochs, to the hundredth: (step + 1) / batches per
    epoch (options.train_batches; Lightning logs a check at the 0-based step of the batch before
    it). Where the config does not fix the batches per epoch, the run's last check is taken to
    end its last epoch; without max_epochs either, a check's position is its number."""
    batches = train_batches(cfg)
    epochs = (cfg.get("trainer") or {}).get("max_epochs")
    if batches is None and isinstance(epochs, int) and epochs > 0 and len(steps):
        batches = (max(steps) + 1) / epochs
    if not batches:
        return [float(i) for i in range(1, len(steps) + 1)]
    return [round((step + 1) / batches, 2) for step in steps]


def lr_drops(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """The epochs after which the run's recipe drops the learning rate (a multistep schedule's
    milestones, options.milestone_epochs); none for the other schedules."""
    optim, epochs = cfg.get("optim") or {}, (cfg.get("trainer") or {}).get("max_epochs")
    if optim.get("scheduler") != "multistep" or not isinstance(epochs, int):
        return ()
    return tuple(milestone_epochs(optim.get("milestones") or [], epochs))


def learning_curves(runs: pd.DataFrame, tracking_uri: str, metric: str = record.VAL_ACC) -> pd.DataFrame:
    """The history of `metric` of each run, one row per logged step (a validation check for the
    validation metrics): columns run_id, check (its number in the run, from 1), step, epoch (its
    position in epochs, check_epochs: 0.5, 1.0, ... with two checks per epoch), value, lr_drops
    (the run's lr_drops), plus the run's CONFIG, family, variant and seed. Runs are aligned by
    check, never by Lightning's `epoch` metric, which gives every check of an epoch the same number."""
    client = _client(tracking_uri)
    frames = []
    for run_id, params in zip(runs["run_id"], logged_params(runs)):
        # A resumed run may log a step twice: the later value stands.
        by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, metric),
                                                   key=lambda m: (m.step, m.timestamp))}
        steps = sorted(by_step)
        cfg = run_config(params)
        frames.append(pd.DataFrame({"run_id": run_id, "check": range(1, len(steps) + 1), "step": steps,
                                    "epoch": check_epochs(steps, cfg), "value": [by_step[s] for s in steps],
                                    "lr_drops": [lr_drops(cfg)] * len(steps)}))
    columns = ["run_id", "check", "step", "epoch", "value", "lr_drops"]
    curves = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return curves[columns].merge(runs[["run_id", *CONFIG, "family", "variant", "seed"]], on="run_id")


def compare_runs(runs: pd.DataFrame, run_ids: Sequence[str]) -> pd.DataFrame:
    """Chosen runs side by side (for a notebook): one column per run, named `<variant>-s<seed>
    (<run id>)`; rows: data, status, seed, the SUMMARY_METRICS and every param in which the runs
    differ. Raises InvalidRunId for a malformed id and KeyError naming ids that are not in `runs`."""
    ids = [check_run_id(i, "run id") for i in run_ids]
    missing = [i for i in ids if i not in set(runs["run_id"])]
    if missing:
        raise KeyError(f"no such run here: {', '.join(missing)}")
    chosen = runs.set_index("run_id").loc[ids].reset_index()
    names = [f"{v}-s{s} ({i[:8]})" for v, s, i in zip(chosen["variant"], chosen["seed"], chosen["run_id"])]
    rows = {"data": chosen["data"], "status": chosen["status"], "seed": chosen["seed"]}
    for metric, label in SUMMARY_METRICS.items():
        rows[label] = chosen[metric] if metric in chosen else [np.nan] * len(chosen)  # a metric no run logged
    params = logged_params(chosen)
    for key in sorted({k for p in params for k in p}):
        values = [p.get(key) for p in params]
        if key != "seed" and len(set(values)) > 1:
            rows[key] = values
    table = pd.DataFrame({k: list(v) for k, v in rows.items()}, index=names).T
    table.columns.name = "run"
    return table


def relative_grads(runs: pd.DataFrame, tracking_uri: str) -> pd.DataFrame:
    """The gradient-flow probe's `gradient_flow/relative_grads.csv` of each run that has one
    (record.RELATIVE_GRADS_COLUMNS: phase init or epoch1, step, depth, relative_depth with 0 = first
    conv and 1 = classifier, layer, kind, role (record.LAYER_ROLES), grad_norm, weight_norm,
    relative_grad = grad_norm / weight_norm) plus run_id, CONFIG, family, variant and seed.

    Files written before the probe recorded roles have none: their rows get the role
    `roles_from_layer_names` reads from the layer names (NA where it knows none)."""
    client = _client(tracking_uri)
    columns = list(record.RELATIVE_GRADS_COLUMNS)
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in runs["run_id"]:
            path = _download(client, run_id, record.RELATIVE_GRADS, Path(tmp, run_id))
            if path is not None:
                frames.append(pd.read_csv(path).reindex(columns=columns).assign(run_id=run_id))
    grads = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*columns, "run_id"])
    return assign_roles(grads).merge(runs[["run_id", *CONFIG, "family", "variant", "seed"]], on="run_id")


def test_predictions(runs: pd.DataFrame, tracking_uri: str) -> dict[str, pd.DataFrame]:
    """Each run's record.TEST_PREDICTIONS (columns target, predicted; one row per test image in the
    test set's order), for the runs that logged one."""
    client = _client(tracking_uri)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in runs["run_id"]:
            path = _download(client, run_id, record.TEST_PREDICTIONS, Path(tmp, run_id))
            if path is not None:
                out[run_id] = pd.read_csv(path)
    return out


def feature_reuse_matrices(runs: pd.DataFrame, tracking_uri: str,
                           path: str = record.FEATURE_REUSE_MATRICES) -> dict[str, list[np.ndarray]]:
    """{run_id: one matrix per dense block} from each run's feature-reuse matrices file (null read
    back as NaN): `path` record.FEATURE_REUSE_MATRICES (after training, the default) or
    record.FEATURE_REUSE_MATRICES_INIT (at step 0, before any update). Runs without it (ResNets,
    probe off, runs from before the probe recorded the init matrices) are absent."""
    client = _client(tracking_uri)
    matrices = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in runs["run_id"]:
            local = _download(client, run_id, path, Path(tmp, run_id))
            if local is not None:
                matrices[run_id] = [np.array(m, dtype=float) for m in json.loads(local.read_text())]
    return matrices


def mean_matrices(per_run: Sequence[list[np.ndarray]]) -> list[np.ndarray]:
    """Element-wise mean over runs of one configuration (same block shapes), block by block."""
    return [np.mean(np.stack(blocks), axis=0) for blocks in zip(*per_run)]


# --- published figures -----------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedResult:
    """A published error rate of one network on one data set. A run matches it only with the same
    data set and class count, the same augmentation (`augment`: C10 is `none`, C10+ `crop_flip`;
    None where this harness gives no choice, as for ImageNet folders), the same family and depth,
    and the same DenseNet knobs (None: not a DenseNet)."""

    family: str
    depth: int
    data: str
    num_classes: int
    augment: str | None
    growth_rate: int | None
    compression: float | None
    bottleneck: bool | None
    error_pct: float
    name: str
    source: str


_T2 = "Huang et al. 2017, Table 2 (C10+/C100+: crop and flip augmentation, 300 epochs)"
_T3 = "Huang et al. 2017, Table 3 (ImageNet val, single crop, 90 epochs)"
_TV = "torchvision model docs (ImageNet val acc@1)"
_C10P = ("cifar10", 10, "crop_flip")
_C100P = ("cifar100", 100, "crop_flip")
_IN = ("imagefolder", 1000, None)
PUBLISHED = [
    PublishedResult("densenet", 40, *_C10P, 12, 1.0, False, 5.24, "DenseNet (L=40, k=12)", _T2),
    PublishedResult("densenet", 100, *_C10P, 12, 1.0, False, 4.10, "DenseNet (L=100, k=12)", _T2),
    PublishedResult("densenet", 100, *_C10P, 24, 1.0, False, 3.74, "DenseNet (L=100, k=24)", _T2),
    PublishedResult("densenet", 100, *_C10P, 12, 0.5, True, 4.51, "DenseNet-BC (L=100, k=12)", _T2),
    PublishedResult("densenet", 250, *_C10P, 24, 0.5, True, 3.62, "DenseNet-BC (L=250, k=24)", _T2),
    PublishedResult("densenet", 190, *_C10P, 40, 0.5, True, 3.46, "DenseNet-BC (L=190, k=40)", _T2),
    PublishedResult("densenet", 100, *_C100P, 12, 0.5, True, 22.27, "DenseNet-BC (L=100, k=12)", _T2),
    PublishedResult("resnet", 110, *_C10P, None, None, None, 6.61, "ResNet-110 (He et al. 2016)", _T2),
    PublishedResult("resnet", 110, *_C100P, None, None, None, 27.22,
                    "ResNet-110 (as reported by Huang et al. 2016, stochastic depth)", _T2),
    PublishedResult("densenet", 121, *_IN, 32, 0.5, True, 25.02, "DenseNet-121 top-1", _T3),
    PublishedResult("densenet", 169, *_IN, 32, 0.5, True, 23.80, "DenseNet-169 top-1", _T3),
    PublishedResult("densenet", 201, *_IN, 32, 0.5, True, 22.58, "DenseNet-201 top-1", _T3),
    PublishedResult("densenet", 264, *_IN, 32, 0.5, True, 22.15, "DenseNet-264 top-1", _T3),
    PublishedResult("resnet", 18, *_IN, None, None, None, 100 - 69.76, "ResNet-18 top-1", _TV),
    PublishedResult("resnet", 50, *_IN, None, None, None, 100 - 76.13, "ResNet-50 top-1", _TV),
]
PUBLISHED_RULE = (
    "A published figure is set beside our runs only when they match it on data set and class count, "
    "augmentation (C10 without, C10+ with crop and flip), model family and depth, and growth rate k, "
    "compression θ and bottleneck B; otherwise none is shown."
)


def _matches_published(runs: pd.DataFrame, pub: PublishedResult) -> pd.Series:
    """PUBLISHED_RULE."""
    match = (runs["family"].eq(pub.family) & runs["depth"].eq(pub.depth) & runs["data"].eq(pub.data)
             & runs["num_classes"].eq(pub.num_classes))
    if pub.augment is not None:
        match &= runs["augment"].eq(pub.augment)
    for knob in DENSENET_KNOBS:
        value = getattr(pub, knob)
        match &= runs[knob].isna() if value is None else runs[knob].eq(value)
    return match.fillna(False).astype(bool)


def published_beside_ours(runs: pd.DataFrame) -> pd.DataFrame:
    """Each PUBLISHED result some of `runs` (finished) match by PUBLISHED_RULE, beside our test
    accuracy over seeds: one row per match, with our epochs (the published recipes train far
    longer)."""
    rows = []
    for pub in PUBLISHED:
        match = runs[_matches_published(runs, pub)]
        ours = match[record.TEST_ACC].dropna() if record.TEST_ACC in match else pd.Series(dtype=float)
        if not len(ours):
            continue
        rows.append({
            "data": pub.data, "model": ", ".join(sorted(match["model"].astype(str).unique())),
            "published": pub.name, "published accuracy": 1 - pub.error_pct / 100, "published error %": pub.error_pct,
            "our accuracy mean": ours.mean(), "our accuracy std": ours.std() if len(ours) > 1 else np.nan,
            "runs": len(ours), "our epochs": ", ".join(str(e) for e in sorted(match["epochs"].dropna().unique())),
            "source": pub.source,
        })
    return pd.DataFrame(rows, columns=["data", "model", "published", "published accuracy", "published error %",
                                       "our accuracy mean", "our accuracy std", "runs", "our epochs", "source"])

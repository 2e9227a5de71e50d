"""The speed tools under benchmarks/: the study bench (per-arm table and the defaults' ratio), the
plan-time estimate from pilot runs (`python -m densenet_exp.study estimate`), and the GPU check, which stops cleanly where no GPU is."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.split("|")[1:-1]]


@pytest.fixture(scope="module")
def study_bench() -> str:
    """One tiny run of the study bench: one arm, fp32, a batch of 8, one step per setting."""
    cmd = [sys.executable, "benchmarks/study_speed.py", "--arms", "resnet20", "--precisions", "fp32", "--batch", "8",
           "--steps", "1", "--warmup", "0", "--no-compile", "--clock", "cpu", "--cores", "2", "--experiment", "study_fmnist"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_study_bench_prints_each_setting_of_an_arm_and_the_ratio_of_the_defaults(study_bench):
    lines = study_bench.splitlines()
    assert "cpu clock" in lines[0] and "ATen capability" in lines[0] and "load average" in lines[0]
    header = cells(next(line for line in lines if line.startswith("| arm")))
    rows = {row[2]: dict(zip(header, row)) for row in (cells(line) for line in lines if line.startswith("| resnet20"))}
    # fp32 as asked, and the precision the defaults pick here (bf16 where native), which the ratio needs.
    (default,) = [p for p, figures in rows.items() if figures["defaults now / before"]]
    assert set(rows) == {"fp32", default} and float(rows["fp32"]["params (K)"]) == pytest.approx(269, abs=1)
    assert float(rows["fp32"]["1 thread NCHW"]) > 0 and float(rows["fp32"]["1 thread channels_last"]) > 0
    figures = rows[default]
    for column in ("1 thread channels_last", "1 x 2 threads", "2 x 1 thread"):
        assert float(figures[column]) > 0, column
    assert figures["1 thread compiled"] == "" and figures["compile s, first / again"] == ""  # --no-compile
    # Before: one job of 2 threads; now: 2 one-thread jobs (the study preset's runs are too short to compile).
    now, before = float(figures["2 x 1 thread"]), float(figures["1 x 2 threads"])  # rounded to whole img/s
    ratio = float(figures["defaults now / before"].strip("*"))
    assert (now - 0.5) / (before + 0.5) - 0.01 <= ratio <= (now + 0.5) / (before - 0.5) + 0.01
    (arm_line,) = [line for line in lines if line.startswith("- resnet20:")]
    assert f"{default}-cl x 2 jobs / {default}-cl x 1 job of 2 threads" in arm_line
    assert "compile off: auto: 138 training steps, under 1000" in arm_line  # 3 epochs of 6000 images at batch 128
    (plan,) = [line for line in lines if line.startswith("- study plan")]
    plan_ratio = float(re.search(r": ([0-9.]+) \(goal >= 1.3\) (met|NOT met)$", plan).group(1))
    assert plan.endswith(" NOT met") == (plan_ratio < 1.3)
    assert plan_ratio == pytest.approx(ratio, abs=0.01)  # one arm, nothing compiled


def test_study_bench_rejects_an_arm_that_is_no_model_preset():
    result = subprocess.run([sys.executable, "benchmarks/study_speed.py", "--arms", "resnet21"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--arms='resnet21' is invalid: expected model presets of conf/model" in result.stderr
    result = subprocess.run([sys.executable, "benchmarks/study_speed.py", "--arms", "densenet_bc28_k12:fused"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "each optionally :plain|:shared_stats" in result.stderr


PILOT_PLAN = """name: pilot
experiment: pilot
recipe: [experiment=study_fmnist]
exploration:
  seeds: [0]
  arms:
    r: [model=resnet20]
    d: [model=densenet_s9]
confirmation:
  seeds: [1, 2, 3]
  arms:
    resnet20: [model=resnet20, trainer.max_epochs=5]
    densenet_s9: [model=densenet_s9, trainer.max_epochs=5]
"""


FMNIST_SLICE = {"data.name": "fashion_mnist", "data.val_size": "3000", "data.train_size": "6000"}


def pilot_run(client, experiment: str, model: str, ips: tuple[float, ...], epochs: tuple[float, ...], wall_s: float,
              stage: str = "exploration", data: dict = FMNIST_SLICE) -> None:
    run = client.create_run(experiment, start_time=1_000_000, tags={"study_stage": stage})
    for key, value in {"model.name": model, **data}.items():
        client.log_param(run.info.run_id, key, str(value))
    for step, (speed, seconds) in enumerate(zip(ips, epochs)):
        client.log_metric(run.info.run_id, "train_images_per_s", speed, step=step)
        client.log_metric(run.info.run_id, "epoch_time_s", seconds, step=step)
    client.set_terminated(run.info.run_id, end_time=1_000_000 + int(wall_s * 1000))


def test_plan_estimate_times_each_confirmation_arm_from_its_models_pilot_runs(store, tmp_path, capsys):
    from densenet_exp import study

    plan = tmp_path / "plan.yaml"
    plan.write_text(PILOT_PLAN)
    client = store.client()
    experiment = client.create_experiment("pilot")
    # 6000 training images (study_fmnist): steps of 12 s at 500 img/s, epochs of 13.2 s (x 1.1).
    pilot_run(client, experiment, "resnet20", (500.0, 500.0), (12.0, 13.2), wall_s=40.0)
    pilot_run(client, experiment, "densenet_s9", (200.0, 250.0), (30.0, 33.0), wall_s=70.0)
    pilot_run(client, experiment, "densenet_s9", (1.0, 1.0), (9.0, 9.0), wall_s=99.0, stage="confirmation")  # not a pilot
    assert study.main(["estimate", str(plan), "--jobs", "2", "--tracking-uri", store.uri]) == 0
    out = capsys.readouterr().out
    rows = {cells(line)[0]: cells(line) for line in out.splitlines() if line.startswith("| ") and "arm" not in line}
    # Epoch overhead and fixed seconds: medians over the pilot's runs; speed: the median of its model's epochs.
    overhead = (13.2 / 12 + 33 / (6000 / 225)) / 2
    fixed = ((40 - 25.2) + (70 - 63)) / 2
    minutes = {"resnet20": (5 * 6000 / 500 * overhead + fixed) / 60, "densenet_s9": (5 * 6000 / 225 * overhead + fixed) / 60}
    assert rows["resnet20"][2:4] == ["500", "500"] and rows["densenet_s9"][2:4] == ["225", "250"]
    for arm, per_run in minutes.items():
        assert float(rows[arm][5]) == pytest.approx(per_run, abs=0.05) and rows[arm][6] == "3"
    hours = 3 * sum(minutes.values()) / 60 / 2
    assert f"confirmation stage: about {hours:.2f} h of wall time with 2 jobs at a time" in out


def test_plan_estimate_is_unknown_while_an_arms_model_has_no_pilot_run(store, tmp_path, capsys):
    from densenet_exp import study

    plan = tmp_path / "plan.yaml"
    plan.write_text(PILOT_PLAN)
    client = store.client()
    pilot_run(client, client.create_experiment("pilot"), "resnet20", (500.0, 500.0), (12.0, 13.2), wall_s=40.0)
    assert study.main(["estimate", str(plan), "--tracking-uri", store.uri]) == 0
    captured = capsys.readouterr()
    assert "no exploration run times these arms' models: densenet_s9" in captured.err
    assert "about nan h" in captured.out and "(unknown: see above)" in captured.out


def test_plan_estimate_on_an_image_folder_counts_the_folders_training_images(store, tmp_path, capsys):
    """Issue 37: a plan on an image folder crashed (ZeroDivisionError): the built-in sets' size
    table knows no folder. Its training images are counted: 4 classes x 10 in train/, no val/, so
    a tenth (4) validates and 36 train."""
    from test_own_data import image_folder

    from densenet_exp import study

    root = image_folder(tmp_path / "pets", {"train": 10}, classes=4)
    plan = tmp_path / "plan.yaml"
    plan.write_text(PILOT_PLAN.replace("recipe: [experiment=study_fmnist]",
                                       f"recipe: [data=imagefolder, 'data.root={root}', data.batch_size=4]"))
    client = store.client()
    experiment = client.create_experiment("pilot")
    # The pilot's runs log the folder's resolved settings: 36 images, steps of 0.36 s at 100 img/s.
    folder_params = {"data.name": "imagefolder", "data.root": str(root), "data.val_size": "4", "data.train_size": None}
    pilot_run(client, experiment, "resnet20", (100.0, 100.0), (0.36, 0.72), wall_s=11.08, data=folder_params)
    pilot_run(client, experiment, "densenet_s9", (50.0, 50.0), (0.72, 1.44), wall_s=12.16, data=folder_params)
    assert study.main(["estimate", str(plan), "--tracking-uri", store.uri]) == 0
    out = capsys.readouterr().out
    rows = {cells(line)[0]: cells(line) for line in out.splitlines() if line.startswith("| ") and "arm" not in line}
    # Epochs at twice the step time, 10 s fixed: 5 epochs x 36 images.
    minutes = {"resnet20": (5 * 36 / 100 * 2 + 10) / 60, "densenet_s9": (5 * 36 / 50 * 2 + 10) / 60}
    for arm, per_run in minutes.items():
        assert float(rows[arm][5]) == pytest.approx(per_run, abs=0.05), out
    assert "confirmation stage: about" in out and "nan" not in out


def test_gpu_check_stops_at_its_first_cuda_call_with_one_line_where_there_is_no_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the check would run")
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work")}
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "run"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 3, output
    assert output == ["gpu_check.sh: no CUDA GPU visible (torch.cuda.is_available() is false): nothing measured"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # nothing started


def test_step_timer_reads_the_cpu_clock_per_step():
    import time

    import torch

    from densenet_exp.probes.size_cost import StepTimer

    timer = StepTimer(torch.device("cpu"))
    for pause in (0.02, 0.04):
        timer.start()
        time.sleep(pause)
        timer.stop()
    first, second = timer.seconds()
    assert first >= 0.02 and second >= 0.04  # each step's own time (a busy machine only adds to it)


SIZED_PLAN = """name: sized
experiment: sized
recipe: [experiment=fmnist_decisive]
exploration:
  seeds: [0, 1, 2]
  arms:
    small-pilot: [model=densenet_bc28_k12, optim.lr=0.2]
    big-pilot: [model=resnet20, optim.lr=0.1]
confirmation:
  seeds: [100, 101, 102, 103, 104, 105]
  arms:
    small: [model=densenet_bc28_k12, optim.lr=0.2]
    big: [model=resnet20, optim.lr=0.1]
claims:
  - {kind: fewer_params, smaller: small, larger: big, margin_pp: 0.5}
  - {kind: matched_cost, smaller: small, larger: big, margin_pp: 0.5}
"""


def sized_pilot_run(client, experiment: str, overrides: list[str], test_acc: float) -> None:
    """A finished exploration run with the params `densenet_exp.run` logs for its recipe (the flattened config)."""
    from mlflow.entities import Param

    from densenet_exp.config import composed, flatten

    run = client.create_run(experiment, tags={"study_stage": "exploration"})
    params = flatten(composed(["experiment=fmnist_decisive", *overrides]))
    client.log_batch(run.info.run_id, params=[Param(key, str(value)) for key, value in params.items()])
    client.log_metric(run.info.run_id, "test/acc", test_acc)
    client.set_terminated(run.info.run_id)


def test_plan_estimate_sizes_the_seeds_at_holms_level_from_the_pilots_seed_sd(store, tmp_path, capsys):
    """Power of every declared test at alpha / k (k = 2 tests: non-inferiority and TOST), from the pooled
    SD of the pilot runs on each arm's recipe; runs on another recipe (another weight decay) do not count."""
    from scipy import stats as sp

    from densenet_exp import study

    plan = tmp_path / "plan.yaml"
    plan.write_text(SIZED_PLAN)
    client = store.client()
    experiment = client.create_experiment("sized")
    small, big = [0.910, 0.914, 0.906], [0.912, 0.910]
    for acc in small:
        sized_pilot_run(client, experiment, ["model=densenet_bc28_k12", "optim.lr=0.2"], acc)
    for acc in big:
        sized_pilot_run(client, experiment, ["model=resnet20", "optim.lr=0.1"], acc)
    sized_pilot_run(client, experiment, ["model=resnet20", "optim.lr=0.1", "optim.weight_decay=0.0005"], 0.95)
    assert study.main(["estimate", str(plan), "--tracking-uri", store.uri]) == 0
    out = capsys.readouterr().out
    (row,) = [cells(line) for line in out.splitlines() if line.startswith("| small as")]
    sd = np.sqrt((np.var(small, ddof=1) * 2 + np.var(big, ddof=1) * 1) / 3)
    assert row[1] == "non-inferiority" and float(row[2]) == pytest.approx(100 * sd, abs=6e-4)
    assert row[3] == "0.025 (Holm, k = 2)" and row[4] == "6, 6"

    def power(n: int, sd: float) -> float:
        df = 2 * n - 2
        return 1 - sp.nct.cdf(sp.t.ppf(1 - 0.025, df), df, (0.005 / sd) * np.sqrt(n / 2))

    assert float(row[5]) == pytest.approx(power(6, sd), abs=6e-4)
    assert int(row[6]) == next(n for n in range(2, 500) if power(n, sd) >= 0.8)
    # The family's second test, TOST, is sized too (its power: stats.tost_power, checked in test_claims).
    (tost,) = [cells(line) for line in out.splitlines() if line.startswith("| cost of small")]
    assert tost[1] == "equivalence (TOST)" and tost[3] == "0.025 (Holm, k = 2)" and 0 <= float(tost[5]) <= 1
    # A given SD replaces the pilot's.
    assert study.main(["estimate", str(plan), "--sd", "0.37", "--tracking-uri", store.uri]) == 0
    (row,) = [cells(line) for line in capsys.readouterr().out.splitlines() if line.startswith("| small as")]
    assert row[2] == "0.37" and float(row[5]) == pytest.approx(power(6, 0.0037), abs=6e-4)


def test_step_profile_splits_a_step_by_kind_of_op_and_compares_per_gmac():
    cmd = [sys.executable, "benchmarks/profile_step.py", "--arms", "resnet20,densenet_bc28_k12:shared_stats",
           "--precision", "fp32", "--batch", "4", "--steps", "1", "--warmup", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "eager" in lines[0] and "1 thread" in lines[0]
    header = cells(next(line for line in lines if line.startswith("| arm")))
    rows = {row[0]: dict(zip(header, row)) for row in (cells(line) for line in lines if line.startswith("| ")) if
            row[0] != "arm" and not row[0].startswith("---")}
    base, dense = rows["resnet20"], rows["densenet_bc28_k12:shared_stats"]
    kinds = [k for k in header if k not in ("arm", "GMACs/step", "ms/step", "ms/GMAC") and not k.startswith("excess")]
    for row in (base, dense):
        # Every op's time lands in exactly one kind (rounded to whole ms per kind).
        assert abs(sum(float(row[k]) for k in kinds) - float(row["ms/step"])) <= len(kinds)
        assert float(row["conv 3x3 fwd"]) > 0 and float(row["batch norm"]) > 0
    # ResNet-20: 40.8 MMACs at 32x32, so (28/32)^2 of it at 28x28; forward and backward: 3x.
    assert float(base["GMACs/step"]) == pytest.approx(3 * 4 * 40.8e6 * (28 / 32) ** 2 / 1e9, rel=0.05)
    assert base["excess/GMAC: batch norm"] == "" and dense["excess/GMAC: batch norm"] != ""


def test_study_memory_regenerates_the_pair_readmes_memory_table():
    """benchmarks/study_memory.py rebuilds each arm from its committed config: the table in the
    pair's README is what it prints, and its eager count agrees with what the runs logged."""
    result = subprocess.run([sys.executable, "benchmarks/study_memory.py", "docs/results/fmnist_pair/runs.jsonl.gz"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    readme = (ROOT / "docs/results/fmnist_pair/README.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| arm")}
    assert set(rows) == {"densenet_bc28", "resnet20"}
    for arm, (plain, efficient, trained, logged) in rows.items():
        assert f"| {arm} | {plain} | {efficient} | {logged} |" in readme
        assert abs(float(plain) / float(logged) - 1) < 0.01
    assert "densenet_bc28 / resnet20: plain 3.17x, memory-efficient 1.51x" in result.stdout

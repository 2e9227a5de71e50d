"""The speed tools under benchmarks/: the study bench (per-arm table and the defaults' ratio), the
plan-time estimate from pilot runs, and the GPU check, which stops cleanly where no GPU is."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import study_time  # noqa: E402


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


def test_plan_time_adds_each_arms_fixed_cost_and_epochs_over_the_jobs_at_once(store):
    client = store.client()
    experiment = client.create_experiment("pilot")
    for variant, epoch_times, wall_s in (("resnet20", (10.0, 12.0), 30.0), ("densenet_s9", (20.0,), 26.0)):
        run = client.create_run(experiment, start_time=1_000_000, tags={"variant": variant, "parallel_jobs": "2"})
        for step, seconds in enumerate(epoch_times):
            client.log_metric(run.info.run_id, "epoch_time_s", seconds, step=step)
        client.log_metric(run.info.run_id, "train_images_per_s", 500.0)
        client.set_terminated(run.info.run_id, end_time=1_000_000 + int(wall_s * 1000))
    report = study_time.main(["--tracking-uri", store.uri, "--experiment", "pilot", "--seeds", "3", "--epochs", "5"])
    rows = {cells(line)[0]: cells(line) for line in report.splitlines() if line.startswith("| ") and "arm" not in line}
    assert rows["resnet20"][4:7] == ["500", "11.0", "8"] and rows["densenet_s9"][5:7] == ["20.0", "6"]
    # (3 x (8 + 5 x 11) + 3 x (6 + 5 x 20)) s over 2 jobs at once.
    expected = (3 * (8 + 55) + 3 * (6 + 100)) / 2 / 60
    assert f"expected: {expected:.0f} min for the plan (2 arms x 3 seeds x 5 epochs, 2 jobs at once)" in report


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

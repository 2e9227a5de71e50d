"""The side-by-side benchmark runs each entry in its own process and prints a table of figures
with ratios to the reference measured in the same run."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_bench_prints_a_table_with_ratios_to_the_reference():
    cmd = [sys.executable, "-m", "densenet_exp.bench", "--models", "densenet121,densenet121:fp32fast,densenet121:fast,tv_densenet121,resnet18",
           "--reference", "densenet121", "--size", "32", "--batch", "4", "--steps", "1", "--warmup", "1",
           "--num-classes", "10", "--threads", "1"]  # one thread: no stalls on a busy machine
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("| ") and "model" not in line}
    assert set(rows) == {"densenet121", "densenet121:fp32fast", "densenet121:fast", "tv_densenet121", "resnet18"}
    params, macs, precision, train, infer, mem, train_ratio, infer_ratio, mem_ratio = rows["densenet121"]
    assert float(params) == 6.96 and (train_ratio, infer_ratio, mem_ratio) == ("1.00", "1.00", "1.00")
    assert float(rows["resnet18"][1]) > 0 and float(rows["resnet18"][3]) > 0
    assert rows["densenet121:fast"][2] in {"bf16", "fp32"}  # bf16 only where the CPU has it
    assert rows["densenet121:fp32fast"][2] == "fp32"
    # The goals are ratios of entries of this run; only those whose two entries ran are printed.
    goals = [line for line in result.stdout.splitlines() if line.startswith("- ")]
    assert len(goals) == 2, goals
    ratio = float(rows["densenet121"][3]) / float(rows["tv_densenet121"][3])
    line = next(g for g in goals if g.startswith("- train ours / torchvision, eager fp32: "))
    assert abs(float(line.split(": ")[1].split()[0]) - ratio) < 0.02 * ratio + 0.01
    assert line.endswith("met") and ("NOT met" in line) == (float(line.split(": ")[1].split()[0]) < 1.3)


def test_bench_rejects_unknown_entries():
    result = subprocess.run([sys.executable, "-m", "densenet_exp.bench", "--models", "densenet999"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--models='densenet999' is invalid: expected NAME" in result.stderr


def test_bench_prints_both_memory_efficient_goals_from_one_run():
    # Memory-efficient mode under the settings `auto` picks for it (fp32fast), from one run:
    # its peak memory against torchvision's memory-efficient model, its speed against ours.
    cmd = [sys.executable, "-m", "densenet_exp.bench", "--models",
           "densenet121:fp32fast,densenet121_me:fp32fast,tv_densenet121_me", "--size", "32", "--batch", "4",
           "--steps", "1", "--warmup", "1", "--num-classes", "10", "--threads", "1", "--clock", "cpu"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cpu clock" in result.stdout.splitlines()[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("| ") and "model" not in line}
    goals = {line[2:].split(": ")[0]: float(line.split(": ")[1].split()[0])
             for line in result.stdout.splitlines() if line.startswith("- ")}
    assert set(goals) == {"peak memory ours ME fp32fast / torchvision ME", "train ours ME / ours, both fp32fast"}
    speed = float(rows["densenet121_me:fp32fast"][3]) / float(rows["densenet121:fp32fast"][3])
    assert abs(goals["train ours ME / ours, both fp32fast"] - speed) < 0.02 * speed + 0.01

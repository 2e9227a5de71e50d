"""Train-step memory of each arm of a committed study, for each DenseNet implementation.

    .venv/bin/python benchmarks/study_memory.py docs/results/fmnist_pair/runs.jsonl.gz

Runs logged before the probe measured both implementations (`memory/train_step_mb_plain` and
`memory/train_step_mb_memory_efficient`) carry only the implementation they trained. These are
exact figures (bytes autograd saves, plus the model state), fixed by the model, batch shape and
precision, so they need no training: for one run of each arm, rebuild its model from the run's
`config.yaml`, and count what one eager training forward saves for each implementation
(`saved_bytes_by_implementation`, the probe's own function) on a batch of the run's shape, under
its precision. The model state (parameters, gradients, optimizer state) is the run's own logged
`memory/train_step_mb - memory/activations_mb`. Prints per-image MiB and each DenseNet arm's ratio
to each other arm, with the figure the run itself logged beside it as a check.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json

import torch
import yaml

from densenet_exp import record
from densenet_exp.models import build_model
from densenet_exp.probes.size_cost import MIB, saved_bytes_by_implementation

SIDE = {"fashion_mnist": (1, 28), "cifar10": (3, 32), "cifar100": (3, 32)}  # channels, pixels


def last(metrics: dict, name: str) -> float:
    return metrics[name][-1][-1]


def arm_memory(row: dict) -> dict:
    cfg = yaml.safe_load(row["artifacts"][record.CONFIG_YAML])
    channels, side = SIDE[cfg["data"]["name"]]
    batch = cfg["data"]["batch_size"]
    torch.manual_seed(0)
    model = build_model({**cfg["model"], "num_classes": cfg["data"]["num_classes"]} | (
        {"in_channels": channels} if channels != 3 else {}))
    images = torch.randn(batch, channels, side, side)
    if cfg["speed"].get("channels_last"):
        images = images.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    bf16 = str(cfg["trainer"]["precision"]).startswith("bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        saved = saved_bytes_by_implementation(model, images)
    metrics = row["metrics"]
    state = last(metrics, record.TRAIN_STEP_MB) - last(metrics, record.ACTIVATIONS_MB)
    return {"batch": batch, "logged": last(metrics, record.TRAIN_STEP_MB) / batch,
            "trained": "memory_efficient" if cfg["model"].get("memory_efficient") else "plain",
            **{impl: (n / MIB + state) / batch for impl, n in saved.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="a study's runs.jsonl.gz")
    args = parser.parse_args()
    rows = [json.loads(line) for line in gzip.open(args.export, "rt")]
    arms: dict[str, dict] = {}
    for row in rows:
        arm = row["tags"].get(record.STUDY_ARM) or row["tags"].get(record.VARIANT)
        if row["status"] == "FINISHED" and arm not in arms and record.ACTIVATIONS_MB in row["metrics"]:
            arms[arm] = arm_memory(row)
    print("| arm | plain MiB/image | memory-efficient MiB/image | trained | logged MiB/image |")
    print("|---|---|---|---|---|")
    for arm, m in arms.items():
        efficient = f"{m['memory_efficient']:.3f}" if "memory_efficient" in m else "(one implementation)"
        print(f"| {arm} | {m['plain']:.3f} | {efficient} | {m['trained']} | {m['logged']:.3f} |")
    for arm, m in arms.items():
        for other, o in arms.items():
            if arm != other and "memory_efficient" in m:
                print(f"{arm} / {other}: plain {m['plain'] / o['plain']:.3g}x, memory-efficient "
                      f"{m['memory_efficient'] / o.get('memory_efficient', o['plain']):.3g}x")


if __name__ == "__main__":
    main()

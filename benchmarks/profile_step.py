"""Where one training step's time goes, per kind of op: the study's arms at 28x28, one thread.

    python benchmarks/profile_step.py                                   # ResNet-20 vs DenseNet-BC L=28
    python benchmarks/profile_step.py --precision fp32 --compile        # compiled too
    python benchmarks/profile_step.py --arms densenet_bc28_k12,densenet_bc28_k12:shared_stats

Each arm's train step (forward, cross-entropy, backward, SGD step; channels_last as the defaults
pick it) runs --warmup steps, then --steps under torch.profiler. Every op's self CPU time goes to
one kind: convolutions by kernel (1x1, 3x3, other) and pass (forward, backward), batch norm, ReLU,
concatenation and copies, the optimizer, the compiled graphs' fused kernels, and the rest. The
table gives ms per step per kind, and per arm ms per GMAC of the step's convolutions and linear
layers (forward MACs x 3 for forward and backward): DenseNet's extra time per FLOP over the first
arm is the difference of those columns, split by kind in the last columns.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from study_speed import arm_overrides  # noqa: E402  (benchmarks/ is the script's folder)

KINDS = ("conv 1x1 fwd", "conv 1x1 bwd", "conv 3x3 fwd", "conv 3x3 bwd", "conv other", "batch norm", "relu",
         "cat and copies", "fused (compiled)", "optimizer", "other")


def op_kind(name: str, shapes: list, in_optimizer: bool) -> str:
    """The kind of one op by its ATen (or compiled kernel) name and its input shapes."""
    if in_optimizer:
        return "optimizer"
    lowered = name.lower()
    if "convolution" in lowered or "conv2d" in lowered:
        # The weight: the second input of a forward, the third of a backward (grad, input, weight).
        at = 2 if "backward" in lowered else 1
        weight = shapes[at] if len(shapes) > at and isinstance(shapes[at], list) else None
        kernel = "1x1" if weight and weight[2:] == [1, 1] else "3x3" if weight and weight[2:] == [3, 3] else None
        if kernel is None:
            return "conv other"
        return f"conv {kernel} {'bwd' if 'backward' in lowered else 'fwd'}"
    if "batch_norm" in lowered:
        return "batch norm"
    if "relu" in lowered or "threshold_backward" in lowered or "clamp_min" in lowered:
        return "relu"
    if any(word in lowered for word in ("aten::cat", "copy", "clone", "contiguous", "split", "narrow", "slice")):
        return "cat and copies"
    if "cpp_fused" in lowered or "graph_" in lowered or "compiled" in lowered:
        return "fused (compiled)"
    return "other"


def forward_macs(model, x) -> int:
    """Multiply-accumulates of one forward pass's convolutions and linear layers."""
    import torch
    from torch import nn

    total = 0

    def count(module, inputs, out) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            total += out.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    model.train()
    for h in hooks:
        h.remove()
    return total


def profile_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """ms per step of each kind of op, and the step's GMACs, for one arm."""
    import torch
    from torch import nn
    from torch.profiler import ProfilerActivity, profile

    from densenet_exp.config import composed
    from densenet_exp.models import build_model
    from densenet_exp.training.speed import compile_cache_per_cpu_capability

    cfg = composed([f"experiment={args.experiment}", *args.overrides, *arm_overrides(arm)])
    batch = args.batch or cfg["data"]["batch_size"]
    torch.manual_seed(0)
    model = build_model(cfg["model"]).to(memory_format=torch.channels_last)
    size, channels = cfg["data"]["image_size"], cfg["data"]["channels"]
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg["data"]["num_classes"], (batch,))
    gmacs = 3 * forward_macs(model, x) / 1e9  # forward, and the backward's two products per layer
    if args.compile:
        compile_cache_per_cpu_capability()
    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    bf16 = args.precision == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
    ms: dict[str, float] = defaultdict(float)
    total = 0.0
    for event in prof.events():
        parent, in_optimizer = event.cpu_parent, False
        while parent is not None:
            in_optimizer = in_optimizer or parent.name.startswith("Optimizer.step")
            parent = parent.cpu_parent
        self_ms = event.self_cpu_time_total / 1e3 / args.steps
        ms[op_kind(event.name, event.input_shapes or [], in_optimizer)] += self_ms
        total += self_ms
    return {"arm": arm, "ms": dict(ms), "total": total, "gmacs": gmacs}


def format_table(rows: list[dict[str, Any]]) -> str:
    """ms per step by kind; ms per GMAC; the excess per GMAC of each arm over the first, by kind."""
    base = rows[0]
    header = ["arm", "GMACs/step", "ms/step", "ms/GMAC", *KINDS, *[f"excess/GMAC: {k}" for k in KINDS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        per = {k: r["ms"].get(k, 0.0) / r["gmacs"] for k in KINDS}
        base_per = {k: base["ms"].get(k, 0.0) / base["gmacs"] for k in KINDS}
        excess = ["" if r is base else f"{per[k] - base_per[k]:.0f}" for k in KINDS]
        lines.append("| " + " | ".join([r["arm"], f"{r['gmacs']:.2f}", f"{r['total']:.0f}",
                                        f"{r['total'] / r['gmacs']:.0f}", *[f"{r['ms'].get(k, 0.0):.0f}" for k in KINDS],
                                        *excess]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="resnet20,densenet_bc28_k12", help="model presets (conf/model), each optionally :IMPL; the first is the base")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward")
    p.add_argument("--experiment", default="fmnist_decisive", help="the preset whose batch applies")
    p.add_argument("--override", dest="overrides", action="append", default=[], help="a Hydra override (repeat)")
    p.add_argument("--batch", type=int, default=0, help="batch size (0: the preset's)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.arms = args.arms.split(",")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [profile_arm(arm, args) for arm in args.arms]
    print(f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}; {args.precision}, channels_last, "
          f"{'compiled' if args.compile else 'eager'}, {args.threads} thread(s), mean of {args.steps} profiled steps "
          f"after {args.warmup}; self CPU ms per step")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()

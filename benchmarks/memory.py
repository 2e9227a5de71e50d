"""Peak memory of one training step of DenseNet-121, normal vs memory-efficient mode.

    .venv/bin/python benchmarks/memory.py [--batch 32] [--size 224]

Each configuration runs in its own subprocess (so no allocator cache or earlier peak leaks into
the next one): build the model and a batch, record the resident set size, run one SGD step
(forward, cross-entropy, backward, optimizer step) in train mode, then read the process's peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). The figure reported is the
peak during the step minus the resident size just before it. Not a test: timings and absolute
figures depend on the machine; only the comparison within one run is meaningful.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CONFIGS = {
    "densenet_exp densenet121": ("ours", False),
    "densenet_exp densenet121 memory_efficient": ("ours", True),
    "torchvision densenet121": ("torchvision", False),
    "torchvision densenet121 memory_efficient": ("torchvision", True),
}


def _child(name: str, batch: int, size: int) -> None:
    import gc
    import resource
    import time

    import psutil
    import torch
    import torch.nn.functional as F
    import torchvision

    from densenet_exp.models import densenet121

    source, efficient = CONFIGS[name]
    torch.manual_seed(0)
    if source == "ours":
        model = densenet121(memory_efficient=efficient)
    else:
        model = torchvision.models.densenet121(weights=None, memory_efficient=efficient)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "rss_before": rss_before,
                "maxrss_before": maxrss_before,
                "maxrss_after": maxrss_after,
                "growth": maxrss_after - rss_before,
                "seconds": seconds,
                "loss": loss.item(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.batch, args.size)
        return

    gib = 1024**3
    print(f"One training step (SGD), batch {args.batch}, {args.size}x{args.size}, fp32, CPU; one subprocess each.")
    print(f"{'model':45s} {'RSS before':>11s} {'peak RSS':>10s} {'peak growth':>12s} {'step s':>8s}")
    rows = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--size", str(args.size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{name:45s} FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows[name] = r
        print(
            f"{name:45s} {r['rss_before'] / gib:9.2f} G {r['maxrss_after'] / gib:8.2f} G"
            f" {r['growth'] / gib:10.2f} G {r['seconds']:8.1f}"
        )
    for source in ("densenet_exp", "torchvision"):
        normal, efficient = rows.get(f"{source} densenet121"), rows.get(f"{source} densenet121 memory_efficient")
        if normal and efficient:
            print(f"{source}: memory_efficient peak growth = {efficient['growth'] / normal['growth']:.0%} of normal")


if __name__ == "__main__":
    main()

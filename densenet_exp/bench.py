"""Side-by-side benchmark of the train step and inference of DenseNets and ResNets.

    python -m densenet_exp.bench                                  # CPU, 32x32, batch 32
    python -m densenet_exp.bench --size 224 --batch 32 --steps 5 --reference tv_densenet121
    python -m densenet_exp.bench --models densenet121,densenet121:fast,timm_densenet121

Each entry runs in its own process (a clean allocator and a clean peak-memory counter), warms up,
then times several steps; the table reports medians, peak memory, FLOPs and each entry's ratio
to the reference entry measured in the same run, then the performance goals as ratios of
entries of that same run. `NAME` alone is the model as its library ships it (NCHW, fp32, the
default allocator); `NAME:fp32fast` adds the speed settings the harness's `auto` picks on this
device (densenet_exp/speed.py: channels_last, and on a CPU glibc keeping freed memory);
`NAME:fast` adds bf16 autocast where it is native (what `trainer.precision: auto` picks).
On a shared machine, `--threads 1 --clock cpu` gives steadier figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import record
from .checks import ArgumentParser, InvalidValue, require, require_int
from .training.speed import bf16_native, choose_speed, keep_freed_memory, use_channels_last, use_keep_freed_memory

DEFAULT_MODELS = (
    "densenet121",
    "densenet121:fp32fast",
    "densenet121:fast",
    "densenet121_me",
    "densenet121_me:fp32fast",
    "tv_densenet121",
    "tv_densenet121:fp32fast",
    "tv_densenet121_me",
    "timm_densenet121",
    "timm_densenet121:fp32fast",
    "resnet18",
    "resnet50",
)

# What an entry's `:OPTION` switches on, as the harness's `speed` settings do on this device.
OPTIONS: dict[str, tuple[str, ...]] = {
    "": (),
    "fp32fast": ("channels_last", "keep_freed_memory"),
    "fast": ("channels_last", "keep_freed_memory", "bf16"),
}


def _ours(**kwargs: Any) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from .models import densenet121

        return densenet121(num_classes=num_classes, **kwargs)

    return build


def _torchvision(name: str, **kwargs: Any) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs)

    return build


def _timm(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import timm  # a bench extra: `pip install -e '.[dev]'`

        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return build


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "densenet121": _ours(),
    "densenet121_me": _ours(memory_efficient=True),
    "tv_densenet121": _torchvision("densenet121"),
    "tv_densenet121_me": _torchvision("densenet121", memory_efficient=True),
    "timm_densenet121": _timm("densenet121"),
    "resnet18": _torchvision("resnet18"),
    "resnet50": _torchvision("resnet50"),
}


def peak_memory_mb(device: torch.device, baseline_kib: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 1024


def measure(entry: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time one entry in this process: train steps, then inference; medians of `args.steps`."""
    name, _, option = entry.partition(":")
    switches = OPTIONS[option]
    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else device.type
    if "keep_freed_memory" in switches:
        keep_freed_memory(use_keep_freed_memory("auto", accelerator))  # as the harness's `auto`
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = MODELS[name](args.num_classes).to(device)
    from .probes import count_flops

    flops = count_flops(model, (1, 3, args.size, args.size))
    bf16 = "bf16" in switches or args.precision == "bf16"
    autocast_dtype = torch.bfloat16 if bf16 and bf16_native(device) else None
    if "channels_last" in switches and use_channels_last("auto", accelerator):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # CPU time of the process (all its threads, page faults included) hardly moves when other
    # processes share the cores; wall time does. GPU work needs wall time.
    clock = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.no_grad(), torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            model(x)

    results: dict[str, Any] = {"entry": entry, "params": sum(p.numel() for p in model.parameters()), **flops}
    for mode, step in (("train", train_step), ("infer", infer_step)):
        model.train(mode == "train")
        times = []
        for i in range(args.warmup + args.steps):
            sync()
            start = clock()
            step()
            sync()
            if i >= args.warmup:
                times.append(clock() - start)
        results[f"{mode}_images_per_s"] = args.batch / statistics.median(times)
        if mode == "train":
            results["peak_memory_mb"] = peak_memory_mb(device, baseline)
    results["precision"] = "bf16" if autocast_dtype is not None else "fp32"
    return results


def run_entry(entry: str, argv: list[str]) -> dict[str, Any]:
    """Measure one entry in a fresh process."""
    cmd = [sys.executable, "-m", "densenet_exp.bench", *argv, "--child", entry]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"entry": entry, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label(row: dict[str, Any], several_thread_counts: bool) -> str:
    """The row's name in the table: the entry, and its threads where a run measured several counts."""
    return f"{row['entry']} @{row['threads']}t" if several_thread_counts else row["entry"]


def format_table(rows: list[dict[str, Any]], reference: str) -> str:
    several = len({r["threads"] for r in rows}) > 1
    header = (
        f"| model | params (M) | GMACs/img | precision | train img/s | infer img/s | peak train mem (MB) "
        f"| train x {reference} | infer x {reference} | mem x {reference} |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {label(r, several)} | error: {r['error']} |" + " |" * 8)
            continue
        # The reference measured with the same threads.
        ref = next((x for x in rows if x["entry"] == reference and x["threads"] == r["threads"] and "error" not in x),
                   None)

        def ratio(key: str) -> str:
            return f"{r[key] / ref[key]:.2f}" if ref and ref[key] else ""

        lines.append(
            f"| {label(r, several)} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.3f} | {r['precision']} "
            f"| {r['train_images_per_s']:.1f} | {r['infer_images_per_s']:.1f} | {r['peak_memory_mb']:.0f} "
            f"| {ratio('train_images_per_s')} | {ratio('infer_images_per_s')} | {ratio('peak_memory_mb')} |"
        )
    return "\n".join(lines)


# (description, numerator entry, denominator entry, measure, goal): ratio >= goal, or <= for memory.
GOALS = (
    ("train ours / timm, eager fp32", "densenet121", "timm_densenet121", "train_images_per_s", 1.0),
    ("train ours / torchvision, eager fp32", "densenet121", "tv_densenet121", "train_images_per_s", 1.3),
    ("train ours fp32fast / timm eager", "densenet121:fp32fast", "timm_densenet121", "train_images_per_s", 1.0),
    ("train ours fp32fast / torchvision eager", "densenet121:fp32fast", "tv_densenet121", "train_images_per_s", 1.3),
    ("train ours fast / timm eager", "densenet121:fast", "timm_densenet121", "train_images_per_s", 1.3),
    # Memory-efficient mode under the settings `auto` picks for it, against torchvision's as shipped
    # and against our normal mode under its own `auto` settings.
    ("peak memory ours ME fp32fast / torchvision ME", "densenet121_me:fp32fast", "tv_densenet121_me", "peak_memory_mb",
     1.0),
    ("train ours ME / ours, both fp32fast", "densenet121_me:fp32fast", "densenet121:fp32fast", "train_images_per_s", 0.9),
)


def format_goals(rows: list[dict[str, Any]]) -> str:
    """One line per goal (and thread count) whose two entries were measured in this run: the
    ratio, the goal, met or not."""
    counts = sorted({r["threads"] for r in rows})
    lines = []
    for threads in counts:
        by_entry = {r["entry"]: r for r in rows if "error" not in r and r["threads"] == threads}
        for text, num, den, key, goal in GOALS:
            if num in by_entry and den in by_entry and by_entry[den][key]:
                ratio = by_entry[num][key] / by_entry[den][key]
                memory = key == "peak_memory_mb"
                met = ratio <= goal if memory else ratio >= goal
                where = f", {threads} threads" if len(counts) > 1 else ""
                lines.append(f"- {text}{where}: {ratio:.2f} (goal {'<=' if memory else '>='} {goal}) "
                             f"{'met' if met else 'NOT met'}")
    return "\n".join(lines)


def log_to_mlflow(rows: list[dict[str, Any]], table: str, args: argparse.Namespace) -> str:
    from pathlib import Path
    import tempfile

    import mlflow

    from .runs.store import tracking_uri
    from .runs.tracking import ensure_experiment

    client = mlflow.MlflowClient(tracking_uri(args.tracking_uri, Path.cwd()))
    run = client.create_run(ensure_experiment(client, "bench"), tags={"mlflow.runName": f"bench-{args.size}px"})
    for key in ("size", "batch", "steps", "warmup", "device", "precision", "reference", "clock"):
        client.log_param(run.info.run_id, key, getattr(args, key))
    client.log_param(run.info.run_id, "threads", ",".join(map(str, args.thread_counts)))
    for r in rows:
        name = r["entry"].replace(":", "_") + (f"_{r['threads']}t" if len(args.thread_counts) > 1 else "")
        for key in ("train_images_per_s", "infer_images_per_s", "peak_memory_mb", "macs", "flops", "params"):
            if key in r:
                client.log_metric(run.info.run_id, f"{name}.{key}", r[key])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bench.md").write_text(table + "\n")
        (Path(tmp) / "bench.json").write_text(json.dumps(rows, indent=1))
        client.log_artifacts(run.info.run_id, tmp)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


OVERHEAD_OVERRIDES = (
    "experiment=quickstart", "probes=none", "probes.size_cost=true", "trainer.max_epochs=1",
    "trainer.precision=32-true", "trainer.enable_progress_bar=false",
)


def bare_epoch(overrides: list[str]) -> float:
    """Seconds for one epoch (train, then validation) of a plain PyTorch loop over the same model,
    data, batches, optimizer and speed settings as the harness run with `overrides`."""
    from .training.classifier import ImageClassifier
    from .training.data import ImageDataModule
    from .models import build_model
    from .config import apply_knobs, composed

    cfg = composed(overrides)
    apply_knobs(cfg)
    speed = choose_speed(cfg)
    torch.manual_seed(cfg["seed"])
    torch.use_deterministic_algorithms(cfg["trainer"]["deterministic"])  # as the harness's Trainer does
    keep_freed_memory(speed.keep_freed_memory)
    model = build_model(cfg["model"])
    layout = torch.channels_last if speed.channels_last else None
    if layout:
        model = model.to(memory_format=layout)

    def as_harness(x: torch.Tensor) -> torch.Tensor:  # as ImageClassifier.forward lays a batch out
        return x.contiguous(memory_format=layout) if layout else x

    dm = ImageDataModule(cfg["data"], seed=cfg["seed"])
    dm.setup()
    train, val = dm.train_dataloader(), dm.val_dataloader()
    optimizer = ImageClassifier.build_optimizer(model.parameters(), cfg["optim"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg["optim"]["lr"], total_steps=len(train))
    start = time.perf_counter()
    model.train()
    for x, y in train:
        loss = nn.functional.cross_entropy(model(as_harness(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(as_harness(x)).argmax(1) == y).sum().item() for x, y in val)
    assert correct >= 0
    return time.perf_counter() - start


def harness_overhead(args: argparse.Namespace) -> dict[str, float]:
    """One epoch through `python -m densenet_exp.run` against a bare loop, each in a fresh process,
    alternating `args.repeats` times; medians, since processes on a shared CPU vary by several %."""
    import os
    import tempfile
    from pathlib import Path

    import mlflow

    overrides = [*OVERHEAD_OVERRIDES, f"data.train_size={args.train_size}", f"cpu_threads={args.threads}"]
    harness, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        Path(tmp, "overrides.json").write_text(json.dumps(overrides))
        bare_cmd = [sys.executable, "-m", "densenet_exp.bench", "--threads", str(args.threads),
                    "--bare-epoch", str(Path(tmp, "overrides.json"))]
        for i in range(args.repeats):
            cmd = [sys.executable, "-m", "densenet_exp.run", *overrides, f"hydra.run.dir={tmp}/run{i}"]
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            bare.append(float(subprocess.run(bare_cmd, check=True, capture_output=True, text=True).stdout.split()[-1]))
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
        harness = [run.data.metrics[record.EPOCH_TIME_S] for run in runs]
    h, b = statistics.median(harness), statistics.median(bare)
    return {"harness_epoch_s": h, "bare_epoch_s": b, "overhead": h / b - 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m densenet_exp.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated entries, NAME or NAME:OPTION, OPTION one of {', '.join(o for o in OPTIONS if o)}")
    p.add_argument("--reference", default="tv_densenet121", help="entry the ratios divide by")
    p.add_argument("--size", type=int, default=32, help="input resolution")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first: a CPU step speeds up over the first few")
    p.add_argument("--threads", default=str(torch.get_num_threads()),
                   help="torch threads of each entry's process; a list (1,2) measures every entry at each")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="for every entry")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time steps by the process's CPU time, steadier on a shared machine (use with "
                        "--threads 1, where it equals the wall time of an idle core); CPU only")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--log-mlflow", action="store_true", help="log the table to the MLflow experiment 'bench'")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--overhead", action="store_true",
                   help="instead: one epoch through the harness (Lightning, MLflow, probes off) vs a bare loop")
    p.add_argument("--train-size", type=int, default=8192, help="training images for --overhead")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each for --overhead (median)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bare-epoch", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        for entry in args.models.split(","):
            name, _, option = entry.partition(":")
            require("--models", entry, name in MODELS and option in OPTIONS,
                    f"NAME or NAME:OPTION, NAME one of {', '.join(MODELS)}, OPTION one of "
                    f"{', '.join(o for o in OPTIONS if o)}")
        counts = args.threads.split(",")
        require("--threads", args.threads, all(c.isdigit() and int(c) >= 1 for c in counts),
                "an integer >= 1 or a comma-separated list of them")
        args.thread_counts, args.threads = [int(c) for c in counts], int(counts[0])
        for key in ("size", "batch", "steps", "num_classes", "repeats", "train_size"):
            require_int(f"--{key.replace('_', '-')}", getattr(args, key), 1)
    except InvalidValue as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return []
    if args.bare_epoch:
        print(bare_epoch(json.loads(open(args.bare_epoch).read())))
        return []
    if args.overhead:
        result = harness_overhead(args)
        print(
            f"one epoch, {args.train_size} images, {args.threads} threads, median of {args.repeats}: harness "
            f"{result['harness_epoch_s']:.1f} s, bare loop {result['bare_epoch_s']:.1f} s, "
            f"overhead {100 * result['overhead']:+.1f}%"
        )
        return [result]
    passthrough = [a for a in argv if not a.startswith("--log-mlflow")]
    rows = []
    for threads in args.thread_counts:
        for entry in args.models.split(","):
            print(f"measuring {entry} on {threads} threads ...", file=sys.stderr, flush=True)
            rows.append({**run_entry(entry, [*passthrough, "--threads", str(threads)]), "threads": threads})
    table = format_table(rows, args.reference)
    print(
        f"{args.device}, {','.join(map(str, args.thread_counts))} threads, {args.size}x{args.size}, batch {args.batch}, "
        f"median of {args.steps} steps after {args.warmup} warm-up, {args.clock} clock, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(table)
    goals = format_goals(rows)
    if goals:
        print("\ngoals, ratios of entries above:\n" + goals)
    if args.log_mlflow:
        print(f"logged to MLflow run {log_to_mlflow(rows, table, args)}")
    return rows


if __name__ == "__main__":
    main()

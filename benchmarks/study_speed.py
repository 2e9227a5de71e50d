"""Train-step throughput of the study's arms at 28x28, and what the harness's defaults make of it.

    python benchmarks/study_speed.py                          # every arm, every setting (10-20 min)
    python benchmarks/study_speed.py --clock cpu              # on a machine shared with other work
    python benchmarks/study_speed.py --arms resnet20,densenet_s9 --steps 5 --no-compile
    python benchmarks/study_speed.py --arms resnet20,densenet_bc28_k12,densenet_bc28_k12:shared_stats

An arm is a model preset, optionally `PRESET:IMPL` for a DenseNet training step other than the
preset's (`model.impl`, models/densenet.py IMPLS): old and new measured in the same run.

For each arm (a model of the study, one grey channel, 10 classes, the study preset's batch) the
train step (forward, cross-entropy, backward, SGD step) is timed in each setting:

- `1 thread`: one process with one thread, every precision (fp32, and bf16 autocast where it is
  native), NCHW and channels_last, eager and torch.compile'd, interleaved step by step in that
  process so that their ratios hold even when the machine is busy;
- `1 x N threads`: one process with all N cores (what a sweep ran as before: one job at a time);
- `N x 1 thread`: N processes of one thread at once, their images/s summed (a joblib sweep with
  n_jobs = cores, `hydra/launcher=cpu_parallel`).

Figures are images/s, the median of --steps after --warmup. With `--clock cpu` they are images
per CPU second times the cores a setting occupies: a one-thread process's CPU time hardly moves
when other work shares the cores, so same-run ratios of one-thread settings stay honest under
load; a process of several threads is another matter (a thread whose sibling was descheduled spins
at the next barrier, on CPU time), so under a load above the cores the `1 x N threads` columns, and
the defaults' ratio built on them, hold for that load only (the header line says so). Idle-machine
figures need `--clock wall` (the default) on an idle machine.

Then, per arm, the ratio of what the defaults now choose (precision and channels_last `auto`,
`speed.compile: auto` for the study preset's run length, N one-thread jobs) to what they chose
before (same precision and layout, eager, one job on all cores), and the same ratio over a whole
study plan (every arm, equal runs, compile time included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

# The study's arms: model presets of conf/model (densenet_bc28_k12: DenseNet-BC k=12, blocks of 4, 4, 4).
ARMS = ("resnet20", "resnet56", "plain20", "plain56", "densenet_s9", "densenet_bc16_k12", "densenet_bc28_k12",
        "densenet_bc40_k12")
PRECISIONS = ("fp32", "bf16")


def arm_overrides(arm: str) -> list[str]:
    """The Hydra overrides of an arm `PRESET` or `PRESET:IMPL`."""
    preset, _, impl = arm.partition(":")
    return [f"model={preset}", *([f"+model.impl={impl}"] if impl else [])]


def compose(overrides: list[str]) -> dict[str, Any]:
    """The resolved run config of the harness for `overrides` (knobs folded into the model)."""
    from densenet_exp.config import composed

    return composed(overrides)


def variant_name(precision: str, channels_last: bool, compiled: bool) -> str:
    return f"{precision}-{'cl' if channels_last else 'nchw'}" + ("-compiled" if compiled else "")


def parse_variant(name: str) -> tuple[str, bool, bool]:
    precision, layout, *rest = name.split("-")
    return precision, layout == "cl", bool(rest)


# -- one process: its variants of one arm, interleaved step by step -------------------------------

def measure(arm: str, variants: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of each variant's train step (median of args.steps after args.warmup), the first
    compiled step's extra seconds (the compile) and the arm's parameters."""
    import torch
    from torch import nn

    from densenet_exp.models import build_model
    from densenet_exp.training.speed import compile_cache_per_cpu_capability

    cfg = compose([*args.overrides, *arm_overrides(arm)])
    batch = args.batch or cfg["data"]["batch_size"]
    torch.manual_seed(0)
    x0 = torch.randn(batch, cfg["data"]["channels"], cfg["data"]["image_size"], cfg["data"]["image_size"])
    y = torch.randint(0, cfg["data"]["num_classes"], (batch,))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    steps = {}
    params = 0
    for name in variants:
        precision, channels_last, compiled = parse_variant(name)
        torch.manual_seed(0)
        model = build_model(cfg["model"])
        params = sum(p.numel() for p in model.parameters())
        x = x0
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x0.contiguous(memory_format=torch.channels_last)
        if compiled:
            compile_cache_per_cpu_capability()
        forward = torch.compile(model) if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        dtype = torch.bfloat16 if precision == "bf16" else None

        def step(forward=forward, optimizer=optimizer, x=x, dtype=dtype) -> None:
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(forward(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in variants}
    first_wall: dict[str, float] = {}
    for _ in range(args.warmup + args.steps):
        for name, step in steps.items():
            start, start_wall = clock(), time.perf_counter()
            step()
            times[name].append(clock() - start)
            first_wall.setdefault(name, time.perf_counter() - start_wall)
    result: dict[str, Any] = {"arm": arm, "params": params, "batch": batch, "pid": os.getpid()}
    for name, t in times.items():
        median = statistics.median(t[args.warmup:])
        # The compile's seconds in wall time (its C++ compilers are other processes): the first
        # step less a steady one.
        result[name] = {"images_per_s": batch / median, "first_step_s": max(0.0, first_wall[name] - median)}
    return result


def run_children(arm: str, variants: list[str], threads: int, processes: int, args: argparse.Namespace,
                 argv: list[str]) -> list[dict[str, Any]]:
    """`processes` fresh processes of `threads` threads each, started together, one arm each."""
    cmd = [sys.executable, __file__, *argv, "--child", arm, "--variants", ",".join(variants), "--threads", str(threads)]
    # One thread really means one: no OpenMP pool larger than torch's, no oneDNN threads of its own.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(processes)]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{arm} ({threads} threads): {(err.strip().splitlines() or ['failed'])[-1]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


# -- what the defaults choose ---------------------------------------------------------------------

def native_precisions() -> tuple[str, ...]:
    from densenet_exp.training.speed import cpu_bf16

    return ("fp32", "bf16") if cpu_bf16()[0] else ("fp32",)


def defaults_for(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """What the harness resolves for this arm in the study preset: precision, channels_last,
    whether `speed.compile: auto` compiles (and why), on this machine."""
    from densenet_exp.training.speed import choose_speed

    cfg = compose([*args.overrides, *arm_overrides(arm), "trainer=cpu"])
    speed = choose_speed(cfg)
    return {
        "precision": "bf16" if speed.precision.startswith("bf16") else "fp32",
        "channels_last": speed.channels_last,
        "compile": bool(cfg["speed"]["compile"]),
        "compile_reason": speed.compile_reason,
        "train_images": speed.planned_train_images,
    }


def arm_figures(arm: str, args: argparse.Namespace, argv: list[str], cores: int) -> dict[str, Any]:
    """Every setting of one arm: a one-thread process over all variants, one process of `cores`
    threads, and `cores` one-thread processes at once (the last two over channels_last, eager
    and compiled, in each precision, and the variant the defaults choose)."""
    defaults = defaults_for(arm, args)
    precisions = [p for p in args.precisions if p in native_precisions()]
    compiled = (False, True) if args.compile else (False,)
    every = [variant_name(p, cl, c) for p in precisions for cl in (False, True) for c in compiled if cl or not c]
    parallel = [variant_name(p, True, c) for p in precisions for c in compiled]
    # Before: the same precision and layout, eager, one job on all cores. Now: what `auto` picks
    # (compile only where measured), one job per core.
    before = variant_name(defaults["precision"], True, False)
    now = variant_name(defaults["precision"], defaults["channels_last"], defaults["compile"] and args.compile)
    every += [v for v in (before, now) if v not in every]
    parallel += [v for v in (before, now) if v not in parallel]
    scale = (lambda threads: threads) if args.clock == "cpu" else (lambda threads: 1)
    (one,) = run_children(arm, every, 1, 1, args, argv)
    figures: dict[str, Any] = {"arm": arm, "params": one["params"], "batch": one["batch"], "one": {}, "wide": {},
                               "jobs": {}, "compile_s": {}, "compile_again_s": {}, "defaults": defaults,
                               "before": before, "now": now}
    for name in every:
        figures["one"][name] = one[name]["images_per_s"]
        if parse_variant(name)[2]:
            figures["compile_s"][name] = one[name]["first_step_s"]
    if cores > 1:
        (wide,) = run_children(arm, parallel, cores, 1, args, argv)
        jobs = run_children(arm, parallel, 1, cores, args, argv)
        for name in parallel:
            figures["wide"][name] = wide[name]["images_per_s"] * scale(cores)
            figures["jobs"][name] = sum(j[name]["images_per_s"] for j in jobs)
            if parse_variant(name)[2]:  # compiled again, after the first process filled the kernel cache
                figures["compile_again_s"][name] = min(j[name]["first_step_s"] for j in jobs)
    else:
        figures["wide"] = figures["jobs"] = {name: figures["one"][name] for name in parallel}
    return figures


def before_and_now(f: dict[str, Any]) -> tuple[float, float]:
    """Images/s of the settings the defaults chose before and choose now."""
    return f["wide"][f["before"]], f["jobs"][f["now"]]


def format_table(rows: list[dict[str, Any]], cores: int) -> str:
    n = cores
    header = (f"| arm | params (K) | precision | 1 thread NCHW | 1 thread channels_last | 1 thread compiled "
              f"| compile s, first / again | 1 x {n} threads | 1 x {n} threads compiled | {n} x 1 thread | {n} x 1 thread compiled "
              f"| defaults now / before |")
    lines = [header, "|" + "---|" * 12]
    for f in rows:
        b, a = before_and_now(f)
        for precision in PRECISIONS:
            cl, nchw, comp = (variant_name(precision, True, False), variant_name(precision, False, False),
                              variant_name(precision, True, True))
            if cl not in f["one"]:
                continue

            def fig(table: str, name: str) -> str:
                value = f[table].get(name)
                return f"{value:.0f}" if value else ""

            first, again = f["compile_s"].get(comp), f["compile_again_s"].get(comp)
            compile_s = "" if first is None else f"{first:.0f}" + ("" if again is None else f" / {again:.0f}")
            ratio = f"**{a / b:.2f}**" if precision == f["defaults"]["precision"] else ""
            lines.append(
                f"| {f['arm']} | {f['params'] / 1e3:.0f} | {precision} | {fig('one', nchw)} | {fig('one', cl)} "
                f"| {fig('one', comp)} | {compile_s} | {fig('wide', cl)} "
                f"| {fig('wide', comp)} | {fig('jobs', cl)} | {fig('jobs', comp)} | {ratio} |"
            )
    return "\n".join(lines)


def format_ratios(rows: list[dict[str, Any]], cores: int, goal: float, seeds: int) -> str:
    """Per arm: the settings before and now and their ratio; then over a study plan of equal runs
    of every arm (each run's compile time included), and whether the goal is met."""
    lines = []
    before_s = now_s = 0.0
    for f in rows:
        b, a = before_and_now(f)
        d = f["defaults"]
        unmeasured = " (compile chosen, not measured: --no-compile)" if d["compile"] and not parse_variant(f["now"])[2] \
            else ""
        lines.append(f"- {f['arm']}: {f['now']} x {cores} jobs / {f['before']} x 1 job of {cores} threads: {a / b:.2f} "
                     f"(compile {'on' if d['compile'] else 'off'}: {d['compile_reason']}){unmeasured}")
        images = d["train_images"]
        before_s += images / b
        # The first run of an arm compiles with a cold kernel cache, the other seeds' with a warm one.
        first = f["compile_s"].get(f["now"], 0.0)
        compile_s = (first + (seeds - 1) * f["compile_again_s"].get(f["now"], first)) / seeds
        # N runs at once, each at a / N images/s after its compile: per run I / a + C / N.
        now_s += images / a + compile_s / cores
    ratio = before_s / now_s
    lines.append(f"- study plan (every arm above, {seeds} runs each of {rows[0]['defaults']['train_images']} training "
                 f"images, compile time included): {ratio:.2f} (goal >= {goal}) {'met' if ratio >= goal else 'NOT met'}")
    return "\n".join(lines)


def machine_line(args: argparse.Namespace) -> str:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    extras = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (f"{model} ({', '.join(extras) or 'no AVX512-BF16/AMX'}), {os.cpu_count()} cores, ATen capability "
            f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default=",".join(ARMS),
                   help="comma-separated model presets (conf/model), each optionally :IMPL (model.impl)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="fp32,bf16 (bf16 only where native)")
    p.add_argument("--experiment", default="fmnist_decisive", help="the preset whose batch and run length apply")
    p.add_argument("--override", dest="extra", action="append", default=[],
                   help="a Hydra override of the preset (repeat), e.g. trainer.max_epochs=10")
    p.add_argument("--batch", type=int, default=0, help="batch size (0: the preset's)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="N of the 1 x N and N x 1 settings")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--goal", type=float, default=1.3)
    p.add_argument("--seeds", type=int, default=5, help="runs per arm in the plan (the first compiles cold)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variants", default="", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from densenet_exp.checks import InvalidValue, require, require_int
    from densenet_exp.options import IMPLS

    args.arms, args.precisions = args.arms.split(","), args.precisions.split(",")
    try:
        for arm in args.arms:
            preset, _, impl = arm.partition(":")
            require("--arms", arm, (ROOT / "conf" / "model" / f"{preset}.yaml").is_file()
                    and impl in ("", *IMPLS), f"model presets of conf/model, each optionally :{'|:'.join(IMPLS)}")
        for precision in args.precisions:
            require("--precisions", precision, precision in PRECISIONS, f"from {', '.join(PRECISIONS)}")
        for key in ("steps", "warmup", "cores", "seeds"):
            require_int(f"--{key}", getattr(args, key), 1 if key != "warmup" else 0)
        if args.child is None:
            require("--warmup", args.warmup, args.warmup >= 1 or not args.compile,
                    "at least 1 with compile (the first step compiles)")
    except InvalidValue as err:
        p.error(str(err))
    args.overrides = [f"experiment={args.experiment}", *args.extra]
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.child, args.variants.split(","), args)))
        return []
    load = os.getloadavg()
    rows = []
    for arm in args.arms:
        print(f"measuring {arm} ...", file=sys.stderr, flush=True)
        rows.append(arm_figures(arm, args, argv, args.cores))
    loaded = max(load[0], os.getloadavg()[0]) > args.cores and args.clock == "cpu" and args.cores > 1
    print(f"{machine_line(args)}; batch {rows[0]['batch']}, 28x28x1, median of {args.steps} steps after "
          f"{args.warmup}, {args.clock} clock; load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
          # A thread whose sibling is descheduled by other work spins at the next barrier, on CPU time.
          + (f"; LOADED: the 1 x {args.cores} threads columns count the CPU time a thread spins waiting for its "
             f"descheduled siblings, so they and the defaults' ratio hold for this load only" if loaded else ""))
    print(format_table(rows, args.cores))
    print("\ndefaults now (auto precision and layout, speed.compile auto, one job per core) / before (eager, "
          "one job on all cores), train images/s:")
    print(format_ratios(rows, args.cores, args.goal, args.seeds))
    return rows


if __name__ == "__main__":
    main()

"""What a run trains on and how fast: the device, the precision, and per-device speed settings,
each chosen by the capability of the machine the run lands on, never by the one it was tuned on.

Every `auto` follows one rule, `choose_speed`, and the run records what was chosen and why
(tags `cpu_capability`, `precision`, `precision_reason`, `speed.*`). channels_last and kept
freed memory change only how fast and in how much memory; the precision changes what is computed
(bf16 keeps 8 bits of mantissa) and compiled kernels round differently, so the resolved precision
and `speed.compile` are part of the run's config and config hash.

Measured (README, "Speed settings"): on a 2-core x86-64 CPU, DenseNet train steps on 28x28
images, one thread, CPU time per step of batch 128 (Intel Xeon, Sapphire Rapids class, AVX512-BF16
and AMX; AVX2 imitated with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2):

| small DenseNet-BC, batch 128 | fp32 NCHW | fp32 channels_last | bf16 NCHW | bf16 channels_last |
|---|---|---|---|---|
| AVX-512 with AMX (native bf16) | 0.73-0.84 s | 0.54-0.65 s | 0.48-0.56 s | 0.40-0.48 s |
| AVX2 (imitated: bf16 emulated) | 0.87-0.91 s | 0.65-0.70 s | | 3.7 s |

So: bf16 autocast only where it is native (1.3x faster there; 5.7x slower emulated here, 18x
on an AVX2 EPYC), channels_last on every CPU kind (1.3x on both), and kept freed memory on
both (no difference at 28x28, where no block reaches glibc's 32 MB mmap threshold; 1.2-1.3x at
224x224, where every concatenation does), memory-efficient models included
(`use_keep_freed_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import record
from ..checks import require
from ..options import train_batches

log = logging.getLogger("densenet_exp")

# mallopt(3) parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4

# Lightning's precision strings, and `auto`.
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "64")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first with native bf16 (AVX512_CORE_BF16).
_ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def cpu_capability() -> str:
    """The vector instruction set ATen dispatches its CPU kernels to (`AVX2`, `AVX512`, ...):
    what the hardware has, capped by ATEN_CPU_CAPABILITY."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_bf16(capability: str | None = None) -> tuple[bool, str]:
    """Whether bf16 runs natively on this CPU, and why (or why not).

    Native: the CPU has AVX512-BF16 or AMX, ATen dispatches to AVX-512 (ATEN_CPU_CAPABILITY may
    cap it) and oneDNN may use bf16 instructions (ONEDNN_MAX_CPU_ISA may cap it). Anything less
    emulates bf16 (measured 5.7x slower than fp32 on imitated AVX2, 18x on an AVX2 EPYC).
    """
    capability = cpu_capability() if capability is None else capability
    has_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if not has_bf16:
        return False, f"cpu {capability} without AVX512-BF16 or AMX: bf16 would be emulated"
    if not capability.startswith("AVX512"):
        return False, f"cpu has AVX512-BF16/AMX but ATen dispatches to {capability}: bf16 would be emulated"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa in _ONEDNN_ISAS_WITHOUT_BF16:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN off bf16 instructions: bf16 would be emulated"
    return True, f"cpu {capability} with AVX512-BF16/AMX: native bf16"


def gpu_bf16() -> tuple[bool, str]:
    """Whether the CUDA GPU runs bf16 natively (Ampere and later), and why."""
    name = torch.cuda.get_device_name(0)
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return True, f"gpu {name} supports bf16"
    return False, f"gpu {name} lacks native bf16"


def resolve_accelerator(accelerator: str) -> str:
    """`auto`: a CUDA GPU when there is one (as Lightning's `auto` picks it), else the CPU."""
    if accelerator != "auto":
        return accelerator
    if torch.cuda.is_available():
        return "gpu"
    return "cpu"


def on_gpu(accelerator: str) -> bool:
    """Whether Lightning's `accelerator` is a CUDA GPU."""
    return accelerator in ("gpu", "cuda") and torch.cuda.is_available()


@dataclass(frozen=True)
class Speed:
    """What `choose_speed` picked for a run."""

    accelerator: str
    precision: str
    precision_reason: str
    cpu_capability: str
    channels_last: bool
    keep_freed_memory: bool
    compile: bool = False
    compile_reason: str = "set by speed.compile"
    planned_train_images: int | None = None  # epochs x training images per epoch, where known

    def tags(self) -> dict[str, str]:
        """The run's record of the choice."""
        d = asdict(self)
        return {
            record.CPU_CAPABILITY: d["cpu_capability"],
            record.PRECISION: d["precision"],
            record.PRECISION_REASON: d["precision_reason"],
            record.ACCELERATOR: d["accelerator"],
            "speed.channels_last": str(d["channels_last"]).lower(),
            "speed.keep_freed_memory": str(d["keep_freed_memory"]).lower(),
            "speed.compile": str(d["compile"]).lower(),
            "speed.compile_reason": d["compile_reason"],
        }


def choose_precision(setting: str, accelerator: str) -> tuple[str, str]:
    """`auto`: bf16-mixed where bf16 is native (a CUDA GPU that supports it; a CPU with AVX512-BF16
    or AMX that ATen and oneDNN may use), else 32-true. Anything else is kept as set."""
    setting = str(setting)
    require("trainer.precision", setting, setting in PRECISIONS, f"one of {', '.join(PRECISIONS)}")
    if setting != "auto":
        return setting, "set by trainer.precision"
    if on_gpu(accelerator):
        native, why = gpu_bf16()
    elif accelerator == "cpu":
        native, why = cpu_bf16()
    else:
        native, why = False, f"accelerator {accelerator}: bf16 not known to be native"
    return ("bf16-mixed" if native else "32-true"), why


def use_channels_last(setting: bool | str, accelerator: str) -> bool:
    """`auto`: on for a CUDA GPU and for every CPU kind: measured 1.3x faster in fp32 on AVX2
    (imitated) and AVX-512 alike (28x28 DenseNet-BC train step, table above), more in bf16, and
    1.2x for DenseNet-121 at 224x224 on an AVX-512 EPYC."""
    if setting != "auto":
        return bool(setting)
    return accelerator == "cpu" or on_gpu(accelerator)


def use_keep_freed_memory(setting: bool | str, accelerator: str) -> bool:
    """`auto`: on for CPU training on Linux, memory-efficient models included: they recompute
    into a fixed workspace (models/densenet.py), so a kept heap no longer grows past their live
    peak. DenseNet-121, 224x224, batch 32, one thread, CPU time per step, Intel Xeon (Sapphire
    Rapids class), each in its own process (README, "Memory-efficient mode"):

    | | s/step | peak RSS |
    |---|---|---|
    | normal mode, kept freed memory | 6.0-6.5 | 5572-5787 MB |
    | memory-efficient, kept freed memory (`auto`) | 6.0-7.0 | 2729-2895 MB |
    | memory-efficient, glibc's defaults | 6.6-7.3 | 2368-2415 MB |
    | torchvision memory_efficient=True, as shipped | 11.4-12.3 | 2994-3081 MB |

    Both meet the memory goal (peak RSS <= torchvision's); only kept memory also meets the
    speed goal (>= 0.9x the normal mode) with a margin. `speed.keep_freed_memory=false` gives
    the least memory.
    """
    if setting != "auto":
        return bool(setting)
    return accelerator == "cpu" and sys.platform.startswith("linux")


# `speed.compile: auto` compiles runs of at least this many training steps (see use_compile).
COMPILE_MIN_STEPS = 1000


def planned_train_steps(cfg: dict[str, Any]) -> int | None:
    """Optimizer steps the run's config plans (epochs x batches per epoch, per rank), or None
    where the training set's size is not known from the config (ImageFolder) or the run has no
    epoch limit."""
    trainer = cfg["trainer"]
    epochs = trainer.get("max_epochs")
    max_steps = trainer.get("max_steps")
    max_steps = max_steps if isinstance(max_steps, int) and max_steps > 0 else None
    batches = train_batches(cfg)
    if batches is None or not epochs or epochs < 0:
        return max_steps
    steps = epochs * batches
    return min(steps, max_steps) if max_steps else steps


def use_compile(setting: bool | str, cfg: dict[str, Any], accelerator: str) -> tuple[bool, str]:
    """`auto`: torch.compile the training forward of runs that train at least COMPILE_MIN_STEPS
    steps, where a compiler for its kernels is at hand (a C++ compiler on a CPU, Triton on a GPU).

    The choice depends only on the config and the machine kind, never on the state of the kernel
    cache, so the same config and seed give the same metrics (compiled kernels round differently
    from eager ones). Measured (docs/performance.md; Sapphire Rapids Xeon, one thread, bf16): a
    compile costs 27-60 s with a cold kernel cache and about 3 s with a warm one, and makes a
    train step of the study's small nets 1.05x (ResNet-20) to 1.26x (DenseNet-BC) faster. At
    1000 steps it pays even cold for the DenseNets and ResNet-56, and for every arm once the
    cache is warm, as it is for every run of a study after the first of each architecture.
    """
    if setting != "auto":
        return bool(setting), "set by speed.compile"
    if (cfg.get("model") or {}).get("memory_efficient"):
        return False, "auto: memory-efficient mode (its custom backward is not compiled)"
    steps = planned_train_steps(cfg)
    if steps is None:
        return False, "auto: run length not known from the config"
    if steps < COMPILE_MIN_STEPS:
        return False, f"auto: {steps} training steps, under {COMPILE_MIN_STEPS}"
    if on_gpu(accelerator):
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return False, "auto: no Triton for GPU kernels"
    elif accelerator == "cpu":
        import shutil

        if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "g++", "clang++")):
            return False, "auto: no C++ compiler for CPU kernels"
    else:
        return False, f"auto: accelerator {accelerator}"
    return True, f"auto: {steps} training steps, at least {COMPILE_MIN_STEPS}"


def choose_speed(cfg: dict[str, Any]) -> Speed:
    """Resolve every `auto` of a run config for this machine: `trainer.accelerator`,
    `trainer.precision`, `trainer.deterministic` (true on a CPU: same seed, same metrics; false
    on a GPU, where deterministic kernels cost speed), `trainer.benchmark` (cuDNN autotuning on a
    GPU, when set to auto), `speed.compile` (`use_compile`). The resolved trainer values and
    `speed.compile` are written back into `cfg` (they shape the result); the other `speed.*`
    switches only shape speed and are returned. Raises InvalidValue (ConfigError) on bad values."""
    trainer, speed = cfg["trainer"], cfg.get("speed", {})
    for key in ("channels_last", "keep_freed_memory", "compile"):
        value = speed.get(key, "auto")
        require(f"speed.{key}", value, value == "auto" or isinstance(value, bool), "auto, true or false")
    accelerator = resolve_accelerator(str(trainer.get("accelerator", "auto")))
    gpu_visible = torch.cuda.is_available() or torch.backends.mps.is_available()
    require("trainer.accelerator", accelerator, accelerator not in ("gpu", "cuda") or gpu_visible,
            "auto or cpu: no CUDA GPU is visible here")
    precision, reason = choose_precision(trainer.get("precision", "auto"), accelerator)
    trainer["accelerator"], trainer["precision"] = accelerator, precision
    if trainer.get("deterministic", "auto") == "auto":
        trainer["deterministic"] = not on_gpu(accelerator)
    if trainer.get("benchmark") == "auto":
        # Off a GPU, drop the key (Lightning's default): `trainer=auto` on a CPU is then the
        # same config, with the same config hash, as `trainer=cpu`.
        if on_gpu(accelerator):
            trainer["benchmark"] = True
        else:
            del trainer["benchmark"]
    compiled, compile_reason = use_compile(speed.get("compile", "auto"), cfg, accelerator)
    if "speed" in cfg:
        cfg["speed"]["compile"] = compiled  # compiled kernels round differently: part of the recipe
    steps = planned_train_steps(cfg)
    chosen = Speed(
        accelerator=accelerator,
        precision=precision,
        precision_reason=reason,
        cpu_capability=cpu_capability(),
        channels_last=use_channels_last(speed.get("channels_last", "auto"), accelerator),
        keep_freed_memory=use_keep_freed_memory(speed.get("keep_freed_memory", "auto"), accelerator),
        compile=compiled,
        compile_reason=compile_reason,
        planned_train_images=None if steps is None else steps * cfg["data"]["batch_size"],
    )
    log.info("%s, precision %s (%s), compile %s (%s)", accelerator, precision, reason, compiled, compile_reason)
    return chosen


def keep_freed_memory(on: bool) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc maps every block over 32 MB (a DenseNet-121 concatenation at 224x224 and
    batch 32 is 50-400 MB) with mmap and unmaps it on free, so each training step faults its
    activations and gradients in again, page by page: a quarter of a CPU train step here. With
    mmap off and trimming at 1 GiB, freed blocks stay in the heap. The cost: the process keeps
    its peak footprint. The setting is process-wide and stays for the process's lifetime.
    Returns whether it is now on (false where the C library is not glibc).
    """
    if not on:
        return False
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False  # not glibc (musl, macOS): nothing to tune
    return all(
        libc.mallopt(param, value) == 1
        for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    )


def compile_cache_per_cpu_capability() -> str:
    """Point torch.compile's on-disk kernel cache at a folder of its own per ATen CPU capability,
    unless TORCHINDUCTOR_CACHE_DIR names a folder other than the default; returns the folder.

    Inductor's cache key leaves ATEN_CPU_CAPABILITY out: after a run on the CPU's own ISA, a run
    with ATen capped at AVX2 (README's AVX2 imitation) reused the cached kernels and computed NaN
    (tests/test_fast_path.py). Call before the first compiled call; the folder stays for the process.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())  # torch writes it into the variable once used
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default) == default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default, cpu_capability().lower())
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively on `device` (the rule of `choose_precision`)."""
    return (gpu_bf16() if device.type == "cuda" else cpu_bf16())[0]

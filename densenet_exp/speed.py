"""Per-device speed settings of a run: memory format and how the C allocator treats freed memory.

Each is a switch under `speed` in the config, with `auto` picking what measured faster on that
device (figures in README, "Benchmark"); none changes what is computed, only how fast.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

import torch

# mallopt(3) parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def use_channels_last(setting: bool | str, trainer_cfg: dict[str, Any]) -> bool:
    """`auto`: channels_last on a GPU and on a CPU. On a 2-core AVX-512 CPU an fp32 train step ran
    1.2x (DenseNet-121, 224x224) to 1.3x (DenseNet-BC, 28x28) faster than NCHW, bf16 more."""
    if setting != "auto":
        return bool(setting)
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    return accelerator in ("cpu", "gpu", "cuda", "auto")


def keep_freed_memory(setting: bool | str, trainer_cfg: dict[str, Any]) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc maps every block over 32 MB (a DenseNet-121 concatenation at 224x224 and
    batch 32 is 50-400 MB) with mmap and unmaps it on free, so each training step faults its
    activations and gradients in again, page by page: a quarter of a CPU train step here. With
    mmap off and trimming at 1 GiB, freed blocks stay in the heap. The cost: the process keeps
    its peak footprint. `auto` turns it on for CPU training on Linux; the setting is process-wide
    and stays for the process's lifetime. Returns whether it is now on.
    """
    if setting == "auto":
        setting = str(trainer_cfg.get("accelerator", "cpu")) == "cpu" and sys.platform.startswith("linux")
    if not setting:
        return False
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False  # not glibc (musl, macOS): nothing to tune
    return all(
        libc.mallopt(param, value) == 1
        for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    )


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively: a GPU that supports it, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags

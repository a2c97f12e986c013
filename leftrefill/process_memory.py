"""Memory figures of this process, for the benchmark scripts: CUDA's allocator counters on a GPU, and on a CPU
the kernel's (``/proc/self/status``: VmRSS resident, VmHWM peak resident, VmSize address space), in GiB."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import torch


def reset_peak_memory(device: torch.device) -> float:
    """Reset the peak counter; return the memory in use now (GiB), the baseline of a step's own memory. On a
    CPU freed heap pages are handed back first (malloc_trim), so the resident size counts live memory only."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**30
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    return status_gib("VmRSS")


def peak_memory_gib(device: torch.device) -> float:
    """The peak since the last reset: CUDA max_memory_allocated, or the peak resident set size (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return status_gib("VmHWM")


def status_gib(field: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM, VmSize, ...) in GiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1]) / 2**20

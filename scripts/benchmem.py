"""Peak memory of a benchmark step, for the bench scripts (imported as a sibling module).

CUDA: ``torch.cuda.max_memory_allocated`` since :func:`reset_peak`; CPU: the process's
peak resident set size (Linux ``VmHWM``; ``reset_peak`` clears it through
``/proc/self/clear_refs``), so run each variant in its own process.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    """Start a new peak: free what can be freed, then reset the counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # "5" resets the peak resident set size of this process (Linux)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_gib(device: torch.device) -> float:
    """The peak since :func:`reset_peak`, GiB (NaN where the OS does not say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

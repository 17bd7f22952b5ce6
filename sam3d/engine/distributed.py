"""Distributed helpers shared by the bundles: rank 0 checks, barriers, unwrapping DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_rank0() -> bool:
    """True outside distributed runs and on rank 0 of a distributed run."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP / DataParallel wrapper (or the module itself)."""
    return network.module if hasattr(network, "module") else network

"""Who this process is in a torch.distributed job: rank, world size, whether there is one."""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialized torch.distributed job of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank, 0 when torch.distributed is not initialized."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks, 1 when torch.distributed is not initialized."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

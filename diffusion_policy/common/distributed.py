"""Data-parallel training with ``torch.distributed``, launched by ``torchrun`` (or ``accelerate launch``).

One process per device. ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without
them everything here degrades to a single process. Backend: nccl for CUDA, gloo otherwise (CPU CI runs 2 gloo
processes). Ranks read disjoint shards through ``DistributedSampler``, ``DistributedDataParallel`` averages
the gradients, and only rank 0 logs, evaluates and writes checkpoints.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """What the launcher asked for (from environment variables)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(device: torch.device, timeout_minutes: float = 120.0) -> DistInfo:
    """Join the process group if launched with several processes; return this process's place in it.

    The generous timeout covers rank 0 running long rollouts while the others wait at the next collective.
    """
    info = env_dist_info()
    if not info.enabled or dist.is_initialized():
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return info


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """Under torchrun each process drives the CUDA device of its local rank."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


class LossModule(nn.Module):
    """Routes ``forward`` to ``policy.compute_loss`` so DDP's gradient hooks see a forward pass."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch):
        return self.policy.compute_loss(batch)


def wrap_for_training(policy: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``LossModule(policy)``, DDP-wrapped when running with several processes (gradients get averaged)."""
    module = LossModule(policy)
    if not info.enabled:
        return module
    # Parameters that never receive a gradient (the zero-size device marker) would stall DDP's reducer.
    for p in policy.parameters():
        if p.numel() == 0:
            p.requires_grad_(False)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of a small picklable object (e.g. the run directory), on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()

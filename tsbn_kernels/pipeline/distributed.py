"""Multi-process training under torchrun: process-group setup and the data split that makes R ranks with a batch
of N each compute what one process computes on the concatenated batch of R·N.

Gradients are not reduced by DistributedDataParallel: the aggregators need every task's gradient of the whole
batch, so each rank computes its per-task gradients G [T, P] (one backward), G and the task-specific parameters'
gradients are averaged across ranks (mtl.backward_aggregated(distributed=True)), and every rank then solves the
same T×T problem. Norm statistics are synchronised by tsbn_kernels.sync_batch_norm.convert_sync.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup() -> Context:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl with one GPU per local rank when CUDA is
    available, else gloo on the CPU. Without torchrun: one process on the GPU if there is one, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Context(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Context(dist.get_rank(), dist.get_world_size(), device)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batches of ``batch_size`` indices for one rank: the epoch's permutation (a function of seed and epoch, the
    same on every rank) is cut into global batches of batch_size · world_size, and rank r takes slice r of each.
    The last incomplete global batch is dropped, so every rank runs the same number of steps. ``set_epoch(epoch,
    start)`` skips the first ``start`` samples of the epoch's permutation (a resume mid-epoch: the rest of the
    epoch in the same order)."""

    def __init__(self, length: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if length < batch_size * world_size:
            raise ValueError(f"the split has {length} samples, fewer than one global batch of "
                             f"{batch_size} × {world_size} ranks")
        self.length, self.batch_size, self.rank, self.world_size = length, batch_size, rank, world_size
        self.seed, self.shuffle, self.epoch, self.start = seed, shuffle, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.length:
            raise ValueError(f"start must lie in [0, {self.length}], got {start}")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.length - self.start) // (self.batch_size * self.world_size)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        else:
            order = torch.arange(self.length)
        step = self.batch_size * self.world_size
        for start in range(self.start, self.start + len(self) * step, step):
            first = start + self.rank * self.batch_size
            yield order[first:first + self.batch_size].tolist()

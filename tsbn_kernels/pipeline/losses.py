"""Task losses of the four benchmarks, each returning the [T] vector of per-task losses in the model's task order.

Labels −1 are ignored. A task whose batch holds no valid pixel (an image without a person for human parts, a
depth map without readings) gets a zero loss that still depends on the output, never NaN: the mean is a sum
over valid pixels divided by max(count, 1).

Under data-parallel training (``distributed=True``) the count is the valid pixels of the whole global batch
(one all_reduce of the per-task counts): rank r's loss is R · (its sum) / max(global count, 1), so the mean
over the R ranks — of the losses and of their gradients, as the per-task gradients are averaged before the
aggregation — is the masked mean of the concatenated batch. Per-rank masked means averaged would weight each
rank's pixels by 1 / (its own count) instead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

# ASTMT's class-balanced edge loss: boundaries are ~5% of the pixels.
EDGE_POSITIVE_WEIGHT = 0.95


def _masked_means(sums: list[Tensor], counts: list[Tensor], distributed: bool) -> list[Tensor]:
    if not sums:
        return []
    counts = torch.stack(counts)
    scale = 1
    if distributed:
        dist.all_reduce(counts)
        scale = dist.get_world_size()
    return list((torch.stack(sums) * scale / counts.clamp_min(1)).unbind())


def dense_losses(outputs: dict[str, Tensor], batch: dict[str, Tensor], distributed: bool = False) -> Tensor:
    # Tasks with a validity mask give (sum, count) for one all_reduce of the counts; the others average over
    # every pixel, the same number on each rank, so their local mean is already exact.
    losses, masked, sums, counts = {}, [], [], []
    for task, out in outputs.items():
        target = batch[task]
        if task in ("segmentation", "human_parts"):
            per_pixel, valid = F.cross_entropy(out, target, ignore_index=-1, reduction="none"), target != -1
        elif task == "depth":
            per_pixel, valid = (out - target).abs(), target > 0
        elif task == "normal":
            per_pixel, valid = 1 - F.cosine_similarity(out, target, dim=1), target.abs().sum(dim=1) > 0
        elif task == "saliency":
            losses[task] = F.binary_cross_entropy_with_logits(out, target)
            continue
        elif task == "edge":
            weight = torch.where(target > 0.5, EDGE_POSITIVE_WEIGHT, 1 - EDGE_POSITIVE_WEIGHT)
            losses[task] = F.binary_cross_entropy_with_logits(out, target, weight=weight.to(out.dtype))
            continue
        else:
            raise ValueError(f"no loss for task {task!r}")
        masked.append(task)
        sums.append((per_pixel * valid).sum())
        counts.append(valid.sum())
    losses.update(zip(masked, _masked_means(sums, counts, distributed)))
    return torch.stack([losses[task] for task in outputs])


def celeba_losses(outputs: dict[str, Tensor], batch: dict[str, Tensor], distributed: bool = False) -> Tensor:
    # Every attribute of every sample counts: the same number on each rank, so the local means are exact.
    return torch.stack([F.binary_cross_entropy_with_logits(out.squeeze(1), batch["attributes"][:, k])
                        for k, out in enumerate(outputs.values())])


def losses_for(benchmark: str):
    return celeba_losses if benchmark == "celeba" else dense_losses

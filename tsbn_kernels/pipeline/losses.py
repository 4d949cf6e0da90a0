"""Task losses of the four benchmarks, each returning the [T] vector of per-task losses in the model's task order.

Labels −1 are ignored. A task whose batch holds no valid pixel (an image without a person for human parts, a
depth map without readings) gets a zero loss that still depends on the output, never NaN: the mean is a sum
over valid pixels divided by max(count, 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ASTMT's class-balanced edge loss: boundaries are ~5% of the pixels.
EDGE_POSITIVE_WEIGHT = 0.95


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    return (values * valid).sum() / valid.sum().clamp_min(1)


def _cross_entropy(logits: Tensor, label: Tensor) -> Tensor:
    per_pixel = F.cross_entropy(logits, label, ignore_index=-1, reduction="none")
    return _masked_mean(per_pixel, label != -1)


def dense_losses(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    losses = []
    for task, out in outputs.items():
        target = batch[task]
        if task in ("segmentation", "human_parts"):
            losses.append(_cross_entropy(out, target))
        elif task == "depth":
            losses.append(_masked_mean((out - target).abs(), target > 0))
        elif task == "normal":
            valid = target.abs().sum(dim=1) > 0
            losses.append(_masked_mean(1 - F.cosine_similarity(out, target, dim=1), valid))
        elif task == "saliency":
            losses.append(F.binary_cross_entropy_with_logits(out, target))
        elif task == "edge":
            weight = torch.where(target > 0.5, EDGE_POSITIVE_WEIGHT, 1 - EDGE_POSITIVE_WEIGHT)
            losses.append(F.binary_cross_entropy_with_logits(out, target, weight=weight.to(out.dtype)))
        else:
            raise ValueError(f"no loss for task {task!r}")
    return torch.stack(losses)


def celeba_losses(outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    return torch.stack([F.binary_cross_entropy_with_logits(out.squeeze(1), batch["attributes"][:, k])
                        for k, out in enumerate(outputs.values())])


def losses_for(benchmark: str):
    return celeba_losses if benchmark == "celeba" else dense_losses

"""Loss weightings that need no Jacobian: equal, uncertainty (Kendall et al. 2018), DWA (Liu et al. 2019) and
GradNorm (Chen et al. 2018, fed with the per-task gradient norms the aggregation already computed)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def equal(num_tasks: int, device=None) -> Tensor:
    return torch.ones(num_tasks, device=device)


class UncertaintyWeighting(nn.Module):
    """Σ_t L_t / (2σ_t²) + log σ_t, with s_t = log σ_t² learned (the LibMTL form)."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(num_tasks))

    def forward(self, losses: Tensor) -> Tensor:
        return (losses / (2 * self.log_var.exp()) + self.log_var / 2).sum()


class DynamicWeightAverage:
    """w_t = T·softmax_t(r_t / τ) with r_t = L_t(e−1) / L_t(e−2), the ratio of the last two epoch-mean losses;
    equal weights for the first two epochs."""

    def __init__(self, num_tasks: int, temperature: float = 2.0):
        self.num_tasks, self.temperature = num_tasks, temperature
        self.history: list[Tensor] = []

    def weights(self) -> Tensor:
        if len(self.history) < 2:
            return torch.ones(self.num_tasks)
        ratio = self.history[-1] / self.history[-2].clamp_min(1e-12)
        return self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)

    def end_epoch(self, mean_losses: Tensor) -> None:
        self.history.append(mean_losses.detach().float().cpu())


class GradNorm:
    """GradNorm's task weights: moved so that |w_t·g_t| approaches mean_t(|w_t·g_t|)·r_t^α, r_t the relative
    inverse training rate L_t/L_t(0) over its mean; renormalised to Σ w = T after each step."""

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025):
        self.alpha, self.lr = alpha, lr
        self.w = torch.ones(num_tasks)
        self.initial_losses: Tensor | None = None

    def update(self, losses: Tensor, grad_norms: Tensor) -> Tensor:
        losses, grad_norms = losses.detach().float().cpu(), grad_norms.detach().float().cpu()
        if self.initial_losses is None:
            self.initial_losses = losses.clamp_min(1e-12)
        rate = losses / self.initial_losses
        target = (self.w * grad_norms).mean() * (rate / rate.mean()) ** self.alpha
        # d/dw_t Σ|w·n − target| with the target held constant, as in the paper.
        grad = torch.sign(self.w * grad_norms - target) * grad_norms
        self.w = (self.w - self.lr * grad).clamp_min(1e-3)
        self.w = self.w * (len(self.w) / self.w.sum())
        return self.w.clone()

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
    """GradNorm's task weights (Chen et al. 2018): w moves so that each weighted gradient norm |∇(w_t·L_t)|
    approaches its mean over the tasks times r_t^α, r_t = (L_t / L_t(0)) / mean_u(L_u / L_u(0)) the relative
    inverse training rate; then Σ w = T again.

    Feed it what ``backward_aggregated(..., loss_weights=gradnorm.w)`` returns: the unweighted ``losses`` and the
    ``grad_norms`` of the weighted per-task gradients. The step is plain gradient descent on
    Σ_t |w_t·n_t − target_t| with the target held constant, as in the paper (n_t = |∇L_t|, so that
    d|w_t·n_t|/dw_t = n_t). Stays on the inputs' device; no host synchronisation.
    """

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025):
        self.alpha, self.lr = alpha, lr
        self.w = torch.ones(num_tasks)
        self.initial_losses: Tensor | None = None

    def update(self, losses: Tensor, weighted_grad_norms: Tensor) -> Tensor:
        losses = losses.detach().float()
        weighted = weighted_grad_norms.detach().float()
        w = self.w.to(losses.device)
        if self.initial_losses is None:
            self.initial_losses = losses.clamp_min(1e-12)
        rate = losses / self.initial_losses
        target = weighted.mean() * (rate / rate.mean()) ** self.alpha
        unweighted = weighted / w                     # n_t = |∇L_t|; w stays ≥ 1e-3, so this is safe
        w = (w - self.lr * torch.sign(weighted - target) * unweighted).clamp_min(1e-3)
        self.w = w * (len(w) / w.sum())
        return self.w.clone()

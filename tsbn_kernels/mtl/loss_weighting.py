"""Loss weightings that need no Jacobian: equal, uncertainty (Kendall et al. 2018), DWA (Liu et al. 2019) and
GradNorm (Chen et al. 2018, fed with the per-task gradient norms the aggregation already computed)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def equal(num_tasks: int, device=None) -> Tensor:
    return torch.ones(num_tasks, device=device)


def _per_task(name: str, values: object, num_tasks: int) -> Tensor:
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a tensor of {num_tasks} per-task values, got {type(values).__name__}")
    if values.shape != (num_tasks,):
        raise ValueError(f"{name} must have shape ({num_tasks},), one value per task, got {tuple(values.shape)}")
    return values


class UncertaintyWeighting(nn.Module):
    """Σ_t L_t / (2σ_t²) + log σ_t, with s_t = log σ_t² learned (the LibMTL form)."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(num_tasks))

    def forward(self, losses: Tensor) -> Tensor:
        losses = _per_task("losses", losses, self.log_var.shape[0])
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
        mean_losses = _per_task("mean_losses", mean_losses, self.num_tasks)
        self.history.append(mean_losses.detach().float().cpu())
        del self.history[:-2]                       # only the last two epochs enter the weights

    # Saved with a training checkpoint, a resumed run continues with the same weights.
    def state_dict(self) -> dict:
        return {"history": [h.clone() for h in self.history], "temperature": self.temperature}

    def load_state_dict(self, state: dict) -> None:
        self.history = [h.detach().float().cpu().clone() for h in state["history"]]
        self.temperature = state["temperature"]


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
        losses = _per_task("losses", losses, len(self.w)).detach().float()
        weighted_grad_norms = _per_task("weighted_grad_norms", weighted_grad_norms, len(self.w))
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

    def state_dict(self) -> dict:
        return {"w": self.w.clone(), "initial_losses": None if self.initial_losses is None
                else self.initial_losses.clone(), "alpha": self.alpha, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.w = state["w"].clone()
        self.initial_losses = None if state["initial_losses"] is None else state["initial_losses"].clone()
        self.alpha, self.lr = state["alpha"], state["lr"]

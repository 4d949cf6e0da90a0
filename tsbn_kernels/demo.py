"""`make demo` until the pipeline's eager-vs-fused check lands: convert an ordinary conv net to TSσBN, train it
on a synthetic three-task problem with the replicated batch, print the per-task losses, and check every
available backend against the eager reference on the same step.

    python -m tsbn_kernels.demo [--steps 30] [--seed 0]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import tsbn_kernels as tk

TASKS = ("brightness", "edges", "checker")


def make_backbone() -> nn.Module:
    """An ordinary single-task conv net, as a user would already have it."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(TASKS)),
    )


def synthetic_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose three targets are different functions of the same pixels."""
    x = torch.rand(n, 1, 16, 16, generator=generator)
    brightness = x.mean(dim=(1, 2, 3))
    edges = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
    checker_mask = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 == 0
    checker = (x * checker_mask).mean(dim=(1, 2, 3)) - (x * ~checker_mask).mean(dim=(1, 2, 3))
    y = torch.stack([brightness, edges, checker], dim=1)
    return x, (y - y.mean(0)) / (y.std(0) + 1e-6)


def task_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Replicated batch: block t of the T·N rows feeds task t's norm statistics and task t's output."""
    n, num_tasks = x.shape[0], y.shape[1]
    out = model(x.repeat(num_tasks, 1, 1, 1)).view(num_tasks, n, num_tasks)
    return torch.stack([nn.functional.mse_loss(out[t, :, t], y[:, t]) for t in range(num_tasks)])


def set_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, tk.modules._TSBatchNorm):
            m.backend = backend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = tk.convert_batchnorm(make_backbone(), num_tasks=len(TASKS), gate="sigmoid")
    optimizer = torch.optim.Adam(tk.gate_param_groups(model, lr=3e-3))
    data = torch.Generator().manual_seed(args.seed)
    backends = tk.available_backends("cpu")
    print(f"tsbn-kernels {tk.__version__} demo: {len(TASKS)} tasks {TASKS}, backends here: {backends}")

    worst = 0.0
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = synthetic_batch(args.batch, data)
        report = step == 1 or step % 10 == 0 or step == args.steps
        if report:
            # Every backend must agree with the eager reference on this very step (same weights, same batch).
            losses = {}
            for backend in backends:
                trial = copy.deepcopy(model)
                set_backend(trial, backend)
                losses[backend] = task_losses(trial, x, y).detach()
            worst = max(worst, *((losses[b] - losses["eager"]).abs().max().item() for b in backends))
        set_backend(model, "auto")
        loss = task_losses(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        if report:
            per_task = "  ".join(f"{name}={v:.4f}" for name, v in zip(TASKS, loss.tolist()))
            print(f"step {step:4d}  {per_task}")
    elapsed = time.perf_counter() - start
    gates = [m.gate_values() for m in model.modules() if isinstance(m, tk.modules._TSBatchNorm)]
    open_frac = torch.stack([(g > 0.5).float().mean(dim=1) for g in gates]).mean(dim=0)
    print(f"{args.steps} steps in {elapsed:.1f}s; fraction of gates open per task: "
          + ", ".join(f"{name} {f:.2f}" for name, f in zip(TASKS, open_frac.tolist())))
    print(f"largest per-task loss difference between backends and eager: {worst:.2e}")
    if worst > 1e-4:
        print("FAIL: a backend disagrees with the eager reference")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

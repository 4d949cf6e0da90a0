"""tsbn-check: train the same model from the same seed on the same batches with the eager reference and with the
fused path, step by step, and fail when they disagree.

    tsbn-check {nyuv2,cityscapes,celeba,pascal,all} [--steps K] [--backend auto] [--method pcgrad] [--width W]
               [--size H W] [--independent]

eager: reference norms, T autograd passes for the per-task gradients, the aggregation's torch path.
fused: the chosen norm backend, per-task gradients from one backward (mtl.OneBackward), the fused Gramian path.
Per step: both losses and their difference, the largest parameter difference, both step times and both peak
memories (MB above what was allocated before the step: the CUDA allocator's statistics on a GPU; on the CPU the
allocator's events under the profiler, ops' own scratch memory included, in an untimed run of the same step, see
pipeline/memory.py; the one-time checks of the first fused step then fall in that run, not in its time).
Exit status 1 when the loss or the parameters differ beyond the dtype's tolerance, 2 for arguments it cannot
check with (argparse's usage errors: a --backend not available here, --steps or --batch below 1, a
PASCAL-Context --size off the ViT's 16-pixel patch grid), 0 when every step agrees.

Each step starts the fused model from the eager run's state (parameters and running statistics), so a difference
is that step's own. Two runs left to themselves part however exact the kernels are: training a small-batch BN
net is so sensitive to its state that a 1e-15 relative perturbation of an eager run grows ~1000× a step against
the unperturbed one (8e-2 after five NYUv2 steps here). ``--independent`` lets the fused run go its own way
(the differences then grow so), and checks the first step only.
PASCAL-Context runs the ViT-S/16 with task-specific layer norms (its ResNet option is the NYUv2 network).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import tempfile
import time

import torch

from .. import mtl
from ..dispatch import available_backends
from . import pascal_data
from .dense_data import DenseDataset, synthesize
from .losses import celeba_losses, dense_losses
from .memory import PeakMemory
from .models import DENSE_TASKS, build_model

BENCHMARKS = ("nyuv2", "cityscapes", "celeba", "pascal")
REAL_SIZES = {"nyuv2": (288, 384), "cityscapes": (128, 256), "celeba": (64, 64), "pascal": (512, 512)}
TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-7}



def _peak_from_a_separate_run(device: str) -> bool:
    # CUDA's allocator statistics cost nothing; the CPU's tracking runs the profiler, which costs time per op.
    return device != "cuda"


def celeba_batches(steps: int, n: int, size: tuple[int, int], generator: torch.Generator):
    """Face-free stand-in for CelebA at check scale: attribute k is 1 when a fixed random pattern k correlates
    positively with the image, so every attribute is a visible, learnable function of the pixels."""
    patterns = torch.randn(40, 3, *size, generator=generator)
    for _ in range(steps):
        images = torch.randn(n, 3, *size, generator=generator)
        attrs = (torch.einsum("nchw,kchw->nk", images, patterns) > 0).float()
        yield {"image": images, "attributes": attrs}


def random_batch(benchmark: str, n: int, size, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One batch of random inputs and targets with the benchmark's shapes and value conventions (for timing)."""
    if benchmark == "celeba":
        return next(celeba_batches(1, n, tuple(size), generator))
    h, w = size
    batch = {"image": torch.rand(n, 3, h, w, generator=generator)}
    for task, channels in DENSE_TASKS[benchmark].items():
        if task in ("segmentation", "human_parts"):
            batch[task] = torch.randint(-1, channels, (n, h, w), generator=generator)
        elif task == "depth":
            batch[task] = torch.rand(n, 1, h, w, generator=generator) + 0.1
        elif task == "normal":
            batch[task] = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=generator), dim=1)
        else:   # saliency, edge: binary maps
            batch[task] = (torch.rand(n, 1, h, w, generator=generator) < 0.3).float()
    return batch


def batches(benchmark: str, steps: int, n: int, size, workdir: str):
    generator = torch.Generator().manual_seed(0)
    if benchmark == "celeba":
        yield from celeba_batches(steps, n, tuple(size), generator)
        return
    if benchmark == "pascal":
        root = pascal_data.synthesize(workdir, n * steps, size=size, val_fraction=0.0)
        data = pascal_data.PascalContext(root, "train", tuple(size), augment=True, seed=0)
    else:
        root = synthesize(benchmark, workdir, n * steps, size=size).parent
        data = DenseDataset(benchmark, root, augment=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=n, shuffle=False)
    yield from loader


def run(benchmark: str, steps: int, backend: str, method: str, width: int, size, n: int, dtype=torch.float32,
        device: str = "cpu", out=None, independent: bool = False) -> bool:
    torch.manual_seed(0)
    eager = build_model(benchmark, width=width, head_width=4 * width, backend="eager",
                        image_size=tuple(size)).to(device, dtype)
    fused = copy.deepcopy(eager)
    fused.set_backend(backend)
    losses_fn = celeba_losses if benchmark == "celeba" else dense_losses
    models = {"eager": eager, "fused": fused}
    # Plain SGD: a parameter difference is then lr × a gradient difference. (Adam's first step, ±lr·sign(g), would
    # turn float noise in near-zero gradients into full-size differences.)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-2) for k, m in models.items()}
    shared = {k: m.shared_parameters() for k, m in models.items()}
    task_params = {k: [p for p in m.parameters() if all(p is not s for s in shared[k])] for k, m in models.items()}
    tol = TOLERANCE[dtype]
    ok = True
    print(f"{benchmark}: {eager.num_tasks} tasks, {sum(p.numel() for p in eager.parameters()):,} parameters, "
          f"method {method}, fused norm backend {backend!r}, "
          f"{'independent runs (step 1 checked)' if independent else 'each step from the eager state'}", file=out)
    print(f"{'step':>4} {'loss eager':>11} {'loss fused':>11} {'|Δloss|':>9} {'max|Δparam|':>11} "
          f"{'ms eager':>9} {'ms fused':>9} {'MB eager':>9} {'MB fused':>9}", file=out)
    with tempfile.TemporaryDirectory() as workdir:
        for step, batch in enumerate(batches(benchmark, steps, n, size, workdir), start=1):
            batch = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
            if not independent:   # plain SGD keeps no state of its own to copy
                fused.load_state_dict(eager.state_dict())
            record = {}
            for name, model in models.items():
                def step_once():
                    generator = torch.Generator(device=device).manual_seed(step)
                    kwargs = {"generator": generator} if method == "pcgrad" else {}
                    if name == "fused":
                        with mtl.OneBackward(model, model.num_tasks, modules=model.split_layers(),
                                             before_replication=model.before_replication_parameters()) as capture:
                            losses = losses_fn(model(batch["image"]), batch)
                        mtl.backward_aggregated(losses, method=method, capture=capture,
                                                task_params=task_params[name], **kwargs)
                    else:
                        losses = losses_fn(model(batch["image"]), batch)
                        mtl.backward_aggregated(losses, shared[name], method, task_params=task_params[name],
                                                backend="eager", **kwargs)
                    optimizers[name].step()
                    return losses

                peak = PeakMemory(device)
                # The last step's gradients are freed before the measured step, which then frees nothing older
                # than itself: the CPU's tracking and the CUDA allocator's peak then mean the same.
                optimizers[name].zero_grad(set_to_none=True)
                if _peak_from_a_separate_run(device):
                    # The CPU's tracking costs time per op: the peak comes from an untimed run of the same step,
                    # after which the model goes back to its state before it (plain SGD keeps none of its own).
                    before = copy.deepcopy(model.state_dict())
                    with peak:
                        step_once()
                    model.load_state_dict(before)
                    optimizers[name].zero_grad(set_to_none=True)
                    timed = contextlib.nullcontext()
                else:
                    timed = peak
                with timed:
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    losses = step_once()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - start
                record[name] = (losses.sum().item(), elapsed * 1e3, peak.peak_bytes / 2**20)
            param_diff = max((a - b).abs().max().item() for a, b in zip(eager.parameters(), fused.parameters()))
            loss_diff = abs(record["eager"][0] - record["fused"][0])
            print(f"{step:>4} {record['eager'][0]:>11.5f} {record['fused'][0]:>11.5f} {loss_diff:>9.2e} "
                  f"{param_diff:>11.2e} {record['eager'][1]:>9.1f} {record['fused'][1]:>9.1f} "
                  f"{record['eager'][2]:>9.1f} {record['fused'][2]:>9.1f}", file=out)
            checked = not independent or step == 1
            if checked and (loss_diff > tol * max(1.0, abs(record["eager"][0])) or param_diff > tol):
                ok = False
    print(f"{benchmark}: {'OK' if ok else 'MISMATCH'} (tolerance {tol:g})", file=out)
    return ok


def main(argv: list[str] | None = None) -> int:
    # The CPU's peak memory runs the profiler once per step and variant; this torch build's kineto logs a line at
    # each profiler start and stop (its USDT level, 5), which would bury the report. 6 is above its every level.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    parser = argparse.ArgumentParser(prog="tsbn-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=BENCHMARKS + ("all",))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--method", default="pcgrad", choices=mtl.METHODS)
    parser.add_argument("--width", type=int, help="stem width (default: 64 on a GPU, 8 on the CPU)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: small on CPU)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--independent", action="store_true",
                        help="let the fused run train from its own state instead of the eager one's each step "
                             "(its differences then grow with the training's sensitivity; only step 1 is checked)")
    parser.add_argument("--dtype", choices=("float32", "float64"),
                        help="default: float64 on the CPU, float32 on a GPU. Deep BN nets at the CPU's tiny batches "
                             "are so ill-conditioned that fp32 gradients of ANY implementation sit ~10%% from the "
                             "float64 truth, so the CPU check compares in float64, where a mismatch is a bug")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Usage errors exit 2 with a line, never 1 (a traceback's status), which means a mismatch.
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1")
    if args.width is not None and args.width < 1:
        parser.error("--width must be at least 1")
    chosen = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    for op in dict.fromkeys("ts_layer_norm" if b == "pascal" else "ts_batch_norm" for b in chosen):
        available = available_backends(device, op)
        if args.backend != "auto" and args.backend not in available:
            parser.error(f"--backend {args.backend!r} cannot run {op} on {device}; available there: "
                         f"{['auto', *available]}")
    if args.size is not None and (min(args.size) < 1 or ("pascal" in chosen and (args.size[0] % 16 or
                                                                                  args.size[1] % 16))):
        parser.error(f"--size {args.size[0]} {args.size[1]}: sizes must be positive"
                     + (", and multiples of 16 for PASCAL-Context's ViT-S/16" if "pascal" in chosen else ""))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device == "cuda" else torch.float64)
    width = args.width or (64 if device == "cuda" else 8)
    ok = True
    for benchmark in (BENCHMARKS if args.benchmark == "all" else (args.benchmark,)):
        real = REAL_SIZES[benchmark]
        size = tuple(args.size) if args.size else (real if device == "cuda" else (real[0] // 4, real[1] // 4))
        ok &= run(benchmark, args.steps, args.backend, args.method, width, size, args.batch, dtype=dtype,
                  device=device, independent=args.independent)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

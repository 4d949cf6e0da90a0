"""tsbn-train: train a benchmark's multi-task model with task-specific norms and gradient aggregation.

    tsbn-train {nyuv2,cityscapes,celeba} [--data PATH|synthetic] [--norm tssigmabn] [--aggregator mean]
               [--backend auto] [--amp bf16|fp16] [--channels-last] [--epochs 1 | --steps N] [--out DIR]

Writes to --out: config.json, checkpoint.pt (atomic, every epoch: model, optimizer, epoch, step, RNG state),
metrics.json and metrics.csv (per epoch: train losses, validation metrics, Δm), plots/ (loss curves, per-task
metrics, gate histograms) and analysis/record.npz (gates and Gramians for tsbn-analyze). ``--resume`` continues
from checkpoint.pt; on the CPU a resumed run reproduces the uninterrupted one bitwise (data order and
augmentation are a function of seed and epoch). A NaN/Inf loss stops the run with a message; the last good
checkpoint stays. --data synthetic writes a small synthetic dataset in the benchmark's on-disk format into
OUT/data first. Not yet: PASCAL-Context, multi-process DDP with synchronised task statistics.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import random
import sys
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import mtl
from ..convert import gate_param_groups
from ..modules import _TSBatchNorm
from . import celeba_data
from . import metrics as metrics_mod
from .check import celeba_losses, dense_losses
from .dense_data import DenseDataset, synthesize
from .models import DENSE_TASKS, build_model

REAL_SIZES = {"nyuv2": (288, 384), "cityscapes": (128, 256), "celeba": (64, 64)}


class NonFiniteLoss(RuntimeError):
    pass


def atomic_save(obj, path: pathlib.Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_data(args, out: pathlib.Path):
    """(train batches per epoch: callable(epoch) -> iterable, validation batches: callable() -> iterable)."""
    root = out / "data" if args.data == "synthetic" else pathlib.Path(args.data)
    if args.benchmark == "celeba":
        if args.data == "synthetic" and not (root / "list_eval_partition.txt").exists():
            total = args.train_size + 2 * args.val_size
            celeba_data.synthesize(root, total, seed=args.seed,
                                   splits=(args.train_size / total, args.val_size / total, args.val_size / total))

        def celeba_train(epoch):
            generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            return torch.utils.data.DataLoader(celeba_data.CelebA(root, "train", args.size[0]), batch_size=args.batch,
                                               shuffle=True, drop_last=True, generator=generator)
        return celeba_train, lambda: torch.utils.data.DataLoader(celeba_data.CelebA(root, "val", args.size[0]),
                                                                 batch_size=args.batch)
    if args.data == "synthetic" and not (root / "val").exists():
        synthesize(args.benchmark, root, args.train_size, "train", seed=args.seed, size=tuple(args.size))
        synthesize(args.benchmark, root, args.val_size, "val", seed=args.seed + 1, size=tuple(args.size))

    def train(epoch):
        generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        data = DenseDataset(args.benchmark, root, "train", augment=True, generator=generator)
        return torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True,
                                           generator=generator)

    def val():
        return torch.utils.data.DataLoader(DenseDataset(args.benchmark, root, "val"), batch_size=args.batch)
    return train, val


def evaluate(model, batches, benchmark: str, device, dtype) -> dict:
    model.eval()
    if benchmark == "celeba":
        attrs = metrics_mod.BinaryAttributes(40)
    else:
        seg = metrics_mod.Segmentation(DENSE_TASKS[benchmark]["segmentation"])
        depth, normal = metrics_mod.Depth(), metrics_mod.Normals()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(batch["image"].to(dtype))
            if benchmark == "celeba":
                attrs.update(torch.cat([o.float() for o in out.values()], dim=1), batch["attributes"])
                continue
            seg.update(out["segmentation"].float(), batch["segmentation"])
            depth.update(out["depth"].float(), batch["depth"])
            if "normal" in out:
                normal.update(out["normal"].float(), batch["normal"])
    model.train()
    if benchmark == "celeba":
        return attrs.compute()
    result = {**seg.compute(), **depth.compute()}
    if benchmark == "nyuv2":
        result.update(normal.compute())
    result["delta_m"] = metrics_mod.delta_m(result, metrics_mod.BASELINES[benchmark])
    return result


def save_plots(out: pathlib.Path, history: list[dict], model) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task in history[-1]["train_loss"]:
        ax.plot(epochs, [h["train_loss"][task] for h in history], marker="o", label=task)
    ax.set_xlabel("epoch"), ax.set_ylabel("mean training loss"), ax.legend(fontsize=6)
    fig.savefig(plots / "loss.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    keys = [k for k in history[-1]["val"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(epochs, [h["val"][key] for h in history], marker="o")
        ax.set_title(key, fontsize=8)
    fig.savefig(plots / "metrics.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    gates = [m.gate_values().flatten().float().cpu().numpy() for m in model.modules()
             if isinstance(m, _TSBatchNorm) and m.weight is not None]
    if gates:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(np.concatenate(gates), bins=50)
        ax.set_xlabel("gate value"), ax.set_ylabel("channels × tasks")
        fig.savefig(plots / "gates.png", dpi=100, bbox_inches="tight")
        plt.close(fig)


def rng_state() -> dict:
    """Every generator's state in types torch.load(weights_only=True) accepts (no pickled numpy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def parse(argv):
    parser = argparse.ArgumentParser(prog="tsbn-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=("nyuv2", "cityscapes", "celeba"))
    parser.add_argument("--data", default="synthetic", help="dataset root in the benchmark's on-disk format")
    parser.add_argument("--norm", default="tssigmabn", choices=("bn", "tsbn", "tssigmabn"))
    parser.add_argument("--aggregator", default="mean", choices=mtl.METHODS)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--amp", choices=("bf16", "fp16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, help="stop after this many optimizer steps in total")
    parser.add_argument("--out", default="runs/latest")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--width", type=int, help="stem width (default 64 on a GPU, 8 on the CPU)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=16, help="synthetic samples in the training split")
    parser.add_argument("--val-size", type=int, default=8)
    parser.add_argument("--pretrained", help="torchvision ResNet state_dict for the encoder")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    args.width = args.width or (64 if on_gpu else 8)
    real = REAL_SIZES[args.benchmark]
    args.size = args.size or (list(real) if on_gpu else [real[0] // 4, real[1] // 4])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    model = build_model(args.benchmark, args.norm, args.width, 4 * args.width, args.backend, args.pretrained)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(gate_param_groups(model, args.lr))
    train_batches, val_batches = make_data(args, out)
    losses_fn = celeba_losses if args.benchmark == "celeba" else dense_losses
    config = {"benchmark": args.benchmark, "norm": args.norm, "num_tasks": model.num_tasks, "task_names": model.tasks,
              "model_builder": "tsbn_kernels.pipeline.models.build_model",
              "model": {"norm": args.norm, "width": args.width, "head_width": 4 * args.width},
              "args": {k: v for k, v in vars(args).items() if k != "resume"}}
    atomic_write(out / "config.json", json.dumps(config, indent=1))
    history, epoch, step = [], 0, 0
    if args.resume:
        if not (out / "checkpoint.pt").exists():
            raise SystemExit(f"tsbn-train: --resume but {out / 'checkpoint.pt'} does not exist")
        state = torch.load(out / "checkpoint.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, step, history = state["epoch"], state["step"], state["history"]
        set_rng_state(state["rng"])
    convs = [m for m in model.encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    shared_ids = {id(p) for m in convs for p in m.parameters()}
    task_params = [p for p in model.parameters() if id(p) not in shared_ids]
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    use_one_backward = args.norm != "bn" and args.aggregator != "sum"
    model.stem_once = not use_one_backward
    recorder = None
    try:
        from ..analysis.record import TrainingRecorder

        recorder = TrainingRecorder(out)
    except ImportError:
        pass
    try:
        while epoch < args.epochs and (args.steps is None or step < args.steps):
            totals, count, gramian = {t: 0.0 for t in model.tasks}, 0, None
            start = time.perf_counter()
            bar = tqdm(train_batches(epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                       disable=not sys.stderr.isatty())
            for batch in bar:
                if args.steps is not None and step >= args.steps:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                image = batch["image"]
                if args.channels_last:
                    image = image.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    if use_one_backward:
                        with mtl.OneBackward(model, model.num_tasks, modules=convs) as capture:
                            losses = losses_fn(model(image), batch).float()
                    else:
                        losses = losses_fn(model(image), batch).float()
                if not bool(torch.isfinite(losses).all()):
                    raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, step {step + 1}: "
                                        f"{dict(zip(model.tasks, losses.tolist()))}")
                if args.aggregator == "sum" and not use_one_backward:
                    losses.sum().backward()
                elif use_one_backward:
                    info = mtl.backward_aggregated(losses, method=args.aggregator, capture=capture,
                                                   task_params=task_params)
                    gramian = info["gramian"]
                else:
                    shared = [p for m in convs for p in m.parameters()]
                    info = mtl.backward_aggregated(losses, shared, args.aggregator, task_params=task_params)
                    gramian = info["gramian"]
                optimizer.step()
                step += 1
                count += 1
                for task, value in zip(model.tasks, losses.tolist()):
                    totals[task] += value
                bar.set_postfix(loss=f"{losses.sum().item():.4f}",
                                img_per_s=f"{count * args.batch / (time.perf_counter() - start):.1f}")
            epoch += 1
            val = evaluate(model, val_batches(), args.benchmark, device,
                           next(model.parameters()).dtype)
            mean_losses = {t: v / max(count, 1) for t, v in totals.items()}
            history.append({"epoch": epoch, "step": step, "train_loss": mean_losses, "val": val,
                            "seconds": time.perf_counter() - start})
            print(f"epoch {epoch}: loss {sum(history[-1]['train_loss'].values()):.4f} " +
                  " ".join(f"{k}={v:.4f}" for k, v in val.items()), flush=True)
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                         "step": step, "history": history, "rng": rng_state(), "config": config},
                        out / "checkpoint.pt")
            write_metrics(out, history)
            save_plots(out, history, model)
            if recorder is not None:
                recorder.record(step, model, gramian)
    except NonFiniteLoss as exc:
        print(f"tsbn-train: {exc}; stopping. The last good checkpoint is {out / 'checkpoint.pt'}", file=sys.stderr)
        return 2
    finally:
        if recorder is not None and recorder.steps:
            recorder.close()
    return 0


def write_metrics(out: pathlib.Path, history: list[dict]) -> None:
    atomic_write(out / "metrics.json", json.dumps(history, indent=1))
    rows = [{"epoch": h["epoch"], "step": h["step"], **{f"loss_{k}": v for k, v in h["train_loss"].items()},
             **h["val"]} for h in history]
    tmp = out / "metrics.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "metrics.csv")


if __name__ == "__main__":
    raise SystemExit(main())

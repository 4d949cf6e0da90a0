"""tsbn-train: train a benchmark's multi-task model with task-specific norms and gradient aggregation.

    tsbn-train {nyuv2,cityscapes,celeba,pascal} [--data PATH|synthetic] [--norm tssigmabn] [--aggregator mean]
               [--backend auto] [--amp bf16|fp16] [--channels-last] [--epochs 1] [--steps N] [--out DIR]
               [--arch vit_s|resnet50] [--optimizer adam|sgd] [--baseline FILE]
    torchrun --nproc_per_node R -m tsbn_kernels.pipeline.train ...     (data parallel; --batch is per process)

Writes to --out: config.json, checkpoint.pt (atomic, every epoch and at a --steps stop: model, optimizer, epoch,
position within the epoch, step, RNG state), metrics.json and metrics.csv (per epoch: train losses, validation
metrics, Δm; a --steps stop inside an epoch adds an entry marked "partial", which the complete epoch replaces),
plots/ (loss curves, per-task metrics, gate histograms) and analysis/record.npz (gates and Gramians for
tsbn-analyze). ``--resume`` continues from checkpoint.pt, after a --steps stop with the next batch of the same
epoch; on the CPU a resumed run reproduces the uninterrupted one bitwise (data order and augmentation are a
function of seed and epoch). Every setting not given on the resuming command line is the run's own (config.json),
so ``tsbn-train BENCHMARK --out DIR --epochs 20 --resume`` continues on the same data, width, batch, ...; one
given anew must match where it shapes the model or optimizer (else the resume is refused) and is reported where
it does not. A new run refuses a directory that already holds a checkpoint. A NaN/Inf loss stops the run with a
message; the last good checkpoint stays. --data synthetic writes a small synthetic dataset in the benchmark's
on-disk format into OUT/data first. Under torchrun (gloo on the CPU, nccl on GPUs) every norm's statistics span
all processes and the per-task gradients are averaged across them before aggregation, so R processes with
--batch N train as one process with --batch R·N (pipeline.distributed); rank 0 evaluates and writes the files.
Δm needs a single-task baseline: built in for NYUv2 and Cityscapes; --baseline FILE (JSON {metric: value})
for PASCAL-Context (whose baselines depend on the backbone) or to override.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import random
import shutil
import signal
import sys
import threading
import time

import numpy as np
import torch
from tqdm import tqdm

from .. import mtl
from ..dispatch import available_backends
from ..convert import gate_param_groups
from ..modules import TSLayerNorm, _TSBatchNorm
from ..mtl.training import average_across_ranks_
from ..sync_batch_norm import convert_sync
from . import celeba_data, pascal_data
from . import distributed as dist_mod
from .dense_data import DenseDataset, synthesize
from .errors import DatasetError
from .losses import celeba_losses, dense_losses
from .metrics import BenchmarkMetrics, check_baseline, summary
from .models import ARCHS, build_model

REAL_SIZES = {"nyuv2": (288, 384), "cityscapes": (128, 256), "celeba": (64, 64), "pascal": (512, 512)}


class NonFiniteLoss(RuntimeError):
    pass


def atomic_save(obj, path: pathlib.Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:   # an interrupt (Ctrl-C, SIGTERM) or a full disk: no half-written file stays behind
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


SYNTHETIC_SETTINGS = ("benchmark", "train_size", "val_size", "seed", "size")


def write_synthetic(args, root: pathlib.Path) -> None:
    """The synthetic dataset of --data synthetic, in the benchmark's real on-disk format (once), with the settings
    it was made with in synthetic.json: a later run in the same --out with other ones would otherwise train on
    the old data without a word. A resume keeps the data it started with (check_run_directory says so)."""
    manifest = root / "synthetic.json"
    wanted = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in vars(args).items()
              if k in SYNTHETIC_SETTINGS}
    if manifest.exists():
        try:
            made = json.loads(manifest.read_text())
        except ValueError:
            made = None
        if made == wanted or args.resume:
            return
        differ = (", ".join(f"--{k.replace('_', '-')} {made.get(k)!r} (now {wanted[k]!r})" for k in wanted
                            if made.get(k) != wanted[k]) if isinstance(made, dict) else f"unreadable {manifest}")
        raise SystemExit(f"tsbn-train: {root} holds synthetic data made with {differ}; delete {root} to make it "
                         "anew, or choose another --out")
    elif root.exists() and any(root.iterdir()):
        if args.resume:
            return                      # data of a run from before synthetic.json: kept as it is
        raise SystemExit(f"tsbn-train: {root} holds data without a synthetic.json (not written by tsbn-train, or "
                         f"by an older version): delete it to make the synthetic data anew, or choose another --out")
    # Written beside and renamed into place when complete: an interrupted write leaves no half dataset that a
    # later run would take for the whole one.
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    _write_synthetic(args, partial)
    (partial / "synthetic.json").write_text(json.dumps(wanted))
    if root.exists():
        root.rmdir()                    # empty (checked above)
    partial.replace(root)


def _write_synthetic(args, root: pathlib.Path) -> None:
    if args.benchmark == "celeba":
        total = args.train_size + 2 * args.val_size
        celeba_data.synthesize(root, total, seed=args.seed,
                               splits=(args.train_size / total, args.val_size / total, args.val_size / total))
    elif args.benchmark == "pascal":
        total = args.train_size + args.val_size
        pascal_data.synthesize(root, total, seed=args.seed, size=tuple(args.size), val_fraction=args.val_size / total)
    else:
        synthesize(args.benchmark, root, args.train_size, "train", seed=args.seed, size=tuple(args.size))
        synthesize(args.benchmark, root, args.val_size, "val", seed=args.seed + 1, size=tuple(args.size))


def make_datasets(args, root: pathlib.Path):
    if args.benchmark == "celeba":
        size = tuple(args.size)
        return celeba_data.CelebA(root, "train", size), celeba_data.CelebA(root, "val", size)
    if args.benchmark == "pascal":
        return (pascal_data.PascalContext(root, "train", tuple(args.size), augment=True, seed=args.seed),
                pascal_data.PascalContext(root, "val", tuple(args.size)))
    return (DenseDataset(args.benchmark, root, "train", augment=True, seed=args.seed),
            DenseDataset(args.benchmark, root, "val"))


def make_data(args, out: pathlib.Path, context: dist_mod.Context):
    """(train batches of this rank: callable(epoch, start) -> DataLoader of the epoch's batches after its first
    ``start`` samples, validation batches: callable() -> iterable). Data order and augmentation are functions of
    (seed, epoch, sample), the same for any number of ranks."""
    root = out / "data" if args.data == "synthetic" else pathlib.Path(args.data)
    if args.data == "synthetic" and context.is_main:
        write_synthetic(args, root)
    context.barrier()
    train_set, val_set = make_datasets(args, root)
    if len(train_set) < args.batch * context.world_size:
        ranks = f" × {context.world_size} processes" if context.distributed else ""
        raise SystemExit(f"tsbn-train: the training split of {root} has {len(train_set)} samples, fewer than one "
                         f"batch of --batch {args.batch}{ranks}")
    sampler = dist_mod.GlobalBatchSampler(len(train_set), args.batch, context.rank, context.world_size, args.seed)

    def train(epoch, start=0):
        sampler.set_epoch(epoch, start)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        return torch.utils.data.DataLoader(train_set, batch_sampler=sampler)
    return train, lambda: torch.utils.data.DataLoader(val_set, batch_size=args.batch)


def evaluate(model, batches, benchmark: str, device, dtype, baseline: dict | None = None) -> dict:
    model.eval()
    metrics = BenchmarkMetrics(benchmark, baseline=baseline)
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            metrics.update(model(batch["image"].to(dtype)), batch)
    model.train()
    return metrics.compute()


def save_plots(out: pathlib.Path, history: list[dict], model) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    def series(part, key):   # the epochs that have the value: a resume may add or drop --baseline (delta_m)
        points = [(h["epoch"], h[part][key]) for h in history if h[part].get(key) is not None]
        return [e for e, _ in points], [v for _, v in points]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for task in dict.fromkeys(k for h in history for k in h["train_loss"]):
        ax.plot(*series("train_loss", task), marker="o", label=task)
    ax.set_xlabel("epoch"), ax.set_ylabel("mean training loss"), ax.legend(fontsize=6)
    fig.savefig(plots / "loss.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    keys = list(dict.fromkeys(k for h in history for k in summary(h["val"])))
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot(*series("val", key), marker="o")
        ax.set_title(key, fontsize=8)
    fig.savefig(plots / "metrics.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    gates = [m.gate_values().flatten().float().cpu().numpy() for m in model.modules()
             if isinstance(m, (_TSBatchNorm, TSLayerNorm)) and m.weight is not None]
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
    parser = _parser()
    args = parser.parse_args(argv)
    _check_and_fill(parser, args)
    if args.resume:
        _adopt_run_settings(args, _given_on_command_line(argv, args))
    return args


def _given_on_command_line(argv, args) -> set[str]:
    """The settings the command line sets (not left at their defaults): the same parser with every default
    suppressed leaves out of its namespace what was not given. (argparse lists its actions in ``_actions`` only;
    set_defaults would not do: a suppressed default there is put in the namespace and converted by ``type``.)"""
    probe = _parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv))) & set(vars(args))


def _adopt_run_settings(args, given: set[str]) -> None:
    """--resume: each setting the command line leaves at its default takes the run's own value from its
    config.json (what the resume continues), except what a resume is expected to change. Without a readable
    config.json nothing is adopted; check_run_directory then says what is missing."""
    try:
        previous = json.loads((pathlib.Path(args.out) / "config.json").read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not isinstance(previous, dict):
        return
    for name, value in previous.items():
        if name in vars(args) and name not in given and name not in RESUME_FREE + RESUME_NOT_ADOPTED:
            setattr(args, name, value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsbn-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=tuple(REAL_SIZES))
    parser.add_argument("--data", default="synthetic", help="dataset root in the benchmark's on-disk format")
    parser.add_argument("--norm", default="tssigmabn", choices=("bn", "tsbn", "tssigmabn"))
    parser.add_argument("--aggregator", default="mean", choices=mtl.METHODS)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--epochs", type=int, help="epochs to train (default: 1, or as many as --steps needs when "
                        "--steps is given); with both, the run stops at whichever limit it reaches first")
    parser.add_argument("--steps", type=int, help="stop after this many optimizer steps in total")
    parser.add_argument("--out", default="runs/latest")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out; settings not given here are the run's own")
    parser.add_argument("--width", type=int, help="stem width (default 64 on a GPU, 8 on the CPU)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size: of the synthetic data, and of the CelebA / PASCAL-Context images, which "
                        "are resized / cropped to it; NYUv2 and Cityscapes files are used at their stored size "
                        "(default: the benchmark's on a GPU, a quarter of it on the CPU)")
    parser.add_argument("--amp", choices=("bf16", "fp16"),
                        help="autocast dtype; fp16 adds a loss scale (torch.amp.GradScaler)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=16, help="synthetic samples in the training split")
    parser.add_argument("--val-size", type=int, default=8)
    parser.add_argument("--pretrained", help="torchvision ResNet / timm ViT state_dict for the encoder")
    parser.add_argument("--arch", help="encoder: resnet50 (NYUv2, Cityscapes), resnet18 (CelebA), vit_s (default) "
                                       "or resnet50 (PASCAL-Context)")
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="parameter dtype (float64 for exact comparisons on the CPU; --amp for mixed precision)")
    parser.add_argument("--baseline", help="JSON file {metric: single-task value} for Δm (\"\": none given; NYUv2 "
                        "and Cityscapes then use their built-in baselines)")
    return parser


def _check_and_fill(parser: argparse.ArgumentParser, args) -> None:
    """Refuse what the model cannot take (parser.error: usage and exit status 2) and fill the defaults that
    depend on the device."""
    if args.arch is not None and args.arch not in ARCHS[args.benchmark]:
        parser.error(f"--arch for {args.benchmark} must be one of {ARCHS[args.benchmark]}")
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    for name in ("epochs", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.epochs is None and args.steps is None:
        args.epochs = 1
    on_gpu = torch.cuda.is_available()
    args.width = args.width or (64 if on_gpu else 8)
    real = REAL_SIZES[args.benchmark]
    args.size = args.size or (list(real) if on_gpu else [real[0] // 4, real[1] // 4])
    if min(args.size) < 1:
        parser.error(f"--size must be positive, got {args.size[0]} {args.size[1]}")
    if (args.arch or ARCHS[args.benchmark][0]) == "vit_s" and (args.size[0] % 16 or args.size[1] % 16):
        parser.error(f"--size {args.size[0]} {args.size[1]}: the ViT-S/16 of {args.benchmark} takes sizes that are "
                     "multiples of its patch size 16 (or pass --arch resnet50)")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    context = dist_mod.setup()
    # SIGTERM (a job scheduler's stop, torchrun tearing the ranks down) stops the run as Ctrl-C does: between two
    # files, never inside one, with a message saying which checkpoint a --resume continues from.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return train(args, context)
    except (FileNotFoundError, DatasetError) as exc:   # the user's files: one line that names them, no traceback
        print(f"tsbn-train: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        dist_mod.teardown(context)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is (handled as Ctrl-C is)."""


def _terminate(signum, frame):
    raise Terminated()


# Settings that shape the model or the optimizer state: a checkpoint cannot continue under other values.
RESUME_MUST_MATCH = ("benchmark", "norm", "width", "arch", "size", "dtype", "optimizer")
RESUME_FREE = ("resume", "epochs", "steps", "out")   # what a resume is expected to change
# Used at the start only (the checkpoint holds the weights): a resume need not find the file again.
RESUME_NOT_ADOPTED = ("pretrained",)


def check_run_directory(args, out: pathlib.Path, world_size: int = 1) -> None:
    """Never overwrite a run by accident, and resume only the run that was started here. Raises SystemExit."""
    checkpoint = out / "checkpoint.pt"
    if not args.resume:
        if checkpoint.exists():
            raise SystemExit(f"tsbn-train: {out} already holds a run ({checkpoint.name}); pass --resume to continue "
                             "it, or choose another --out (or delete that directory) to start a new one")
        return
    if not checkpoint.exists():
        raise SystemExit(f"tsbn-train: --resume but {checkpoint} does not exist")
    try:
        config = json.loads((out / "config.json").read_text())
        previous = config["args"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"tsbn-train: --resume needs {out / 'config.json'} of the run that wrote the checkpoint: "
                         f"{exc}") from None
    current = vars(args)
    clash = [f"{'' if k == 'benchmark' else '--'}{k.replace('_', '-')} {previous.get(k)!r} (now {current[k]!r})"
             for k in RESUME_MUST_MATCH if previous.get(k) != current[k]]
    if clash:
        raise SystemExit(f"tsbn-train: the run in {out} was started with " + ", ".join(clash)
                         + "; resume it with the same settings, or start a new run in another --out")
    kept = " (the synthetic data made at the start stays)"
    changed = [f"{k}: {previous.get(k)!r} -> {v!r}" + (kept if k in SYNTHETIC_SETTINGS and args.data == "synthetic"
                                                        else "")
               for k, v in current.items()
               if k not in RESUME_FREE + RESUME_MUST_MATCH + RESUME_NOT_ADOPTED and previous.get(k) != v]
    before = config.get("world_size", 1)
    if before != world_size:   # --batch is per process: the global batch changes with the number of processes
        changed.append(f"processes: {before} -> {world_size} (global batch {before * previous.get('batch', args.batch)}"
                       f" -> {world_size * args.batch})")
    if changed:
        print("tsbn-train: resuming with changed settings (the run will not reproduce an uninterrupted one): "
              + "; ".join(changed), file=sys.stderr)


def check_backend(args, device: torch.device) -> None:
    """--backend must run the model's task-specific norms on this device: said before any data is read (it used
    to be a traceback from the first forward)."""
    if args.norm == "bn" or args.backend == "auto":
        return
    op = "ts_layer_norm" if (args.arch or ARCHS[args.benchmark][0]) == "vit_s" else "ts_batch_norm"
    available = available_backends(device, op)
    if args.backend not in available:
        raise SystemExit(f"tsbn-train: --backend {args.backend!r} cannot run {op} on {device.type}; available there: "
                         f"{['auto', *available]}")


def load_baseline(args, context: dist_mod.Context) -> dict | None:
    """--baseline checked against the benchmark's metrics before training, not when the first epoch ends."""
    if not args.baseline:
        return None
    path = pathlib.Path(args.baseline)
    try:
        baseline = json.loads(path.read_text())
        warnings = check_baseline(args.benchmark, baseline)
    except ValueError as exc:   # also json.JSONDecodeError
        raise SystemExit(f"tsbn-train: --baseline {path}: {exc}") from None
    if context.is_main:
        for warning in warnings:
            print(f"tsbn-train: --baseline {path}: {warning}", file=sys.stderr)
    return baseline


def train(args, context: dist_mod.Context) -> int:
    out = pathlib.Path(args.out)
    check_run_directory(args, out, context.world_size)
    baseline = load_baseline(args, context)
    out.mkdir(parents=True, exist_ok=True)
    device = context.device
    check_backend(args, device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    model = build_model(args.benchmark, args.norm, args.width, 4 * args.width, args.backend, args.pretrained,
                        args.arch, tuple(args.size)).to(device, getattr(torch, args.dtype))
    if context.distributed:
        model = convert_sync(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = gate_param_groups(model, args.lr)
    optimizer = torch.optim.Adam(groups) if args.optimizer == "adam" else torch.optim.SGD(groups, lr=args.lr)
    train_batches, val_batches = make_data(args, out, context)
    losses_fn = celeba_losses if args.benchmark == "celeba" else dense_losses
    config = {"benchmark": args.benchmark, "norm": args.norm, "num_tasks": model.num_tasks, "task_names": model.tasks,
              "model_builder": "tsbn_kernels.pipeline.models.build_model",
              "model": {"norm": args.norm, "width": args.width, "head_width": 4 * args.width, "arch": args.arch,
                        "image_size": list(args.size)},
              "world_size": context.world_size,
              "args": {k: v for k, v in vars(args).items() if k != "resume"}}
    if context.is_main:
        atomic_write(out / "config.json", json.dumps(config, indent=1))
    history, epoch, step = [], 0, 0
    # Where the checkpoint stopped inside epoch `epoch` (a --steps stop): samples of its permutation done, and
    # the running sums of the epoch's mean losses.
    progress = {"samples": 0, "count": 0, "totals": {t: 0.0 for t in model.tasks}, "seconds": 0.0}
    # PCGrad's random projection order: its own generator, so every rank draws the same orders whatever else
    # consumes the global RNG (rank 0's evaluation, DataLoader seeds), and a resume continues its stream.
    aggregator_rng = torch.Generator(device).manual_seed(args.seed)
    saved_rng = None
    if args.resume:
        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)   # RNG states live on the CPU
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        # load_state_dict restores the checkpoint's hyperparameters too; this run's --lr (and the gate lr and
        # weight decay derived from it) are the ones asked for, so they apply from here on.
        for group, requested in zip(optimizer.param_groups, gate_param_groups(model, args.lr)):
            group["lr"], group["weight_decay"] = requested["lr"], requested["weight_decay"]
        epoch, step, history = state["epoch"], state["step"], state["history"]
        if context.is_main:
            # An interrupt between the checkpoint and the files made from it leaves them behind it: rewrite them
            # from the checkpoint, also when it has nothing left to train.
            write_metrics(out, history)
            save_plots(out, history, model)
        progress = state.get("progress", progress)
        if history and history[-1].get("partial"):   # replaced by the epoch's entry once the epoch is complete
            history.pop()
        saved_rng = state["rng"]
        if not progress["samples"]:
            set_rng_state(saved_rng)
            saved_rng = None
        aggregator_rng.set_state(state["rng"]["aggregator"])
    saved_step = step if args.resume else None
    convs = model.split_layers()
    shared = model.shared_parameters()
    before_replication = model.before_replication_parameters()
    shared_ids = {id(p) for p in shared}
    task_params = [p for p in model.parameters() if id(p) not in shared_ids]
    model_dtype = getattr(torch, args.dtype)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    # float16's 5 exponent bits flush small gradients to zero: the losses are scaled, the step unscales and skips
    # a step whose gradients overflowed (lowering the scale). bfloat16 has float32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    if args.resume and state.get("scaler"):   # empty when saved without float16 scaling
        scaler.load_state_dict(state["scaler"])
    use_one_backward = args.norm != "bn" and args.aggregator != "sum"
    recorder = None
    if context.is_main and args.norm != "bn":   # the recorder follows the task-specific gates
        try:
            from ..analysis.record import TrainingRecorder

            recorder = TrainingRecorder(out, append=args.resume)   # a resume keeps the snapshots recorded so far
            if args.resume:   # but none after the checkpoint (an interrupt between the record and the checkpoint)
                recorder.truncate(step)
        except ImportError:
            pass
        except ValueError as exc:
            raise SystemExit(f"tsbn-train: {exc}") from None
    max_epochs = math.inf if args.epochs is None else args.epochs   # None: as many as --steps needs
    if args.resume and context.is_main and not (epoch < max_epochs and (args.steps is None or step < args.steps)):
        limits = [f"--{k} {v}" for k, v in (("epochs", args.epochs), ("steps", args.steps)) if v is not None]
        print(f"tsbn-train: nothing to train: the run in {out} is at epoch {epoch}, step {step} "
              f"({', '.join(limits)})", file=sys.stderr)
    try:
        while epoch < max_epochs and (args.steps is None or step < args.steps):
            totals, count, gramian = dict(progress["totals"]), progress["count"], None
            overflows = progress.get("overflows", 0)
            start, taken = time.perf_counter() - progress["seconds"], 0
            loader = train_batches(epoch, progress["samples"])
            batches = iter(loader)
            if saved_rng is not None:
                # A mid-epoch checkpoint holds the RNG state after this epoch's DataLoader drew its base seed:
                # restored after the new DataLoader's draw, the stream continues as in the uninterrupted run.
                set_rng_state(saved_rng)
                saved_rng = None
            of = "" if args.epochs is None else f"/{args.epochs}"
            bar = tqdm(batches, total=len(loader), desc=f"epoch {epoch + 1}{of}", leave=False,
                       disable=not (context.is_main and sys.stderr.isatty()))
            for batch in bar:
                batch = {k: v.to(device, model_dtype) if v.is_floating_point() else v.to(device)
                         for k, v in batch.items()}
                image = batch["image"]
                if args.channels_last:
                    image = image.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    if use_one_backward:
                        with mtl.OneBackward(model, model.num_tasks, modules=convs,
                                             before_replication=before_replication) as capture:
                            losses = losses_fn(model(image), batch, distributed=context.distributed)
                    else:
                        losses = losses_fn(model(image), batch, distributed=context.distributed)
                losses = losses.to(torch.promote_types(losses.dtype, torch.float32))
                reported = losses.detach().clone()
                if context.distributed:          # every rank sees the same losses, so all stop together
                    average_across_ranks_([reported])
                if not bool(torch.isfinite(reported).all()):
                    raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, step {step + 1}: "
                                        f"{dict(zip(model.tasks, reported.tolist()))}")
                if args.aggregator == "sum" and not use_one_backward:
                    scaler.scale(losses.sum()).backward()
                    if context.distributed:
                        params = [p for p in model.parameters() if p.requires_grad]
                        for p in params:
                            if p.grad is None:
                                p.grad = torch.zeros_like(p)
                        average_across_ranks_([p.grad for p in params])
                else:
                    extra = {"generator": aggregator_rng} if args.aggregator == "pcgrad" else {}
                    info = mtl.backward_aggregated(
                        losses, None if use_one_backward else shared, args.aggregator,
                        capture=capture if use_one_backward else None, task_params=task_params,
                        distributed=context.distributed, check_finite=False, grad_scaler=scaler, **extra)
                    gramian = info["gramian"]
                if scaler.is_enabled():
                    before = scaler.get_scale()
                    scaler.step(optimizer)
                    scaler.update()
                    overflows += scaler.get_scale() < before    # the scale drops exactly when the step was skipped
                else:
                    optimizer.step()
                step += 1
                count += 1
                taken += 1
                for task, value in zip(model.tasks, reported.tolist()):
                    totals[task] += value
                images = taken * args.batch * context.world_size
                bar.set_postfix(loss=f"{reported.sum().item():.4f}",
                                img_per_s=f"{images / (time.perf_counter() - start):.1f}")
                if args.steps is not None and step >= args.steps:
                    break
            complete = taken == len(loader)
            # A --steps stop inside the epoch saves its position, so that --resume trains the rest of the epoch
            # in the same order, and its RNG state before the evaluation, which the uninterrupted run skips there.
            samples = 0 if complete else progress["samples"] + taken * args.batch * context.world_size
            progress = {"samples": samples, "count": 0 if complete else count,
                        "overflows": 0 if complete else overflows,
                        "totals": {t: 0.0 for t in model.tasks} if complete else totals,
                        "seconds": 0.0 if complete else time.perf_counter() - start}
            rng = None if complete else {**rng_state(), "aggregator": aggregator_rng.get_state()}
            if complete:
                epoch += 1
            if context.is_main:
                val = evaluate(model, val_batches(), args.benchmark, device, next(model.parameters()).dtype,
                               baseline)
                mean_losses = {t: v / max(count, 1) for t, v in totals.items()}
                entry = {"epoch": epoch if complete else epoch + 1, "step": step, "train_loss": mean_losses,
                         "val": val, "seconds": time.perf_counter() - start}
                if not complete:
                    entry["partial"] = True
                if scaler.is_enabled():
                    entry["skipped_steps"] = overflows
                rng = rng or {**rng_state(), "aggregator": aggregator_rng.get_state()}
                history.append(entry)
                where = "" if complete else f" (stopped at step {step}, batch {count} of {count + len(loader) - taken})"
                skipped = f" ({overflows} float16-overflow steps skipped)" if overflows else ""
                print(f"epoch {entry['epoch']}{where}: loss {sum(entry['train_loss'].values()):.4f}{skipped} " +
                      " ".join(f"{k}={v:.4f}" for k, v in summary(val).items()), flush=True)
                # The record before the checkpoint: an interrupt between the two leaves the record ahead, which a
                # resume cuts back to the checkpoint's step (behind, it would miss this snapshot for good). The
                # metrics and plots, made from the checkpoint's history, are rewritten by a resume.
                if recorder is not None:
                    recorder.record(step, model, gramian)
                    recorder.save()
                atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "epoch": epoch,
                             "step": step, "progress": progress, "history": history, "rng": rng, "config": config},
                            out / "checkpoint.pt")
                saved_step = step
                write_metrics(out, history)
                save_plots(out, history, model)
            saved_step = step
            context.barrier()
    except NonFiniteLoss as exc:
        if context.is_main:
            kept = (f"the last good checkpoint is {out / 'checkpoint.pt'} (step {saved_step})" if saved_step is not None
                    else "no checkpoint was written: the run stopped before its first one (at the end of an epoch "
                    "or a --steps stop)")
            print(f"tsbn-train: {exc}; stopping, {kept}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if context.is_main:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            kept = (f"{out / 'checkpoint.pt'} holds step {saved_step}; --resume continues from there"
                    if saved_step is not None else "no checkpoint was written yet (one is written at the end of each "
                    "epoch and at a --steps stop)")
            print(f"tsbn-train: {what} at step {step}; {kept}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    return 0


def _strict_json(value):
    """NaN/Inf (an undefined metric, such as the mIoU of a split without labels) as null: JSON has no NaN."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict_json(v) for v in value]
    return value


def write_metrics(out: pathlib.Path, history: list[dict]) -> None:
    atomic_write(out / "metrics.json", json.dumps(_strict_json(history), indent=1, allow_nan=False))
    rows = [{"epoch": h["epoch"], "step": h["step"], **{f"loss_{k}": v for k, v in h["train_loss"].items()},
             **h["val"]} for h in history]
    # Every column any epoch has (a resume may add or drop --baseline, hence delta_m); empty where one lacks it.
    fieldnames = list(dict.fromkeys(k for row in rows for k in row))
    tmp = out / "metrics.csv.tmp"
    try:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, out / "metrics.csv")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    raise SystemExit(main())

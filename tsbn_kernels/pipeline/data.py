"""tsbn-data: datasets in the benchmarks' real on-disk formats.

    tsbn-data synth {nyuv2,cityscapes,celeba,pascal} --out DIR --n N [--split both] [--size H W] [--seed 0]

writes a synthetic, learnable dataset in the real layout, so the real loaders run on real files, and tsbn-train
--data DIR trains on it. N images in all: for NYUv2 and Cityscapes a quarter of them (at least one) in val and
the rest in train, or all N in one split with --split train|val; for CelebA every split in the released files
(80/10/10, at the released 178×218: --split and --size do not apply); for PASCAL-Context both split lists, a
quarter of the images in val (--split does not apply).
"""
from __future__ import annotations

import argparse

from . import celeba_data, pascal_data
from .celeba_data import CelebA
from .dense_data import SPECS, DenseDataset, synthesize
from .pascal_data import PascalContext

__all__ = ["CelebA", "DenseDataset", "PascalContext", "SPECS", "main", "synthesize"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsbn-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write a synthetic dataset in the benchmark's on-disk format")
    synth.add_argument("benchmark", choices=sorted(SPECS) + ["celeba", "pascal"])
    synth.add_argument("--out", required=True)
    synth.add_argument("--n", type=int, required=True)
    synth.add_argument("--split", default="both", choices=("both", "train", "val"),
                       help="NYUv2 / Cityscapes: both (default: a quarter of --n in val), or all of --n in one")
    synth.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="default: the benchmark's size")
    synth.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    dense_both = args.benchmark in SPECS and args.split == "both"
    if dense_both and args.n < 2:
        parser.error("--n must be at least 2 to fill both splits (or give --split train or --split val)")
    if args.benchmark == "celeba":
        path = celeba_data.synthesize(args.out, args.n, args.seed)
    elif args.benchmark == "pascal":
        path = pascal_data.synthesize(args.out, args.n, args.seed, tuple(args.size) if args.size else (512, 512))
    elif dense_both:
        size = tuple(args.size) if args.size else None
        val = max(1, args.n // 4)
        synthesize(args.benchmark, args.out, args.n - val, "train", args.seed, size)
        path = synthesize(args.benchmark, args.out, val, "val", args.seed + 1, size).parent
        print(f"wrote {args.n - val} train and {val} val {args.benchmark} samples to {path}")
        return 0
    else:
        path = synthesize(args.benchmark, args.out, args.n, args.split, args.seed,
                          tuple(args.size) if args.size else None)
    print(f"wrote {args.n} {args.benchmark} samples to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sweep the Triton batch-norm tile sizes at the benchmark shapes on a GPU; write the winners to a tuning table.

    python -m benchmarks.tune_triton --out tuned.json [--quick]

For every batch-norm case of benchmarks/shapes.py × fp32/bf16 × NCHW/channels-last × training (forward +
backward) / eval: each candidate (BLOCK_C, BLOCK_S, num_warps) must reproduce the heuristic configuration's
output (a different reduction split moves only rounding) and is timed like the benchmark suite
(benchmarks.conftest.device_time); the fastest goes into the table's "triton" list, with the heuristic's time
for comparison. Other keys of an existing table (the report's "backend" list) are kept.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess

import torch

import tsbn_kernels as tk
from benchmarks.conftest import device_time
from benchmarks.shapes import batch_norm_cases
from benchmarks.test_bench_batch_norm import _inputs
from tsbn_kernels import tuning
from tsbn_kernels.kernels.triton_ts_batch_norm import tile_config


def candidates(channels_last: bool, quick: bool) -> list[tuple[int, int, int]]:
    """Tiles of 1K–8K elements with the long side along the contiguous dim (coalesced loads)."""
    if channels_last:
        grid = [(bc, bs) for bc in (32, 64, 128) for bs in (16, 32, 64, 128)]
    else:
        grid = [(bc, bs) for bc in (1, 2, 4, 8) for bs in (256, 512, 1024, 2048)]
    warps = (4,) if quick else (4, 8)
    return [(bc, bs, w) for bc, bs in grid for w in warps if 1024 <= bc * bs <= 8192]


def _step(x, grad, weight, num_tasks, training):
    rm = torch.zeros(num_tasks, x.shape[1], device=x.device)
    rv = torch.ones_like(rm)
    if training:
        x = x.detach().requires_grad_(True)

        def step():
            y = tk.ts_batch_norm(x, weight, None, rm, rv, training=True, backend="triton")
            return y, torch.autograd.grad(y, x, grad)[0]
    else:
        def step():
            with torch.no_grad():
                return (tk.ts_batch_norm(x, weight, None, rm, rv, training=False, backend="triton"),)
    return step


def sweep(case, dtype, channels_last, training, quick) -> dict:
    x, grad, weight = _inputs(case.shape, case.num_tasks, dtype, channels_last)
    seeds = iter(range(1, 1 << 16))

    def rotate():
        return _step(*_inputs(case.shape, case.num_tasks, dtype, channels_last, next(seeds))[:2], weight,
                     case.num_tasks, training)
    step = _step(x, grad, weight, case.num_tasks, training)
    bytes_moved = (5 if training else 2) * x.numel() * x.element_size()
    expected = step()
    heuristic, _ = device_time(step, bytes_moved, rotate)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    times, rejected = {}, []
    for block_c, block_s, warps in candidates(channels_last, quick):
        name = f"{block_c}x{block_s}w{warps}"
        with tile_config(block_c, block_s, warps):
            got = step()
            if not all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in zip(got, expected)):
                rejected.append(name)
                continue
            times[name] = (device_time(step, bytes_moved, rotate)[0], (block_c, block_s, warps))
    best_name = min(times, key=lambda k: times[k][0])
    block_c, block_s, warps = times[best_name][1]
    print(f"{case.id} {str(dtype)[6:]} {'cl' if channels_last else 'nchw'} {'train' if training else 'eval'}: "
          f"heuristic {heuristic * 1e3:.3f} ms, best {best_name} {times[best_name][0] * 1e3:.3f} ms"
          + (f"; REJECTED (wrong output) {rejected}" if rejected else ""), flush=True)
    return {"op": "ts_batch_norm", "training": training, "dtype": str(dtype)[6:],
            "layout": "channels_last" if channels_last else "nchw", "numel": x.numel(), "channels": x.shape[1],
            "best": {"block_c": block_c, "block_s": block_s, "num_warps": warps},
            "best_s": times[best_name][0], "heuristic_s": heuristic, "rejected": rejected}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="tuning table to write (its other keys are kept)")
    parser.add_argument("--quick", action="store_true", help="num_warps 4 only, fp32 and bf16 channels-last")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or "triton" not in tk.available_backends("cuda"):
        raise SystemExit("tune_triton needs a CUDA device and the triton backend")
    entries = []
    for case in batch_norm_cases("cuda"):
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in (False, True):
                if args.quick and dtype == torch.bfloat16 and not channels_last:
                    continue
                for training in (True, False):
                    entries.append(sweep(case, dtype, channels_last, training, args.quick))
    path = pathlib.Path(args.out)
    table = json.loads(path.read_text()) if path.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    table.update(device_name=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                 commit=commit or "?", triton=entries)
    path.write_text(json.dumps(table, indent=1))
    print(f"wrote {len(entries)} Triton entries to {path} (install: tsbn_kernels/tuned/"
          f"{tuning.device_slug(torch.cuda.get_device_name())}.json)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compile every Triton kernel of the package for sm_90 (H100/H200) on a machine without a GPU, and report
what the compiler made of it: registers, spills (local memory, stack), shared memory and the widths of the
global loads in the SASS.

    python tests/triton_sm90.py [--json]

Triton's compiler needs no GPU: a stand-in driver names the target, and the launch in each kernel wrapper is
replaced by a compile of the same specialisation (argument types, alignments, constants) that a real launch
on the same tensors would compile. The wrappers run on CPU tensors of the real benchmark shapes, with the
multiprocessor count of an H100 (132), so the grids and tiles are those the GPU would get. Used by
tests/test_triton_compile.py; nothing runs on a device.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class _OfflineDriver:
    """Just enough of Triton's driver for JITFunction.run to specialise and compile (warmup=True)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET


compiled: list[dict] = []
_case = {"name": ""}


def _compile_instead_of_launch(self, grid):
    def launch(*args, **kwargs):
        kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
        grid_shape = grid(args) if callable(grid) else tuple(grid)
        compiled.append({"case": _case["name"], "kernel": self.fn.__name__, "grid": list(grid_shape),
                         "num_warps": kernel.metadata.num_warps, **_resources(kernel.asm["cubin"])})
        return kernel
    return launch


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    loads = re.findall(r"\bLDG\.E(?:\.[A-Z0-9_]+)*", sass)
    return {"registers": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
            "local": int(fields.get("LOCAL", 0)), "shared": int(fields.get("SHARED", 0)),
            "loads_128": sum(".128" in op for op in loads), "loads_64": sum(".64" in op for op in loads),
            "loads": len(loads), "tensor_core_ops": len(re.findall(r"\b[HQ]G?MMA\b|\bHGMMA\.", sass))}


def _empty(shape, dtype, channels_last=False):
    x = torch.empty(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def batch_norm_cases():
    from benchmarks.shapes import BATCH_NORM_CASES

    by_name = {c.name: c for c in BATCH_NORM_CASES}
    for name, dtype, channels_last in (("nyuv2-layer1", torch.float32, False), ("nyuv2-layer1", torch.float32, True),
                                       ("nyuv2-layer1", torch.bfloat16, True), ("nyuv2-layer4", torch.bfloat16, False),
                                       ("celeba-stage2", torch.float32, False)):
        case = by_name[name]
        yield f"{case.id}-{str(dtype)[6:]}-{'cl' if channels_last else 'nchw'}", case.shape, case.num_tasks, dtype, \
            channels_last
    for dtype in (torch.float16, torch.float64):
        yield f"odd-{str(dtype)[6:]}", (9, 5, 9, 4), 3, dtype, False
    yield "odd-2d-float32", (9, 5), 3, torch.float32, False
    yield "odd-3d-float32", (9, 5, 7), 3, torch.float32, False
    yield "odd-5d-cl-bfloat16", (6, 3, 2, 3, 4), 3, torch.bfloat16, True


def run_batch_norm():
    from tsbn_kernels.kernels import triton_ts_batch_norm as tbn

    for name, shape, tasks, dtype, channels_last in batch_norm_cases():
        _case["name"] = name
        x = _empty(shape, dtype, channels_last)
        c = shape[1]
        w, b = torch.randn(tasks, c), torch.randn(tasks, c)
        rm, rv = torch.zeros(tasks, c), torch.ones(tasks, c)
        for relu, training in ((False, True), (True, False)):   # every constexpr of the kernels, in two calls
            y, mean, invstd, _, count = tbn.triton_bn_forward(x, w, b if relu else None, rm, rv, None, tasks,
                                                              training, 1e-5, True, relu)
            tbn.triton_bn_backward(y, x, w, b if relu else None, mean, invstd, count, None, tasks, training, True,
                                   relu)


def run_layer_norm():
    from benchmarks.shapes import LAYER_NORM_CASES
    from tsbn_kernels.kernels import triton_ts_layer_norm as tln

    for case in LAYER_NORM_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            _case["name"] = f"{case.id}-{str(dtype)[6:]}"
            x = _empty(case.shape, dtype)
            d = case.shape[-1]
            w, b = torch.randn(case.num_tasks, d), torch.randn(case.num_tasks, d)
            y, mean, rstd = tln.triton_ln_forward(x, w, b, None, case.num_tasks, 1, 1e-5, True)
            tln.triton_ln_backward(y, x, w, b, mean, rstd, None, case.num_tasks, 1, True)


def run_gramian():
    from tsbn_kernels.mtl import triton_gramian as tg

    for tasks in (3, 40):
        for dtype in (torch.float32, torch.bfloat16):
            _case["name"] = f"gramian-T{tasks}-P1e7-{str(dtype)[6:]}"
            G = torch.empty(tasks, 10_000_000, dtype=dtype)
            tg.triton_gramian(G)
            tg.triton_combine(G, torch.randn(tasks))


def run_solvers():
    from tsbn_kernels.mtl import triton_solvers as ts

    for tasks, rows, simplex in ((3, 1, True), (3, 3, False), (32, 1, True), (40, 40, False), (64, 1, True),
                                 (64, 64, False)):
        for dtype in (torch.float32, torch.float64):
            if not ts.applies(torch.empty(tasks, tasks, dtype=dtype), simplex):
                continue
            _case["name"] = f"min_quadratic-T{tasks}-{'simplex' if simplex else 'box'}-{str(dtype)[6:]}"
            ts.min_quadratic(torch.empty(tasks, tasks, dtype=dtype), torch.empty(rows, tasks, dtype=dtype), simplex,
                             500, 30)
    for tasks in (3, 20, 32, 40, 64):
        for dtype in (torch.float32, torch.float64):
            if ts.cagrad_applies(torch.empty(tasks, tasks, dtype=dtype)):
                _case["name"] = f"cagrad-T{tasks}-{str(dtype)[6:]}"
                ts.cagrad(torch.empty(tasks, tasks, dtype=dtype), 0.5, True, 300)


def main() -> int:
    from tsbn_kernels.kernels import triton_utils

    driver.set_active(_OfflineDriver())
    JITFunction.__getitem__ = _compile_instead_of_launch
    triton_utils.SIMULATED_MULTIPROCESSORS = 132
    failures = []
    for part in (run_batch_norm, run_layer_norm, run_gramian, run_solvers):
        try:
            part()
        except Exception as exc:  # a compile error names the kernel and line; report it and go on
            failures.append(f"{part.__name__} [{_case['name']}]: {type(exc).__name__}: {exc}")
    if "--json" in sys.argv:
        print(json.dumps({"kernels": compiled, "failures": failures}))
    else:
        for k in compiled:
            print(f"{k['case']:42s} {k['kernel']:24s} warps={k['num_warps']} grid={k['grid']} regs={k['registers']} "
                  f"stack={k['stack']} local={k['local']} ldg128={k['loads_128']}/{k['loads']} "
                  f"mma={k['tensor_core_ops']}")
        print("\n".join(failures) or "all kernels compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Every Triton kernel compiles for sm_90 on this GPU-less machine, into what a memory-bound kernel needs.

tests/triton_sm90.py compiles each kernel at the benchmark shapes (and odd ones) with the grids and tiles an
H100 would get. The checks here are the ones the compiler's output can answer without a device: no register
spills or stack frames anywhere; 16-byte global loads in every streaming batch-norm kernel at the real
NYUv2 shapes; tensor-core instructions in the many-task Gramian (3xTF32). Timings need a GPU
(benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
SCRIPT = pathlib.Path(__file__).with_name("triton_sm90.py")
CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
pytestmark = pytest.mark.skipif(not CUOBJDUMP.exists(), reason="triton without its NVIDIA backend tools")

STREAMING = ("_moments_kernel", "_apply_kernel", "_grad_sums_kernel", "_grad_input_kernel")


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.stdout.strip(), f"triton_sm90.py printed nothing:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90(report):
    assert not report["failures"], "\n".join(report["failures"])
    names = {k["kernel"] for k in report["kernels"]}
    assert {*STREAMING, "_merge_moments_kernel", "_merge_sums_kernel", "_ln_forward_kernel", "_ln_backward_kernel",
            "_merge_rows_kernel", "_gramian_partial_kernel", "_combine_kernel", "_min_quadratic_kernel",
            "_cagrad_kernel"} <= names


def test_no_spills(report):
    spilled = {(k["case"], k["kernel"]) for k in report["kernels"] if k["local"] or k["stack"]}
    assert not spilled, f"kernels with local memory or a stack frame: {sorted(spilled)}"


@pytest.mark.parametrize("case", ["nyuv2-layer1-24x256x72x96-T3-float32-nchw",
                                  "nyuv2-layer1-24x256x72x96-T3-float32-cl",
                                  "nyuv2-layer1-24x256x72x96-T3-bfloat16-cl"])
def test_streaming_kernels_load_16_bytes(report, case):
    kernels = [k for k in report["kernels"] if k["case"] == case and k["kernel"] in STREAMING]
    assert {k["kernel"] for k in kernels} == set(STREAMING)
    narrow = [k["kernel"] for k in kernels if k["loads_128"] == 0]
    assert not narrow, f"{case}: no 16-byte loads in {narrow}"


def test_batch_norm_grid_fills_the_gpu(report):
    for k in report["kernels"]:
        if k["case"].startswith("nyuv2") and k["kernel"] in STREAMING:
            assert k["grid"][0] >= 4 * 132, f"{k['case']} {k['kernel']}: grid {k['grid']} under 4 programs per SM"


def test_many_task_gramian_uses_tensor_cores(report):
    gramians = [k for k in report["kernels"] if k["kernel"] == "_gramian_partial_kernel" and "T40" in k["case"]]
    assert gramians and all(k["tensor_core_ops"] > 0 for k in gramians)

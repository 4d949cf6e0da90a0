"""The CUDA batch-norm kernels executed on the host, so that their index, partition and reduction logic is
tested on machines without a GPU.

tests/cuda_sim/sim_cuda.h mocks the CUDA built-ins the kernels use (threads as fibers, __syncthreads, warp
shuffles and votes, dynamic shared memory with a guard; a collective not reached by every lane is reported as a
deadlock), and sim_main.cpp runs csrc/cuda/ts_batch_norm_kernels.cuh with the host code's plans for many
shapes, both layouts, every pack width, replicated/ragged/alternating/empty task layouts and two grid sizes,
and the slab kernels (one block per (task, channel) unit in shared memory) over odd and packed S, N_t = 1, C up
to 2048 (sampled), T up to 40, several block sizes, eval backward, gates and affine options. It checks every
output and partial-count slot is written, the results against a float64 reference (|mean| = 1e4·std included)
and that they are bitwise equal across grid sizes and thread schedules (round robin, and one warp running
ahead as far as the barriers allow, which exposes a missing barrier). The device code is built without fast math
(setup.py), so its arithmetic is IEEE as here, up to nvcc's fused multiply-adds. Throughput and real memory
behaviour are not covered: that needs a GPU (tests/test_fused_batch_norm.py, tests/test_cuda_graphs.py).
TSBN_SIM_MODE=quick (about a minute of run time) or full runs longer sweeps than the default smoke set.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[1]
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@pytest.mark.skipif(CXX is None or not sys.platform.startswith("linux"),
                    reason="needs a C++20 compiler and glibc's ucontext")
def test_cuda_kernels_in_the_host_simulator(tmp_path: pathlib.Path):
    exe = tmp_path / "sim"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd = [CXX, "-std=c++20", "-O1", "-U_FORTIFY_SOURCE", "-Wno-unknown-pragmas", *includes, f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "cuda_sim" / "sim_main.cpp"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"building the simulator failed:\n{build.stderr[-6000:]}"
    mode = os.environ.get("TSBN_SIM_MODE", "smoke")
    run = subprocess.run([str(exe), mode], capture_output=True, text=True, timeout=3600)
    failed = "\n".join(line for line in run.stdout.splitlines() if line.startswith("FAIL"))
    assert run.returncode == 0, f"{failed[-6000:]}\n{run.stdout[-500:]}\n{run.stderr[-2000:]}"

"""The C++ CPU kernels are built three times, for the baseline ISA, for AVX2 + FMA and for AVX-512, and one build is
chosen when the library loads, from torch's CPU capability (csrc/cpu/cpu_isa.h). The rest of the suite runs the
build this machine gets; test_other_build_passes_the_cpu_kernel_tests runs the CPU kernel tests (batch norm and
Gramian) again in a process where ATEN_CPU_CAPABILITY selects each other build this CPU can run, so that no build
goes untested on a CPU that runs it (the AVX-512 build needs an AVX-512 CPU to be tested at all).
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tsbn_kernels as tk

pytestmark = pytest.mark.skipif("cpu" not in tk.available_backends("cpu"), reason="the C++ CPU kernel is not built")

TESTS = Path(__file__).resolve().parent
# The AVX2 and AVX-512 builds exist where the extension is compiled by GCC for x86-64 (setup.py uses the system
# compiler, which is GCC on Linux).
WIDE_BUILT = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
# ATEN_CPU_CAPABILITY's values, narrowest first, and the build of ours each selects.
CAPABILITIES = {"default": "baseline", "avx2": "avx2", "avx512": "avx512"}


def expected_isa() -> str:
    if not WIDE_BUILT:
        return "baseline"
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "baseline")


def test_isa_follows_torch_cpu_capability():
    assert torch.ops.tsbn.cpu_isa() == expected_isa()


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_other_build_passes_the_cpu_kernel_tests(capability):
    builds = list(CAPABILITIES.values())
    wanted, running = CAPABILITIES[capability], expected_isa()
    if wanted == running:
        pytest.skip(f"this process runs the {wanted} build already")
    if builds.index(wanted) > builds.index(running):   # (where no wider build exists, the baseline runs)
        pytest.skip(f"this CPU or compiler has no {wanted} build to run")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(TESTS / "test_cpu_isa.py"), str(TESTS / "test_cpu_slab_kernel.py"),
           str(TESTS / "test_fused_batch_norm.py"), str(TESTS / "test_mtl_gramian.py"),
           "-k", "(cpu or cpp) and not other_build"]
    result = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    # Not vacuous: that environment does select that build.
    probe = subprocess.run([sys.executable, "-c", "import torch, tsbn_kernels; print(torch.ops.tsbn.cpu_isa())"],
                           cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.strip() == wanted
    assert " passed" in result.stdout, result.stdout[-2000:]

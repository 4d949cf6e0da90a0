"""The C++ CPU kernels are built twice, for the baseline ISA and for AVX2 + FMA, and one build is chosen when the
library loads, from torch's CPU capability (csrc/cpu/cpu_isa.h). The rest of the suite runs the build
this machine gets; test_baseline_build_passes_the_cpu_kernel_tests runs the CPU kernel tests (batch norm and
Gramian) again in a process where ATEN_CPU_CAPABILITY=default selects the baseline build, so that neither build
goes untested.
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
# The AVX2 build exists where the extension is compiled by GCC for x86-64 (setup.py uses the system compiler,
# which is GCC on Linux).
AVX2_BUILT = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


def expected_isa() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return "avx2" if AVX2_BUILT and capability in ("AVX2", "AVX512") else "baseline"


def test_isa_follows_torch_cpu_capability():
    assert torch.ops.tsbn.cpu_isa() == expected_isa()


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT",
                    reason="this process already runs the baseline build")
def test_baseline_build_passes_the_cpu_kernel_tests():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(TESTS / "test_cpu_isa.py"), str(TESTS / "test_cpu_slab_kernel.py"),
           str(TESTS / "test_fused_batch_norm.py"), str(TESTS / "test_mtl_gramian.py"),
           "-k", "(cpu or cpp) and not baseline_build"]
    result = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    # Not vacuous: that environment does select the baseline build.
    probe = subprocess.run([sys.executable, "-c", "import torch, tsbn_kernels; print(torch.ops.tsbn.cpu_isa())"],
                           cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.strip() == "baseline"
    assert " passed" in result.stdout, result.stdout[-2000:]

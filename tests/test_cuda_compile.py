"""Every CUDA source compiles with nvcc for sm_80 and sm_90, also on a machine without a GPU.

The CPU build of torch ships the c10/ATen headers but not the one header CMake generates for c10_cuda; a
throwaway include directory supplies it (it only declares that c10_cuda is a shared library). The flags are
those torch.utils.cpp_extension passes to nvcc, so this catches what `pip install` on a GPU machine would hit.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))
ARCHS = ("80", "90")


def find_nvcc() -> str | None:
    if cpp_extension.CUDA_HOME and (pathlib.Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return str(pathlib.Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = find_nvcc()


def include_flags(shim: pathlib.Path) -> list[str]:
    paths = list(cpp_extension.include_paths()) + [sysconfig.get_paths()["include"]]
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((pathlib.Path(p) / generated).exists() for p in paths):
        header = shim / generated
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        paths.insert(0, str(shim))
    return [f"-I{p}" for p in paths]


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/ holds no .cu file"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nvcc_compiles(source: pathlib.Path, tmp_path: pathlib.Path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, "-c", str(source), "-o", str(tmp_path / "out.o"), "-std=c++20", "-O3", "-DTSBN_WITH_CUDA",
           "-Xcompiler", "-fPIC", *cpp_extension.COMMON_NVCC_FLAGS, *gencode, *include_flags(tmp_path / "shim"),
           f"-I{ROOT / 'csrc'}", "-diag-suppress=3306"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_HOME": os.path.dirname(
        os.path.dirname(NVCC))})
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr[-6000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0

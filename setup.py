"""Builds tsbn_kernels._C with torch.utils.cpp_extension (install with `pip install --no-build-isolation .`).

CPU sources always; CUDA sources when nvcc and a CUDA build of torch are present (decided from
torch.version.cuda and CUDA_HOME, not from a visible GPU, so a GPU-less build node still builds them).
TSBN_FORCE_CUDA=1 / 0 overrides the decision. TSBN_CUDA_ARCHS (default "8.0;9.0") sets the targets
when TORCH_CUDA_ARCH_LIST is unset.
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("TSBN_FORCE_CUDA")
    if forced is not None and forced != "":
        if forced not in ("0", "1"):
            raise SystemExit(f"TSBN_FORCE_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (torch.version.cuda is None or CUDA_HOME is None):
            raise SystemExit("TSBN_FORCE_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME); found "
                             f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}")
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def extension():
    cxx = ["-O3", "-fopenmp"]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/**/*.cpp")
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("TSBN_CUDA_ARCHS", "8.0;9.0"))
        return CUDAExtension(
            "tsbn_kernels._C", srcs + sources("csrc/cuda/**/*.cu"),
            define_macros=[("TSBN_WITH_CUDA", None)],
            # No --use_fast_math: the kernels are bound by memory, so approximate division and square root and
            # flushed fp32 denormals would buy no time, and IEEE arithmetic keeps the device's numerics those of
            # the host simulator (tests/test_cuda_kernel_sim.py) and of the CPU kernels.
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("tsbn_kernels._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})

"""Builds the `svdquant._C` extension in place: `python setup.py build_ext --inplace`.

What gets built follows torch's CUDA support, not the presence of nvcc: a CPU-only torch gets
the C++ host module alone (the engine then runs its PyTorch reference path); a CUDA torch with
a CUDA toolkit also gets the kernels, for the GPU architectures found here (or listed in
SVDQUANT_CUDA_ARCHS, e.g. "9.0a"). Set SVDQUANT_NO_CUDA=1 to skip the kernels.
"""

import glob
import os
import re

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Kernel families by the architectures they run on (sm_90a: Hopper wgmma), and the kernels any
# sm_80+ GPU runs (csrc/generic).
ARCH_SOURCES = {"9.0a": sorted(glob.glob(os.path.join("csrc", "sm90", "*.cu")))}
GENERIC_SOURCES = sorted(glob.glob(os.path.join("csrc", "generic", "*.cu")))


def cuda_archs() -> list[str]:
    """Architectures to build kernels for, each in torch's TORCH_CUDA_ARCH_LIST spelling."""
    if os.environ.get("SVDQUANT_NO_CUDA") == "1" or torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return []
    listed = os.environ.get("SVDQUANT_CUDA_ARCHS")
    if listed:
        return listed.replace(";", " ").split()
    found = set()
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            found.add(f"{major}.{minor}a" if (major, minor) == (9, 0) else f"{major}.{minor}")
    else:  # building on a machine without a visible GPU: build every family we have
        found = set(ARCH_SOURCES)
    return sorted(found)


def build_archs() -> list[str]:
    """The architectures this build compiles for: sm_80 and newer. Every source is compiled for every
    listed architecture, so a build holding the sm_90a family is for sm_90a alone (other GPUs of the
    machine then run the PyTorch reference path)."""
    archs = [a for a in cuda_archs() if int(re.match(r"\d+", a).group()) >= 8]
    return ["9.0a"] if "9.0a" in archs else archs


def extension():
    archs = build_archs()
    sources = ["csrc/bindings.cpp"]
    define = [("SVDQ_BUILD_ARCHS", '"%s"' % " ".join(archs))]
    extra = {"cxx": ["-O3"]}
    if not archs:
        print("svdquant: building the C++ host module only (no CUDA kernels for this torch/toolkit/GPU)")
        return cpp_extension.CppExtension("svdquant._C", sources, define_macros=define, extra_compile_args=extra)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    sources += GENERIC_SOURCES
    define.append(("SVDQ_WITH_CUDA", "1"))
    for arch in archs:
        sources += ARCH_SOURCES.get(arch, [])
        if ARCH_SOURCES.get(arch):
            define.append(("SVDQ_WITH_SM" + arch.replace(".", "").upper(), "1"))
    extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    print(f"svdquant: building CUDA kernels for {', '.join(archs)}")
    return cpp_extension.CUDAExtension("svdquant._C", sources, define_macros=define, extra_compile_args=extra)


setup(
    packages=["svdquant"],
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)

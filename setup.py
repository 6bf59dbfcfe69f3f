"""Build script for StreamKL's native extension ``streamkl._C``.

* torch built with CUDA and a CUDA toolkit (``CUDA_HOME``) present -> ``CUDAExtension`` with the CPU and
  CUDA sources. Whether a GPU is visible at build time does not matter (never gate on it).
* otherwise -> ``CppExtension`` with the CPU sources only.

Environment knobs:
  STREAMKL_FORCE_CPU=1         build the CPU-only extension even when CUDA is available
  STREAMKL_CUDA_ARCHS="80;90"  SM architectures for the CUDA kernels (default "80;90"; 90 builds sm_90a)
  STREAMKL_DISABLE_<FAMILY>=1  skip a family of kernel instantiations (see csrc/cuda/instantiations)
  CUTLASS_INCLUDE_DIR          CUTLASS headers (default: third_party/cutlass/include, then the
                               nvidia-cutlass wheel's cutlass_library/source/include)
  MAX_JOBS, NVCC_THREADS       build parallelism (torch's ninja backend honours MAX_JOBS)
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import build_config  # noqa: E402  (tools/build_config.py: source lists and flags, shared with CMake docs)

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("STREAMKL_FORCE_CPU", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    # -fopenmp-simd: omp simd pragmas only (no OpenMP runtime); -fno-trapping-math: lets the CPU loops'
    # conditional selects vectorize (csrc/cpu/cpu_math.h). No -std flag: torch's build adds the language
    # standard its headers are written for (C++20 in recent releases; under C++17 their headers warn).
    cxx_flags = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
    sources = build_config.cpu_sources(ROOT)
    if not _want_cuda():
        print("streamkl: building the CPU extension (torch.version.cuda=%s, CUDA_HOME=%s)"
              % (torch.version.cuda, cpp_extension.CUDA_HOME))
        return cpp_extension.CppExtension("streamkl._C", sources, extra_compile_args={"cxx": cxx_flags})
    cuda_sources = build_config.cuda_sources(ROOT)
    archs = build_config.cuda_archs()
    print("streamkl: building the CUDA extension for sm_%s with %d CUDA sources" % (",".join(archs), len(cuda_sources)))
    nvcc_flags = build_config.nvcc_flags(archs) + ["-I" + build_config.cutlass_include_dir(ROOT)]
    threads = os.environ.get("NVCC_THREADS")
    if threads:
        nvcc_flags += ["--threads", threads]
    return cpp_extension.CUDAExtension(
        "streamkl._C",
        sources + cuda_sources,
        define_macros=[("STREAMKL_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        libraries=_cublas_libraries(),
    )


def _cublas_libraries():
    """linear_kl's CUDA backend calls cuBLAS directly (csrc/cuda/linear_kl_gemm.cpp): name libcublas among the
    extension's dependencies when the toolkit ships it, so its symbols do not depend on how torch loaded its own
    copy (same major version: torch's build refuses a toolkit of another major). Otherwise the symbols resolve
    through libtorch_cuda's dependency on libcublas."""
    for sub in ("lib64", "lib"):  # the library directories torch's CUDAExtension adds
        if os.path.exists(os.path.join(cpp_extension.CUDA_HOME, sub, "libcublas.so")):
            return ["cublas"]
    print("streamkl: libcublas.so not found under CUDA_HOME; cuBLAS symbols will resolve through libtorch_cuda")
    return []


setup(
    name="streamkl",
    version="0.1.0",
    description="KL divergence between two softmax distributions without materializing them",
    packages=find_packages(include=["streamkl", "streamkl.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
)

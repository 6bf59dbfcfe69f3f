"""Source lists and compiler flags for the native extension, shared by setup.py and tools/nvcc_check.sh."""

import glob
import importlib.util
import os

DEFAULT_ARCHS = "80;90"


def cpu_sources(root):
    return sorted(glob.glob(os.path.join(root, "csrc", "ops", "*.cpp")) +
                  glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))


def _disabled_families():
    prefix = "STREAMKL_DISABLE_"
    return {k[len(prefix):].lower() for k, v in os.environ.items() if k.startswith(prefix) and v == "1"}


def cuda_sources(root):
    """Every .cu/.cpp under csrc/cuda, minus instantiation files (named <family>_<dtype>_hd<Ds>x<Dt>.cu) that
    contain a token switched off by STREAMKL_DISABLE_<TOKEN>=1 (e.g. STREAMKL_DISABLE_FP16, _BWD, _HD256X256)."""
    srcs = sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")) +
                  glob.glob(os.path.join(root, "csrc", "cuda", "*.cpp")))
    inst = sorted(glob.glob(os.path.join(root, "csrc", "cuda", "instantiations", "*.cu")))
    disabled = _disabled_families()
    srcs += [s for s in inst if not disabled & set(os.path.basename(s)[:-3].split("_"))]
    return srcs


def cuda_archs():
    raw = os.environ.get("STREAMKL_CUDA_ARCHS", DEFAULT_ARCHS)
    return [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]


def nvcc_flags(archs):
    # No -std flag: inside the torch build, torch adds the standard of its headers; the bare-nvcc compile test
    # (tests/test_cuda_compile.py) builds torch-free kernel files with nvcc's default (C++17).
    flags = ["-O3", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
             "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
             "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    for a in archs:
        # Hopper kernels need the arch-specific target (wgmma, setmaxnreg): sm_90a.
        if a == "90":
            flags.append("-gencode=arch=compute_90a,code=sm_90a")
        else:
            flags.append("-gencode=arch=compute_%s,code=sm_%s" % (a, a))
    return flags


def cutlass_include_dir(root):
    env = os.environ.get("CUTLASS_INCLUDE_DIR")
    if env:
        return env
    vendored = os.path.join(root, "third_party", "cutlass", "include")
    if os.path.isdir(os.path.join(vendored, "cute")):
        return vendored
    # The nvidia-cutlass wheel (installable with --no-deps); located without importing it.
    spec = importlib.util.find_spec("cutlass_library")
    for location in (spec.submodule_search_locations or []) if spec else []:
        wheel = os.path.join(location, "source", "include")
        if os.path.isdir(os.path.join(wheel, "cute")):
            return wheel
    raise RuntimeError(
        "streamkl: CUTLASS headers not found. Install them with `pip install --no-deps nvidia-cutlass==4.2.0.0`, "
        "set CUTLASS_INCLUDE_DIR, or populate third_party/cutlass/include.")

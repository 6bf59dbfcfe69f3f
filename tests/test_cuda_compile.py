"""Compile-only check of the CUDA kernels, for machines without a GPU (CI).

Builds one instantiation of each attention kernel family (forward, backward; Ampere path, Hopper path -- also for
sm_80, where a default build compiles it without running it -- and aggregated teachers) and linear_kl's torch-free
epilogue kernels with nvcc for sm_80 and sm_90a, so kernel breakage is caught where no GPU exists to run the CUDA
tests. Skipped when nvcc or the CUTLASS headers are missing (the README's install command installs the headers).
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import build_config  # noqa: E402

# Paths under csrc/cuda.
INSTANTIATIONS = ["instantiations/fwd_bf16_hd64x128.cu", "instantiations/bwd_bf16_hd64x128.cu",
                  "instantiations/fwd90_bf16_hd64x128.cu", "instantiations/bwd90_bf16_hd64x128.cu",
                  "instantiations/fwdagg_bf16_hd64x128.cu", "instantiations/bwdagg_bf16_hd64x128.cu",
                  "instantiations/fwdagg90_bf16_hd64x128.cu", "instantiations/bwdagg90_bf16_hd64x128.cu",
                  "linear_kl_epilogue.cu"]
ARCHS = ["80", "90"]


def _nvcc():
    return shutil.which("nvcc")


def _cutlass():
    try:
        return build_config.cutlass_include_dir(ROOT)
    except RuntimeError:
        return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.skipif(_cutlass() is None, reason="CUTLASS headers not found (pip install --no-deps nvidia-cutlass)")
def test_kernel_families_compile_for_sm80_and_sm90(tmp_path):
    jobs = []
    for name in INSTANTIATIONS:
        for arch in ARCHS:
            src = os.path.join(ROOT, "csrc", "cuda", name)
            obj = tmp_path / f"{os.path.basename(name)}.{arch}.o"
            cmd = ([_nvcc(), "-c", src, "-o", str(obj), "-I" + _cutlass(), "-Xptxas", "-v"] +
                   build_config.nvcc_flags([arch]))
            jobs.append((name, arch, cmd))
    # Two compiles at a time: CI machines have 2 cores.
    results = []
    for i in range(0, len(jobs), 2):
        procs = [(n, a, subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                 for n, a, c in jobs[i:i + 2]]
        results += [(n, a, p.communicate()[0], p.returncode) for n, a, p in procs]
    failures = [(n, a, log[-3000:]) for n, a, log, rc in results if rc != 0]
    for n, a, log, rc in results:
        regs = [line.strip() for line in log.splitlines() if "registers" in line or "stack frame" in line]
        print(f"{n} sm_{a}: rc={rc}", *regs, sep="\n  ")
    assert not failures, "nvcc failed:\n" + "\n\n".join(f"{n} sm_{a}:\n{log}" for n, a, log in failures)
    for name in INSTANTIATIONS:
        for arch in ARCHS:
            assert (tmp_path / f"{os.path.basename(name)}.{arch}.o").stat().st_size > 0

"""Host time per attention-KL call against the GPU time of its kernels, for both CUDA paths, at small N (where a
call can be bound by the host: launch arguments, TMA descriptor encoding, allocations).

Usage (on the GPU machine): python tools/host_overhead.py [--n 1024] [--d 128] [--heads 16] [--causal] [--iters 200]
[--profile]
Prints, per path and for the forward and forward+backward: the host time per call (wall clock of `iters` calls
issued back to back, divided by iters, after a synchronize), and the summed GPU time of the streamkl kernels per call
(torch.profiler). Host time well above GPU time means the call is host-bound. --profile adds, per path, the
profiler's CPU view of the forward+backward (where the host time goes).
"""

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

import streamkl
from problem_args import add_problem_args, make_problem


def host_ms(fn, iters):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def kernel_ms(fn, iters):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.key_averages() if "streamkl" in e.key)
    return total_us / 1e3 / iters


def loaded_library(fragment):
    """Path of a shared library already mapped into this process (torch loads the CUDA runtime and driver)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if fragment in path:
                return path
    raise RuntimeError(f"no loaded library matching {fragment!r}")


def driver_call_us(iters):
    """Microseconds per call of the two driver steps behind one TMA descriptor as CUTLASS's wrapper makes them:
    the entry-point lookup it repeats on every call, and cuTensorMapEncodeTiled itself."""
    import ctypes
    cudart = ctypes.CDLL(loaded_library("libcudart.so"))
    libcuda = ctypes.CDLL(loaded_library("libcuda.so"))
    pfn, status = ctypes.c_void_p(), ctypes.c_int()
    lookup = lambda: cudart.cudaGetDriverEntryPointByVersion(b"cuTensorMapEncodeTiled", ctypes.byref(pfn), 12000,
                                                             ctypes.c_ulonglong(0), ctypes.byref(status))
    buf = torch.empty(1 << 20, device="cuda", dtype=torch.bfloat16)
    desc = (ctypes.c_uint8 * 192)()
    aligned = ctypes.c_void_p((ctypes.addressof(desc) + 63) // 64 * 64)
    u64, u32 = ctypes.c_uint64 * 4, ctypes.c_uint32 * 4
    dims, strides = u64(128, 1024, 8, 1), u64(256, 256 * 1024, 256 * 1024 * 8)
    box, elem = u32(64, 64, 1, 1), u32(1, 1, 1, 1)
    encode = lambda: libcuda.cuTensorMapEncodeTiled(aligned, 9, 4, ctypes.c_void_p(buf.data_ptr()), dims, strides,
                                                    box, elem, 0, 3, 0, 0)
    out = {}
    for name, fn in (("entry-point lookup", lookup), ("cuTensorMapEncodeTiled", encode)):
        rc = fn()
        if rc != 0:
            raise RuntimeError(f"{name} returned {rc}")
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        out[name] = (time.perf_counter() - start) * 1e6 / iters
    return out


def main():
    ap = argparse.ArgumentParser()
    add_problem_args(ap, n=1024)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    q_s, k_s, q_t, k_t = make_problem(a)

    def forward():
        with torch.no_grad():
            streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=a.causal)

    def forward_backward():
        streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=a.causal).sum().backward()
        q_s.grad = k_s.grad = None

    for name, us in driver_call_us(2000).items():
        print(f"{name}: {us:.2f} us per call (ctypes)")
    print(f"N={a.n} D={a.d} H={a.heads} bf16, {a.iters} calls; ms per call")
    for path in ("ampere", "hopper"):
        os.environ["STREAMKL_CUDA_PATH"] = path
        for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
            print(f"{path:7s} {name:8s} host {host_ms(fn, a.iters):.4f}  kernels {kernel_ms(fn, a.iters):.4f}",
                  flush=True)
        if a.profile:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(a.iters):
                    forward_backward()
                torch.cuda.synchronize()
            print(f"==== {path}: CPU time of {a.iters} fwd+bwd calls")
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()

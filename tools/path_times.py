"""Median forward and forward+backward time of each divergence on both CUDA paths, in one process.

Usage (on the GPU machine): python tools/path_times.py [--n 8192] [--d 128] [--heads 16] [--causal]
                            [--aggregate R --d-s 64]   (a head-aggregated teacher, tools/problem_args.py)
Prints one line per (divergence, path): ms forward / forward+backward (grads w.r.t. the student's q, k; the teacher
detached), triton.testing.do_bench medians. STREAMKL_CUDA_PATH is set per line (the ops read it at every call).
"""

import argparse
import os

import torch
from triton.testing import do_bench

import streamkl
from problem_args import add_problem_args, make_problem, teacher_head_reduce


def main():
    ap = argparse.ArgumentParser()
    add_problem_args(ap)
    a = ap.parse_args()
    q_s, k_s, q_t, k_t = make_problem(a)
    print(f"B=1 H={a.heads} N={a.n} D={a.d} D_s={a.d_s or a.d} r={a.aggregate} causal={a.causal} bf16 "
          f"({torch.cuda.get_device_name()})")
    for divergence in ("forward", "reverse", "jsd"):
        for path in ("ampere", "hopper"):
            os.environ["STREAMKL_CUDA_PATH"] = path
            kwargs = dict(divergence=divergence, causal=a.causal, teacher_head_reduce=teacher_head_reduce(a))

            def fwd():
                with torch.no_grad():
                    streamkl.attention_kl(q_s, k_s, q_t, k_t, **kwargs)

            def fwd_bwd():
                torch.autograd.grad(streamkl.attention_kl(q_s, k_s, q_t, k_t, **kwargs).sum(), (q_s, k_s))

            print(f"{divergence:8s} {path:7s} {do_bench(fwd):8.3f} / {do_bench(fwd_bwd):8.3f} ms")


if __name__ == "__main__":
    main()

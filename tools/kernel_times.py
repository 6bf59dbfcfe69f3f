"""Per-kernel GPU time of one attention-KL forward + backward (torch.profiler), for tuning on the device.

Usage: python tools/kernel_times.py [--n 8192] [--d 128] [--heads 16] [--causal] [--aggregate R --d-s 64]
(--aggregate R: a head-aggregated teacher with R query heads per student head, D_s = --d-s, e.g. DSA's
--heads 1 --aggregate 64 --d-s 64 --causal)
Prints the profiler's table of CUDA kernels (total and average time per call).
"""

import argparse
import torch
from torch.profiler import ProfilerActivity, profile

import streamkl
from problem_args import add_problem_args, make_problem, teacher_head_reduce


def main():
    ap = argparse.ArgumentParser()
    add_problem_args(ap)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    d_s = a.d_s or a.d
    q_s, k_s, q_t, k_t = make_problem(a)
    reduce = teacher_head_reduce(a)
    step = lambda: streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=a.causal,
                                         teacher_head_reduce=reduce).sum().backward()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.iters):
            step()
        torch.cuda.synchronize()
    print(f"N={a.n} D={a.d} D_s={d_s} H={a.heads} r={a.aggregate} causal={a.causal}: {a.iters} fwd+bwd steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=90))


if __name__ == "__main__":
    main()

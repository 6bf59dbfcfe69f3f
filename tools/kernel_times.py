"""Per-kernel GPU time of one attention-KL forward + backward (torch.profiler), for tuning on the device.

Usage: python tools/kernel_times.py [--n 8192] [--d 128] [--heads 16] [--causal]
Prints the profiler's table of CUDA kernels (total and average time per call).
"""

import argparse
import torch
from torch.profiler import ProfilerActivity, profile

import streamkl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda: torch.randn(1, a.heads, a.n, a.d, device="cuda", dtype=torch.bfloat16, generator=g)
    q_s, k_s, q_t, k_t = mk().requires_grad_(), mk().requires_grad_(), mk(), mk()
    step = lambda: streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=a.causal).sum().backward()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.iters):
            step()
        torch.cuda.synchronize()
    print(f"N={a.n} D={a.d} H={a.heads} causal={a.causal}: {a.iters} fwd+bwd steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=90))


if __name__ == "__main__":
    main()

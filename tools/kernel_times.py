"""Per-kernel GPU time of one attention-KL forward + backward (torch.profiler), for tuning on the device.

Usage: python tools/kernel_times.py [--n 8192] [--d 128] [--heads 16] [--causal]
Prints each CUDA kernel's total time over --iters iterations divided by --iters (ms per call).
"""

import argparse
from collections import defaultdict

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
    totals = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    print(f"N={a.n} D={a.d} H={a.heads} causal={a.causal}: ms per fwd+bwd step, by kernel")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:8]:
        print(f"{us / a.iters / 1000:8.3f}  {name[:110]}")


if __name__ == "__main__":
    main()

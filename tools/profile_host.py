"""Where the host time of one attention-KL forward+backward goes (torch.profiler CPU view), per CUDA path, at small N.
Usage (GPU machine): python tools/profile_host.py [--n 1024]"""
import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import streamkl

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=1024)
a = ap.parse_args()
mk = lambda: torch.randn(1, 16, a.n, 128, device="cuda", dtype=torch.bfloat16)
q_s, k_s, q_t, k_t = mk(), mk(), mk(), mk()
q_s.requires_grad_(True)
k_s.requires_grad_(True)


def step():
    streamkl.attention_kl(q_s, k_s, q_t, k_t).sum().backward()
    q_s.grad = k_s.grad = None


for path in ("ampere", "hopper"):
    os.environ["STREAMKL_CUDA_PATH"] = path
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(50):
            step()
        torch.cuda.synchronize()
    print(f"==== {path}: CPU time per fwd+bwd (us), 50 calls")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))

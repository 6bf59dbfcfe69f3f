"""Which inputs make the first tools/cuda_smoke.py case crash on the device (each variant in its own process, so a
segfault names its variant). Usage (GPU machine): python tools/repro_smoke_crash.py"""
import os
import subprocess
import sys

CASE = r'''
import os, sys, torch, streamkl
variant = sys.argv[1]
B, H, N, D = 1, 2, int(os.environ.get("N", 128)), int(os.environ.get("D", 64))
if variant == "cpu_gen":
    g = torch.Generator().manual_seed(1)
    mk = lambda: (torch.randn(B, H, N, D, generator=g) * 1.5).to("cuda", torch.bfloat16)
else:
    g = torch.Generator(device="cuda").manual_seed(1234)
    mk = lambda: (torch.randn(B, H, N, D, device="cuda", generator=g) * 1.5).to(torch.bfloat16)
q_s, k_s, q_t, k_t = mk(), mk(), mk(), mk()
q_s.requires_grad_(True); k_s.requires_grad_(True)
out = streamkl.attention_kl(q_s, k_s, q_t, k_t)
gr = torch.autograd.grad(out, [q_s, k_s], torch.rand_like(out))
torch.cuda.synchronize()
print("ok", variant, float(out.sum()), float(gr[0].float().norm()))
'''

for name, env in [("default", {}), ("ampere", {"STREAMKL_CUDA_PATH": "ampere"}), ("cpu_gen", {}),
                  ("n129", {"N": "129"}), ("d128", {"D": "128"}), ("n256", {"N": "256"})]:
    variant = "cpu_gen" if name == "cpu_gen" else "cuda_gen"
    r = subprocess.run([sys.executable, "-c", CASE, variant], env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=120)
    print(f"{name:8s} rc={r.returncode} {r.stdout.strip()[-120:]} {r.stderr.strip()[-200:] if r.returncode else ''}",
          flush=True)

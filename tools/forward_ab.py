"""Forward-kernel A/B timing for tuning on the device: the attention-KL forward of the streamkl found first on
sys.path against SDPA-cuDNN in the same process, after a float64 check on fresh random inputs.

Usage: python tools/forward_ab.py --label NAME   (run once per build; tools/ab_forward.sh drives it)
Prints one line per shape: label, shape, ours (ms, median of triton.testing.do_bench), cuDNN (ms), ratio.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import streamkl
from streamkl.reference import attention_kl_reference


def check(causal, n=777, d=128, divergence="forward"):
    mk = lambda: torch.randn(2, 3, n, d, device="cuda", dtype=torch.bfloat16)
    q_s, k_s, q_t, k_t = mk(), mk(), mk(), mk()
    ours = streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=causal, divergence=divergence).double()
    ref = attention_kl_reference(q_s, k_s, q_t, k_t, causal=causal, divergence=divergence)
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    ok = err < 1e-4 and not torch.isnan(ours).any().item()
    return ok, err


def check_backward(causal, d, divergence="forward", n=777):
    """Student gradients (q_s, k_s) against the float64 reference's autograd, norm-relative error."""
    mk = lambda: torch.randn(2, 3, n, d, device="cuda", dtype=torch.bfloat16)
    q_s, k_s, q_t, k_t = mk(), mk(), mk(), mk()
    g = torch.randn(2, 3, n, device="cuda")
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    ours = torch.autograd.grad((streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=causal, divergence=divergence) * g)
                               .sum(), (q_s, k_s))
    q64, k64 = q_s.detach().double().requires_grad_(True), k_s.detach().double().requires_grad_(True)
    ref = attention_kl_reference(q64, k64, q_t.double(), k_t.double(), causal=causal, divergence=divergence)
    refs = torch.autograd.grad((ref * g.double()).sum(), (q64, k64))
    err = max(((o.double() - r).norm() / r.norm()).item() for o, r in zip(ours, refs))
    return err < 2e-2, err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="?")
    ap.add_argument("--backward", action="store_true", help="also time forward+backward (needs the bwd kernels)")
    a = ap.parse_args()
    torch.manual_seed(0)
    for d in (64, 128):
        for causal in (False, True):
            for div in ("forward", "reverse"):
                ok, err = check(causal, d=d, divergence=div)
                print(f"{a.label:10s} check D={d} causal={causal} {div}: {'ok' if ok else 'BAD'} max rel err {err:.2e}",
                      flush=True)
                if a.backward:
                    ok, err = check_backward(causal, d, div)
                    print(f"{a.label:10s} check grads D={d} causal={causal} {div}: {'ok' if ok else 'BAD'} "
                          f"rel err {err:.2e}", flush=True)
    for d, n, causal in ((128, 8192, False), (128, 8192, True), (64, 8192, False)):
        mk = lambda: torch.randn(1, 16, n, d, device="cuda", dtype=torch.bfloat16)
        q_s, k_s, q_t, k_t = mk(), mk(), mk(), mk()
        with torch.no_grad():
            ours = do_bench(lambda: streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=causal), warmup=100, rep=500)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cudnn = do_bench(lambda: F.scaled_dot_product_attention(q_s, k_s, q_t, is_causal=causal),
                                 warmup=100, rep=500)
        print(f"{a.label:10s} fwd     D={d} N={n} causal={int(causal)}: ours {ours:.3f} ms  cudnn {cudnn:.3f} ms  "
              f"ratio {ours / cudnn:.3f}", flush=True)
        if not a.backward:
            continue
        q_s.requires_grad_(True)
        k_s.requires_grad_(True)
        ours = do_bench(lambda: streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=causal).sum().backward(),
                        warmup=50, rep=500, grad_to_none=[q_s, k_s])
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = do_bench(lambda: F.scaled_dot_product_attention(q_s, k_s, q_t, is_causal=causal).sum().backward(),
                             warmup=50, rep=500, grad_to_none=[q_s, k_s])
        print(f"{a.label:10s} fwd+bwd D={d} N={n} causal={int(causal)}: ours {ours:.3f} ms  cudnn {cudnn:.3f} ms  "
              f"ratio {ours / cudnn:.3f}", flush=True)


if __name__ == "__main__":
    main()

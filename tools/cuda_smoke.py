"""Quick CUDA correctness + timing check used while iterating on the device (not part of the test suite).

Compares the CUDA kernels with the float64 reference on fresh random inputs over a few shapes, then times
N=8192, D=128 forward and forward+backward against SDPA (cuDNN) in the same run.
"""

import sys

import torch

import streamkl
from streamkl import attention_kl, attention_kl_reference


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(B, H, Nq, Nk, Ds, Dt, causal, div, dtype, teacher_grad, gen, r=1):
    """div: "forward", "reverse" or "jsd:<beta>" (the generalized JSD); r > 1: a head-aggregated teacher with r query
    heads per student head (teacher_head_reduce="mean", no teacher gradients)."""
    dev = "cuda"
    name, _, beta = div.partition(":")
    options = dict(divergence=name, beta=float(beta)) if beta else dict(divergence=name)
    if r > 1:
        options["teacher_head_reduce"] = "mean"
    mk = lambda *s: (torch.randn(*s, device=dev, generator=gen) * 1.5).to(dtype)
    q_s, k_s, q_t, k_t = mk(B, H, Nq, Ds), mk(B, H, Nk, Ds), mk(B, H * r, Nq, Dt), mk(B, H, Nk, Dt)
    for t in (q_s, k_s):
        t.requires_grad_(True)
    if teacher_grad:
        q_t.requires_grad_(True)
        k_t.requires_grad_(True)
    out = attention_kl(q_s, k_s, q_t, k_t, causal=causal, **options)
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in (q_s, k_s, q_t, k_t)]
    ref = attention_kl_reference(*ref_inputs, causal=causal, **options)
    g = torch.rand_like(out)
    wrt = [t for t in (q_s, k_s, q_t, k_t) if t.requires_grad]
    wrt_ref = [t for t in ref_inputs if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, g)
    grads_ref = torch.autograd.grad(ref, wrt_ref, g.double())
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, grads_ref)]
    nan = any(torch.isnan(x).any().item() for x in (out, *grads))
    ok = not nan and errs[0] < 1e-2 and all(e < 3e-2 for e in errs[1:])
    print(f"{'ok ' if ok else 'BAD'} B={B} H={H} Nq={Nq} Nk={Nk} Ds={Ds} Dt={Dt} causal={causal} {div:8s} "
          f"{str(dtype)[6:]:8s} tgrad={teacher_grad} r={r} errs={' '.join(f'{e:.2e}' for e in errs)} nan={nan}")
    return ok


def main():
    gen = torch.Generator(device="cuda").manual_seed(1234)
    ok = True
    cases = [
        (1, 2, 128, 128, 64, 64, False, "forward", torch.bfloat16, False),
        (2, 3, 100, 100, 64, 64, True, "forward", torch.bfloat16, True),
        (1, 2, 257, 300, 128, 128, False, "reverse", torch.bfloat16, True),
        (1, 2, 300, 257, 128, 128, True, "forward", torch.bfloat16, False),
        (1, 2, 1000, 1000, 64, 128, True, "reverse", torch.bfloat16, True),
        (1, 2, 513, 1000, 128, 64, False, "forward", torch.bfloat16, True),
        (1, 1, 1, 1, 64, 64, False, "forward", torch.bfloat16, True),
        (1, 2, 200, 50, 64, 64, True, "forward", torch.bfloat16, True),
        (2, 2, 300, 200, 128, 64, True, "reverse", torch.bfloat16, False),
        (1, 3, 77, 1000, 64, 128, False, "forward", torch.bfloat16, False),
        (1, 2, 500, 450, 128, 128, True, "forward", torch.bfloat16, False),
        (1, 2, 257, 300, 128, 128, False, "jsd:0.5", torch.bfloat16, True),
        (2, 2, 300, 200, 128, 64, True, "jsd:0.1", torch.bfloat16, False),
        (1, 2, 1000, 1000, 64, 128, True, "jsd:0.9", torch.bfloat16, True),
        (1, 2, 257, 300, 64, 128, True, "forward", torch.bfloat16, False, 4),
        (1, 1, 300, 200, 128, 128, False, "jsd:0.4", torch.bfloat16, False, 8),
    ]
    extra = [(1, 2, 333, 444, 64, 64, True, "reverse", torch.float16, True),
             (1, 2, 300, 300, 32, 32, True, "forward", torch.bfloat16, True),
             (1, 2, 300, 200, 96, 96, False, "forward", torch.float16, True),
             (1, 2, 200, 300, 256, 256, True, "reverse", torch.bfloat16, True),
             (1, 2, 200, 300, 256, 256, True, "jsd:0.3", torch.bfloat16, True),
             (1, 2, 333, 444, 64, 64, True, "jsd:0.7", torch.float16, True)]
    if len(sys.argv) > 1 and sys.argv[1] == "--small":  # one tiny case each way, for compute-sanitizer
        cases, extra = [(1, 2, 100, 130, 64, 128, True, "forward", torch.bfloat16, True),
                        (1, 2, 130, 100, 128, 64, True, "reverse", torch.bfloat16, False),
                        (1, 2, 100, 130, 64, 128, True, "jsd:0.3", torch.bfloat16, True),
                        (1, 2, 130, 100, 64, 64, False, "jsd:0.6", torch.bfloat16, False),
                        (1, 2, 200, 150, 128, 128, True, "jsd:0.5", torch.bfloat16, False),  # fused Hopper backward
                        (1, 1, 100, 130, 64, 128, True, "reverse", torch.bfloat16, False, 3),
                        (1, 1, 130, 100, 128, 64, False, "jsd:0.4", torch.bfloat16, False, 4)], []
    for c in cases + extra:
        try:
            ok &= check(*c[:10], gen, *c[10:])  # c[10:]: the aggregated teacher's r, when given
        except Exception as e:  # report every case, then fail
            ok = False
            print("ERR", c, repr(e)[:300])
    print("CORRECTNESS", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""Quick CUDA correctness + timing check used while iterating on the device (not part of the test suite).

Compares the CUDA kernels with the float64 reference on fresh random inputs over a few shapes, then times
N=8192, D=128 forward and forward+backward against SDPA (cuDNN) in the same run.
"""

import sys

import torch

import streamkl
from streamkl import attention_kl, attention_kl_reference, attention_kl_varlen, attention_kl_varlen_reference


def rel(a, b):
    """Relative error of a against b, with a floor of 1e-4 per element on b's norm (far below the divergences and
    gradients of these inputs, ~1e-2 and up): where the exact result is 0 (a one-key row, whose softmax is exactly 1:
    divergence and teacher gradients 0), fp32 rounding of log-probabilities leaves 1e-9 to 1e-7 in ours, an
    absolute error, not a relative one."""
    floor = 1e-4 * max(b.numel(), 1) ** 0.5
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor)).item()


def grade(label, out, ref, grads, grads_ref):
    """Print one ok/BAD line for a case: the output within 1e-2 of the float64 reference (norm-relative), every
    gradient within 3e-2, no NaN. Returns whether it passed."""
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, grads_ref)]
    nan = any(torch.isnan(x).any().item() for x in (out, *grads))
    ok = not nan and errs[0] < 1e-2 and all(e < 3e-2 for e in errs[1:])
    print(f"{'ok ' if ok else 'BAD'} {label} errs={' '.join(f'{e:.2e}' for e in errs)} nan={nan}")
    return ok


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
    return grade(f"B={B} H={H} Nq={Nq} Nk={Nk} Ds={Ds} Dt={Dt} causal={causal} {div:8s} {str(dtype)[6:]:8s} "
                 f"tgrad={teacher_grad} r={r}", out, ref, grads, grads_ref)


def check_varlen(lengths_q, lengths_k, H, D, causal, div, gen):
    """Packed sequences (student-only gradients): on Hopper at D=128 the varlen fused backward unless
    STREAMKL_FUSED_BACKWARD=0. Query and key lengths differ, so key blocks end inside a sequence, next to another
    sequence's keys."""
    dev = "cuda"
    cu = lambda lens: torch.tensor([0] + list(lens), device=dev).cumsum(0).to(torch.int32)
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)
    mk = lambda n: (torch.randn(n, H, D, device=dev, generator=gen) * 1.5).to(torch.bfloat16)
    q_s, k_s, q_t, k_t = mk(sum(lengths_q)), mk(sum(lengths_k)), mk(sum(lengths_q)), mk(sum(lengths_k))
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    out = attention_kl_varlen(q_s, k_s, q_t, k_t, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal,
                              divergence=div)
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in (q_s, k_s, q_t, k_t)]
    ref = attention_kl_varlen_reference(*ref_inputs, cu_q, cu_k, causal=causal, divergence=div)
    g = torch.rand_like(out)
    grads = torch.autograd.grad(out, (q_s, k_s), g)
    grads_ref = torch.autograd.grad(ref, ref_inputs[:2], g.double())
    return grade(f"varlen q={lengths_q} k={lengths_k} H={H} D={D} causal={causal} {div:8s}", out, ref, grads,
                 grads_ref)


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
    small = len(sys.argv) > 1 and sys.argv[1] == "--small"
    if small:  # one tiny case each way, for compute-sanitizer
        cases, extra = [(1, 2, 100, 130, 64, 128, True, "forward", torch.bfloat16, True),
                        (1, 2, 130, 100, 128, 64, True, "reverse", torch.bfloat16, False),
                        (1, 2, 100, 130, 64, 128, True, "jsd:0.3", torch.bfloat16, True),
                        (1, 2, 130, 100, 64, 64, False, "jsd:0.6", torch.bfloat16, False),
                        (1, 2, 200, 150, 128, 128, True, "jsd:0.5", torch.bfloat16, False),  # fused Hopper backward
                        (1, 1, 100, 130, 64, 128, True, "reverse", torch.bfloat16, False, 3),
                        (1, 1, 130, 100, 128, 64, False, "jsd:0.4", torch.bfloat16, False, 4)], []
    varlen_cases = [((70, 130, 33), (90, 200, 33), 2, 128, True, "forward"),
                    ((150, 60), (150, 61), 2, 128, False, "reverse")]
    if not small:
        varlen_cases += [((1000, 77, 513), (1000, 300, 513), 3, 128, True, "jsd"),
                         ((1000, 77, 513), (900, 300, 600), 2, 64, False, "forward")]
    checks = [(check, c, c[:10] + (gen,) + c[10:]) for c in cases + extra]  # c[10:]: the aggregated teacher's r
    checks += [(check_varlen, c, c + (gen,)) for c in varlen_cases]
    for fn, case, args in checks:
        try:
            ok &= fn(*args)
        except Exception as e:  # report every case, then fail
            ok = False
            print("ERR", case, repr(e)[:300])
    print("CORRECTNESS", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

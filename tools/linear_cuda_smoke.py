"""Small CUDA check of streamkl.linear_kl for compute-sanitizer runs (not part of the test suite).

A few tiny forward+backward cases (every divergence, biases, labels with ignored rows, the CE term, teacher
gradients, each input dtype) under a small workspace budget, so every launch of the interim design runs over
several vocabulary chunks with a partial last one; each case is compared with the float64 reference.
Prints one 'ok' / 'BAD' / 'ERR' line per case, then CORRECTNESS PASS / FAIL (exit code 0 / 1).
"""

import os
import sys

import torch

import streamkl

os.environ.setdefault("STREAMKL_LINEAR_WORKSPACE_MB", "0.05")  # T = 21, V = 333: 2 forward, 3 backward chunks


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(divergence, beta, dtype, gen, T=21, V=333, Ds=40, Dt=24):
    dev = "cuda"

    def mk(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x_s, w_s, b_s = mk(T, Ds), mk(V, Ds, scale=3 / Ds ** 0.5), mk(V)
    x_t, w_t, b_t = mk(T, Dt), mk(V, Dt, scale=3 / Dt ** 0.5), mk(V)
    inputs = [t.requires_grad_() for t in (x_s, w_s, b_s, x_t, w_t, b_t)]
    labels = torch.randint(0, V, (T,), device=dev, generator=gen)
    labels[::4] = -100
    kwargs = dict(divergence=divergence, beta=beta, labels=labels, ce_weight=0.5, reduction="sum")

    def run(fn, tensors):
        x_s, w_s, b_s, x_t, w_t, b_t = tensors
        out = fn(x_s, w_s, x_t, w_t, b_s=b_s, b_t=b_t, **kwargs)
        return out, torch.autograd.grad(out, tensors)

    out, grads = run(streamkl.linear_kl, inputs)
    ref, ref_grads = run(streamkl.linear_kl_reference,
                         [t.detach().double().requires_grad_() for t in inputs])
    errs = [rel(out, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
    nan = any(torch.isnan(t).any().item() for t in (out, *grads))
    ok = not nan and errs[0] < 1e-4 and all(e < 1e-2 for e in errs[1:])
    print(f"{'ok ' if ok else 'BAD'} linear_kl {divergence:7s} beta={beta} {str(dtype)[6:]:8s} "
          f"errs={' '.join(f'{e:.2e}' for e in errs)} nan={nan}")
    return ok


def main():
    gen = torch.Generator(device="cuda").manual_seed(4321)
    ok = True
    for divergence, beta, dtype in [("forward", 0.5, torch.float32), ("reverse", 0.5, torch.bfloat16),
                                    ("jsd", 0.3, torch.float16), ("jsd", 0.7, torch.bfloat16)]:
        try:
            ok &= check(divergence, beta, dtype, gen)
        except Exception as e:  # report every case, then fail
            ok = False
            print("ERR", divergence, beta, dtype, repr(e)[:300])
    print("CORRECTNESS", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

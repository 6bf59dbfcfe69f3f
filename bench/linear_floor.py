#!/usr/bin/env python
"""Matrix-product floors of hidden-state logit distillation, against torch.compile, in one run (GPU).

Why this exists: issue 6 asks linear_kl to be the fastest method at T >= 4k *and* to stay within 1 GB of extra
memory at T = 16k, with exact (fp32-accumulated) gradients. This script measures, with the same cuBLAS that every
method here uses, the time of the matrix products alone (no softmax, no epilogue, no launches between them) that
each design must run, so the gap between a design's floor and torch.compile's measured time is a fact of this
GPU, not an estimate. Forward KL, gradients w.r.t. x_s and w_s (teacher detached), bf16, V = 152064,
D_s = 3584, D_t = 5120 by default. One "unit" is 2 T V D_s flops.

    full-T products    Z_t = X_t W_t^T, Z_s = X_s W_s^T (fp32 out), dX_s = G W_s, dW_s = G^T X_s over all T
                       rows at once: the 4.43 units any exact method runs (torch.compile of the materializing
                       baseline runs exactly these, plus elementwise work on the [T, V] logits).
    recompute floor    the products of a design that keeps only O(T) row statistics between the forward and the
                       backward (the design issue 6 prescribes: "backward recomputes the logit tiles", and the
                       one StreamKL runs): Z_t and Z_s twice, dX_s, dW_s = 6.86 units.
    <= 1 GB, no recompute   row chunks of C rows small enough that both chunks' fp32 logits and the bf16 logit
                       gradients fit in --budget-gb (10 V bytes per row): per chunk Z_t, Z_s, dX_s, and
                       dW_s += G_c^T X_c accumulated in the bf16 gradient (beta = 1; an fp32 accumulator alone is
                       V D_s 4 bytes = 2.18 GB, over the budget; bf16 accumulation also rounds once per chunk,
                       so it is not exact).

Example:  python bench/linear_floor.py --tokens 4096,8192,16384
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import streamkl
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import streamkl
import linear_baselines as baselines  # noqa: E402
from streamkl import benchmark as bm  # noqa: E402


def product_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result from half-precision inputs (what a method that keeps logits exact needs)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except TypeError:  # torch without mm(out_dtype=): the product time is the same, the output half as wide
        return torch.mm(a, b)


class Products:
    """The inputs and the timed matrix products of one T."""

    def __init__(self, tokens, vocab, dim_s, dim_t, dtype, device, seed):
        g = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape, scale):
            return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale).to(dtype)

        self.x_s, self.x_t = randn(tokens, dim_s, scale=1.0), randn(tokens, dim_t, scale=1.0)
        self.w_s, self.w_t = randn(vocab, dim_s, scale=dim_s ** -0.5), randn(vocab, dim_t, scale=dim_t ** -0.5)
        self.device = device

    def time(self, fn) -> float:
        return bm.time_fn(fn, self.device)

    def full_t(self) -> dict:
        """Each product over all T rows, timed alone (the logit gradient G is fresh random data)."""
        x_s, x_t, w_s, w_t = self.x_s, self.x_t, self.w_s, self.w_t
        times = {"z_t": self.time(lambda: product_fp32(x_t, w_t.T)), "z_s": self.time(lambda: product_fp32(x_s, w_s.T))}
        grad = torch.randn(x_s.shape[0], w_s.shape[0], device=self.device, dtype=x_s.dtype) * 1e-4
        times["dx_s"] = self.time(lambda: grad @ w_s)
        times["dw_s"] = self.time(lambda: grad.T @ x_s)
        del grad
        return times

    def row_chunked(self, chunk: int) -> float:
        """One pass of the no-recompute design over row chunks of `chunk` rows, products only."""
        x_s, x_t, w_s, w_t = self.x_s, self.x_t, self.w_s, self.w_t
        tokens = x_s.shape[0]
        grad = torch.randn(chunk, w_s.shape[0], device=self.device, dtype=x_s.dtype) * 1e-4
        dw = torch.zeros_like(w_s)

        def run():
            for r0 in range(0, tokens, chunk):
                rows = slice(r0, min(tokens, r0 + chunk))
                n = rows.stop - rows.start
                product_fp32(x_t[rows], w_t.T)
                product_fp32(x_s[rows], w_s.T)
                grad[:n] @ w_s
                dw.addmm_(grad[:n].T, x_s[rows])

        return self.time(run)


def compile_fwd_bwd_ms(p: Products) -> float:
    """torch.compile of the materializing baseline (bench/linear_baselines.py), forward + backward."""
    fn = baselines.compiled_linear_kl()
    x_s, w_s = p.x_s.detach().requires_grad_(), p.w_s.detach().requires_grad_()

    def step():
        return torch.autograd.grad(fn(x_s, w_s, p.x_t, p.w_t), (x_s, w_s))

    step()
    return p.time(step)


def ours_fwd_bwd_ms(p: Products) -> float:
    x_s, w_s = p.x_s.detach().requires_grad_(), p.w_s.detach().requires_grad_()

    def step():
        return torch.autograd.grad(streamkl.linear_kl(x_s, w_s, p.x_t, p.w_t), (x_s, w_s))

    step()
    return p.time(step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="4096,8192,16384")
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--dim-s", type=int, default=3584)
    ap.add_argument("--dim-t", type=int, default=5120)
    ap.add_argument("--budget-gb", type=float, default=1.0, help="extra memory of the row-chunked design")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("linear_floor.py measures cuBLAS on a GPU; no GPU here")
        return 0
    device = torch.device("cuda")
    # 10 V bytes per chunk row: fp32 logits of both sides and the bf16 logit gradients.
    chunk = max(128, int(args.budget_gb * 1e9 * 0.9) // (10 * args.vocab) // 128 * 128)
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        p = Products(tokens, args.vocab, args.dim_s, args.dim_t, torch.bfloat16, device, seed=tokens)
        unit_tflop = 2 * tokens * args.vocab * args.dim_s / 1e12
        t = p.full_t()
        exact = sum(t.values())
        recompute = exact + t["z_t"] + t["z_s"]
        chunked = p.row_chunked(chunk)
        comp = None if args.no_compile else compile_fwd_bwd_ms(p)
        ours = ours_fwd_bwd_ms(p)
        units = (args.dim_t / args.dim_s + 3) * unit_tflop
        rows.append([str(tokens), f"{t['z_t']:.1f} / {t['z_s']:.1f} / {t['dx_s']:.1f} / {t['dw_s']:.1f}",
                     f"{exact:.1f} ({units / exact * 1e3:.0f} TF/s)", f"{recompute:.1f}", f"{chunked:.1f}",
                     bm.format_ms(comp), f"{ours:.1f}"])
        del p
        bm.free_memory(device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, V={args.vocab}, D_s={args.dim_s}, "
          f"D_t={args.dim_t}; row chunk C={chunk} for a {args.budget_gb:g} GB budget; times in ms "
          f"({bm.timing_method(device)})")
    print(bm.format_table(["T", "Z_t / Z_s / dX_s / dW_s", "full-T products (4.43 units)",
                           "recompute floor (6.86 units)", f"<= {args.budget_gb:g} GB row-chunked products",
                           "torch.compile fwd+bwd", "ours fwd+bwd"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The attention problem the device tools time: shape options and fresh random bf16 inputs on the GPU."""

import torch


def add_problem_args(ap, *, n=8192):
    """--n (default n), --d, --heads, --causal on an argparse parser."""
    ap.add_argument("--n", type=int, default=n)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--causal", action="store_true")


def make_problem(a, *, d_s=None, teacher_heads=None):
    """(q_s, k_s, q_t, k_t), B=1, bf16, seeded: the student [1, heads, n, d_s or d] requiring grad, the teacher
    [1, teacher_heads or heads, n, d] detached."""
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda heads, d: torch.randn(1, heads, a.n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    d_s = d_s or a.d
    teacher_heads = teacher_heads or a.heads
    q_s, k_s = mk(a.heads, d_s).requires_grad_(), mk(a.heads, d_s).requires_grad_()
    return q_s, k_s, mk(teacher_heads, a.d), mk(teacher_heads, a.d)

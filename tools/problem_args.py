"""The attention problem the device tools time: shape options and fresh random bf16 inputs on the GPU."""

import torch


def add_problem_args(ap, *, n=8192):
    """--n (default n), --d, --heads, --causal, --aggregate R (a head-aggregated teacher with R query heads per
    student head) and --d-s (the student's head dim, default --d) on an argparse parser. DSA's indexer shape:
    --heads 1 --aggregate 64 --d-s 64 --causal."""
    ap.add_argument("--n", type=int, default=n)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--aggregate", type=int, default=1)
    ap.add_argument("--d-s", type=int, default=None)


def teacher_head_reduce(a):
    """The teacher_head_reduce argument of the problem."""
    return "mean" if a.aggregate > 1 else "none"


def make_problem(a):
    """(q_s, k_s, q_t, k_t), B=1, bf16, seeded: the student [1, heads, n, d_s or d] requiring grad, the teacher
    [1, heads * aggregate, n, d] detached."""
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda heads, d: torch.randn(1, heads, a.n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    d_s = a.d_s or a.d
    teacher_heads = a.heads * a.aggregate
    q_s, k_s = mk(a.heads, d_s).requires_grad_(), mk(a.heads, d_s).requires_grad_()
    return q_s, k_s, mk(teacher_heads, a.d), mk(teacher_heads, a.d)

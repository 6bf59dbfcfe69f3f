"""Autograd of streamkl.attention_kl: float64 gradcheck, fully masked rows, and which inputs get gradients."""

import pytest
import torch

import streamkl
from helpers import make_inputs, masked_rows, reference_grads, seed_of, upstream_grad, assert_grads_close

DIVERGENCES = ("forward", "reverse")

# (B, H, N_q, N_k, D_s, D_t), tiny: gradcheck perturbs every input element.
TINY_SHAPES = [
    pytest.param((1, 2, 5, 7, 3, 4), id="nq5-nk7"),
    pytest.param((2, 1, 6, 4, 4, 2), id="nq6-nk4"),  # causal: 2 rows see no key
    pytest.param((1, 1, 1, 3, 2, 3), id="nq1-nk3"),
]


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_gradcheck(shape, causal, divergence, teacher_grad):
    inputs = make_inputs(*shape, seed=seed_of("gradcheck", shape, causal, divergence, teacher_grad),
                         dtype=torch.float64, requires_grad=True, teacher_requires_grad=teacher_grad)

    def fn(q_s, k_s, q_t, k_t):
        return streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=causal, scale_s=0.7, scale_t=0.9,
                                     divergence=divergence)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_reduced_loss(divergence):
    """gradcheck through reduction="mean" (the upstream gradient is an expanded, stride-0 tensor)."""
    inputs = make_inputs(2, 2, 4, 6, 3, 2, seed=seed_of("gradcheck-mean", divergence), dtype=torch.float64,
                         requires_grad=True)
    fn = lambda *x: streamkl.attention_kl(*x, causal=True, divergence=divergence, reduction="mean")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("shape", [pytest.param((2, 2, 9, 4, 3, 5), id="nq9-nk4"),
                                   pytest.param((1, 1, 100, 35, 8, 8), id="nq100-nk35")])
def test_fully_masked_rows(shape, divergence, dtype):
    """Causal with N_q > N_k: the first N_q - N_k rows see no key: output exactly 0, gradient exactly 0."""
    B, H, Nq, Nk, Ds, Dt = shape
    seed = seed_of("masked", shape, divergence, dtype)
    inputs = make_inputs(*shape, seed=seed, dtype=dtype, requires_grad=True)
    out = streamkl.attention_kl(*inputs, causal=True, divergence=divergence)
    masked = masked_rows(Nq, Nk, True)
    assert masked.sum() == Nq - Nk
    assert not torch.isnan(out).any()
    assert (out[..., masked] == 0).all()
    sees_two_keys = torch.arange(Nq) + (Nk - Nq) >= 1  # one visible key gives a divergence of 0
    assert (out[..., sees_two_keys] > 0).all()

    # Upstream gradient only on the masked rows: every input gradient is exactly zero.
    grad_out = upstream_grad(out.shape, seed, dtype=dtype) * masked.to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    for name, g in zip(("q_s", "k_s", "q_t", "k_t"), grads):
        assert not torch.isnan(g).any(), f"{name}: NaN"
        assert (g == 0).all(), f"{name}: gradient from fully masked rows must be exactly 0"

    # Full random upstream gradient: masked query rows get exactly zero dQ, the rest matches the reference.
    grad_out = upstream_grad(out.shape, seed + 7, dtype=dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    for g in grads:
        assert not torch.isnan(g).any()
    assert (grads[0][:, :, masked] == 0).all() and (grads[2][:, :, masked] == 0).all()
    _, ref_grads = reference_grads(inputs, grad_out, causal=True, divergence=divergence)
    assert_grads_close(grads, ref_grads, 1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_teacher_without_requires_grad_gets_no_grad(causal):
    q_s, k_s, q_t, k_t = make_inputs(2, 2, 20, 30, 8, 16, seed=seed_of("no-teacher-grad", causal),
                                     requires_grad=True, teacher_requires_grad=False)
    loss = streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=causal, reduction="sum")
    loss.backward()
    assert q_t.grad is None and k_t.grad is None
    assert q_s.grad is not None and k_s.grad is not None
    assert q_s.grad.abs().sum() > 0 and k_s.grad.abs().sum() > 0


@pytest.mark.parametrize("which", ["q_t", "k_t"])
def test_partial_teacher_grad(which):
    """Only one teacher tensor requires grad: it gets the right gradient, the other gets none."""
    seed = seed_of("partial", which)
    inputs = make_inputs(1, 2, 33, 40, 8, 4, seed=seed, dtype=torch.float64, requires_grad=True,
                         teacher_requires_grad=False)
    idx = 2 if which == "q_t" else 3
    inputs[idx].requires_grad_()
    out = streamkl.attention_kl(*inputs, causal=True)
    grad_out = upstream_grad(out.shape, seed, dtype=torch.float64)
    out.backward(grad_out)
    _, ref_grads = reference_grads(inputs, grad_out, causal=True)
    assert inputs[5 - idx].grad is None
    assert_grads_close([x.grad for x in inputs], ref_grads, 1e-10)


def test_student_without_requires_grad():
    """Gradients to the teacher only (student frozen)."""
    seed = seed_of("teacher-only")
    inputs = make_inputs(1, 2, 33, 40, 8, 4, seed=seed, dtype=torch.float64, requires_grad=False,
                         teacher_requires_grad=True)
    out = streamkl.attention_kl(*inputs, divergence="reverse")
    grad_out = upstream_grad(out.shape, seed, dtype=torch.float64)
    out.backward(grad_out)
    _, ref_grads = reference_grads(inputs, grad_out, divergence="reverse")
    assert inputs[0].grad is None and inputs[1].grad is None
    assert_grads_close([x.grad for x in inputs], ref_grads, 1e-10)


def test_no_grad_mode_builds_no_graph():
    inputs = make_inputs(1, 1, 10, 10, 4, 4, seed=seed_of("no_grad"), requires_grad=True)
    with torch.no_grad():
        out = streamkl.attention_kl(*inputs)
    assert out.grad_fn is None and not out.requires_grad
    out2 = streamkl.attention_kl(*inputs)
    assert out2.requires_grad
    assert torch.equal(out, out2.detach())


def test_deterministic_across_runs_and_thread_counts():
    """The CPU kernels give one writer per output element: bitwise identical results run to run and for any
    number of threads."""
    inputs = make_inputs(2, 3, 70, 130, 8, 16, seed=seed_of("determinism"), requires_grad=True)
    grad_out = upstream_grad((2, 3, 70), seed_of("determinism"))

    def run():
        out = streamkl.attention_kl(*inputs, causal=True)
        return (out.detach(), *torch.autograd.grad(out, inputs, grad_out))

    threads = torch.get_num_threads()
    try:
        first = run()
        second = run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("op", ["kl", "jsd", "varlen"])
def test_statistics_outputs_carry_no_gradient(op):
    """Only the divergence is differentiable: the LSE / statistics outputs of the ops refuse a backward (instead of
    silently dropping its term), and a backward through the divergence alone still works."""
    q_s, k_s, q_t, k_t = make_inputs(1, 2, 6, 7, 4, 4, seed=seed_of("stats-no-grad", op), dtype=torch.float64,
                                     requires_grad=True)
    if op == "kl":
        out = torch.ops.streamkl.attention_kl_fwd(q_s, k_s, q_t, k_t, 0.5, 0.5, False, "forward")
    elif op == "jsd":
        out = torch.ops.streamkl.attention_jsd_fwd(q_s, k_s, q_t, k_t, 0.5, 0.5, False, 0.3)
    else:
        flat = [x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]) for x in (q_s, k_s, q_t, k_t)]
        cu_q = torch.tensor([0, 6], dtype=torch.int32)
        cu_k = torch.tensor([0, 7], dtype=torch.int32)
        out = torch.ops.streamkl.attention_kl_varlen_fwd(*flat, cu_q, cu_k, 6, 7, 0.5, 0.5, False, "forward")
    assert out[0].requires_grad
    assert not any(t.requires_grad for t in out[1:])
    with pytest.raises(RuntimeError, match="does not require grad"):
        out[1].sum().backward()
    grads = torch.autograd.grad(out[0].sum(), (q_s, k_s))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_broadcast_upstream_gradient_read_in_place(reduction, divergence):
    """The gradient of kl.sum() / kl.mean() reaches the backward op as one value expanded over the rows (all strides
    0), which the kernels read in place: same gradients as the same values passed contiguous."""
    inputs = make_inputs(2, 3, 37, 45, 16, 24, seed=seed_of("broadcast-grad", reduction, divergence),
                         dtype=torch.float64, requires_grad=True)
    kl = streamkl.attention_kl(*inputs, causal=True, divergence=divergence)
    reduced = kl.sum() if reduction == "sum" else kl.mean()
    via_reduction = torch.autograd.grad(reduced, inputs, retain_graph=True)
    value = 1.0 if reduction == "sum" else 1.0 / kl.numel()
    contiguous = torch.full_like(kl, value)
    assert contiguous.is_contiguous()
    via_contiguous = torch.autograd.grad(kl, inputs, contiguous)
    for a, b in zip(via_reduction, via_contiguous):
        assert torch.equal(a, b)


def test_backward_op_takes_an_expanded_gradient():
    """attention_kl_bwd called directly with grad_kl = one value expanded over the rows: the same gradients as with
    that value materialized."""
    inputs = make_inputs(1, 2, 33, 40, 16, 8, seed=seed_of("expanded-grad-op"), dtype=torch.float64)
    options = (0.25, 0.2, True, "reverse")
    kl, lse_s, lse_t = torch.ops.streamkl.attention_kl_fwd(*inputs, *options)
    expanded = torch.tensor(0.37, dtype=torch.float64).expand_as(kl)
    grads = [torch.ops.streamkl.attention_kl_bwd(g, *inputs, kl, lse_s, lse_t, *options, True)
             for g in (expanded, expanded.contiguous())]
    for a, b in zip(*grads):
        assert torch.equal(a, b)

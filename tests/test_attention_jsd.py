"""Generalized JSD(beta) attention divergence on the CPU (TRL / Liger convention: beta KL(P_t || M) +
(1 - beta) KL(P_s || M), M = beta P_t + (1 - beta) P_s; tests/test_jsd_convention.py pins it across the APIs):
values and gradients against the float64 reference (GQA, windows, varlen too), the end points (beta = 0 / 1 are
forward / reverse KL, bitwise), symmetry at 1/2, no NaN or negative values (identical or sharp rows, low
precision), gradcheck, opcheck, torch.compile, errors."""

import math

import pytest
import torch

import streamkl
from helpers import (assert_grads_close, assert_rel_close, gqa_inputs, make_inputs, reference_grads, seed_of,
                     upstream_grad, varlen_inputs, varlen_reference_grads)
from streamkl._ops import JSD_NUM_STATS

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

jsd_fwd = torch.ops.streamkl.attention_jsd_fwd
jsd_bwd = torch.ops.streamkl.attention_jsd_bwd

BETAS = [0.0, 0.2, 0.5, 0.85, 1.0]
MASKS = [
    pytest.param(False, (-1, -1), id="full"),
    pytest.param(True, (-1, -1), id="causal"),
    pytest.param(False, (7, 3), id="win7_3"),
]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("shape", [(37, 70), (70, 37)], ids=lambda s: f"nq{s[0]}-nk{s[1]}")
def test_jsd_matches_reference(beta, causal, window, shape):
    seed = seed_of("jsd", beta, causal, window, shape)
    inputs = make_inputs(2, 2, shape[0], shape[1], 8, 12, seed=seed, dtype=torch.float64, requires_grad=True)
    kwargs = dict(divergence="jsd", beta=beta, causal=causal, window_size=window)
    out = streamkl.attention_kl(*inputs, **kwargs)
    grad_out = upstream_grad(tuple(out.shape), seed, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref, ref_grads = reference_grads(inputs, grad_out, **kwargs)
    assert_rel_close(out, ref, 1e-10)
    assert_grads_close(grads, ref_grads, 1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("causal,window", MASKS)
def test_jsd_gqa_matches_reference(beta, causal, window):
    seed = seed_of("jsd-gqa", beta, causal, window)
    inputs = gqa_inputs(1, 4, 2, 1, 40, 50, 8, 6, seed=seed)
    kwargs = dict(divergence="jsd", beta=beta, causal=causal, window_size=window)
    out = streamkl.attention_kl(*inputs, **kwargs)
    grad_out = upstream_grad(tuple(out.shape), seed, dtype=torch.float64)
    ref, ref_grads = reference_grads(inputs, grad_out, **kwargs)
    assert_rel_close(out, ref, 1e-10)
    assert_grads_close(torch.autograd.grad(out, inputs, grad_out), ref_grads, 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("beta,kl", [(0.0, "forward"), (1.0, "reverse")])
def test_end_points_are_the_kl_divergences(beta, kl, dtype):
    """beta = 0 / 1 is forward / reverse KL exactly: the op runs the KL kernels there, so values and gradients
    are bitwise those of divergence="forward" / "reverse" (padded and varlen)."""
    seed = seed_of("jsd-limits", beta, dtype)
    inputs = make_inputs(2, 2, 45, 70, 8, 8, seed=seed, dtype=dtype, requires_grad=True)
    grad_out = upstream_grad((2, 2, 45), seed, dtype=dtype)
    jsd = streamkl.attention_kl(*inputs, divergence="jsd", beta=beta, causal=True)
    ref = streamkl.attention_kl(*inputs, divergence=kl, causal=True)
    assert torch.equal(jsd, ref)
    for g, r in zip(torch.autograd.grad(jsd, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)):
        assert torch.equal(g, r)


@pytest.mark.parametrize("beta,kl", [(0.0, "forward"), (1.0, "reverse")])
def test_varlen_end_points_are_the_kl_divergences(beta, kl):
    from test_attention_varlen import RAGGED, varlen_inputs
    tensors, layout = varlen_inputs(RAGGED, 4, 2, 1, 8, 12, seed=seed_of("jsd-varlen-limits", beta))
    jsd = streamkl.attention_kl_varlen(*tensors, *layout, divergence="jsd", beta=beta, causal=True)
    ref = streamkl.attention_kl_varlen(*tensors, *layout, divergence=kl, causal=True)
    assert torch.equal(jsd, ref)
    for g, r in zip(torch.autograd.grad(jsd.sum(), tensors), torch.autograd.grad(ref.sum(), tensors)):
        assert torch.equal(g, r)


@pytest.mark.parametrize("beta,kl", [(1e-7, "forward"), (1 - 1e-7, "reverse")])
def test_near_end_points_tend_to_the_kls(beta, kl):
    """Just inside (0, 1) the JSD kernels run; divided by the vanishing weight they approach the KLs the ends are
    defined as (the error is of order that weight times max p_t / p_s, hence mild logits)."""
    inputs = make_inputs(1, 2, 30, 40, 8, 8, seed=seed_of("jsd-near-limits", beta), dtype=torch.float64,
                         sharpness=0.5)
    jsd = streamkl.attention_kl(*inputs, divergence="jsd", beta=beta)
    weight = beta if kl == "forward" else 1 - beta
    assert_rel_close(jsd / weight, streamkl.attention_kl(*inputs, divergence=kl), 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_identical_distributions_give_zero_never_negative(beta, dtype):
    """Student = teacher: every KL term is 0 exactly, rounding may not be; the result is >= 0, tiny, never NaN."""
    q, k, _, _ = make_inputs(1, 2, 33, 70, 16, 16, seed=seed_of("jsd-zero", beta, dtype), dtype=dtype, sharpness=4.0)
    q, k = q.requires_grad_(), k.requires_grad_()
    out = streamkl.attention_kl(q, k, q, k, divergence="jsd", beta=beta)
    assert torch.isfinite(out).all() and (out >= 0).all() and out.max() < 1e-5
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), (q, k)))


def test_half_is_symmetric_and_bounded():
    """beta = 1/2 is the symmetric JSD: swapping teacher and student changes nothing, and it is <= log 2."""
    q_s, k_s, q_t, k_t = make_inputs(1, 2, 33, 50, 8, 8, seed=seed_of("jsd-sym"), dtype=torch.float64, sharpness=3.0)
    a = streamkl.attention_kl(q_s, k_s, q_t, k_t, divergence="jsd")
    b = streamkl.attention_kl(q_t, k_t, q_s, k_s, divergence="jsd")
    assert_rel_close(a, b, 1e-12)
    assert a.max() <= math.log(2) + 1e-12 and a.min() >= 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_sharp_logits_no_nan_never_negative(dtype, beta):
    """Near one-hot rows in low precision: the log-sum-exp mixture gives no NaN, no negative value, and stays
    close to the float64 reference (the log(p + q) trap of peer libraries)."""
    inputs = make_inputs(1, 2, 40, 64, 16, 16, seed=seed_of("jsd-sharp", dtype, beta), dtype=dtype, sharpness=50.0,
                         requires_grad=True)
    out = streamkl.attention_kl(*inputs, divergence="jsd", beta=beta, causal=True)
    assert torch.isfinite(out).all() and (out >= 0).all()
    grads = torch.autograd.grad(out.sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)
    ref = streamkl.attention_kl_reference(*inputs, divergence="jsd", beta=beta, causal=True)
    assert_rel_close(out, ref, 1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_jsd_varlen_matches_reference(beta):
    from test_attention_varlen import RAGGED
    seed = seed_of("jsd-varlen", beta)
    tensors, layout = varlen_inputs(RAGGED, 4, 2, 1, 8, 12, seed=seed)
    kwargs = dict(divergence="jsd", beta=beta, causal=True, window_size=(20, -1))
    out = streamkl.attention_kl_varlen(*tensors, *layout, **kwargs)
    grad_out = upstream_grad(tuple(out.shape), seed, dtype=torch.float64)
    ref, ref_grads = varlen_reference_grads(tensors, layout, grad_out, **kwargs)
    assert_rel_close(out, ref, 1e-10)
    assert_grads_close(torch.autograd.grad(out, tensors, grad_out), ref_grads, 1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_gradcheck(beta):
    inputs = make_inputs(1, 2, 5, 7, 3, 4, seed=seed_of("jsd-gc", beta), dtype=torch.float64, requires_grad=True)
    fn = lambda *x: streamkl.attention_kl(*x, divergence="jsd", beta=beta, causal=True, scale_s=0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_jsd_opcheck(teacher_grad, dtype):
    inputs = make_inputs(2, 2, 37, 70, 8, 16, seed=seed_of("jsd-opcheck", teacher_grad, dtype), dtype=dtype,
                         requires_grad=teacher_grad)
    torch.library.opcheck(jsd_fwd, (*inputs, 0.3, 0.25, True, 0.3, 9, -1))
    detached = [x.detach() for x in inputs]
    jsd, lse_s, lse_t, stats = jsd_fwd(*detached, 0.3, 0.25, True, 0.3, 9, -1)
    assert stats.shape == (2, 2, 37, JSD_NUM_STATS)
    g = upstream_grad(tuple(jsd.shape), seed_of("jsd-opcheck-g"))
    torch.library.opcheck(jsd_bwd, (g, *detached, jsd, lse_s, lse_t, stats, 0.3, 0.25, True, 0.3, teacher_grad, 9, -1))


def test_jsd_varlen_opcheck():
    from test_attention_varlen import RAGGED
    tensors, layout = varlen_inputs(RAGGED, 2, 2, 1, 8, 8, seed=seed_of("jsd-varlen-opcheck"), dtype=torch.float32)
    options = (0.3, 0.25, True, "jsd", -1, -1, 0.7)
    torch.library.opcheck(torch.ops.streamkl.attention_kl_varlen_fwd, (*tensors, *layout, *options))
    detached = [t.detach() for t in tensors]
    kl, lse_s, lse_t, stats = torch.ops.streamkl.attention_kl_varlen_fwd(*detached, *layout, *options)
    assert stats.shape == (*kl.shape, JSD_NUM_STATS)
    g = upstream_grad(tuple(kl.shape), seed_of("jsd-varlen-opcheck-g"))
    torch.library.opcheck(torch.ops.streamkl.attention_kl_varlen_bwd,
                          (g, *detached, *layout, kl, lse_s, lse_t, stats, 0.3, 0.25, True, "jsd", True, -1, -1, 0.7))


def test_jsd_compile_fullgraph():
    inputs = make_inputs(1, 2, 33, 47, 8, 8, seed=seed_of("jsd-compile"), requires_grad=True)

    def loss(*x):
        return streamkl.attention_kl(*x, divergence="jsd", beta=0.25, causal=True, reduction="mean")

    eager = loss(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(*inputs)
    assert_rel_close(compiled, eager, 1e-6)
    assert_grads_close(torch.autograd.grad(compiled, inputs), eager_grads, 1e-6)


def test_jsd_module():
    inputs = make_inputs(1, 1, 20, 20, 8, 8, seed=seed_of("jsd-module"))
    loss = streamkl.AttentionKLLoss(divergence="jsd", beta=0.2, reduction="sum")
    assert "beta=0.2" in repr(loss)
    assert torch.allclose(loss(*inputs), streamkl.attention_kl(*inputs, divergence="jsd", beta=0.2).sum())


@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan, math.inf, None, "0.5", True], ids=repr)
def test_bad_beta(beta):
    inputs = make_inputs(1, 1, 4, 4, 8, 8, seed=seed_of("jsd-bad-beta"))
    with pytest.raises(ValueError, match="beta"):
        streamkl.attention_kl(*inputs, divergence="jsd", beta=beta)
    with pytest.raises(ValueError, match="beta"):
        streamkl.AttentionKLLoss(divergence="jsd", beta=beta)


@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan], ids=repr)
def test_bad_beta_raw_ops(beta):
    inputs = make_inputs(1, 1, 4, 4, 8, 8, seed=seed_of("jsd-bad-beta-op"))
    with pytest.raises(ValueError, match="beta"):
        jsd_fwd(*inputs, 0.5, 0.5, False, beta)
    tensors, layout = varlen_inputs([(3, 4)], 1, 1, 1, 4, 4, seed=seed_of("jsd-bad-beta-varlen"), requires_grad=False)
    with pytest.raises(ValueError, match="beta"):
        torch.ops.streamkl.attention_kl_varlen_fwd(*tensors, *layout, 0.5, 0.5, False, "jsd", -1, -1, beta)


def test_jsd_bwd_rejects_bad_stats():
    inputs = make_inputs(1, 2, 6, 8, 4, 4, seed=seed_of("jsd-bad-stats"))
    jsd, lse_s, lse_t, stats = jsd_fwd(*inputs, 0.5, 0.5, False, 0.5)
    with pytest.raises(ValueError, match="jsd_stats"):
        jsd_bwd(jsd, *inputs, jsd, lse_s, lse_t, stats[..., :1], 0.5, 0.5, False, 0.5, False)

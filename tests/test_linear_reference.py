"""streamkl.linear_kl against the float64 materializing reference: values and gradients for every divergence,
heterogeneous hidden sizes, biases, temperatures, reductions, the CE term, and the JSD endpoints."""

import pytest
import torch

import streamkl
from helpers import assert_grads_close, assert_rel_close, seed_of, upstream_grad
from linear_helpers import NAMES, call, make_labels, make_linear_inputs, ours_and_grads, reference_and_grads

DIVERGENCES = [pytest.param("forward", 0.5, id="forward"), pytest.param("reverse", 0.5, id="reverse"),
               pytest.param("jsd", 0.3, id="jsd0.3")]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}

# (leading dims, V, D_s, D_t); T = 70 spans three 32-row token blocks, V = 200 ends in a partial 64-entry tile.
SHAPES = [
    pytest.param((70,), 200, 24, 40, id="t70-v200-ds24-dt40"),
    pytest.param((2, 3, 5), 37, 8, 8, id="lead2x3x5-v37-d8"),
    pytest.param((1,), 300, 5, 17, id="t1-v300-ds5-dt17"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bias", [(False, False), (True, True)], ids=["no-bias", "bias"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("lead,V,Ds,Dt", SHAPES)
def test_rows_and_grads(lead, V, Ds, Dt, divergence, beta, bias, dtype):
    """reduction="none" with a random upstream gradient: per-row values and all six gradients."""
    seed = seed_of("linear-ref", lead, V, Ds, Dt, divergence, bias, dtype)
    inputs = make_linear_inputs(lead, V, Ds, Dt, seed=seed, dtype=dtype, bias=bias, teacher_requires_grad=True)
    kwargs = dict(divergence=divergence, beta=beta, reduction="none")
    grad_out = upstream_grad(lead, seed, dtype=dtype)
    out, grads = ours_and_grads(inputs, grad_out, **kwargs)
    ref, ref_grads = reference_and_grads(inputs, grad_out, **kwargs)
    assert out.shape == tuple(lead) and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (out >= 0).all()
    assert_rel_close(out, ref, TOL[dtype], "per-row loss")
    assert_grads_close(grads, ref_grads, TOL[dtype] * 5, names=NAMES)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_student_bias_only_and_frozen_student_weight(divergence, beta):
    """A bias on one side only; w_s frozen (no dw_s computed) while b_s trains."""
    seed = seed_of("linear-bias-one-side", divergence)
    inputs = make_linear_inputs((45,), 130, 16, 12, seed=seed, dtype=torch.float64, bias=(True, False))
    inputs[1].requires_grad_(False)
    kwargs = dict(divergence=divergence, beta=beta)
    out, grads = ours_and_grads(inputs, **kwargs)
    ref, ref_grads = reference_and_grads(inputs, **kwargs)
    assert_rel_close(out, ref, 1e-12)
    assert grads[1] is None and grads[2] is not None
    assert_grads_close(grads, ref_grads, 1e-11, names=NAMES)


@pytest.mark.parametrize("scale_sq", [False, True], ids=["plain", "tau2"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_temperature(divergence, beta, temperature, scale_sq):
    seed = seed_of("linear-temperature", divergence, temperature, scale_sq)
    inputs = make_linear_inputs((33,), 150, 12, 20, seed=seed, dtype=torch.float64, bias=(True, True))
    kwargs = dict(divergence=divergence, beta=beta, temperature=temperature, scale_by_temperature_sq=scale_sq)
    out, grads = ours_and_grads(inputs, **kwargs)
    ref, ref_grads = reference_and_grads(inputs, **kwargs)
    assert_rel_close(out, ref, 1e-12)
    assert_grads_close(grads, ref_grads, 1e-11, names=NAMES)


def test_temperature_sq_scaling_is_exactly_tau_squared():
    inputs = make_linear_inputs((20,), 90, 8, 8, seed=seed_of("tau2-exact"), dtype=torch.float64)
    plain = call(streamkl.linear_kl, inputs, temperature=3.0)
    scaled = call(streamkl.linear_kl, inputs, temperature=3.0, scale_by_temperature_sq=True)
    torch.testing.assert_close(scaled, 9.0 * plain, rtol=1e-15, atol=0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_cross_entropy_term(divergence, beta, reduction):
    """ce_weight adds the student's hard-label cross-entropy, computed in the same pass, with ignored rows."""
    seed = seed_of("linear-ce", divergence, reduction)
    inputs = make_linear_inputs((3, 25), 140, 16, 24, seed=seed, dtype=torch.float64, bias=(True, True),
                                teacher_requires_grad=True)
    labels = make_labels((3, 25), 140, seed=seed, ignore_every=4)
    kwargs = dict(divergence=divergence, beta=beta, labels=labels, ce_weight=0.7, reduction=reduction)
    out, grads = ours_and_grads(inputs, **kwargs)
    ref, ref_grads = reference_and_grads(inputs, **kwargs)
    assert_rel_close(out, ref, 1e-12)
    assert_grads_close(grads, ref_grads, 1e-11, names=NAMES)


def test_cross_entropy_alone_matches_torch():
    """With identical student and teacher every divergence is 0, so the loss is the plain cross-entropy."""
    inputs = make_linear_inputs((40,), 120, 16, 16, seed=seed_of("ce-alone"), dtype=torch.float64)
    x_s, w_s, _, _, _, _ = inputs
    labels = make_labels((40,), 120, seed=3, ignore_every=5)
    ours = streamkl.linear_kl(x_s, w_s, x_s.detach(), w_s.detach(), labels=labels, ce_weight=1.0)
    expected = torch.nn.functional.cross_entropy(x_s @ w_s.T, labels, ignore_index=-100)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions(reduction):
    seed = seed_of("linear-reduction", reduction)
    inputs = make_linear_inputs((2, 17), 80, 8, 12, seed=seed, dtype=torch.float64)
    out, grads = ours_and_grads(inputs, reduction=reduction)
    ref, ref_grads = reference_and_grads(inputs, reduction=reduction)
    assert out.shape == ref.shape
    assert_rel_close(out, ref, 1e-12)
    assert_grads_close(grads, ref_grads, 1e-11, names=NAMES)


@pytest.mark.parametrize("beta,kl", [(0.0, "forward"), (1.0, "reverse")])
def test_jsd_endpoints_are_the_kls(beta, kl):
    """TRL / Liger convention: jsd at beta = 0 is KL(P_t || P_s), at beta = 1 KL(P_s || P_t), bitwise."""
    inputs = make_linear_inputs((50,), 170, 16, 24, seed=seed_of("jsd-endpoint", beta), bias=(True, True),
                                teacher_requires_grad=True)
    jsd, jsd_grads = ours_and_grads(inputs, divergence="jsd", beta=beta, reduction="none")
    ref, ref_grads = ours_and_grads(inputs, divergence=kl, reduction="none")
    assert torch.equal(jsd, ref)
    for g, r in zip(jsd_grads, ref_grads):
        assert torch.equal(g, r)


@pytest.mark.parametrize("beta,kl", [(1e-8, "forward"), (1 - 1e-8, "reverse")])
def test_jsd_near_endpoints_tends_to_the_kls(beta, kl):
    """Continuity of the convention: JSD / beta -> forward KL as beta -> 0, JSD / (1 - beta) -> reverse KL.
    (The error is of order beta * max_v p_t,v / p_s,v, hence the tiny beta and the mild logits.)"""
    inputs = make_linear_inputs((30,), 100, 8, 8, seed=seed_of("jsd-limit", beta), dtype=torch.float64,
                                logit_scale=1.0)
    jsd = call(streamkl.linear_kl, inputs, divergence="jsd", beta=beta, reduction="none")
    limit = call(streamkl.linear_kl, inputs, divergence=kl, reduction="none")
    weight = beta if kl == "forward" else 1 - beta
    assert_rel_close(jsd / weight, limit, 1e-4, "JSD / weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_peaked_logits_stay_finite(divergence, beta, dtype):
    """Logits of magnitude ~200 (near one-hot rows, exp underflows for most entries): no NaN, values match.

    Such rows are saturated: their exact gradients are tiny (~1e-13) cancellations of log-probabilities of
    magnitude |logit|, so any implementation resolves them only to an absolute error of about
    eps * max|logit| * max|w|; gradients are held to that scale (times a margin for the sums)."""
    seed = seed_of("linear-peaked", divergence)
    inputs = make_linear_inputs((40,), 260, 16, 16, seed=seed, logit_scale=60.0, dtype=dtype,
                                teacher_requires_grad=True)
    out, grads = ours_and_grads(inputs, divergence=divergence, beta=beta, reduction="sum")
    ref, ref_grads = reference_and_grads(inputs, divergence=divergence, beta=beta, reduction="sum")
    assert_rel_close(out, ref, 1e-5 if dtype == torch.float32 else 1e-12)
    x_s, w_s, _, x_t, w_t, _ = (t.detach().double() if t is not None else None for t in inputs)
    max_logit = max((x_s @ w_s.T).abs().max().item(), (x_t @ w_t.T).abs().max().item())
    max_w = max(t.detach().abs().max().item() for t in inputs if t is not None)
    bound = 200 * torch.finfo(dtype).eps * max_logit * max_w
    for name, g, r in zip(NAMES, grads, ref_grads):
        if r is not None:
            assert torch.isfinite(g).all(), f"{name}.grad is not finite"
            err = (g.double() - r).abs().max().item()
            assert err < bound, f"{name}.grad: max abs error {err:.2e} above {bound:.2e}"


def test_module_matches_function():
    seed = seed_of("linear-module")
    inputs = make_linear_inputs((4, 9), 70, 8, 16, seed=seed, bias=(True, True))
    labels = make_labels((4, 9), 70, seed=seed, ignore_every=3)
    x_s, w_s, b_s, x_t, w_t, b_t = inputs
    module = streamkl.LinearKLLoss(divergence="jsd", beta=0.2, ce_weight=0.5)
    assert "jsd" in repr(module)
    got = module(x_s, w_s, x_t, w_t, labels, b_s=b_s, b_t=b_t)
    want = streamkl.linear_kl(x_s, w_s, x_t, w_t, b_s=b_s, b_t=b_t, divergence="jsd", beta=0.2, ce_weight=0.5,
                              labels=labels)
    assert torch.equal(got, want)

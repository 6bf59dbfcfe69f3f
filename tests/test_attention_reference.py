"""streamkl.attention_kl (CPU) against the float64 materializing reference: values, gradients, LSEs, layouts,
reductions and the nn.Module. Fresh seeded random inputs per parameter set."""

import pytest
import torch

import streamkl
from helpers import (assert_grads_close, assert_rel_close, default_scale, detached_copies, make_inputs,
                     masked_rows, reference_grads, seed_of, upstream_grad)

DIVERGENCES = ("forward", "reverse")

# (B, H, N_q, N_k, D_s, D_t). CPU tiles are 32 query rows x 64 keys: the lengths straddle tile edges.
SHAPES = [
    pytest.param((1, 1, 1, 130, 16, 16), id="nq1-nk130"),
    pytest.param((2, 2, 33, 33, 16, 16), id="n33"),
    pytest.param((1, 2, 65, 65, 8, 24), id="n65-ds8-dt24"),
    pytest.param((1, 1, 130, 130, 16, 8), id="n130-ds16-dt8"),
    pytest.param((2, 1, 33, 65, 8, 16), id="nq33-nk65"),
    pytest.param((1, 2, 65, 33, 16, 8), id="nq65-nk33"),  # causal: 32 rows see no key
    pytest.param((1, 1, 64, 128, 8, 8), id="nq64-nk128-exact-tiles"),
    pytest.param((1, 1, 130, 2, 4, 4), id="nq130-nk2"),
]

SMALL_SHAPES = [
    pytest.param((2, 2, 33, 65, 16, 8), id="nq33-nk65-ds16-dt8"),
    pytest.param((1, 2, 130, 130, 8, 8), id="n130"),
    pytest.param((1, 1, 65, 33, 16, 24), id="nq65-nk33-ds16-dt24"),
]

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _check_masked_rows_zero(out, Nq, Nk, causal):
    masked = masked_rows(Nq, Nk, causal)
    if masked.any():
        assert (out[..., masked] == 0).all(), "rows that see no key must give exactly 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape, causal, divergence, dtype):
    inputs = make_inputs(*shape, seed=seed_of("fwd", shape, causal, divergence, dtype), dtype=dtype)
    out = streamkl.attention_kl(*inputs, causal=causal, divergence=divergence)
    ref = streamkl.attention_kl_reference(*inputs, causal=causal, divergence=divergence)
    assert out.dtype == dtype and out.shape == shape[:3]
    assert ref.norm() > 0
    assert_rel_close(out, ref, TOL[dtype])
    _check_masked_rows_zero(out, shape[2], shape[3], causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_reference(shape, causal, divergence, dtype):
    seed = seed_of("grad", shape, causal, divergence, dtype)
    inputs = make_inputs(*shape, seed=seed, dtype=dtype, requires_grad=True)
    out = streamkl.attention_kl(*inputs, causal=causal, divergence=divergence)
    grad_out = upstream_grad(out.shape, seed, dtype=dtype)
    out.backward(grad_out)
    ref, ref_grads = reference_grads(inputs, grad_out, causal=causal, divergence=divergence)
    assert_rel_close(out, ref, TOL[dtype])
    assert all(g.norm() > 0 for g in ref_grads)
    assert_grads_close([x.grad for x in inputs], ref_grads, TOL[dtype])
    for x in inputs:
        assert x.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SMALL_SHAPES + [pytest.param((1, 1, 1, 130, 16, 16), id="nq1-nk130")])
def test_sharp_distributions(shape, causal, divergence, dtype):
    """Logits ~50x larger than usual: near one-hot rows, KL in the hundreds; no overflow, no NaN."""
    seed = seed_of("sharp", shape, causal, divergence, dtype)
    inputs = make_inputs(*shape, seed=seed, dtype=dtype, sharpness=50.0, requires_grad=True)
    out = streamkl.attention_kl(*inputs, causal=causal, divergence=divergence)
    grad_out = upstream_grad(out.shape, seed, dtype=dtype)
    out.backward(grad_out)
    ref, ref_grads = reference_grads(inputs, grad_out, causal=causal, divergence=divergence)
    assert ref.abs().max() > 10, "inputs are not sharp"
    assert_rel_close(out, ref, TOL[dtype])
    # The other side's gradient (p_o - p_w) is held to the usual per-tensor tolerance. The exact gradient on
    # the weighting side of a near one-hot row, p_w (log p_w - log p_o - KL), is a cancellation of O(KL)
    # terms and nearly 0, so its error is measured against the norm of all four gradients.
    grads = [x.grad for x in inputs]
    names = ("q_s", "k_s", "q_t", "k_t")
    weighting = (2, 3) if divergence == "forward" else (0, 1)
    other = (0, 1) if divergence == "forward" else (2, 3)
    assert_grads_close([grads[i] for i in other], [ref_grads[i] for i in other], TOL[dtype],
                       names=[names[i] for i in other])
    total = torch.cat([r.flatten() for r in ref_grads]).norm().item()
    for i in weighting:
        assert not torch.isnan(grads[i]).any()
        err = (grads[i].double() - ref_grads[i]).norm().item() / total
        assert err < TOL[dtype], f"{names[i]}.grad: error {err:.3e} relative to the whole gradient"
    _check_masked_rows_zero(out.detach(), shape[2], shape[3], causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_low_precision_inputs(shape, causal, divergence, dtype):
    """bf16/fp16 inputs: fp32 output, compared with the reference on the same rounded values upcast.

    The CPU path keeps scores and statistics in fp32, so the forward is held to 1e-3 (rounding the scores
    to bf16 would already cost ~1e-2); gradients are returned in the input dtype (rounding ~4e-3).
    """
    seed = seed_of("lowp", shape, causal, divergence, dtype)
    inputs = make_inputs(*shape, seed=seed, dtype=dtype, requires_grad=True)
    out = streamkl.attention_kl(*inputs, causal=causal, divergence=divergence)
    assert out.dtype == torch.float32
    grad_out = upstream_grad(out.shape, seed)
    out.backward(grad_out)
    ref, ref_grads = reference_grads(inputs, grad_out, causal=causal, divergence=divergence)
    assert_rel_close(out, ref, 1e-3)
    for x in inputs:
        assert x.grad.dtype == dtype
    assert_grads_close([x.grad for x in inputs], ref_grads, 2e-2)
    _check_masked_rows_zero(out.detach(), shape[2], shape[3], causal)


@pytest.mark.parametrize("shape", [pytest.param((1, 1, 1, 1, 8, 8), id="n1"),
                                   pytest.param((2, 1, 130, 1, 8, 16), id="nq130-nk1")])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_single_key_gives_zero(shape, divergence, dtype):
    """One key: both distributions are the same point mass, so the divergence and its gradient vanish."""
    seed = seed_of("one-key", shape, divergence, dtype)
    inputs = make_inputs(*shape, seed=seed, dtype=dtype, requires_grad=True)
    out = streamkl.attention_kl(*inputs, divergence=divergence)
    out.backward(upstream_grad(out.shape, seed, dtype=dtype))
    atol = 1e-5 if dtype == torch.float32 else 1e-13
    assert not torch.isnan(out).any()
    assert out.abs().max() <= atol
    for x in inputs:
        assert not torch.isnan(x.grad).any()
        assert x.grad.abs().max() <= atol


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("shape", [pytest.param((2, 2, 33, 130, 8, 16), id="nq33-nk130"),
                                   pytest.param((1, 2, 130, 65, 16, 8), id="nq130-nk65")])
def test_lse_outputs(shape, dtype, causal):
    """lse_s / lse_t of the fwd op equal logsumexp of the materialized (masked) scores; -inf on empty rows."""
    q_s, k_s, q_t, k_t = make_inputs(*shape, seed=seed_of("lse", shape, dtype, causal), dtype=dtype)
    scale_s, scale_t = 0.37, 0.21
    kl, lse_s, lse_t = torch.ops.streamkl.attention_kl_fwd(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, "forward")
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    assert kl.dtype == lse_s.dtype == lse_t.dtype == stats
    Nq, Nk = shape[2], shape[3]
    masked = masked_rows(Nq, Nk, causal)
    allowed = torch.ones(Nq, Nk, dtype=torch.bool)
    if causal:
        allowed = streamkl.reference.causal_mask(Nq, Nk, "cpu")
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for lse, q, k, scale in ((lse_s, q_s, k_s, scale_s), (lse_t, q_t, k_t, scale_t)):
        scores = scale * (q.double() @ k.double().transpose(-1, -2))
        ref = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        assert (lse[..., masked] == float("-inf")).all()
        live = ~masked
        assert_rel_close(lse[..., live], ref[..., live], tol, "lse")


def _layout(x, kind):
    """A view of ``x`` (values unchanged) with the memory layout named by ``kind``."""
    B, H, N, D = x.shape
    if kind == "contiguous":
        return x
    if kind == "bnhd":  # [B, N, H, D] storage, heads and sequence transposed
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "last-dim-strided":  # stride(-1) == 2
        wide = torch.zeros(B, H, N, 2 * D, dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if kind == "last-dim-transposed":  # [B, H, D, N] storage
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "seq-strided":  # every other row of a longer buffer
        tall = torch.zeros(B, H, 2 * N, D, dtype=x.dtype)
        tall[:, :, ::2] = x
        return tall[:, :, ::2]
    raise AssertionError(kind)


LAYOUTS = ["bnhd", "last-dim-strided", "last-dim-transposed", "seq-strided"]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS + ["mixed"])
def test_non_contiguous_inputs(layout, causal):
    shape = (2, 3, 37, 70, 8, 16)
    seed = seed_of("layout", layout, causal)
    base = make_inputs(*shape, seed=seed)
    kinds = (["bnhd", "last-dim-strided", "contiguous", "last-dim-transposed"] if layout == "mixed"
             else [layout] * 4)
    views = [_layout(x, kind).requires_grad_() for x, kind in zip(base, kinds)]
    for v, kind in zip(views, kinds):
        assert kind == "contiguous" or not v.is_contiguous()
    contig = [x.detach().clone().contiguous().requires_grad_() for x in base]
    out = streamkl.attention_kl(*views, causal=causal, divergence="forward")
    expected = streamkl.attention_kl(*contig, causal=causal, divergence="forward")
    grad_out = upstream_grad(out.shape, seed)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert_rel_close(out, expected, 1e-6)
    assert_rel_close(out, streamkl.attention_kl_reference(*base, causal=causal), TOL[torch.float32])
    assert_grads_close([v.grad for v in views], [c.grad for c in contig], 1e-6)


def test_expanded_batch_input():
    """A stride-0 (expanded) batch dimension is read correctly and its gradient summed over the batch."""
    seed = seed_of("expand")
    q_s, k_s, q_t, k_t = make_inputs(3, 2, 40, 70, 8, 8, seed=seed)
    k_shared = k_t[:1].clone().requires_grad_()
    k_expanded = k_shared.expand(3, -1, -1, -1)
    assert k_expanded.stride(0) == 0
    out = streamkl.attention_kl(q_s, k_s, q_t, k_expanded, causal=True)
    grad_out = upstream_grad(out.shape, seed)
    out.backward(grad_out)
    k_ref = k_shared.detach().double().requires_grad_()
    ref = streamkl.attention_kl_reference(q_s, k_s, q_t, k_ref.expand(3, -1, -1, -1), causal=True)
    ref.backward(grad_out.double())
    assert_rel_close(out, ref, TOL[torch.float32])
    assert_rel_close(k_shared.grad, k_ref.grad, TOL[torch.float32], "k_t.grad")


def test_explicit_scales_and_defaults():
    """scale_s / scale_t are honoured, and the defaults are 1/sqrt(D) of each side (D_s != D_t)."""
    Ds, Dt = 8, 32
    inputs = make_inputs(2, 2, 40, 50, Ds, Dt, seed=seed_of("scales"), dtype=torch.float64)
    for scale_s, scale_t in ((0.3, 0.7), (1.5, 0.05)):
        out = streamkl.attention_kl(*inputs, scale_s=scale_s, scale_t=scale_t)
        ref = streamkl.attention_kl_reference(*inputs, scale_s=scale_s, scale_t=scale_t)
        assert_rel_close(out, ref, TOL[torch.float64])
    default = streamkl.attention_kl(*inputs)
    explicit = streamkl.attention_kl_reference(*inputs, scale_s=default_scale(Ds), scale_t=default_scale(Dt))
    assert_rel_close(default, explicit, TOL[torch.float64])
    swapped = streamkl.attention_kl_reference(*inputs, scale_s=default_scale(Dt), scale_t=default_scale(Ds))
    assert (default - swapped).norm() > 1e-3 * swapped.norm(), "scales do not matter: test is vacuous"


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions(reduction, causal, divergence):
    """reduction="sum"/"mean" (mean over all B*H*N_q rows, masked rows included) and their gradients."""
    shape = (2, 2, 45, 30, 8, 16)  # causal: 15 rows per head see no key
    seed = seed_of("reduce", reduction, causal, divergence)
    inputs = make_inputs(*shape, seed=seed, dtype=torch.float64, requires_grad=True)
    loss = streamkl.attention_kl(*inputs, causal=causal, divergence=divergence, reduction=reduction)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    loss.backward()
    leaves = detached_copies(inputs)
    ref_rows = streamkl.attention_kl_reference(*leaves, causal=causal, divergence=divergence)
    ref = ref_rows.sum() if reduction == "sum" else ref_rows.sum() / ref_rows.numel()
    ref.backward()
    assert_rel_close(loss, ref, TOL[torch.float64])
    assert_grads_close([x.grad for x in inputs], [x.grad for x in leaves], TOL[torch.float64])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", None])
def test_attention_kl_loss_module(reduction):
    shape = (2, 2, 33, 65, 16, 8)
    seed = seed_of("module", reduction)
    inputs = make_inputs(*shape, seed=seed, dtype=torch.float64, requires_grad=True)
    kwargs = dict(causal=True, scale_s=0.4, scale_t=0.2, divergence="reverse")
    module = (streamkl.AttentionKLLoss(**kwargs) if reduction is None
              else streamkl.AttentionKLLoss(reduction=reduction, **kwargs))
    assert isinstance(module, torch.nn.Module)
    assert "reverse" in repr(module)
    loss = module(*inputs)
    leaves = detached_copies(inputs)
    ref_rows = streamkl.attention_kl_reference(*leaves, **kwargs)
    ref = {"none": ref_rows, "sum": ref_rows.sum(), "mean": ref_rows.mean(), None: ref_rows.mean()}[reduction]
    assert loss.shape == ref.shape
    grad_out = upstream_grad(loss.shape, seed, dtype=torch.float64)
    loss.backward(grad_out)
    ref.backward(grad_out)
    assert_rel_close(loss, ref, TOL[torch.float64])
    assert_grads_close([x.grad for x in inputs], [x.grad for x in leaves], TOL[torch.float64])


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("which", ["q_s", "k_s", "q_t", "k_t"])
def test_nan_input_propagates(which, divergence):
    """A NaN in an input makes the rows that read it NaN, as in the reference (never a silent 0)."""
    inputs = list(make_inputs(1, 2, 6, 9, 8, 4, seed=seed_of("nan", which, divergence)))
    idx = ("q_s", "k_s", "q_t", "k_t").index(which)
    inputs[idx][0, 1, 3, 0] = float("nan")  # query row 3 / key 3 of head 1
    out = streamkl.attention_kl(*inputs, divergence=divergence)
    ref = streamkl.attention_kl_reference(*inputs, divergence=divergence)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(streamkl.attention_kl(*inputs, divergence=divergence, reduction="mean"))

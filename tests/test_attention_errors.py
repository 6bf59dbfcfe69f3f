"""Input validation of streamkl.attention_kl / AttentionKLLoss and of the raw ops, and empty inputs."""

import math

import pytest
import torch

import streamkl
from helpers import make_inputs, seed_of

fwd_op = torch.ops.streamkl.attention_kl_fwd
bwd_op = torch.ops.streamkl.attention_kl_bwd

NAMES = ("q_s", "k_s", "q_t", "k_t")
# Valid reference shapes: B=2, H=3, N_q=5, N_k=7, D_s=4, D_t=6.
GOOD = {"q_s": (2, 3, 5, 4), "k_s": (2, 3, 7, 4), "q_t": (2, 3, 5, 6), "k_t": (2, 3, 7, 6)}


def _inputs(**shapes):
    g = torch.Generator().manual_seed(seed_of("errors", sorted(shapes.items())))
    return [torch.randn(shapes.get(n, GOOD[n]), generator=g) for n in NAMES]


# (case id, overridden shapes, argument the message must name)
SHAPE_ERRORS = [
    ("batch-q_t", {"q_t": (1, 3, 5, 6)}, "q_t"),
    ("heads-q_t", {"q_t": (2, 2, 5, 6)}, "q_t"),
    ("nq-q_t", {"q_t": (2, 3, 4, 6)}, "q_t"),
    ("batch-k_s", {"k_s": (1, 3, 7, 4)}, "k_s"),
    ("heads-k_s", {"k_s": (2, 4, 7, 4)}, "k_s"),
    ("batch-k_t", {"k_t": (3, 3, 7, 6)}, "k_t"),
    ("heads-k_t", {"k_t": (2, 2, 7, 6)}, "k_t"),  # 2 does not divide 3 query heads (1 would be MQA)
    ("nk-k_s-vs-k_t", {"k_t": (2, 3, 8, 6)}, "k_t"),
    ("nk-k_t-vs-k_s", {"k_s": (2, 3, 6, 4)}, "k_s"),
    ("headdim-k_s", {"k_s": (2, 3, 7, 5)}, "k_s"),
    ("headdim-k_t", {"k_t": (2, 3, 7, 4)}, "k_t"),
    ("headdim-q_s", {"q_s": (2, 3, 5, 6)}, "k_s"),  # q_s's D now differs from k_s's
    ("rank3-q_s", {"q_s": (3, 5, 4)}, "q_s"),
    ("rank3-k_s", {"k_s": (3, 7, 4)}, "k_s"),
    ("rank5-q_t", {"q_t": (1, 2, 3, 5, 6)}, "q_t"),
    ("rank2-k_t", {"k_t": (7, 6)}, "k_t"),
]


@pytest.mark.parametrize("shapes,arg", [pytest.param(s, a, id=i) for i, s, a in SHAPE_ERRORS])
def test_shape_errors(shapes, arg):
    inputs = _inputs(**shapes)
    with pytest.raises(ValueError, match=arg):
        streamkl.attention_kl(*inputs)
    with pytest.raises(ValueError, match=arg):
        streamkl.AttentionKLLoss()(*inputs)


@pytest.mark.parametrize("shapes,arg", [pytest.param(s, a, id=i) for i, s, a in SHAPE_ERRORS])
def test_shape_errors_raw_op(shapes, arg):
    """The op validates on its own (it is callable without the Python wrapper): ValueError naming the arg."""
    inputs = _inputs(**shapes)
    with pytest.raises(ValueError, match=arg):
        fwd_op(*inputs, 0.5, 0.5, False, "forward")


def test_valid_inputs_pass():
    """The baseline of the tables above is valid (so every error comes from the one changed argument)."""
    out = streamkl.attention_kl(*_inputs())
    assert out.shape == (2, 3, 5) and torch.isfinite(out).all()
    assert fwd_op(*_inputs(), 0.5, 0.5, True, "reverse")[0].shape == (2, 3, 5)


def test_key_length_may_differ_from_query_length():
    """Within a side, N_k is free (only k_s vs k_t must agree)."""
    inputs = _inputs(k_s=(2, 3, 11, 4), k_t=(2, 3, 11, 6))
    assert streamkl.attention_kl(*inputs, causal=True).shape == (2, 3, 5)


@pytest.mark.parametrize("which", NAMES[1:])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_mismatch(which, dtype):
    inputs = _inputs()
    inputs[NAMES.index(which)] = inputs[NAMES.index(which)].to(dtype)
    with pytest.raises(ValueError, match=which):
        streamkl.attention_kl(*inputs)
    with pytest.raises(ValueError, match=which):
        fwd_op(*inputs, 0.5, 0.5, False, "forward")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_dtype(dtype):
    inputs = [x.to(dtype) for x in _inputs()]
    with pytest.raises(ValueError, match="float"):
        streamkl.attention_kl(*inputs)
    if dtype != torch.complex64:
        with pytest.raises(ValueError, match="float"):
            fwd_op(*inputs, 0.5, 0.5, False, "forward")


@pytest.mark.parametrize("which", NAMES[1:])
def test_device_mismatch(which):
    inputs = _inputs()
    inputs[NAMES.index(which)] = inputs[NAMES.index(which)].to("meta")
    with pytest.raises(ValueError, match=which):
        streamkl.attention_kl(*inputs)


@pytest.mark.parametrize("which", NAMES[1:])
def test_device_mismatch_raw_op(which):
    """A meta tensor among CPU tensors dispatches to the fake kernel, which validates devices too."""
    inputs = _inputs()
    inputs[NAMES.index(which)] = inputs[NAMES.index(which)].to("meta")
    with pytest.raises((ValueError, RuntimeError), match=which):
        fwd_op(*inputs, 0.5, 0.5, False, "forward")


NON_TENSORS = [None, 1.0, [[1.0]], "q"]
@pytest.mark.parametrize("which", NAMES)
@pytest.mark.parametrize("value", NON_TENSORS, ids=lambda v: type(v).__name__)
def test_non_tensor_inputs(which, value):
    inputs = _inputs()
    inputs[NAMES.index(which)] = value
    with pytest.raises(TypeError, match=which):
        streamkl.attention_kl(*inputs)


@pytest.mark.parametrize("which", NAMES)
@pytest.mark.parametrize("value", NON_TENSORS, ids=lambda v: type(v).__name__)
def test_non_tensor_inputs_explicit_scales(which, value):
    inputs = _inputs()
    inputs[NAMES.index(which)] = value
    with pytest.raises(TypeError, match=which):
        streamkl.attention_kl(*inputs, scale_s=0.5, scale_t=0.5)
    with pytest.raises(TypeError, match=which):
        streamkl.AttentionKLLoss(scale_s=0.5, scale_t=0.5)(*inputs)


@pytest.mark.parametrize("which", NAMES)
def test_zero_dim_tensor_input(which):
    inputs = _inputs()
    inputs[NAMES.index(which)] = torch.tensor(1.0)
    with pytest.raises(ValueError, match=which):
        streamkl.attention_kl(*inputs)


@pytest.mark.parametrize("divergence", ["JSD", "Forward", "", "kl"])
def test_unknown_divergence(divergence):
    inputs = _inputs()
    with pytest.raises(ValueError, match="divergence"):
        streamkl.attention_kl(*inputs, divergence=divergence)
    with pytest.raises(ValueError, match="divergence"):
        streamkl.AttentionKLLoss(divergence=divergence)
    with pytest.raises(ValueError, match="divergence"):
        fwd_op(*inputs, 0.5, 0.5, False, divergence)


def test_kl_op_points_jsd_to_its_own_op():
    """The KL ops keep their three outputs; the JSD (which saves more per row) has attention_jsd_fwd/bwd."""
    with pytest.raises(ValueError, match="attention_jsd_fwd"):
        fwd_op(*_inputs(), 0.5, 0.5, False, "jsd")


@pytest.mark.parametrize("reduction", ["avg", "batchmean", "", "None"])
def test_unknown_reduction(reduction):
    with pytest.raises(ValueError, match="reduction"):
        streamkl.attention_kl(*_inputs(), reduction=reduction)
    with pytest.raises(ValueError, match="reduction"):
        streamkl.AttentionKLLoss(reduction=reduction)


BAD_SCALES = [0.0, -0.5, -math.inf, math.nan, math.inf]


@pytest.mark.parametrize("which", ["scale_s", "scale_t"])
@pytest.mark.parametrize("value", BAD_SCALES, ids=lambda v: repr(v))
def test_bad_scale(which, value):
    with pytest.raises(ValueError, match=which):
        streamkl.attention_kl(*_inputs(), **{which: value})
    with pytest.raises(ValueError, match=which):
        streamkl.AttentionKLLoss(**{which: value})(*_inputs())


@pytest.mark.parametrize("which", ["scale_s", "scale_t"])
@pytest.mark.parametrize("value", [0.0, -0.5, -math.inf, math.nan], ids=lambda v: repr(v))
def test_bad_scale_raw_op(which, value):
    scales = {"scale_s": 0.5, "scale_t": 0.5, which: value}
    with pytest.raises(ValueError, match=which):
        fwd_op(*_inputs(), scales["scale_s"], scales["scale_t"], False, "forward")


def test_infinite_scale_raw_op():
    with pytest.raises(ValueError, match="scale_s"):
        fwd_op(*_inputs(), math.inf, 0.5, False, "forward")


def test_bwd_op_rejects_bad_row_tensors():
    inputs = _inputs()
    kl, lse_s, lse_t = fwd_op(*inputs, 0.5, 0.5, False, "forward")
    with pytest.raises(ValueError, match="grad_kl"):
        bwd_op(kl[:, :, :-1], *inputs, kl, lse_s, lse_t, 0.5, 0.5, False, "forward", False)
    with pytest.raises(ValueError, match="lse_s"):
        bwd_op(kl, *inputs, kl, lse_s[:1], lse_t, 0.5, 0.5, False, "forward", False)
    with pytest.raises(ValueError, match="k_t"):
        bwd_op(kl, *inputs[:3], inputs[3][:, :, :-1], kl, lse_s, lse_t, 0.5, 0.5, False, "forward", True)


# ----------------------------------------------------------------------------------------------- empty inputs

EMPTY_SHAPES = [
    pytest.param((0, 2, 5, 7, 4, 6), id="B0"),
    pytest.param((2, 0, 5, 7, 4, 6), id="H0"),
    pytest.param((2, 2, 0, 7, 4, 6), id="Nq0"),
    pytest.param((2, 2, 5, 0, 4, 6), id="Nk0"),
    pytest.param((0, 2, 0, 0, 4, 6), id="B0-Nq0-Nk0"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_inputs(shape, causal, divergence, dtype):
    """No rows or no keys: empty / zero results and zero gradients of the right shapes, no NaN."""
    B, H, Nq, Nk, Ds, Dt = shape
    inputs = make_inputs(*shape, seed=seed_of("empty", shape), dtype=dtype, requires_grad=True)
    out = streamkl.attention_kl(*inputs, causal=causal, divergence=divergence)
    assert out.shape == (B, H, Nq)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (out == 0).all()  # rows without keys give 0
    for reduction in ("sum", "mean"):
        loss = streamkl.attention_kl(*inputs, causal=causal, divergence=divergence, reduction=reduction)
        assert loss.dim() == 0 and loss.item() == 0.0, f"reduction={reduction} gave {loss.item()}"
    (out.sum() + loss).backward()
    for name, x in zip(NAMES, inputs):
        assert x.grad is not None, name
        assert x.grad.shape == x.shape and x.grad.dtype == dtype, name
        assert (x.grad == 0).all(), name
    # The raw ops agree.
    kl, lse_s, lse_t = fwd_op(*[x.detach() for x in inputs], 0.5, 0.5, causal, divergence)
    assert kl.shape == lse_s.shape == lse_t.shape == (B, H, Nq)
    grads = bwd_op(torch.ones_like(kl), *[x.detach() for x in inputs], kl, lse_s, lse_t, 0.5, 0.5, causal,
                   divergence, True)
    for name, x, g in zip(NAMES, inputs, grads):
        assert g.shape == x.shape and (g == 0).all(), name

"""Varlen (packed, cu_seqlens) attention KL on the CPU: values and gradients against the float64 reference
(one padded reference call per sequence), ragged lengths with empty sequences and N_q != N_k, masks aligned
per sequence, GQA; gradcheck, opcheck, torch.compile, and the cu_seqlens errors."""

import pytest
import torch

import streamkl
from helpers import (assert_grads_close, assert_rel_close, seed_of, upstream_grad, varlen_inputs,
                     varlen_reference_grads)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

fwd_op = torch.ops.streamkl.attention_kl_varlen_fwd
bwd_op = torch.ops.streamkl.attention_kl_varlen_bwd

# Per-sequence (N_q, N_k): crosses the CPU tiles (32 rows x 64 keys), includes a sequence without queries, one
# without keys, N_q > N_k (causal rows that see nothing) and N_q < N_k.
RAGGED = [(37, 70), (0, 9), (5, 0), (70, 33), (1, 1), (12, 130)]


MASKS = [  # (causal, window_size)
    pytest.param(False, (-1, -1), id="full"),
    pytest.param(True, (-1, -1), id="causal"),
    pytest.param(False, (6, 3), id="win6_3"),
    pytest.param(True, (9, -1), id="causal-win9"),
]
HEADS = [pytest.param((4, 4, 4), id="mha"), pytest.param((4, 2, 1), id="gqa-mqa")]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_varlen_matches_reference(heads, causal, window, divergence):
    H, kv_s, kv_t = heads
    seed = seed_of("varlen", heads, causal, window, divergence)
    tensors, layout = varlen_inputs(RAGGED, H, kv_s, kv_t, 8, 12, seed=seed)
    kwargs = dict(causal=causal, window_size=window, divergence=divergence)
    out = streamkl.attention_kl_varlen(*tensors, *layout, **kwargs)
    assert out.shape == (layout[0][-1].item(), H) and out.dtype == torch.float64
    grad_out = upstream_grad(tuple(out.shape), seed, dtype=torch.float64)
    grads = torch.autograd.grad(out, tensors, grad_out)
    ref, ref_grads = varlen_reference_grads(tensors, layout, grad_out, **kwargs)
    assert_rel_close(out, ref, 1e-10)
    assert_grads_close(grads, ref_grads, 1e-9)


def test_varlen_float32_and_bfloat16():
    tensors, layout = varlen_inputs(RAGGED, 2, 2, 2, 16, 16, seed=seed_of("varlen-fp32"), requires_grad=False)
    ref = streamkl.attention_kl_varlen_reference(*tensors, *layout[:2], causal=True)
    out32 = streamkl.attention_kl_varlen(*[t.float() for t in tensors], *layout, causal=True)
    assert out32.dtype == torch.float32
    assert_rel_close(out32, ref, 1e-5)
    out16 = streamkl.attention_kl_varlen(*[t.bfloat16() for t in tensors], *layout, causal=True)
    assert out16.dtype == torch.float32
    assert_rel_close(out16, ref, 5e-2)  # bf16 inputs, fp32 statistics


def test_varlen_equals_padded_for_equal_lengths():
    """B sequences of one length, packed, give exactly what the padded op gives on the same data."""
    B, N_q, N_k, H = 3, 21, 40, 2
    tensors, layout = varlen_inputs([(N_q, N_k)] * B, H, 1, 2, 8, 8, seed=seed_of("varlen-padded"),
                                    dtype=torch.float32, requires_grad=False)
    packed = streamkl.attention_kl_varlen(*tensors, *layout, causal=True, window_size=(5, -1))
    padded_inputs = [t.view(B, -1, t.shape[1], t.shape[2]).transpose(1, 2) for t in tensors]
    padded = streamkl.attention_kl(*padded_inputs, causal=True, window_size=(5, -1))
    assert torch.equal(packed, padded.transpose(1, 2).reshape(B * N_q, H))


def test_sequence_without_keys_gives_zero_and_zero_grads():
    tensors, layout = varlen_inputs([(4, 6), (7, 0), (3, 5)], 2, 2, 2, 4, 4, seed=seed_of("varlen-nokeys"))
    out = streamkl.attention_kl_varlen(*tensors, *layout, causal=True)
    assert torch.all(out[4:11] == 0)
    grads = torch.autograd.grad(out[4:11].sum(), tensors, retain_graph=True)
    assert all(torch.all(g == 0) for g in grads)
    full_grads = torch.autograd.grad(out.sum(), tensors)
    assert torch.all(full_grads[0][4:11] == 0) and torch.all(full_grads[2][4:11] == 0)
    assert all(torch.isfinite(g).all() for g in full_grads)


def test_varlen_max_seqlen_may_exceed_longest():
    tensors, layout = varlen_inputs([(9, 13), (30, 2)], 2, 2, 2, 4, 4, seed=seed_of("varlen-max"),
                                    requires_grad=False)
    exact = streamkl.attention_kl_varlen(*tensors, *layout, causal=True)
    loose = streamkl.attention_kl_varlen(*tensors, *layout[:2], 100, 200, causal=True)
    assert torch.equal(exact, loose)


def test_varlen_gradcheck():
    tensors, layout = varlen_inputs([(3, 4), (0, 2), (4, 3), (2, 0)], 2, 1, 2, 3, 2, seed=seed_of("varlen-gc"))
    fn = lambda *x: streamkl.attention_kl_varlen(*x, *layout, causal=True, scale_s=0.8, scale_t=0.6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
def test_varlen_opcheck(teacher_grad):
    tensors, layout = varlen_inputs(RAGGED, 4, 2, 4, 8, 16, seed=seed_of("varlen-opcheck", teacher_grad),
                                    dtype=torch.float32, requires_grad=teacher_grad)
    options = (0.3, 0.25, True, "reverse", 7, -1)
    torch.library.opcheck(fwd_op, (*tensors, *layout, *options))
    detached = [t.detach() for t in tensors]
    kl, lse_s, lse_t, stats = fwd_op(*detached, *layout, *options)
    assert stats.shape == (0,)
    g = upstream_grad(tuple(kl.shape), seed_of("varlen-opcheck-g"))
    torch.library.opcheck(bwd_op, (g, *detached, *layout, kl, lse_s, lse_t, stats, 0.3, 0.25, True, "reverse",
                                   teacher_grad, 7, -1))


def test_varlen_compile_fullgraph():
    tensors, layout = varlen_inputs(RAGGED, 2, 1, 2, 8, 8, seed=seed_of("varlen-compile"), dtype=torch.float32)

    def loss(*x):
        return streamkl.attention_kl_varlen(*x, *layout, causal=True, reduction="mean")

    eager = loss(*tensors)
    eager_grads = torch.autograd.grad(eager, tensors)
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(*tensors)
    compiled_grads = torch.autograd.grad(compiled, tensors)
    assert_rel_close(compiled, eager, 1e-6)
    assert_grads_close(compiled_grads, eager_grads, 1e-6)


def test_varlen_module():
    tensors, layout = varlen_inputs(RAGGED, 2, 2, 2, 8, 8, seed=seed_of("varlen-module"), requires_grad=False)
    loss = streamkl.AttentionKLVarlenLoss(causal=True, reduction="sum")
    assert "causal=True" in repr(loss)
    assert torch.allclose(loss(*tensors, *layout), streamkl.attention_kl_varlen(*tensors, *layout, causal=True).sum())


# ------------------------------------------------------------------------------------------------------ errors

def _good():
    return varlen_inputs([(4, 6), (3, 5)], 2, 2, 2, 4, 4, seed=seed_of("varlen-errors"), dtype=torch.float32,
                         requires_grad=False)


def _call_both(tensors, layout, match, exc=ValueError):
    """The public function (Python checks) and the raw op (C++ checks) reject the same input."""
    with pytest.raises(exc, match=match):
        streamkl.attention_kl_varlen(*tensors, *layout)
    with pytest.raises(exc, match=match):
        fwd_op(*tensors, *layout, 0.5, 0.5, False, "forward")


BAD_CU = [  # (case id, cu_seqlens_q, cu_seqlens_k, message)
    ("q-int64", torch.tensor([0, 4, 7]), None, "cu_seqlens_q must be int32"),
    ("k-float", None, torch.tensor([0.0, 6.0, 11.0]), "cu_seqlens_k must be int32"),
    ("q-2d", torch.tensor([[0, 4, 7]], dtype=torch.int32), None, "cu_seqlens_q must be a 1-D"),
    ("k-empty", None, torch.zeros(0, dtype=torch.int32), "cu_seqlens_k must be a 1-D"),
    ("batch-mismatch", None, torch.tensor([0, 6, 11, 11], dtype=torch.int32), "length batch \\+ 1"),
]


@pytest.mark.parametrize("cu_q,cu_k,match", [pytest.param(q, k, m, id=i) for i, q, k, m in BAD_CU])
def test_bad_cu_seqlens_static(cu_q, cu_k, match):
    tensors, layout = _good()
    layout = (layout[0] if cu_q is None else cu_q, layout[1] if cu_k is None else cu_k, *layout[2:])
    _call_both(tensors, layout, match)


BAD_VALUES = [  # (case id, cu_seqlens_q, cu_seqlens_k, message): data-dependent, checked by the op
    ("q-start", [1, 4, 7], None, "cu_seqlens_q must start at 0"),
    ("k-decreasing", None, [0, 7, 6, 11], "non-decreasing"),
    ("q-last", [0, 4, 6], None, "q_s.size\\(0\\) = 7"),
    ("k-last", None, [0, 6, 12], "k_s.size\\(0\\) = 11"),
]


@pytest.mark.parametrize("cu_q,cu_k,match", [pytest.param(q, k, m, id=i) for i, q, k, m in BAD_VALUES])
def test_bad_cu_seqlens_values(cu_q, cu_k, match):
    tensors, layout = _good()
    cu_q = layout[0] if cu_q is None else torch.tensor(cu_q, dtype=torch.int32)
    cu_k = layout[1] if cu_k is None else torch.tensor(cu_k, dtype=torch.int32)
    if cu_k.shape[0] != cu_q.shape[0]:  # keep the batch sizes equal so the value check is what fails
        cu_q = torch.tensor([0, 2, 4, 7], dtype=torch.int32)
    _call_both(tensors, (cu_q, cu_k, 10, 10), match)


@pytest.mark.parametrize("which", ["max_seqlen_q", "max_seqlen_k"])
def test_max_seqlen_too_small(which):
    tensors, (cu_q, cu_k, max_q, max_k) = _good()
    layout = (cu_q, cu_k, max_q - 1, max_k) if which == "max_seqlen_q" else (cu_q, cu_k, max_q, max_k - 1)
    _call_both(tensors, layout, which)


@pytest.mark.parametrize("value", [-1, 2.5, None, True], ids=repr)
def test_bad_max_seqlen_type(value):
    tensors, (cu_q, cu_k, _, max_k) = _good()
    with pytest.raises(ValueError, match="max_seqlen_q"):
        streamkl.attention_kl_varlen(*tensors, cu_q, cu_k, value, max_k)


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_device_mismatch(which):
    tensors, layout = _good()
    layout = list(layout)
    layout[0 if which == "cu_seqlens_q" else 1] = layout[0 if which == "cu_seqlens_q" else 1].to("meta")
    with pytest.raises(ValueError, match=which):
        streamkl.attention_kl_varlen(*tensors, *layout)
    with pytest.raises((ValueError, RuntimeError), match=which):
        fwd_op(*tensors, *layout, 0.5, 0.5, False, "forward")


SHAPE_ERRORS = [  # (case id, index of the tensor to replace, new shape, message)
    ("rank-q_s", 0, (7, 2, 4, 1), "q_s must be 3-D"),
    ("q_t-tokens", 2, (6, 2, 4), "q_t must match q_s"),
    ("k_s-heads", 1, (11, 3, 4), "k_s has 3 heads"),
    ("k_t-total", 3, (10, 2, 4), "same keys"),
    ("k_t-dim", 3, (11, 2, 5), "head dim"),
]


@pytest.mark.parametrize("index,shape,match", [pytest.param(i, s, m, id=c) for c, i, s, m in SHAPE_ERRORS])
def test_varlen_shape_errors(index, shape, match):
    tensors, layout = _good()
    tensors[index] = torch.zeros(shape)
    _call_both(tensors, layout, match)

"""Varlen (packed, cu_seqlens) attention KL on CUDA: values and gradients against the float64 reference, equality
with the padded CUDA op run per sequence, opcheck and torch.compile(fullgraph=True).

Skipped unless a GPU is visible and this build has the CUDA kernels. Inputs are drawn on the CPU from a seeded
generator, rounded to bf16/fp16, and the reference runs in float64 on the same rounded values. No test here makes
the C++ op raise an error whose message holds a number (the GPU test machine's torch environment crashes on
those, tools/repro_c10_str.py); the varlen error paths are tested on the CPU (tests/test_attention_varlen.py).
"""

import pytest
import torch

import streamkl
from helpers import (CUDA_TEST_MARKS, assert_compile_matches_eager, assert_grads_close, assert_rel_close, seed_of,
                     upstream_grad, varlen_inputs, varlen_reference_grads)

pytestmark = CUDA_TEST_MARKS

DEVICE = "cuda"
FWD_TOL = 1e-2
GRAD_TOL = 2e-2
fwd_op = torch.ops.streamkl.attention_kl_varlen_fwd
bwd_op = torch.ops.streamkl.attention_kl_varlen_bwd

# Per-sequence (N_q, N_k) against the CUDA tiles (128 or 64 rows per CTA, 32-key tiles): a sequence without
# queries, one without keys, length 1, lengths that are not multiples of any tile, sequences spanning several row
# blocks, N_q > N_k (causal rows that see nothing) and N_q < N_k.
RAGGED = [(37, 70), (0, 9), (5, 0), (1, 1), (200, 131), (129, 300), (1, 250), (300, 97)]

MASKS = [  # (causal, window_size)
    pytest.param(False, (-1, -1), id="full"),
    pytest.param(True, (-1, -1), id="causal"),
    pytest.param(False, (16, 8), id="win16_8"),
    pytest.param(True, (40, -1), id="causal-win40"),
]
# (H, H_kv student, H_kv teacher): teacher gradients when both sides group their heads alike (the CUDA dK kernel
# needs that), student-only gradients otherwise.
HEADS = [pytest.param((2, 2, 2), id="mha"), pytest.param((4, 2, 2), id="gqa"), pytest.param((4, 2, 1), id="gqa-mqa")]
DIMS = [pytest.param((64, 64), id="d64"), pytest.param((128, 128), id="d128"),
        pytest.param((128, 64), id="ds128-dt64"), pytest.param((64, 128), id="ds64-dt128")]
LOW_PRECISION = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _inputs(lengths, heads, dims, dtype, seed, *, teacher_grad=None):
    H, kv_s, kv_t = heads
    teacher_grad = kv_s == kv_t if teacher_grad is None else teacher_grad
    return varlen_inputs(lengths, H, kv_s, kv_t, *dims, seed=seed, dtype=dtype, device=DEVICE,
                         teacher_requires_grad=teacher_grad)


def _grads(out, tensors, grad_out):
    wrt = [x for x in tensors if x.requires_grad]
    got = iter(torch.autograd.grad(out, wrt, grad_out))
    return [next(got) if x.requires_grad else None for x in tensors]


def _sequence_rows(cu, b):
    return slice(int(cu[b]), int(cu[b + 1]))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dims", DIMS)
def test_cuda_varlen_matches_reference(dims, heads, causal, window, divergence, dtype):
    if dtype == torch.float16 and (divergence == "reverse" or heads[0] != 2):
        pytest.skip("fp16 is covered on the forward-KL MHA cases")
    seed = seed_of("cuda-varlen", dims, heads, causal, window, divergence, dtype)
    tensors, layout = _inputs(RAGGED, heads, dims, dtype, seed)
    kwargs = dict(causal=causal, window_size=window, divergence=divergence)
    out = streamkl.attention_kl_varlen(*tensors, *layout, **kwargs)
    assert out.shape == (sum(n for n, _ in RAGGED), heads[0]) and out.dtype == torch.float32
    assert out.device.type == DEVICE
    grad_out = upstream_grad(tuple(out.shape), seed, device=DEVICE)
    grads = _grads(out, tensors, grad_out)
    for g, x in zip(grads, tensors):
        assert g is None or (g.dtype == dtype and g.shape == x.shape)
    ref, ref_grads = varlen_reference_grads(tensors, layout, grad_out, **kwargs)
    assert_rel_close(out, ref, FWD_TOL)
    assert_grads_close(grads, ref_grads, GRAD_TOL)
    # The sequence without keys gives exactly 0 and zero query gradients; the one without queries gives its keys
    # zero gradients (never NaN, never another sequence's values).
    cu_q, cu_k = layout[0].tolist(), layout[1].tolist()
    no_keys, no_queries = RAGGED.index((5, 0)), RAGGED.index((0, 9))
    rows, keys = _sequence_rows(cu_q, no_keys), _sequence_rows(cu_k, no_queries)
    assert (out[rows] == 0).all()
    assert all((g[rows] == 0).all() for g in grads[0::2] if g is not None)
    assert all((g[keys] == 0).all() for g in grads[1::2] if g is not None)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dims", [DIMS[0], DIMS[2]])
def test_cuda_varlen_equals_padded_per_sequence(monkeypatch, dims, heads, causal, window, divergence):
    """The same kernels, located per sequence: packing changes no bit of the result or of the gradients. Split streams
    off: the launchers pick the split from the grid, which packing changes (and with it the summation order)."""
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", "1")
    seed = seed_of("cuda-varlen-per-seq", dims, heads, causal, window, divergence)
    tensors, layout = _inputs(RAGGED, heads, dims, torch.bfloat16, seed)
    kwargs = dict(causal=causal, window_size=window, divergence=divergence)
    out = streamkl.attention_kl_varlen(*tensors, *layout, **kwargs)
    grad_out = upstream_grad(tuple(out.shape), seed, device=DEVICE)
    grads = _grads(out, tensors, grad_out)
    cu_q, cu_k = layout[0].tolist(), layout[1].tolist()
    for b in range(len(RAGGED)):
        rows, keys = _sequence_rows(cu_q, b), _sequence_rows(cu_k, b)
        # [n, H, D] slices as [1, H, n, D] views: the padded op reads the packed memory in place.
        seq = [x.detach()[sl].transpose(0, 1).unsqueeze(0).requires_grad_(x.requires_grad)
               for x, sl in zip(tensors, (rows, keys, rows, keys))]
        padded = streamkl.attention_kl(*seq, **kwargs)
        assert torch.equal(out[rows], padded[0].transpose(0, 1)), f"sequence {b}: divergence differs"
        padded_grads = _grads(padded, seq, grad_out[rows].transpose(0, 1).unsqueeze(0))
        for name, g, pg, sl in zip(("q_s", "k_s", "q_t", "k_t"), grads, padded_grads, (rows, keys, rows, keys)):
            if g is None:
                assert pg is None
                continue
            assert torch.equal(g[sl], pg[0].transpose(0, 1)), f"sequence {b}: {name}.grad differs"


def test_cuda_varlen_loose_max_seqlen(monkeypatch):
    """max_seqlen above the longest sequence only adds blocks that return at once (split streams off: a larger grid
    may split differently)."""
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", "1")
    seed = seed_of("cuda-varlen-max")
    tensors, layout = _inputs(RAGGED, (4, 2, 2), (64, 64), torch.bfloat16, seed)
    exact = streamkl.attention_kl_varlen(*tensors, *layout, causal=True)
    loose = streamkl.attention_kl_varlen(*tensors, *layout[:2], layout[2] + 300, layout[3] + 500, causal=True)
    assert torch.equal(exact, loose)
    grad_out = upstream_grad(tuple(exact.shape), seed, device=DEVICE)
    for g_exact, g_loose in zip(_grads(exact, tensors, grad_out), _grads(loose, tensors, grad_out)):
        assert torch.equal(g_exact, g_loose)


def test_cuda_varlen_strided_inputs():
    """q/k sliced out of a packed [total, 2, H, D] buffer (row stride 2 * H * D) read in place, same results."""
    seed = seed_of("cuda-varlen-strided")
    tensors, layout = _inputs(RAGGED, (2, 2, 2), (64, 128), torch.bfloat16, seed)
    views = []
    for x in tensors:
        buffer = torch.zeros(x.shape[0], 2, *x.shape[1:], dtype=x.dtype, device=DEVICE)
        buffer[:, 1] = x.detach()
        views.append(buffer[:, 1].requires_grad_())
    out = streamkl.attention_kl_varlen(*views, *layout, causal=True)
    expected = streamkl.attention_kl_varlen(*tensors, *layout, causal=True)
    assert torch.equal(out, expected)
    grad_out = upstream_grad(tuple(out.shape), seed, device=DEVICE)
    for g, e in zip(_grads(out, views, grad_out), _grads(expected, tensors, grad_out)):
        assert torch.equal(g, e)


@pytest.mark.parametrize("lengths", [pytest.param([(0, 5), (0, 3)], id="no-queries"),
                                     pytest.param([(3, 0), (4, 0)], id="no-keys"),
                                     pytest.param([], id="no-sequences")])
def test_cuda_varlen_empty(lengths):
    tensors, layout = _inputs(lengths, (2, 2, 2), (64, 64), torch.bfloat16, seed_of("cuda-varlen-empty", lengths))
    out = streamkl.attention_kl_varlen(*tensors, *layout, causal=True)
    assert out.shape == (sum(n for n, _ in lengths), 2) and (out == 0).all()
    loss = streamkl.attention_kl_varlen(*tensors, *layout, causal=True, reduction="sum")
    grads = torch.autograd.grad(loss, tensors)
    assert all(g.shape == x.shape and (g == 0).all() for g, x in zip(grads, tensors))


def test_cuda_varlen_teacher_grads_need_same_grouping():
    """Refused in Python (NotImplementedError) before the op runs; the gqa-mqa cases above run student-only."""
    tensors, layout = _inputs(RAGGED, (4, 2, 1), (64, 64), torch.bfloat16, seed_of("cuda-varlen-refuse"),
                              teacher_grad=True)
    with pytest.raises(NotImplementedError, match="key heads"):
        streamkl.attention_kl_varlen(*tensors, *layout).sum().backward()


OP_CASES = [  # (lengths, heads, dims, causal, divergence, window, dtype)
    pytest.param(RAGGED, (4, 2, 2), (64, 128), True, "reverse", (30, -1), torch.bfloat16, id="gqa-causal-reverse"),
    pytest.param([(100, 257), (1, 1), (0, 3), (64, 32)], (2, 2, 2), (128, 64), False, "forward", (-1, -1),
                 torch.float16, id="mha-full-forward-fp16"),
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "requires-grad"])
@pytest.mark.parametrize("lengths,heads,dims,causal,divergence,window,dtype", OP_CASES)
def test_cuda_varlen_opcheck_fwd(lengths, heads, dims, causal, divergence, window, dtype, requires_grad):
    tensors, layout = _inputs(lengths, heads, dims, dtype, seed_of("cuda-varlen-opcheck-fwd", heads, requires_grad))
    tensors = [x.detach().requires_grad_(requires_grad) for x in tensors]
    torch.library.opcheck(fwd_op.default, (*tensors, *layout, 0.125, 0.09, causal, divergence, *window))


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
@pytest.mark.parametrize("lengths,heads,dims,causal,divergence,window,dtype", OP_CASES)
def test_cuda_varlen_opcheck_bwd(lengths, heads, dims, causal, divergence, window, dtype, teacher_grad):
    seed = seed_of("cuda-varlen-opcheck-bwd", heads, teacher_grad)
    tensors, layout = _inputs(lengths, heads, dims, dtype, seed)
    detached = [x.detach() for x in tensors]
    kl, lse_s, lse_t, stats = fwd_op(*detached, *layout, 0.125, 0.09, causal, divergence, *window)
    assert stats.shape == (0,)
    grad_kl = upstream_grad(tuple(kl.shape), seed, device=DEVICE)
    torch.library.opcheck(bwd_op.default, (grad_kl, *detached, *layout, kl, lse_s, lse_t, stats, 0.125, 0.09, causal,
                                           divergence, teacher_grad, *window))


@pytest.mark.parametrize("causal,divergence", [(False, "forward"), (True, "reverse")])
def test_cuda_varlen_compile_fullgraph(causal, divergence):
    tensors, layout = _inputs(RAGGED, (4, 2, 2), (64, 128), torch.bfloat16,
                              seed_of("cuda-varlen-compile", causal, divergence))
    cu_q, cu_k, max_q, max_k = layout

    def loss_fn(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k):
        return streamkl.attention_kl_varlen(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_q, max_k,
                                            causal=causal, divergence=divergence, window_size=(50, -1),
                                            reduction="mean")

    assert_compile_matches_eager(loss_fn, tensors, cu_q, cu_k)

"""Sliding-window attention KL (FlashAttention window semantics, bottom-right aligned) on the CPU.

Values and gradients against the float64 reference, gradcheck, opcheck with a window, rows that see no key,
bad windows. The CUDA kernels' windows are tested in test_attention_cuda_features.py.
"""

import pytest
import torch

import streamkl
from helpers import (assert_grads_close, assert_rel_close, make_inputs, reference_grads, seed_of, upstream_grad)
from streamkl.reference import attention_mask

fwd_op = torch.ops.streamkl.attention_kl_fwd
bwd_op = torch.ops.streamkl.attention_kl_bwd

# (N_q, N_k): tiles of 32 rows x 64 keys, so ragged and unequal lengths cross tile edges.
SHAPES = [(70, 70), (37, 130), (130, 37), (65, 200)]
WINDOWS = [(1, 0), (5, -1), (-1, 7), (16, 3), (100, 100), (0, -1), (0, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"nq{s[0]}-nk{s[1]}")
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"win{w[0]}_{w[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_window_matches_reference(shape, window, causal, divergence):
    nq, nk = shape
    seed = seed_of("window", shape, window, causal, divergence)
    inputs = make_inputs(2, 2, nq, nk, 16, 24, seed=seed, dtype=torch.float64, requires_grad=True)
    grad_out = upstream_grad((2, 2, nq), seed, dtype=torch.float64)
    kwargs = dict(causal=causal, window_size=window, divergence=divergence)
    out = streamkl.attention_kl(*inputs, **kwargs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref, ref_grads = reference_grads(inputs, grad_out, **kwargs)
    if ref.abs().max() < 1e-12:  # every row sees at most one key (e.g. causal + left 0): exact zeros
        assert out.abs().max() < 1e-12 and all(g.abs().max() < 1e-12 for g in grads)
        return
    assert_rel_close(out, ref, 1e-10)
    assert_grads_close(grads, ref_grads, 1e-9)


@pytest.mark.parametrize("window", [(2, 1), (3, 2)], ids=lambda w: f"win{w[0]}_{w[1]}")
def test_window_float32(window):
    inputs = make_inputs(1, 3, 100, 90, 32, 32, seed=seed_of("window32", window))
    out = streamkl.attention_kl(*inputs, window_size=window)
    ref = streamkl.attention_kl_reference(*inputs, window_size=window)
    assert out.dtype == torch.float32
    assert_rel_close(out, ref, 1e-4)


def test_window_rows_without_keys_are_zero():
    """N_q > N_k with a one-sided window: the first rows see no key, give 0 and receive zero gradient."""
    inputs = make_inputs(1, 1, 12, 4, 8, 8, seed=seed_of("window-empty"), dtype=torch.float64, requires_grad=True)
    out = streamkl.attention_kl(*inputs, window_size=(0, 0))
    empty = ~attention_mask(12, 4, "cpu", window_size=(0, 0)).any(-1)
    assert empty.any() and not empty.all()
    assert torch.all(out[0, 0, empty] == 0)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert torch.all(grads[0][0, 0, empty] == 0) and torch.all(grads[2][0, 0, empty] == 0)
    assert all(torch.isfinite(g).all() for g in grads)


def test_single_key_window_is_zero():
    """window (0, 0) with N_q == N_k: each row sees exactly its diagonal key, so the divergence is 0 up to
    rounding (relative errors are meaningless there, so this is checked on its own)."""
    inputs = make_inputs(1, 2, 70, 70, 8, 8, seed=seed_of("window-diag"), dtype=torch.float64, requires_grad=True)
    out = streamkl.attention_kl(*inputs, window_size=(0, 0))
    assert out.abs().max() < 1e-12
    assert all(g.abs().max() < 1e-12 for g in torch.autograd.grad(out.sum(), inputs))


def test_window_wider_than_sequence_equals_no_window():
    inputs = make_inputs(1, 2, 50, 60, 8, 8, seed=seed_of("window-wide"), dtype=torch.float64)
    wide = streamkl.attention_kl(*inputs, window_size=(1000, 1000))
    none = streamkl.attention_kl(*inputs)
    assert torch.equal(wide, none)


@pytest.mark.parametrize("window", [(2, 3), (4, -1)], ids=lambda w: f"win{w[0]}_{w[1]}")
def test_window_gradcheck(window):
    inputs = make_inputs(1, 1, 6, 9, 4, 5, seed=seed_of("window-gc", window), dtype=torch.float64,
                         requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: streamkl.attention_kl(*x, window_size=window), inputs)


def test_window_opcheck():
    inputs = make_inputs(1, 2, 40, 70, 8, 16, seed=seed_of("window-opcheck"), requires_grad=True)
    torch.library.opcheck(fwd_op, (*inputs, 0.3, 0.25, True, "forward", 5, -1))
    kl, lse_s, lse_t = fwd_op(*[x.detach() for x in inputs], 0.3, 0.25, True, "forward", 5, -1)
    g = upstream_grad(tuple(kl.shape), seed_of("window-opcheck-g"))
    torch.library.opcheck(bwd_op, (g, *[x.detach() for x in inputs], kl, lse_s, lse_t, 0.3, 0.25, True,
                                   "forward", True, 5, -1))


def test_window_compile_fullgraph():
    inputs = make_inputs(1, 2, 33, 47, 8, 8, seed=seed_of("window-compile"), requires_grad=True)

    def loss(*x):
        return streamkl.attention_kl(*x, window_size=(4, 2), reduction="mean")

    eager = loss(*inputs)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(*inputs)
    compiled_grads = torch.autograd.grad(compiled, inputs)
    assert_rel_close(compiled, eager, 1e-6)
    assert_grads_close(compiled_grads, eager_grads, 1e-6)


def test_window_module():
    inputs = make_inputs(1, 1, 20, 20, 8, 8, seed=seed_of("window-module"))
    loss = streamkl.AttentionKLLoss(window_size=(3, 0), reduction="sum")
    assert "window_size=(3, 0)" in repr(loss)
    assert torch.allclose(loss(*inputs), streamkl.attention_kl(*inputs, window_size=(3, 0)).sum())


@pytest.mark.parametrize("window", [(-2, 0), (0, -5), (1,), (1, 2, 3), (1.5, 2), "ab", None, (True, 1)],
                         ids=repr)
def test_bad_window(window):
    inputs = make_inputs(1, 1, 4, 4, 8, 8, seed=seed_of("window-bad"))
    with pytest.raises(ValueError, match="window_size"):
        streamkl.attention_kl(*inputs, window_size=window)


@pytest.mark.parametrize("window", [(-2, 0), (0, -3)], ids=repr)
def test_bad_window_raw_op(window):
    inputs = make_inputs(1, 1, 4, 4, 8, 8, seed=seed_of("window-bad-op"))
    with pytest.raises(ValueError, match="window_size"):
        fwd_op(*inputs, 0.5, 0.5, False, "forward", *window)

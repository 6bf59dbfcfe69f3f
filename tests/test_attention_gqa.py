"""GQA / MQA on each side independently (CPU): contiguous groups of query heads share a key head, dK is
summed over the group without copying keys. Values and gradients against the float64 reference."""

import pytest
import torch

import streamkl
from helpers import assert_grads_close, assert_rel_close, gqa_inputs, reference_grads, seed_of, upstream_grad

fwd_op = torch.ops.streamkl.attention_kl_fwd
bwd_op = torch.ops.streamkl.attention_kl_bwd


# (H, H_kv student, H_kv teacher): GQA, MQA, mixed (one side grouped, the other not).
HEADS = [(4, 2, 2), (4, 1, 1), (6, 3, 6), (6, 6, 2), (8, 4, 1)]


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}-kvs{h[1]}-kvt{h[2]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("shape", [(37, 70), (70, 37)], ids=lambda s: f"nq{s[0]}-nk{s[1]}")
def test_gqa_matches_reference(heads, causal, divergence, shape):
    H, kv_s, kv_t = heads
    seed = seed_of("gqa", heads, causal, divergence, shape)
    inputs = gqa_inputs(2, H, kv_s, kv_t, shape[0], shape[1], 8, 12, seed=seed)
    grad_out = upstream_grad((2, H, shape[0]), seed, dtype=torch.float64)
    kwargs = dict(causal=causal, divergence=divergence)
    out = streamkl.attention_kl(*inputs, **kwargs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref, ref_grads = reference_grads(inputs, grad_out, **kwargs)
    assert_rel_close(out, ref, 1e-10)
    assert_grads_close(grads, ref_grads, 1e-9)
    assert grads[1].shape == inputs[1].shape and grads[3].shape == inputs[3].shape


def test_gqa_equals_repeated_keys():
    """Sharing a key head gives exactly what repeating it per query head gives, and dK is the group sum."""
    q_s, k_s, q_t, k_t = gqa_inputs(1, 4, 2, 1, 20, 30, 8, 8, seed=seed_of("gqa-repeat"), dtype=torch.float32)
    out = streamkl.attention_kl(q_s, k_s, q_t, k_t)
    k_s_rep = k_s.detach().repeat_interleave(2, dim=1).requires_grad_(True)
    k_t_rep = k_t.detach().repeat_interleave(4, dim=1).requires_grad_(True)
    out_rep = streamkl.attention_kl(q_s, k_s_rep, q_t, k_t_rep)
    assert_rel_close(out, out_rep, 1e-6)
    g = torch.autograd.grad(out.sum(), (k_s, k_t))
    g_rep = torch.autograd.grad(out_rep.sum(), (k_s_rep, k_t_rep))
    assert_rel_close(g[0], g_rep[0].view(1, 2, 2, 30, 8).sum(2), 1e-5, "dk_s")
    assert_rel_close(g[1], g_rep[1].sum(1, keepdim=True), 1e-5, "dk_t")


def test_gqa_gradcheck():
    inputs = gqa_inputs(1, 4, 2, 1, 5, 7, 3, 4, seed=seed_of("gqa-gc"))
    assert torch.autograd.gradcheck(lambda *x: streamkl.attention_kl(*x, causal=True), inputs)


def test_gqa_student_only_grads():
    q_s, k_s, q_t, k_t = gqa_inputs(1, 6, 3, 2, 15, 25, 8, 8, seed=seed_of("gqa-student"), requires_grad=False)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    grad_out = upstream_grad((1, 6, 15), seed_of("gqa-student"), dtype=torch.float64)
    out = streamkl.attention_kl(q_s, k_s, q_t, k_t)
    grads = torch.autograd.grad(out, (q_s, k_s), grad_out)
    _, ref_grads = reference_grads([q_s, k_s, q_t, k_t], grad_out)
    assert_grads_close(list(grads) + [None, None], ref_grads, 1e-9)


def test_gqa_opcheck():
    inputs = gqa_inputs(1, 4, 2, 1, 16, 24, 8, 8, seed=seed_of("gqa-opcheck"), dtype=torch.float32)
    torch.library.opcheck(fwd_op, (*inputs, 0.3, 0.25, True, "forward"))
    detached = [x.detach() for x in inputs]
    kl, lse_s, lse_t = fwd_op(*detached, 0.3, 0.25, True, "forward")
    g = upstream_grad(tuple(kl.shape), seed_of("gqa-opcheck-g"))
    torch.library.opcheck(bwd_op, (g, *detached, kl, lse_s, lse_t, 0.3, 0.25, True, "forward", True))


@pytest.mark.parametrize("kv", [(3, 4), (4, 3), (0, 4)], ids=lambda kv: f"kvs{kv[0]}-kvt{kv[1]}")
def test_gqa_heads_must_divide(kv):
    inputs = gqa_inputs(1, 4, kv[0], kv[1], 5, 6, 8, 8, seed=seed_of("gqa-bad", kv), requires_grad=False)
    name = "k_s" if 4 % max(kv[0], 1) or kv[0] == 0 else "k_t"
    with pytest.raises(ValueError, match=name):
        streamkl.attention_kl(*inputs)
    with pytest.raises(ValueError, match=name):
        fwd_op(*inputs, 0.5, 0.5, False, "forward")

"""One generalized-JSD convention for the whole library (TRL / Liger):
    0 < beta < 1:  beta KL(P_t || M) + (1 - beta) KL(P_s || M),  M = beta P_t + (1 - beta) P_s
    beta = 0 / 1:  forward KL(P_t || P_s) / reverse KL(P_s || P_t).
attention_kl, attention_kl_varlen and linear_kl must give the same numbers for the same logits: checked against
a value computed by hand, and against each other (with gradients) on logits that both APIs reproduce exactly."""

import math

import pytest
import torch

import streamkl
from helpers import assert_grads_close, assert_rel_close, randn, seed_of, upstream_grad

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

BETAS = [0.0, 0.2, 0.5, 0.85, 1.0]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _by_hand(beta):
    """One row with two keys: teacher scores (0, log 3) -> P_t = (1/4, 3/4); student scores (0, 0) -> P_s = (1/2, 1/2)."""
    p_t, p_s = (0.25, 0.75), (0.5, 0.5)
    if beta == 0:
        return _kl(p_t, p_s)
    if beta == 1:
        return _kl(p_s, p_t)
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)


# Queries (student 0, teacher 1) against keys (0, log 3) with scale 1 give exactly those scores, on every API.
_KEYS = torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64)
_Q_S, _Q_T = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)


@pytest.mark.parametrize("beta", BETAS)
def test_every_api_matches_the_convention_by_hand(beta):
    want = torch.tensor(_by_hand(beta), dtype=torch.float64)
    padded = [x.view(1, 1, *x.shape) for x in (_Q_S, _KEYS, _Q_T, _KEYS)]
    attention = streamkl.attention_kl(*padded, scale_s=1.0, scale_t=1.0, divergence="jsd", beta=beta)
    packed = [x.unsqueeze(1) for x in (_Q_S, _KEYS, _Q_T, _KEYS)]  # [total, H = 1, D = 1]
    cu_q, cu_k = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    varlen = streamkl.attention_kl_varlen(*packed, cu_q, cu_k, 1, 2, scale_s=1.0, scale_t=1.0, divergence="jsd",
                                          beta=beta)
    linear = streamkl.linear_kl(_Q_S, _KEYS, _Q_T, _KEYS, divergence="jsd", beta=beta, reduction="none")
    reference = streamkl.attention_kl_reference(*padded, scale_s=1.0, scale_t=1.0, divergence="jsd", beta=beta)
    for name, got in (("attention_kl", attention), ("attention_kl_varlen", varlen), ("linear_kl", linear),
                      ("attention_kl_reference", reference)):
        assert_rel_close(got.reshape(()), want, 1e-13, name)


def _same_logits(T, V, *, seed):
    """Student / teacher logits [T, V] and each API's inputs that reproduce them exactly: identity keys (scale 1)
    for attention, identity output embeddings for linear_kl."""
    g = torch.Generator().manual_seed(seed)
    z_s = randn((T, V), g, dtype=torch.float64, scale=3.0).requires_grad_()
    z_t = randn((T, V), g, dtype=torch.float64, scale=3.0).requires_grad_()
    return z_s, z_t, torch.eye(V, dtype=torch.float64)


@pytest.mark.parametrize("beta", BETAS)
def test_attention_and_linear_jsd_agree(beta):
    """Same logits through attention_kl (rows = queries, keys = identity) and linear_kl (hidden states = logits,
    embedding = identity): same values and gradients, and both equal the float64 materializing reference."""
    T, V = 37, 100  # two 32-row blocks, a full and a partial 64-key tile
    seed = seed_of("jsd-attention-vs-linear", beta)
    z_s, z_t, eye = _same_logits(T, V, seed=seed)
    grad_out = upstream_grad((T,), seed, dtype=torch.float64)

    attention = streamkl.attention_kl(z_s[None, None], eye[None, None], z_t[None, None], eye[None, None],
                                      scale_s=1.0, scale_t=1.0, divergence="jsd", beta=beta)[0, 0]
    linear = streamkl.linear_kl(z_s, eye, z_t, eye, divergence="jsd", beta=beta, reduction="none")
    reference = streamkl.reference.kl_from_scores(z_s, z_t, divergence="jsd", beta=beta)
    grads = [torch.autograd.grad(out, (z_s, z_t), grad_out) for out in (attention, linear, reference)]

    assert_rel_close(attention, linear, 1e-12, "attention vs linear_kl")
    assert_grads_close(grads[0], grads[1], 1e-11, names=("z_s", "z_t"))
    for name, out, got in (("attention", attention, grads[0]), ("linear_kl", linear, grads[1])):
        assert_rel_close(out, reference, 1e-12, f"{name} vs reference")
        assert_grads_close(got, grads[2], 1e-10, names=(f"{name} z_s", f"{name} z_t"))


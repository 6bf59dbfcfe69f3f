"""Autograd of streamkl.linear_kl: float64 gradcheck (every divergence, biases, teacher grads, CE term, ignored
rows) and which inputs receive gradients."""

import pytest
import torch

import streamkl
from helpers import seed_of
from linear_helpers import make_labels, make_linear_inputs


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
@pytest.mark.parametrize("bias", [(False, False), (True, True)], ids=["no-bias", "bias"])
@pytest.mark.parametrize("divergence,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.35)])
def test_gradcheck(divergence, beta, bias, teacher_grad):
    inputs = make_linear_inputs((5,), 7, 3, 4, seed=seed_of("linear-gradcheck", divergence, bias, teacher_grad),
                                dtype=torch.float64, bias=bias, teacher_requires_grad=teacher_grad)
    present = [t for t in inputs if t is not None]
    has_b = bias[0]

    def fn(*tensors):
        it = iter(tensors)
        x_s, w_s = next(it), next(it)
        b_s = next(it) if has_b else None
        x_t, w_t = next(it), next(it)
        b_t = next(it) if has_b else None
        return streamkl.linear_kl(x_s, w_s, x_t, w_t, b_s=b_s, b_t=b_t, divergence=divergence, beta=beta,
                                  temperature=1.3, reduction="none")

    assert torch.autograd.gradcheck(fn, present, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_gradcheck_mean_with_ce_and_ignored_rows(divergence):
    """reduction="mean" (a stride-0 upstream gradient), a CE term and ignored rows."""
    inputs = make_linear_inputs((2, 3), 6, 3, 2, seed=seed_of("linear-gradcheck-ce", divergence),
                                dtype=torch.float64, teacher_requires_grad=True)
    labels = make_labels((2, 3), 6, seed=5, ignore_every=4)
    x_s, w_s, _, x_t, w_t, _ = inputs
    fn = lambda *t: streamkl.linear_kl(*t, divergence=divergence, labels=labels, ce_weight=0.6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x_s, w_s, x_t, w_t), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_only_where_required():
    x_s, w_s, b_s, x_t, w_t, b_t = make_linear_inputs((9,), 20, 4, 6, seed=seed_of("which-grads"), bias=(True, True))
    w_s.requires_grad_(False)
    streamkl.linear_kl(x_s, w_s, x_t, w_t, b_s=b_s, b_t=b_t).backward()
    assert x_s.grad is not None and b_s.grad is not None
    assert w_s.grad is None and x_t.grad is None and w_t.grad is None and b_t.grad is None

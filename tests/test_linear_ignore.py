"""ignore_index: ignored rows contribute nothing anywhere, and "mean" divides by the valid rows of the whole call."""

import pytest
import torch

import streamkl
from helpers import assert_grads_close, assert_rel_close, seed_of
from linear_helpers import NAMES, call, make_labels, make_linear_inputs, ours_and_grads, reference_and_grads

DIVERGENCES = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.4)]


def _spread_labels(T, V, seed, ignore_index=-100):
    """Ignored rows scattered over every 32-row token block, plus one token block ignored entirely."""
    labels = make_labels((T,), V, seed=seed, ignore_every=7, ignore_index=ignore_index)
    labels[32:64] = ignore_index
    return labels


@pytest.mark.parametrize("ce_weight", [0.0, 0.5], ids=["kl", "kl+ce"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_global_mean_over_valid_rows(divergence, beta, ce_weight):
    T, V = 130, 150
    seed = seed_of("ignore-global", divergence, ce_weight)
    inputs = make_linear_inputs((T,), V, 12, 20, seed=seed, dtype=torch.float64, bias=(True, True),
                                teacher_requires_grad=True)
    labels = _spread_labels(T, V, seed)
    kwargs = dict(divergence=divergence, beta=beta, labels=labels, ce_weight=ce_weight)
    out, grads = ours_and_grads(inputs, **kwargs)
    ref, ref_grads = reference_and_grads(inputs, **kwargs)
    assert_rel_close(out, ref, 1e-12)
    assert_grads_close(grads, ref_grads, 1e-11, names=NAMES)
    # The normalizer is the count of valid rows of the whole call, not of any chunk or block.
    rows = call(streamkl.linear_kl, inputs, reduction="none", **kwargs)
    valid = labels != -100
    torch.testing.assert_close(out, rows.sum() / valid.sum(), rtol=1e-14, atol=0)


def test_ignored_rows_get_zero_loss_and_gradient():
    T, V = 100, 90
    seed = seed_of("ignore-zero")
    inputs = make_linear_inputs((T,), V, 8, 8, seed=seed, teacher_requires_grad=True)
    labels = _spread_labels(T, V, seed)
    out, grads = ours_and_grads(inputs, labels=labels, reduction="none", ce_weight=1.0)
    ignored = labels == -100
    assert (out[ignored] == 0).all() and (out[~ignored] > 0).all()
    assert (grads[0][ignored] == 0).all() and (grads[3][ignored] == 0).all()
    assert (grads[0][~ignored].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_all_rows_ignored(divergence, beta):
    """No valid row: mean is 0 (not NaN) and every gradient is exactly 0."""
    inputs = make_linear_inputs((40,), 70, 8, 8, seed=seed_of("ignore-all", divergence), bias=(True, True),
                                teacher_requires_grad=True)
    labels = torch.full((40,), -100)
    out, grads = ours_and_grads(inputs, divergence=divergence, beta=beta, labels=labels, ce_weight=1.0)
    assert out.item() == 0
    for g in grads:
        assert g is not None and (g == 0).all()


def test_custom_ignore_index_and_int32_labels():
    T, V = 50, 60
    seed = seed_of("ignore-custom")
    inputs = make_linear_inputs((5, 10), V, 8, 12, seed=seed, dtype=torch.float64)
    labels = make_labels((5, 10), V, seed=seed, ignore_every=3, ignore_index=-1).to(torch.int32)
    out, grads = ours_and_grads(inputs, labels=labels, ignore_index=-1)
    ref, ref_grads = reference_and_grads(inputs, labels=labels.long(), ignore_index=-1)
    assert_rel_close(out, ref, 1e-12)
    assert_grads_close(grads, ref_grads, 1e-11, names=NAMES)


def test_labels_without_ignored_rows_change_nothing():
    inputs = make_linear_inputs((33,), 64, 8, 8, seed=seed_of("ignore-none"), dtype=torch.float64)
    labels = make_labels((33,), 64, seed=1)
    assert torch.equal(call(streamkl.linear_kl, inputs, labels=labels), call(streamkl.linear_kl, inputs))

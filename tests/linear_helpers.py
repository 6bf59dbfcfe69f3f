"""Input factories and reference gradients for the linear_kl (hidden-state logit distillation) tests."""

import torch

import streamkl
from helpers import randn

NAMES = ("x_s", "w_s", "b_s", "x_t", "w_t", "b_t")


def make_linear_inputs(lead, V, Ds, Dt, *, seed, dtype=torch.float32, device="cpu", bias=(False, False),
                       requires_grad=True, teacher_requires_grad=False, logit_scale=3.0):
    """Random (x_s, w_s, b_s, x_t, w_t, b_t): x_* [*lead, D_*], w_* [V, D_*], b_* [V] or None.

    Weights are scaled by ``logit_scale / sqrt(D)`` so logits have standard deviation ~``logit_scale``
    (LM-like peaked rows, far from uniform).
    """
    g = torch.Generator().manual_seed(seed)
    lead = tuple(lead)
    out = []
    for dim, has_bias, grad in ((Ds, bias[0], requires_grad), (Dt, bias[1], teacher_requires_grad)):
        x = randn(lead + (dim,), g, dtype=dtype, device=device)
        w = randn((V, dim), g, dtype=dtype, device=device, scale=logit_scale / dim ** 0.5)
        b = randn((V,), g, dtype=dtype, device=device) if has_bias else None
        for t in (x, w, b):
            if t is not None:
                t.requires_grad_(grad)
        out += [x, w, b]
    return tuple(out)


def make_labels(lead, V, *, seed, ignore_every=0, ignore_index=-100, device="cpu"):
    """Random labels in [0, V); every ``ignore_every``-th row (flattened) set to ``ignore_index``."""
    g = torch.Generator().manual_seed(seed + 7)
    labels = torch.randint(0, V, tuple(lead), generator=g)
    if ignore_every:
        labels.view(-1)[::ignore_every] = ignore_index
    return labels.to(device)


def call(fn, inputs, **kwargs):
    """``fn(x_s, w_s, x_t, w_t, b_s=..., b_t=..., **kwargs)`` from the 6-tuple of make_linear_inputs."""
    x_s, w_s, b_s, x_t, w_t, b_t = inputs
    return fn(x_s, w_s, x_t, w_t, b_s=b_s, b_t=b_t, **kwargs)


def output_and_grads(fn, inputs, grad_out=None, *, dtype=None, **kwargs):
    """``fn``'s output on leaf copies of ``inputs`` (cast to ``dtype`` if given) and its gradients w.r.t. the
    inputs that require grad (None for the others), for the upstream gradient ``grad_out`` (default ones)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)
              for t in inputs]
    out = call(fn, leaves, **kwargs)
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    if not wrt:
        return out.detach(), [None] * len(leaves)
    grad_out = torch.ones_like(out) if grad_out is None else grad_out.to(out.dtype)
    grads = iter(torch.autograd.grad(out, wrt, grad_out))
    return out.detach(), [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def reference_and_grads(inputs, grad_out=None, **kwargs):
    """The float64 reference's output and gradients (see output_and_grads)."""
    return output_and_grads(streamkl.linear_kl_reference, inputs, grad_out, dtype=torch.float64, **kwargs)


def ours_and_grads(inputs, grad_out=None, **kwargs):
    """streamkl.linear_kl's output and gradients (see output_and_grads)."""
    return output_and_grads(streamkl.linear_kl, inputs, grad_out, **kwargs)

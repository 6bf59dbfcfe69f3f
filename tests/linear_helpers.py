"""Input factories and reference gradients for the linear_kl (hidden-state logit distillation) tests."""

import torch

import streamkl
from helpers import assert_grads_close, assert_rel_close, randn, seed_of

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


def linear_op_args(divergence, beta, dtype, bias, labels, with_ce, *, seed, device="cpu", requires_grad=False):
    """Arguments of ``torch.ops.streamkl.linear_kl_fwd`` for opcheck: T = 37, V = 70, D_s = 8, D_t = 16."""
    x_s, w_s, b_s, x_t, w_t, b_t = make_linear_inputs((37,), 70, 8, 16, seed=seed, dtype=dtype, device=device,
                                                      bias=(bias, bias), requires_grad=requires_grad)
    lab = make_labels((37,), 70, seed=seed, ignore_every=5, device=device) if labels else None
    return (x_s, w_s, b_s, x_t, w_t, b_t, lab, 1.0, divergence, beta, -100, with_ce)


def compile_loss_fn(x_s, w_s, b_s, x_t, w_t, b_t, labels, *, divergence):
    """The loss that the torch.compile tests compile: every option that changes the graph around the op."""
    return streamkl.linear_kl(x_s, w_s, x_t, w_t, b_s=b_s, b_t=b_t, labels=labels, divergence=divergence, beta=0.3,
                              ce_weight=0.5, scale_by_temperature_sq=True)


def compile_and_compare(backend, divergence, dtype, teacher_grad, tol, *, device="cpu"):
    """torch.compile(fullgraph=True) of compile_loss_fn, forward and backward, against eager on fresh inputs."""
    seed = seed_of("linear-compile", backend, divergence, dtype, teacher_grad, device)
    inputs = make_linear_inputs((3, 13), 90, 8, 16, seed=seed, dtype=dtype, device=device, bias=(True, True),
                                teacher_requires_grad=teacher_grad)
    labels = make_labels((3, 13), 90, seed=seed, ignore_every=4, device=device)
    eager_inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    torch._dynamo.reset()
    compiled = torch.compile(compile_loss_fn, fullgraph=True, backend=backend, dynamic=False)
    loss = compiled(*inputs, labels, divergence=divergence)
    loss.backward()
    eager = compile_loss_fn(*eager_inputs, labels, divergence=divergence)
    eager.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert_rel_close(loss, eager, tol, "compiled loss")
    wanted = [t for t in inputs if t.requires_grad]
    assert_grads_close([t.grad for t in wanted], [t.grad for t in eager_inputs if t.requires_grad], tol,
                       names=[f"input{i}" for i in range(len(wanted))])

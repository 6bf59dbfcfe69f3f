"""Fake (meta) kernels and autograd for ``torch.ops.streamkl.linear_kl_fwd`` / ``linear_kl_bwd``.

The schemas live in C++ (``csrc/ops/linear_schema.cpp``); the backward calls the registered bwd op, so the
whole graph stays traceable by torch.compile.
"""

import torch

from . import _ops  # noqa: F401  (loads the extension)
from ._linear_validation import NUM_STATS, check_linear_options, check_linear_tensors

ops = torch.ops.streamkl

# Output order of linear_kl_bwd, and the index of each input in linear_kl_fwd's argument list.
GRAD_NAMES = ("x_s", "w_s", "b_s", "x_t", "w_t", "b_t")


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_op_args(x_s, w_s, b_s, x_t, w_t, b_t, labels, inv_temperature, divergence, beta, with_ce, where):
    check_linear_tensors(x_s, w_s, x_t, w_t, b_s, b_t, labels, where=where, flat=True)
    if not inv_temperature > 0:
        raise ValueError(f"{where}: inv_temperature must be positive and finite, got {inv_temperature}")
    check_linear_options(1.0 / inv_temperature, divergence, beta, ce_weight=1.0 if with_ce else 0.0,
                         has_labels=labels is not None, where=where)


@torch.library.register_fake("streamkl::linear_kl_fwd")
def _linear_kl_fwd_fake(x_s, w_s, b_s, x_t, w_t, b_t, labels, inv_temperature, divergence, beta, ignore_index,
                        with_ce):
    _check_op_args(x_s, w_s, b_s, x_t, w_t, b_t, labels, inv_temperature, divergence, beta, with_ce,
                   "streamkl::linear_kl_fwd")
    rows = x_s.shape[0]
    loss = x_s.new_empty((rows,), dtype=_stats_dtype(x_s.dtype))
    return loss, torch.empty_like(loss), x_s.new_empty((NUM_STATS, rows), dtype=loss.dtype)


@torch.library.register_fake("streamkl::linear_kl_bwd")
def _linear_kl_bwd_fake(grad_loss, grad_ce, x_s, w_s, b_s, x_t, w_t, b_t, labels, loss, stats, inv_temperature,
                        divergence, beta, ignore_index, with_ce, output_mask):
    where = "streamkl::linear_kl_bwd"
    _check_op_args(x_s, w_s, b_s, x_t, w_t, b_t, labels, inv_temperature, divergence, beta, with_ce, where)
    rows = x_s.shape[0]
    for name, t, shape in (("grad_loss", grad_loss, (rows,)), ("grad_ce", grad_ce, (rows,)), ("loss", loss, (rows,)),
                           ("stats", stats, (NUM_STATS, rows))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    inputs = (x_s, w_s, b_s, x_t, w_t, b_t)
    for name, t, wanted in zip(GRAD_NAMES, inputs, output_mask):
        if wanted and t is None:
            raise ValueError(f"{where}: output_mask asks for d{name} but {name} is None")
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else x_s.new_empty((0,))
                 for t, wanted in zip(inputs, output_mask))


def _setup_context(ctx, inputs, output):
    x_s, w_s, b_s, x_t, w_t, b_t, labels, *options = inputs
    loss, _ce, stats = output
    ctx.save_for_backward(x_s, w_s, b_s, x_t, w_t, b_t, labels, loss, stats)
    ctx.options = tuple(options)  # inv_temperature, divergence, beta, ignore_index, with_ce


def _backward(ctx, grad_loss, grad_ce, _grad_stats):
    x_s, w_s, b_s, x_t, w_t, b_t, labels, loss, stats = ctx.saved_tensors
    inputs = (x_s, w_s, b_s, x_t, w_t, b_t)
    mask = [bool(ctx.needs_input_grad[i]) and t is not None for i, t in enumerate(inputs)]
    grad_loss = torch.zeros_like(loss) if grad_loss is None else grad_loss
    grad_ce = torch.zeros_like(loss) if grad_ce is None else grad_ce
    grads = ops.linear_kl_bwd(grad_loss, grad_ce, x_s, w_s, b_s, x_t, w_t, b_t, labels, loss, stats, *ctx.options,
                              mask)
    return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,) * (1 + len(ctx.options))


torch.library.register_autograd("streamkl::linear_kl_fwd", _backward, setup_context=_setup_context)

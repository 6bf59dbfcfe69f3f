"""Loads the native extension and registers fake (meta) kernels and autograd for ``torch.ops.streamkl``.

The op schemas live in C++ (``csrc/ops/schema.cpp``); this module adds what makes them first-class in
PyTorch: shape propagation for ``torch.compile`` / meta tensors, and a backward that calls another
registered op so the whole graph stays traceable.
"""

import torch

from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
from ._validation import (KL_DIVERGENCES, check_attention_tensors, check_beta, check_options, check_varlen_tensors,
                          check_window)

ops = torch.ops.streamkl


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gradients_like(q_s, k_s, q_t, k_t, teacher_grad):
    """Fake gradient outputs: contiguous like the inputs; the teacher's are [0] without teacher_grad."""
    dq_s = torch.empty_like(q_s, memory_format=torch.contiguous_format)
    dk_s = torch.empty_like(k_s, memory_format=torch.contiguous_format)
    if teacher_grad:
        dq_t = torch.empty_like(q_t, memory_format=torch.contiguous_format)
        dk_t = torch.empty_like(k_t, memory_format=torch.contiguous_format)
    else:
        dq_t, dk_t = q_t.new_empty((0,)), k_t.new_empty((0,))
    return dq_s, dk_s, dq_t, dk_t


def _jsd_stats_like(rows, divergence):
    return rows.new_empty((0,)) if divergence != "jsd" else rows.new_empty((*rows.shape, 4))


def _check_row_tensors(rows_shape, named, *, where):
    for name, t in named:
        if tuple(t.shape) != tuple(rows_shape):
            raise ValueError(f"{where}: {name} must have shape {tuple(rows_shape)} (q_s's shape without its head "
                             f"dim), got {tuple(t.shape)}")


@torch.library.register_fake("streamkl::attention_kl_fwd")
def _attention_kl_fwd_fake(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, divergence, window_left=-1, window_right=-1):
    check_attention_tensors(q_s, k_s, q_t, k_t, where="streamkl::attention_kl_fwd")
    check_options(scale_s, scale_t, divergence, where="streamkl::attention_kl_fwd", divergences=KL_DIVERGENCES)
    check_window((window_left, window_right), where="streamkl::attention_kl_fwd")
    rows = q_s.new_empty(q_s.shape[:3], dtype=_stats_dtype(q_s.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.register_fake("streamkl::attention_kl_bwd")
def _attention_kl_bwd_fake(grad_kl, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, scale_s, scale_t, causal, divergence,
                           teacher_grad, window_left=-1, window_right=-1):
    check_attention_tensors(q_s, k_s, q_t, k_t, where="streamkl::attention_kl_bwd")
    check_options(scale_s, scale_t, divergence, where="streamkl::attention_kl_bwd", divergences=KL_DIVERGENCES)
    check_window((window_left, window_right), where="streamkl::attention_kl_bwd")
    _check_row_tensors(q_s.shape[:3], (("grad_kl", grad_kl), ("kl", kl), ("lse_s", lse_s), ("lse_t", lse_t)),
                       where="streamkl::attention_kl_bwd")
    return _gradients_like(q_s, k_s, q_t, k_t, teacher_grad)


def _attention_kl_setup_context(ctx, inputs, output):
    q_s, k_s, q_t, k_t, scale_s, scale_t, causal, divergence, *window = inputs
    kl, lse_s, lse_t = output
    ctx.save_for_backward(q_s, k_s, q_t, k_t, kl, lse_s, lse_t)
    ctx.options = (scale_s, scale_t, causal, divergence)
    ctx.window = tuple(window) + (-1, -1)[len(window):]  # the schema's defaults when not passed
    ctx.num_options = 4 + len(window)


def _attention_kl_backward(ctx, grad_kl, _grad_lse_s, _grad_lse_t):
    q_s, k_s, q_t, k_t, kl, lse_s, lse_t = ctx.saved_tensors
    scale_s, scale_t, causal, divergence = ctx.options
    teacher_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    dq_s, dk_s, dq_t, dk_t = ops.attention_kl_bwd(grad_kl, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, scale_s, scale_t,
                                                  causal, divergence, teacher_grad, *ctx.window)
    if not teacher_grad:
        dq_t = dk_t = None
    return (dq_s, dk_s, dq_t, dk_t) + (None,) * ctx.num_options


torch.library.register_autograd("streamkl::attention_kl_fwd", _attention_kl_backward,
                                setup_context=_attention_kl_setup_context)


# -------------------------------------------------------------------------------------------- generalized JSD
# Same inputs as the KL ops plus beta; a 4th output holds the per-row statistics the backward needs.

def _check_jsd_op(q_s, k_s, q_t, k_t, scale_s, scale_t, beta, window, *, where):
    check_attention_tensors(q_s, k_s, q_t, k_t, where=where)
    check_options(scale_s, scale_t, "jsd", where=where)
    check_beta(beta, where=where)
    check_window(window, where=where)


@torch.library.register_fake("streamkl::attention_jsd_fwd")
def _attention_jsd_fwd_fake(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, beta, window_left=-1, window_right=-1):
    _check_jsd_op(q_s, k_s, q_t, k_t, scale_s, scale_t, beta, (window_left, window_right),
                  where="streamkl::attention_jsd_fwd")
    rows = q_s.new_empty(q_s.shape[:3], dtype=_stats_dtype(q_s.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows), _jsd_stats_like(rows, "jsd")


@torch.library.register_fake("streamkl::attention_jsd_bwd")
def _attention_jsd_bwd_fake(grad_jsd, q_s, k_s, q_t, k_t, jsd, lse_s, lse_t, jsd_stats, scale_s, scale_t, causal,
                            beta, teacher_grad, window_left=-1, window_right=-1):
    where = "streamkl::attention_jsd_bwd"
    _check_jsd_op(q_s, k_s, q_t, k_t, scale_s, scale_t, beta, (window_left, window_right), where=where)
    _check_row_tensors(q_s.shape[:3], (("grad_jsd", grad_jsd), ("jsd", jsd), ("lse_s", lse_s), ("lse_t", lse_t)),
                       where=where)
    _check_row_tensors((*q_s.shape[:3], 4), (("jsd_stats", jsd_stats),), where=where)
    return _gradients_like(q_s, k_s, q_t, k_t, teacher_grad)


def _attention_jsd_setup_context(ctx, inputs, output):
    q_s, k_s, q_t, k_t, *options = inputs
    ctx.save_for_backward(q_s, k_s, q_t, k_t, *output)
    ctx.options = options  # scale_s, scale_t, causal, beta[, window_left, window_right]


def _attention_jsd_backward(ctx, grad_jsd, *_unused_grads):
    q_s, k_s, q_t, k_t, jsd, lse_s, lse_t, jsd_stats = ctx.saved_tensors
    scale_s, scale_t, causal, beta, *window = ctx.options
    teacher_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    dq_s, dk_s, dq_t, dk_t = ops.attention_jsd_bwd(grad_jsd, q_s, k_s, q_t, k_t, jsd, lse_s, lse_t, jsd_stats, scale_s,
                                                   scale_t, causal, beta, teacher_grad, *window)
    if not teacher_grad:
        dq_t = dk_t = None
    return (dq_s, dk_s, dq_t, dk_t) + (None,) * len(ctx.options)


torch.library.register_autograd("streamkl::attention_jsd_fwd", _attention_jsd_backward,
                                setup_context=_attention_jsd_setup_context)


# ----------------------------------------------------------------------------------------------------- varlen
# Packed [total, H, D] inputs; per-row outputs [total_q, H]. The 4th output holds the generalized JSD's row
# statistics and is an empty [0] tensor for the KL divergences.

def _check_varlen_op(q_s, k_s, q_t, k_t, cu_q, cu_k, max_q, max_k, scale_s, scale_t, divergence, window, beta, *,
                     where):
    check_varlen_tensors(q_s, k_s, q_t, k_t, cu_q, cu_k, max_q, max_k, where=where)
    check_options(scale_s, scale_t, divergence, where=where)
    check_window(window, where=where)
    if divergence == "jsd":
        check_beta(beta, where=where)


@torch.library.register_fake("streamkl::attention_kl_varlen_fwd")
def _attention_kl_varlen_fwd_fake(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  scale_s, scale_t, causal, divergence, window_left=-1, window_right=-1, beta=0.5):
    _check_varlen_op(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale_s, scale_t,
                     divergence, (window_left, window_right), beta, where="streamkl::attention_kl_varlen_fwd")
    rows = q_s.new_empty(q_s.shape[:2], dtype=_stats_dtype(q_s.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows), _jsd_stats_like(rows, divergence)


@torch.library.register_fake("streamkl::attention_kl_varlen_bwd")
def _attention_kl_varlen_bwd_fake(grad_kl, q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, kl, lse_s, lse_t, jsd_stats, scale_s, scale_t, causal, divergence,
                                  teacher_grad, window_left=-1, window_right=-1, beta=0.5):
    where = "streamkl::attention_kl_varlen_bwd"
    _check_varlen_op(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale_s, scale_t,
                     divergence, (window_left, window_right), beta, where=where)
    _check_row_tensors(q_s.shape[:2], (("grad_kl", grad_kl), ("kl", kl), ("lse_s", lse_s), ("lse_t", lse_t)),
                       where=where)
    if divergence == "jsd":
        _check_row_tensors((*q_s.shape[:2], 4), (("jsd_stats", jsd_stats),), where=where)
    return _gradients_like(q_s, k_s, q_t, k_t, teacher_grad)


_VARLEN_LAYOUT_ARGS = 4  # cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k


def _attention_kl_varlen_setup_context(ctx, inputs, output):
    q_s, k_s, q_t, k_t, cu_q, cu_k, max_q, max_k, *options = inputs
    kl, lse_s, lse_t, jsd_stats = output
    ctx.save_for_backward(q_s, k_s, q_t, k_t, cu_q, cu_k, kl, lse_s, lse_t, jsd_stats)
    ctx.max_seqlens = (max_q, max_k)
    ctx.options = options  # scale_s, scale_t, causal, divergence[, window_left, window_right, beta]


def _attention_kl_varlen_backward(ctx, grad_kl, _grad_lse_s, _grad_lse_t, _grad_jsd_stats):
    q_s, k_s, q_t, k_t, cu_q, cu_k, kl, lse_s, lse_t, jsd_stats = ctx.saved_tensors
    scale_s, scale_t, causal, divergence, *tail = ctx.options
    teacher_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    dq_s, dk_s, dq_t, dk_t = ops.attention_kl_varlen_bwd(grad_kl, q_s, k_s, q_t, k_t, cu_q, cu_k, *ctx.max_seqlens,
                                                         kl, lse_s, lse_t, jsd_stats, scale_s, scale_t, causal,
                                                         divergence, teacher_grad, *tail)
    if not teacher_grad:
        dq_t = dk_t = None
    return (dq_s, dk_s, dq_t, dk_t) + (None,) * (_VARLEN_LAYOUT_ARGS + len(ctx.options))


torch.library.register_autograd("streamkl::attention_kl_varlen_fwd", _attention_kl_varlen_backward,
                                setup_context=_attention_kl_varlen_setup_context)

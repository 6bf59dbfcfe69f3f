"""Loads the native extension and registers fake (meta) kernels and autograd for ``torch.ops.streamkl``.

The op schemas live in C++ (``csrc/ops/schema.cpp``); this module adds what makes them first-class in
PyTorch: shape propagation for ``torch.compile`` / meta tensors, and a backward that calls another
registered op so the whole graph stays traceable.
"""

import torch

from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
from ._validation import (KL_DIVERGENCES, check_attention_tensors, check_beta, check_options, check_teacher_lse,
                          check_varlen_tensors, check_window)

ops = torch.ops.streamkl

JSD_NUM_STATS = 2  # per-row statistics the JSD forward saves: JsdRowStats::kCount (csrc/kernels/online_kl.h)


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
    return rows.new_empty((0,)) if divergence != "jsd" else rows.new_empty((*rows.shape, JSD_NUM_STATS))


def _check_row_tensors(rows_shape, named, *, where):
    for name, t in named:
        if tuple(t.shape) != tuple(rows_shape):
            raise ValueError(f"{where}: {name} must have shape {tuple(rows_shape)} (q_s's shape without its head "
                             f"dim), got {tuple(t.shape)}")


def _refuse_cuda_teacher_grad_grouping(teacher_grad, q_s, k_s, k_t):
    """Teacher gradients on CUDA need both sides to group their query heads alike (key heads: dim 1 in both
    layouts). The CUDA ops refuse this too. Raising here as well keeps autograd users runnable on the GPU test
    machine, whose torch 2.11 environment crashes on any C++ error message that formats a number
    (tools/repro_c10_str.py reproduces it with a minimal extension: not StreamKL's code)."""
    if teacher_grad and q_s.is_cuda and k_s.shape[1] != k_t.shape[1]:
        raise NotImplementedError(
            f"streamkl: teacher gradients on CUDA need the same number of key heads on both sides (student "
            f"{k_s.shape[1]}, teacher {k_t.shape[1]}); detach the teacher, or run this configuration on the CPU")


# ----------------------------------------------------------------------------------------------------- padded
# attention_kl_* (forward / reverse KL: kl, lse_s, lse_t) and attention_jsd_* (+ jsd_stats). Both end with
# (window_left=-1, window_right=-1, teacher_head_reduce="none", teacher_lse=None) in the forward and
# (window_left=-1, window_right=-1, teacher_head_reduce="none") in the backward.
_PADDED_TAIL_DEFAULTS = (-1, -1, "none", None)


def _padded_tail(tail):
    """The forward's trailing options with the schema's defaults filled in."""
    return tuple(tail) + _PADDED_TAIL_DEFAULTS[len(tail):]


def _check_padded_op(q_s, k_s, q_t, k_t, scale_s, scale_t, divergence, window, teacher_head_reduce, *, where,
                     divergences=KL_DIVERGENCES):
    check_attention_tensors(q_s, k_s, q_t, k_t, where=where, teacher_head_reduce=teacher_head_reduce)
    check_options(scale_s, scale_t, divergence, where=where, divergences=divergences)
    check_window(window, where=where)


def _padded_rows(q_s, q_t):
    """Fake per-row outputs: kl and lse_s like q_s's rows, lse_t like q_t's (an aggregated teacher's heads)."""
    rows = q_s.new_empty(q_s.shape[:3], dtype=_stats_dtype(q_s.dtype))
    return rows, torch.empty_like(rows), q_t.new_empty(q_t.shape[:3], dtype=rows.dtype)


def _check_backward_rows(q_s, q_t, named_rows, lse_t, *, where):
    _check_row_tensors(q_s.shape[:3], named_rows, where=where)
    if tuple(lse_t.shape) != tuple(q_t.shape[:3]):
        raise ValueError(f"{where}: lse_t must have shape {tuple(q_t.shape[:3])} (q_t's shape without its head dim), "
                         f"got {tuple(lse_t.shape)}")


@torch.library.register_fake("streamkl::attention_kl_fwd")
def _attention_kl_fwd_fake(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, divergence, window_left=-1, window_right=-1,
                           teacher_head_reduce="none", teacher_lse=None):
    where = "streamkl::attention_kl_fwd"
    _check_padded_op(q_s, k_s, q_t, k_t, scale_s, scale_t, divergence, (window_left, window_right),
                     teacher_head_reduce, where=where)
    check_teacher_lse(teacher_lse, q_t, teacher_head_reduce, where=where)
    return _padded_rows(q_s, q_t)


@torch.library.register_fake("streamkl::attention_kl_bwd")
def _attention_kl_bwd_fake(grad_kl, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, scale_s, scale_t, causal, divergence,
                           teacher_grad, window_left=-1, window_right=-1, teacher_head_reduce="none"):
    where = "streamkl::attention_kl_bwd"
    _check_padded_op(q_s, k_s, q_t, k_t, scale_s, scale_t, divergence, (window_left, window_right),
                     teacher_head_reduce, where=where)
    _check_backward_rows(q_s, q_t, (("grad_kl", grad_kl), ("kl", kl), ("lse_s", lse_s)), lse_t, where=where)
    return _gradients_like(q_s, k_s, q_t, k_t, teacher_grad)


def _mark_statistics(ctx, output):
    """Only the divergence (output 0) carries gradients: the LSEs and JSD statistics are the backward's inputs, not
    differentiable results (a loss built on them gets an error, not a silently dropped term). Undefined output
    gradients stay None instead of being materialized as zero tensors (two allocations and fills per backward that
    the backward never reads; removing them did not measurably change the small-N wall time on H100)."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _attention_kl_setup_context(ctx, inputs, output):
    q_s, k_s, q_t, k_t, scale_s, scale_t, causal, divergence, *tail = inputs
    _mark_statistics(ctx, output)
    window_left, window_right, teacher_head_reduce, _teacher_lse = _padded_tail(tail)
    ctx.save_for_backward(q_s, k_s, q_t, k_t, *output)
    ctx.options = (scale_s, scale_t, causal, divergence)
    ctx.tail = (window_left, window_right, teacher_head_reduce)
    ctx.num_options = len(inputs) - 4


def _attention_kl_backward(ctx, grad_kl, _grad_lse_s, _grad_lse_t):
    if grad_kl is None:  # the divergence was not used: no gradient
        return (None,) * (4 + ctx.num_options)
    q_s, k_s, q_t, k_t, kl, lse_s, lse_t = ctx.saved_tensors
    teacher_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    _refuse_cuda_teacher_grad_grouping(teacher_grad, q_s, k_s, k_t)
    dq_s, dk_s, dq_t, dk_t = ops.attention_kl_bwd(grad_kl, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, *ctx.options,
                                                  teacher_grad, *ctx.tail)
    if not teacher_grad:
        dq_t = dk_t = None
    return (dq_s, dk_s, dq_t, dk_t) + (None,) * ctx.num_options


torch.library.register_autograd("streamkl::attention_kl_fwd", _attention_kl_backward,
                                setup_context=_attention_kl_setup_context)


# Generalized JSD: same inputs plus beta; the 4th output holds the per-row statistics the backward needs.
def _check_jsd_op(q_s, k_s, q_t, k_t, scale_s, scale_t, beta, window, teacher_head_reduce, *, where):
    _check_padded_op(q_s, k_s, q_t, k_t, scale_s, scale_t, "jsd", window, teacher_head_reduce, where=where,
                     divergences=("jsd",))
    check_beta(beta, where=where)


@torch.library.register_fake("streamkl::attention_jsd_fwd")
def _attention_jsd_fwd_fake(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, beta, window_left=-1, window_right=-1,
                            teacher_head_reduce="none", teacher_lse=None):
    where = "streamkl::attention_jsd_fwd"
    _check_jsd_op(q_s, k_s, q_t, k_t, scale_s, scale_t, beta, (window_left, window_right), teacher_head_reduce,
                  where=where)
    check_teacher_lse(teacher_lse, q_t, teacher_head_reduce, where=where)
    jsd, lse_s, lse_t = _padded_rows(q_s, q_t)
    return jsd, lse_s, lse_t, _jsd_stats_like(jsd, "jsd")


@torch.library.register_fake("streamkl::attention_jsd_bwd")
def _attention_jsd_bwd_fake(grad_jsd, q_s, k_s, q_t, k_t, jsd, lse_s, lse_t, jsd_stats, scale_s, scale_t, causal,
                            beta, teacher_grad, window_left=-1, window_right=-1, teacher_head_reduce="none"):
    where = "streamkl::attention_jsd_bwd"
    _check_jsd_op(q_s, k_s, q_t, k_t, scale_s, scale_t, beta, (window_left, window_right), teacher_head_reduce,
                  where=where)
    _check_backward_rows(q_s, q_t, (("grad_jsd", grad_jsd), ("jsd", jsd), ("lse_s", lse_s)), lse_t, where=where)
    _check_row_tensors((*q_s.shape[:3], JSD_NUM_STATS), (("jsd_stats", jsd_stats),), where=where)
    return _gradients_like(q_s, k_s, q_t, k_t, teacher_grad)


def _attention_jsd_backward(ctx, grad_jsd, *_unused_grads):
    if grad_jsd is None:
        return (None,) * (4 + ctx.num_options)
    q_s, k_s, q_t, k_t, jsd, lse_s, lse_t, jsd_stats = ctx.saved_tensors
    teacher_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    _refuse_cuda_teacher_grad_grouping(teacher_grad, q_s, k_s, k_t)
    dq_s, dk_s, dq_t, dk_t = ops.attention_jsd_bwd(grad_jsd, q_s, k_s, q_t, k_t, jsd, lse_s, lse_t, jsd_stats,
                                                   *ctx.options, teacher_grad, *ctx.tail)
    if not teacher_grad:
        dq_t = dk_t = None
    return (dq_s, dk_s, dq_t, dk_t) + (None,) * ctx.num_options


# The JSD forward's inputs have the KL forward's layout (beta where divergence is), so one setup serves both.
torch.library.register_autograd("streamkl::attention_jsd_fwd", _attention_jsd_backward,
                                setup_context=_attention_kl_setup_context)


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
        _check_row_tensors((*q_s.shape[:2], JSD_NUM_STATS), (("jsd_stats", jsd_stats),), where=where)
    return _gradients_like(q_s, k_s, q_t, k_t, teacher_grad)


_VARLEN_LAYOUT_ARGS = 4  # cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k


def _attention_kl_varlen_setup_context(ctx, inputs, output):
    q_s, k_s, q_t, k_t, cu_q, cu_k, max_q, max_k, *options = inputs
    kl, lse_s, lse_t, jsd_stats = output
    _mark_statistics(ctx, output)
    ctx.save_for_backward(q_s, k_s, q_t, k_t, cu_q, cu_k, kl, lse_s, lse_t, jsd_stats)
    ctx.max_seqlens = (max_q, max_k)
    ctx.options = options  # scale_s, scale_t, causal, divergence[, window_left, window_right, beta]


def _attention_kl_varlen_backward(ctx, grad_kl, _grad_lse_s, _grad_lse_t, _grad_jsd_stats):
    if grad_kl is None:
        return (None,) * (4 + _VARLEN_LAYOUT_ARGS + len(ctx.options))
    q_s, k_s, q_t, k_t, cu_q, cu_k, kl, lse_s, lse_t, jsd_stats = ctx.saved_tensors
    scale_s, scale_t, causal, divergence, *tail = ctx.options
    teacher_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    _refuse_cuda_teacher_grad_grouping(teacher_grad, q_s, k_s, k_t)
    dq_s, dk_s, dq_t, dk_t = ops.attention_kl_varlen_bwd(grad_kl, q_s, k_s, q_t, k_t, cu_q, cu_k, *ctx.max_seqlens,
                                                         kl, lse_s, lse_t, jsd_stats, scale_s, scale_t, causal,
                                                         divergence, teacher_grad, *tail)
    if not teacher_grad:
        dq_t = dk_t = None
    return (dq_s, dk_s, dq_t, dk_t) + (None,) * (_VARLEN_LAYOUT_ARGS + len(ctx.options))


torch.library.register_autograd("streamkl::attention_kl_varlen_fwd", _attention_kl_varlen_backward,
                                setup_context=_attention_kl_varlen_setup_context)

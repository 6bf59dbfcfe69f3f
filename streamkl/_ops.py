"""Loads the native extension and registers fake (meta) kernels for ``torch.ops.streamkl``.

The op schemas live in C++ (``csrc/ops/schema.cpp``), and so does the attention ops' autograd
(``csrc/ops/attention_autograd.cpp``: a backward that calls the registered backward op, so the whole graph stays
traceable); this module adds the shape propagation that ``torch.compile`` and meta tensors need.
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


def refuse_cuda_teacher_grad_grouping(q_s, k_s, q_t, k_t, *, where):
    """Teacher gradients on CUDA need both sides to group their query heads alike (key heads: dim 1 in both
    layouts); the CUDA backward ops refuse it too, but only once the backward runs. The public functions raise at
    the forward instead, which keeps them runnable on the GPU test machine, whose torch 2.11 environment crashes on
    any C++ error message that formats a number (tools/repro_c10_str.py reproduces it with a minimal extension: not
    StreamKL's code)."""
    teacher_grad = torch.is_grad_enabled() and (q_t.requires_grad or k_t.requires_grad)
    if teacher_grad and q_s.is_cuda and k_s.shape[1] != k_t.shape[1]:
        raise NotImplementedError(
            f"{where}: teacher gradients on CUDA need the same number of key heads on both sides (student "
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

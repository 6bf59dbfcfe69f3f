"""Argument checks for the attention-KL API, shared by the public functions and the fake (meta) kernels,
so eager calls, meta tensors and torch.compile tracing reject the same inputs with the same messages.
The C++ ops check again (csrc/ops/attention_inputs.cpp) for direct callers of torch.ops.streamkl."""

import math

import torch

DIVERGENCES = ("forward", "reverse", "jsd")
KL_DIVERGENCES = ("forward", "reverse")  # what the attention_kl_fwd/bwd ops take (JSD has its own ops)
REDUCTIONS = ("none", "sum", "mean")


def check_same_dtype_device(tensors, *, where, subject="all inputs"):
    """The named tensors (a dict, the first is the reference) share the first one's dtype and device.
    ``subject`` names them in the dtype message."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.dtype != first.dtype:
            raise ValueError(f"{where}: {subject} must share one dtype; {first_name} is {first.dtype} but {name} is "
                             f"{t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{where}: all inputs must be on one device; {first_name} is on {first.device} "
                             f"but {name} is on {t.device}")


def _check_tensor_basics(tensors, rank, shape_name, *, where):
    """Types, ranks, one dtype (floating point) and one device for the named tensors."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{where}: {name} must be {rank}-D {shape_name}, got shape {tuple(t.shape)}")
    check_same_dtype_device(tensors, where=where)
    first = next(iter(tensors.values()))
    if not first.dtype.is_floating_point:
        raise ValueError(f"{where}: inputs must be floating point, got {first.dtype}")


def _check_shapes(q_s, k_s, q_t, k_t, *, packed, teacher_head_group=1, where):
    """Shapes of the four inputs in either layout (padded [B, H, N, D] or packed [total, H, D]): q_t like q_s
    (with r times its heads for an aggregated teacher), each side's key heads dividing its query heads (GQA/MQA),
    matching head dims, the same keys for both sides."""
    seq, head = (0, 1) if packed else (2, 1)
    H = q_s.shape[head]
    expected = list(q_s.shape[:-1])
    expected[head] = teacher_head_group * H
    if list(q_t.shape[:-1]) != expected:
        what = "total query tokens and heads" if packed else "batch, heads and query length"
        raise ValueError(f"{where}: q_t must match q_s in {what}: expected "
                         f"[{', '.join(map(str, expected))}, D_t], got {tuple(q_t.shape)}")
    for qn, kn, q, k in (("q_s", "k_s", q_s, k_s), ("q_t", "k_t", q_t, k_t)):
        if not packed and k.shape[0] != q.shape[0]:
            raise ValueError(f"{where}: {kn} must have the batch of {qn}: expected "
                             f"[{q.shape[0]}, H_kv, N_k, {q.shape[-1]}], got {tuple(k.shape)}")
        heads, kv = q.shape[head], k.shape[head]
        if (heads % kv != 0) if kv > 0 else heads != 0:
            raise ValueError(f"{where}: {kn} has {kv} heads, which must divide the {heads} query heads of "
                             f"{qn} (GQA/MQA: contiguous groups of query heads share a key head); got shape "
                             f"{tuple(k.shape)}")
        if k.shape[-1] != q.shape[-1]:
            raise ValueError(f"{where}: {kn} must have the head dim of {qn} ({q.shape[-1]}), got "
                             f"{k.shape[-1]} (shape {tuple(k.shape)})")
    if k_s.shape[seq] != k_t.shape[seq]:
        name = "total_k" if packed else "N_k"
        raise ValueError(f"{where}: student and teacher must attend over the same keys: k_s has "
                         f"{name}={k_s.shape[seq]} but k_t has {name}={k_t.shape[seq]}")


def check_attention_tensors(q_s, k_s, q_t, k_t, *, where, teacher_head_reduce="none"):
    """Types, ranks, dtypes, devices and shapes of the four padded attention inputs [B, H, N, D].

    With ``teacher_head_reduce="mean"`` the teacher has ``r * H`` query heads (returns r; 1 otherwise)."""
    _check_tensor_basics({"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}, 4, "[batch, heads, seq, head_dim]",
                         where=where)
    r = teacher_head_group(teacher_head_reduce, q_s.shape[1], q_t.shape[1], where=where)
    _check_shapes(q_s, k_s, q_t, k_t, packed=False, teacher_head_group=r, where=where)
    return r


TEACHER_HEAD_REDUCTIONS = ("none", "mean")


def teacher_head_group(teacher_head_reduce, student_heads, teacher_heads, *, where):
    """r, the number of teacher heads averaged per student head: 1 for "none", H_t / H_s for "mean"."""
    if teacher_head_reduce not in TEACHER_HEAD_REDUCTIONS:
        raise ValueError(f"{where}: teacher_head_reduce must be one of {TEACHER_HEAD_REDUCTIONS}, got "
                         f"{teacher_head_reduce!r}")
    if teacher_head_reduce == "none":
        return 1
    if student_heads == 0:
        return 1
    if teacher_heads == 0 or teacher_heads % student_heads:
        raise ValueError(f"{where}: teacher_head_reduce='mean' needs the {teacher_heads} teacher query heads of q_t "
                         f"to be a positive multiple of the {student_heads} student heads of q_s")
    return teacher_heads // student_heads


def check_teacher_lse(teacher_lse, q_t, teacher_head_reduce, *, where):
    """Optional precomputed teacher LSE ``[B, H_t, N_q]`` (with teacher_head_reduce="mean" only)."""
    if teacher_lse is None:
        return
    if teacher_head_reduce != "mean":
        raise ValueError(f"{where}: teacher_lse is the per-head LSE of an aggregated teacher: pass it with "
                         f"teacher_head_reduce='mean'")
    if not isinstance(teacher_lse, torch.Tensor):
        raise TypeError(f"{where}: teacher_lse must be a torch.Tensor, got {type(teacher_lse).__name__}")
    if tuple(teacher_lse.shape) != tuple(q_t.shape[:-1]) or not teacher_lse.dtype.is_floating_point:
        raise ValueError(f"{where}: teacher_lse must be a floating-point tensor of shape {tuple(q_t.shape[:-1])} "
                         f"(one LSE per teacher head and query), got {teacher_lse.dtype} {tuple(teacher_lse.shape)}")
    if teacher_lse.device != q_t.device:
        raise ValueError(f"{where}: teacher_lse must be on the device of q_t ({q_t.device}), got {teacher_lse.device}")


def check_varlen_tensors(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, where):
    """Packed inputs ``[total, H, D]`` and the cu_seqlens' static properties (dtype, rank, device, length).

    The values of cu_seqlens (start at 0, non-decreasing, end at the total, max_seqlen bounds) are checked by
    the op on real data: reading them here would break torch.compile tracing."""
    _check_tensor_basics({"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}, 3, "[total_tokens, heads, head_dim]",
                         where=where)
    _check_shapes(q_s, k_s, q_t, k_t, packed=True, where=where)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise ValueError(f"{where}: {name} must be int32 (FlashAttention convention), got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{where}: {name} must be a 1-D tensor of length batch + 1 >= 1, got shape "
                             f"{tuple(cu.shape)}")
        if cu.device != q_s.device:
            raise ValueError(f"{where}: {name} must be on the device of q_s ({q_s.device}), got {cu.device}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"{where}: cu_seqlens_q and cu_seqlens_k must both have length batch + 1, got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)) or m < 0:
            raise ValueError(f"{where}: {name} must be an int >= 0 (the longest sequence), got {m!r}")


def check_window(window_size, *, where):
    """``window_size=(left, right)``: ints >= 0, or -1 for an unbounded side (FlashAttention semantics)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise ValueError(f"{where}: window_size must be a pair of ints (left, right), got {window_size!r}")
    if any(w < -1 for w in window_size):
        raise ValueError(f"{where}: window_size sides must be >= 0, or -1 for unbounded; got {tuple(window_size)}")


def check_options(scale_s, scale_t, divergence, reduction=None, *, where, divergences=DIVERGENCES):
    for name, scale in (("scale_s", scale_s), ("scale_t", scale_t)):
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"{where}: {name} must be a positive finite number, got {scale}")
    check_divergence(divergence, where=where, divergences=divergences)
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_divergence(divergence, *, where, divergences=DIVERGENCES):
    if divergence not in divergences:
        raise ValueError(f"{where}: divergence must be one of {divergences}, got {divergence!r}")


def check_beta(beta, *, where):
    """beta of the generalized JSD: a number in [0, 1] (0: forward KL, 1: reverse KL)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"{where}: beta must be a number in [0, 1] (0: forward KL, 1: reverse KL), got {beta!r}")

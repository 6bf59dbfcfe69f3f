"""Argument checks for the attention-KL API, shared by the public functions and the fake (meta) kernels,
so eager calls, meta tensors and torch.compile tracing reject the same inputs with the same messages.
The C++ ops check again (csrc/ops/attention_inputs.cpp) for direct callers of torch.ops.streamkl."""

import math

import torch

DIVERGENCES = ("forward", "reverse", "jsd")
KL_DIVERGENCES = ("forward", "reverse")  # what the attention_kl_fwd/bwd ops take (JSD has its own ops)
REDUCTIONS = ("none", "sum", "mean")


def _check_tensor_basics(tensors, rank, shape_name, *, where):
    """Types, ranks, one dtype (floating point) and one device for the named tensors."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{where}: {name} must be {rank}-D {shape_name}, got shape {tuple(t.shape)}")
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.dtype != first.dtype:
            raise ValueError(f"{where}: all inputs must share one dtype; {first_name} is {first.dtype} but {name} is "
                             f"{t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{where}: all inputs must be on one device; {first_name} is on {first.device} "
                             f"but {name} is on {t.device}")
    if not first.dtype.is_floating_point:
        raise ValueError(f"{where}: inputs must be floating point, got {first.dtype}")


def _check_key_heads_and_dims(q_s, k_s, q_t, k_t, *, head_dim, where):
    """GQA/MQA head grouping and matching head dims of each side (dims given for the layout)."""
    H = q_s.shape[head_dim]
    for qn, kn, q, k in (("q_s", "k_s", q_s, k_s), ("q_t", "k_t", q_t, k_t)):
        kv = k.shape[head_dim]
        if (H % kv != 0) if kv > 0 else H != 0:
            raise ValueError(f"{where}: {kn} has {kv} heads, which must divide the {H} query heads of "
                             f"{qn} (GQA/MQA: contiguous groups of query heads share a key head); got shape "
                             f"{tuple(k.shape)}")
        if k.shape[-1] != q.shape[-1]:
            raise ValueError(f"{where}: {kn} must have the head dim of {qn} ({q.shape[-1]}), got "
                             f"{k.shape[-1]} (shape {tuple(k.shape)})")


def check_attention_tensors(q_s, k_s, q_t, k_t, *, where):
    """Types, ranks, dtypes, devices and shapes of the four padded attention inputs [B, H, N, D]."""
    tensors = {"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}
    _check_tensor_basics(tensors, 4, "[batch, heads, seq, head_dim]", where=where)
    B, H, Nq, _ = q_s.shape
    if tuple(q_t.shape[:3]) != (B, H, Nq):
        raise ValueError(f"{where}: q_t must match q_s in batch, heads and query length: expected "
                         f"[{B}, {H}, {Nq}, D_t], got {tuple(q_t.shape)}")
    for qn, kn, q, k in (("q_s", "k_s", q_s, k_s), ("q_t", "k_t", q_t, k_t)):
        if k.shape[0] != B:
            raise ValueError(f"{where}: {kn} must have the batch of {qn}: expected "
                             f"[{B}, H_kv, N_k, {q.shape[3]}], got {tuple(k.shape)}")
    _check_key_heads_and_dims(q_s, k_s, q_t, k_t, head_dim=1, where=where)
    if k_s.shape[2] != k_t.shape[2]:
        raise ValueError(f"{where}: student and teacher must attend over the same keys: k_s has "
                         f"N_k={k_s.shape[2]} but k_t has N_k={k_t.shape[2]}")


def check_varlen_tensors(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, where):
    """Packed inputs ``[total, H, D]`` and the cu_seqlens' static properties (dtype, rank, device, length).

    The values of cu_seqlens (start at 0, non-decreasing, end at the total, max_seqlen bounds) are checked by
    the op on real data: reading them here would break torch.compile tracing."""
    _check_tensor_basics({"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}, 3, "[total_tokens, heads, head_dim]",
                         where=where)
    if tuple(q_t.shape[:2]) != tuple(q_s.shape[:2]):
        raise ValueError(f"{where}: q_t must match q_s in total query tokens and heads: expected "
                         f"[{q_s.shape[0]}, {q_s.shape[1]}, D_t], got {tuple(q_t.shape)}")
    _check_key_heads_and_dims(q_s, k_s, q_t, k_t, head_dim=1, where=where)
    if k_s.shape[0] != k_t.shape[0]:
        raise ValueError(f"{where}: student and teacher must attend over the same keys: k_s has "
                         f"total_k={k_s.shape[0]} but k_t has total_k={k_t.shape[0]}")
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

"""Argument checks for the attention-KL API, shared by the public functions and the fake (meta) kernels,
so eager calls, meta tensors and torch.compile tracing reject the same inputs with the same messages.
The C++ ops check again (csrc/ops/attention_inputs.cpp) for direct callers of torch.ops.streamkl."""

import math

import torch

DIVERGENCES = ("forward", "reverse")
REDUCTIONS = ("none", "sum", "mean")


def check_attention_tensors(q_s, k_s, q_t, k_t, *, where):
    """Types, ranks, dtypes, devices and shapes of the four attention inputs."""
    tensors = {"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    for name, t in tensors.items():
        if t.dtype != q_s.dtype:
            raise ValueError(f"{where}: all inputs must share one dtype; q_s is {q_s.dtype} but {name} is {t.dtype}")
        if t.device != q_s.device:
            raise ValueError(f"{where}: all inputs must be on one device; q_s is on {q_s.device} "
                             f"but {name} is on {t.device}")
    if not q_s.dtype.is_floating_point:
        raise ValueError(f"{where}: inputs must be floating point, got {q_s.dtype}")
    B, H, Nq, _ = q_s.shape
    if tuple(q_t.shape[:3]) != (B, H, Nq):
        raise ValueError(f"{where}: q_t must match q_s in batch, heads and query length: expected "
                         f"[{B}, {H}, {Nq}, D_t], got {tuple(q_t.shape)}")
    for qn, kn, q, k in (("q_s", "k_s", q_s, k_s), ("q_t", "k_t", q_t, k_t)):
        if k.shape[0] != B:
            raise ValueError(f"{where}: {kn} must have the batch of {qn}: expected "
                             f"[{B}, H_kv, N_k, {q.shape[3]}], got {tuple(k.shape)}")
        if (H % k.shape[1] != 0) if k.shape[1] > 0 else H != 0:
            raise ValueError(f"{where}: {kn} has {k.shape[1]} heads, which must divide the {H} query heads of "
                             f"{qn} (GQA/MQA: contiguous groups of query heads share a key head); got shape "
                             f"{tuple(k.shape)}")
        if k.shape[3] != q.shape[3]:
            raise ValueError(f"{where}: {kn} must have the head dim of {qn} ({q.shape[3]}), got "
                             f"{k.shape[3]} (shape {tuple(k.shape)})")
    if k_s.shape[2] != k_t.shape[2]:
        raise ValueError(f"{where}: student and teacher must attend over the same keys: k_s has "
                         f"N_k={k_s.shape[2]} but k_t has N_k={k_t.shape[2]}")


def check_window(window_size, *, where):
    """``window_size=(left, right)``: ints >= 0, or -1 for an unbounded side (FlashAttention semantics)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise ValueError(f"{where}: window_size must be a pair of ints (left, right), got {window_size!r}")
    if any(w < -1 for w in window_size):
        raise ValueError(f"{where}: window_size sides must be >= 0, or -1 for unbounded; got {tuple(window_size)}")


def check_options(scale_s, scale_t, divergence, reduction=None, *, where):
    for name, scale in (("scale_s", scale_s), ("scale_t", scale_t)):
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"{where}: {name} must be a positive finite number, got {scale}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"{where}: divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")

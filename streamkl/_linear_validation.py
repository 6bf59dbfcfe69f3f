"""Argument checks for the hidden-state logit-distillation API (``linear_kl``), shared by the public function,
the module and the fake (meta) kernels, so eager calls, meta tensors and torch.compile tracing reject the same
inputs with the same messages. The C++ ops check again (csrc/ops/linear_inputs.cpp) for direct callers."""

import math

import torch

from ._validation import REDUCTIONS, check_same_dtype_device

LINEAR_DIVERGENCES = ("forward", "reverse", "jsd")
NUM_STATS = 4  # rows of the forward's per-row statistics (csrc/kernels/linear_params.h, LinearStat)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # csrc/cuda/linear_kl_cuda.cpp


def _check_float(name, t, x_s, where):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    check_same_dtype_device({"x_s": x_s, name: t}, where=where, subject="x_s, w_s, x_t, w_t and the biases")


def check_linear_tensors(x_s, w_s, x_t, w_t, b_s=None, b_t=None, labels=None, *, where, flat=False):
    """Types, ranks, dtypes, devices and shapes. ``flat``: the op's layout (x 2-D, labels int64 [T])."""
    if not isinstance(x_s, torch.Tensor):
        raise TypeError(f"{where}: x_s must be a torch.Tensor, got {type(x_s).__name__}")
    if not x_s.dtype.is_floating_point:
        raise ValueError(f"{where}: inputs must be floating point, got x_s of dtype {x_s.dtype}")
    for name, t in (("w_s", w_s), ("x_t", x_t), ("w_t", w_t), ("b_s", b_s), ("b_t", b_t)):
        if t is not None:
            _check_float(name, t, x_s, where)
    if x_s.device.type == "cuda" and x_s.dtype not in CUDA_DTYPES:
        raise ValueError(f"{where}: linear_kl on CUDA takes float32, bfloat16 or float16 inputs (logits and "
                         f"statistics are kept in float32 whatever the input dtype); got {x_s.dtype}. Cast the "
                         f"inputs, or run float64 on the CPU.")
    for name, x, w, b, d in (("s", x_s, w_s, b_s, "D_s"), ("t", x_t, w_t, b_t, "D_t")):
        if (x.dim() != 2) if flat else (x.dim() < 1):
            raise ValueError(f"{where}: x_{name} must be {'2-D [T, ' if flat else '[..., '}{d}], got shape "
                             f"{tuple(x.shape)}")
        if w.dim() != 2:
            raise ValueError(f"{where}: w_{name} must be 2-D [V, {d}], got shape {tuple(w.shape)}")
        if w.shape[1] != x.shape[-1]:
            raise ValueError(f"{where}: w_{name} must have the hidden size of x_{name} ({x.shape[-1]}): expected "
                             f"[V, {x.shape[-1]}], got {tuple(w.shape)}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{where}: b_{name} must be 1-D [V] = [{w.shape[0]}], got shape {tuple(b.shape)}")
    lead = tuple(x_s.shape[:-1])
    if tuple(x_t.shape[:-1]) != lead:
        raise ValueError(f"{where}: x_t must have the leading shape of x_s: expected [{', '.join(map(str, lead))}"
                         f"{', ' if lead else ''}D_t], got {tuple(x_t.shape)}")
    if w_t.shape[0] != w_s.shape[0]:
        raise ValueError(f"{where}: student and teacher must share the vocabulary: w_s has V={w_s.shape[0]} but "
                         f"w_t has V={w_t.shape[0]}")
    if w_s.shape[0] == 0:
        raise ValueError(f"{where}: the vocabulary is empty (w_s has shape {tuple(w_s.shape)})")
    if labels is not None:
        check_labels(labels, lead, x_s.device, where=where, int64_only=flat)


def check_labels(labels, lead, device, *, where, int64_only=False):
    """Integer labels shaped like the leading dims of x (one per row), on the inputs' device."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{where}: labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if int64_only and labels.dtype != torch.int64:
        raise ValueError(f"{where}: labels must be int64 (torch.long), got {labels.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{where}: labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(f"{where}: labels must have the leading shape of x_s, {list(lead)}, got "
                         f"{list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{where}: labels must be on the device of x_s ({device}), got {labels.device}")


def check_linear_options(temperature, divergence, beta, reduction=None, *, ce_weight=0.0, has_labels=False,
                         where):
    """Scalar options. ``temperature`` is tau (the op itself takes 1 / tau)."""
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{where}: temperature must be a positive finite number, got {temperature!r}")
    if divergence not in LINEAR_DIVERGENCES:
        raise ValueError(f"{where}: divergence must be one of {LINEAR_DIVERGENCES}, got {divergence!r}")
    if not (isinstance(beta, (int, float)) and 0 <= beta <= 1):
        raise ValueError(f"{where}: beta must be a number in [0, 1], got {beta!r}")
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(ce_weight, (int, float)) and math.isfinite(ce_weight)):
        raise ValueError(f"{where}: ce_weight must be a finite number, got {ce_weight!r}")
    if ce_weight and not has_labels:
        raise ValueError(f"{where}: ce_weight != 0 needs labels (the hard-label cross-entropy term)")
    if ce_weight and temperature != 1:
        raise ValueError(f"{where}: ce_weight != 0 is only supported at temperature 1 (the cross-entropy term is "
                         f"the plain student cross-entropy); got temperature={temperature}. Add a separate "
                         f"cross-entropy loss for tempered distillation.")

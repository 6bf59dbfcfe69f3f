"""Public API of the hidden-state logit-distillation path: ``linear_kl`` and the ``LinearKLLoss`` module."""

from typing import Optional

import torch

from . import _linear_ops
from ._linear_validation import check_linear_options, check_linear_tensors


def _devices_with_kernels():
    """Device types that have a linear_kl kernel in this build (read once: the registrations happen when the
    extension loads, and a constant set keeps the check traceable by torch.compile)."""
    found = {"cpu"}
    for device_type, key in (("cuda", "CUDA"),):
        if torch._C._dispatch_has_kernel_for_dispatch_key("streamkl::linear_kl_fwd", key):
            found.add(device_type)
    return frozenset(found)


_KERNEL_DEVICES = _devices_with_kernels()


def linear_kl(x_s: torch.Tensor, w_s: torch.Tensor, x_t: torch.Tensor, w_t: torch.Tensor, *,
              b_s: Optional[torch.Tensor] = None, b_t: Optional[torch.Tensor] = None, temperature: float = 1.0,
              divergence: str = "forward", beta: float = 0.5, labels: Optional[torch.Tensor] = None,
              ignore_index: int = -100, reduction: str = "mean", scale_by_temperature_sq: bool = False,
              ce_weight: float = 0.0) -> torch.Tensor:
    """Logit distillation from hidden states, without materializing either ``[T, V]`` logit matrix.

    For every row ``i`` of the flattened leading dims (a token)::

        s_i = (x_s[i] @ w_s.T + b_s) / temperature          (student logits, [V])
        t_i = (x_t[i] @ w_t.T + b_t) / temperature          (teacher logits, [V])
        P_s = softmax(s_i),  P_t = softmax(t_i)
        divergence="forward":  KL(P_t || P_s)               (the usual distillation loss)
        divergence="reverse":  KL(P_s || P_t)
        divergence="jsd":      the generalized JSD with parameter beta, as in streamkl.attention_kl:
                               beta * KL(P_t || M) + (1 - beta) * KL(P_s || M),  M = beta P_t + (1 - beta) P_s
                               for 0 < beta < 1; exactly forward KL at beta = 0 and reverse KL at beta = 1
                               (TRL / Liger: the limits of the JSD divided by beta, resp. 1 - beta)

    computed by streaming over vocabulary tiles with the online two-softmax core: neither ``[T, V]`` logit matrix
    is ever stored. Logits and softmax statistics are kept in fp32 (fp64 for fp64 inputs on the CPU), never
    rounded to bf16/fp16.

    Args:
        x_s, w_s: student hidden states ``[..., D_s]`` and output embedding ``[V, D_s]``.
        x_t, w_t: teacher hidden states ``[..., D_t]`` and output embedding ``[V, D_t]``; ``D_t`` may differ
            from ``D_s``, ``V`` and the leading dims may not.
        b_s, b_t: optional output biases ``[V]``.
        temperature: tau > 0, divides both sides' logits.
        scale_by_temperature_sq: multiply the divergence by ``tau**2`` (Hinton's convention, which keeps the
            gradient scale independent of tau). Off by default: the divergence is returned as is.
        labels: optional integer tensor shaped like the leading dims of ``x_s``. Rows whose label equals
            ``ignore_index`` contribute nothing (loss 0, zero gradient).
        reduction: ``"mean"`` (default) divides the sum by the number of valid rows of the whole call (rows not
            ignored; all rows without labels; 0 when none is valid); ``"sum"``; ``"none"`` returns the per-row
            loss shaped like the leading dims of ``x_s``.
        ce_weight: adds ``ce_weight * CE(student logits, labels)`` per row, computed in the same pass (the
            student's log-sum-exp is there). Needs labels and ``temperature == 1`` (the term is the plain student
            cross-entropy; at tau != 1 use a separate cross-entropy loss). Not scaled by tau**2.

    Returns:
        float32 tensor (float64 for float64 inputs). Gradients flow to ``x_s, w_s, b_s``, and to ``x_t, w_t,
        b_t`` when they require grad.

    Devices and precision:
        CPU: float32 and float64 natively; float16 / bfloat16 inputs are upcast to float32 once. Extra memory
        O(T) plus small per-thread tiles.

        CUDA: float32, bfloat16 and float16 (float64 raises a ValueError: run it on the CPU). This is an interim
        "hybrid" design, until a fused CuTe/wgmma GEMM + epilogue kernel replaces it: the vocabulary is streamed
        in chunks of ``Vc`` columns; the matrix products run on cuBLAS (fp32 accumulation, logits written in fp32,
        never rounded to the input dtype; fp32 inputs get true fp32 products, no TF32), and the online-softmax
        and gradient epilogues are StreamKL kernels sharing the CPU's online two-softmax core. Extra memory is
        O(T) plus the chunk workspaces (two fp32 ``[T, Vc]`` logit chunks, and the backward's ``[T, Vc]``
        gradient chunks in the input dtype), which stay within a budget of 512 MiB by default, set by the
        environment variable ``STREAMKL_LINEAR_WORKSPACE_MB`` (``Vc`` = V when everything fits, else a multiple
        of 128). The logit gradients are rounded to the input dtype once before the cuBLAS products that give
        ``dx`` (accumulated in fp32 across chunks), ``dw`` and ``db``. With float16 inputs those gradients live in
        float16's range, as in any float16 training: tiny ones (a mean over many rows at a large V) underflow
        unless the loss is scaled (``torch.amp.GradScaler``). bfloat16 has no such issue.
    """
    where = "streamkl.linear_kl"
    check_linear_tensors(x_s, w_s, x_t, w_t, b_s, b_t, labels, where=where)
    check_linear_options(temperature, divergence, beta, reduction, ce_weight=ce_weight,
                         has_labels=labels is not None, where=where)
    if x_s.device.type not in _KERNEL_DEVICES:
        raise NotImplementedError(
            f"{where}: no {x_s.device.type.upper()} kernel in this build of streamkl (kernels: "
            f"{', '.join(sorted(_KERNEL_DEVICES))}). For CUDA, build streamkl with a CUDA toolkit and a CUDA build "
            f"of torch; otherwise move the inputs to the CPU.")
    lead = x_s.shape[:-1]
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64)
    loss, ce, _ = _linear_ops.ops.linear_kl_fwd(
        x_s.reshape(-1, x_s.shape[-1]), w_s, b_s, x_t.reshape(-1, x_t.shape[-1]), w_t, b_t, flat_labels,
        1.0 / float(temperature), divergence, float(beta), int(ignore_index), bool(ce_weight))
    rows = loss * float(temperature) ** 2 if scale_by_temperature_sq else loss
    if ce_weight:
        rows = rows + float(ce_weight) * ce
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    if flat_labels is None:
        return rows.sum() / max(rows.numel(), 1)
    return rows.sum() / (flat_labels != ignore_index).sum().clamp_min(1)


class LinearKLLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`linear_kl`: ``forward(x_s, w_s, x_t, w_t, labels=None, b_s=None, b_t=None)``.

    Options as in :func:`linear_kl`; the default reduction is ``"mean"`` over the valid rows.
    """

    def __init__(self, *, temperature: float = 1.0, divergence: str = "forward", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "mean", scale_by_temperature_sq: bool = False,
                 ce_weight: float = 0.0):
        super().__init__()
        check_linear_options(temperature, divergence, beta, reduction, where="streamkl.LinearKLLoss")
        if ce_weight and temperature != 1:  # the labels are only seen in forward
            check_linear_options(temperature, divergence, beta, ce_weight=ce_weight, has_labels=True,
                                 where="streamkl.LinearKLLoss")
        self.temperature, self.divergence, self.beta = temperature, divergence, beta
        self.ignore_index, self.reduction = ignore_index, reduction
        self.scale_by_temperature_sq, self.ce_weight = scale_by_temperature_sq, ce_weight

    def forward(self, x_s, w_s, x_t, w_t, labels=None, b_s=None, b_t=None):
        return linear_kl(x_s, w_s, x_t, w_t, b_s=b_s, b_t=b_t, temperature=self.temperature,
                         divergence=self.divergence, beta=self.beta, labels=labels, ignore_index=self.ignore_index,
                         reduction=self.reduction, scale_by_temperature_sq=self.scale_by_temperature_sq,
                         ce_weight=self.ce_weight)

    def extra_repr(self):
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, beta={self.beta}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"scale_by_temperature_sq={self.scale_by_temperature_sq}, ce_weight={self.ce_weight}")

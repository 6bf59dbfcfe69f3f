"""Public attention-KL API: ``attention_kl`` and the ``AttentionKLLoss`` module."""

import math
from typing import Optional, Tuple

import torch

from . import _ops
from ._validation import DIVERGENCES, REDUCTIONS, check_attention_tensors, check_options, check_window


def attention_kl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, *,
                 causal: bool = False, scale_s: Optional[float] = None, scale_t: Optional[float] = None,
                 divergence: str = "forward", reduction: str = "none",
                 window_size: Tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Row-wise divergence between a teacher's and a student's attention distributions.

    For every batch ``b``, head ``h`` and query row ``i``::

        P_s = softmax(scale_s * q_s[b, h, i] @ k_s[b, h].T)      (student)
        P_t = softmax(scale_t * q_t[b, h, i] @ k_t[b, h].T)      (teacher)
        divergence="forward":  KL(P_t || P_s)   (the usual distillation loss)
        divergence="reverse":  KL(P_s || P_t)

    computed in one streaming pass over key tiles: neither ``[B, H, N_q, N_k]`` matrix is ever built.

    Args:
        q_s, k_s: student queries ``[B, H, N_q, D_s]`` and keys ``[B, H, N_k, D_s]``.
        q_t, k_t: teacher queries ``[B, H, N_q, D_t]`` and keys ``[B, H, N_k, D_t]``; ``D_t`` may differ
            from ``D_s``. Any strides are accepted (a non-contiguous last dim is copied).
        causal: mask keys after the query. When ``N_q != N_k`` the mask is aligned bottom-right (query
            row ``i`` sees keys ``j <= i + N_k - N_q``), as in FlashAttention >= 2.1. Rows that see no key
            (``N_q > N_k``) contribute 0 and receive zero gradient.
        scale_s, scale_t: softmax scales; default ``1/sqrt(D)`` of each side.
        window_size: ``(left, right)`` sliding window with FlashAttention's semantics, aligned bottom-right
            like ``causal``: row ``i`` sees keys ``j`` with ``i + N_k - N_q - left <= j <= i + N_k - N_q + right``;
            ``-1`` leaves a side unbounded; ``causal=True`` sets ``right = 0``. CPU only for now (CUDA raises
            NotImplementedError until its window path has been validated on a GPU).
        divergence: ``"forward"`` or ``"reverse"`` (see above).
        reduction: ``"none"`` returns ``[B, H, N_q]``; ``"sum"``; ``"mean"`` averages over all
            ``B * H * N_q`` rows (fully masked rows count as rows with divergence 0).

    Returns:
        float32 tensor (float64 for float64 inputs): statistics are accumulated in fp32 whatever the
        input dtype. Gradients flow to ``q_s, k_s``, and to ``q_t, k_t`` when they require grad.
    """
    check_attention_tensors(q_s, k_s, q_t, k_t, where="streamkl.attention_kl")
    scale_s, scale_t = default_scales(q_s, q_t, scale_s, scale_t)
    check_options(scale_s, scale_t, divergence, reduction, where="streamkl.attention_kl")
    check_window(window_size, where="streamkl.attention_kl")
    kl, _, _ = _ops.ops.attention_kl_fwd(q_s, k_s, q_t, k_t, scale_s, scale_t, bool(causal), divergence,
                                         int(window_size[0]), int(window_size[1]))
    return reduce_rows(kl, reduction)


def default_scales(q_s, q_t, scale_s, scale_t):
    """``1/sqrt(D)`` of each side unless given."""
    scale_s = 1.0 / math.sqrt(q_s.shape[-1]) if scale_s is None else float(scale_s)
    scale_t = 1.0 / math.sqrt(q_t.shape[-1]) if scale_t is None else float(scale_t)
    return scale_s, scale_t


def reduce_rows(kl, reduction):
    """``"none"``: the per-row tensor; ``"sum"``; ``"mean"`` over all rows (0 when there is none)."""
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean() if kl.numel() else kl.sum()
    return kl


class AttentionKLLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`attention_kl`; ``forward(q_s, k_s, q_t, k_t)``.

    Default reduction is ``"mean"``, as is usual for a training loss.
    """

    def __init__(self, *, causal: bool = False, scale_s: Optional[float] = None, scale_t: Optional[float] = None,
                 divergence: str = "forward", reduction: str = "mean", window_size: Tuple[int, int] = (-1, -1)):
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(f"streamkl.AttentionKLLoss: divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"streamkl.AttentionKLLoss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.causal, self.scale_s, self.scale_t = causal, scale_s, scale_t
        check_window(window_size, where="streamkl.AttentionKLLoss")
        self.divergence, self.reduction, self.window_size = divergence, reduction, tuple(window_size)

    def forward(self, q_s, k_s, q_t, k_t):
        return attention_kl(q_s, k_s, q_t, k_t, causal=self.causal, scale_s=self.scale_s, scale_t=self.scale_t,
                            divergence=self.divergence, reduction=self.reduction, window_size=self.window_size)

    def extra_repr(self):
        return (f"causal={self.causal}, scale_s={self.scale_s}, scale_t={self.scale_t}, "
                f"divergence={self.divergence!r}, reduction={self.reduction!r}, window_size={self.window_size}")

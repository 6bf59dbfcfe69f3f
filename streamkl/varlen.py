"""Attention KL on varlen-packed sequences (FlashAttention's ``*_varlen`` layout): ``attention_kl_varlen``
and the ``AttentionKLVarlenLoss`` module."""

from typing import Optional, Tuple

import torch

from . import _ops
from ._validation import REDUCTIONS, check_beta, check_divergence, check_options, check_varlen_tensors, check_window
from .attention import default_scales, reduce_rows


def attention_kl_varlen(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                        *, scale_s: Optional[float] = None, scale_t: Optional[float] = None, causal: bool = False,
                        divergence: str = "forward", window_size: Tuple[int, int] = (-1, -1),
                        reduction: str = "none", beta: float = 0.5) -> torch.Tensor:
    """Row-wise divergence between teacher and student attention over a batch of packed sequences.

    Same divergence as :func:`streamkl.attention_kl`, on FlashAttention's varlen layout: the ``B`` sequences
    are concatenated along the token dimension, sequence ``b`` being query rows
    ``cu_seqlens_q[b] .. cu_seqlens_q[b+1]`` and key rows ``cu_seqlens_k[b] .. cu_seqlens_k[b+1]``.

    Args:
        q_s, k_s: student queries ``[total_q, H, D_s]`` and keys ``[total_k, H_kv_s, D_s]``.
        q_t, k_t: teacher queries ``[total_q, H, D_t]`` and keys ``[total_k, H_kv_t, D_t]``. ``H_kv`` divides
            ``H`` (GQA/MQA) on each side.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` on the inputs' device, starting at 0, non-decreasing,
            ending at ``total_q`` / ``total_k``. A sequence may have different query and key lengths, and 0 keys
            (its rows give 0 and get zero gradients).
        max_seqlen_q, max_seqlen_k: ints ``>=`` every sequence's length (as in FlashAttention).
        causal, window_size: as in :func:`streamkl.attention_kl`, aligned bottom-right *per sequence* (row ``i``
            of a sequence with ``n_q`` queries and ``n_k`` keys sees keys up to ``i + n_k - n_q`` when causal).
        divergence, beta: ``"forward"`` (KL(P_t || P_s)), ``"reverse"`` (KL(P_s || P_t)) or ``"jsd"`` (the
            generalized JSD with parameter ``beta``, same convention as :func:`streamkl.attention_kl`).
        reduction: ``"none"`` gives ``[total_q, H]``; ``"sum"``; ``"mean"`` over all ``total_q * H`` rows.

    Returns:
        float32 (float64 for float64 inputs). Gradients flow to ``q_s, k_s`` and, when they require grad, to
        ``q_t, k_t``. The cu_seqlens values are checked by the op (ValueError). CUDA (float16 / bfloat16) runs
        all three divergences; teacher gradients on CUDA need ``H_kv`` equal on both sides, as in
        :func:`streamkl.attention_kl`, whose note on memory and determinism (the fused Hopper backward's fp32
        ``[total_q, H, D_s]`` dQ workspace, its cap ``STREAMKL_DQ_WORKSPACE_MB``, ``STREAMKL_FUSED_BACKWARD``) applies
        here too.
    """
    where = "streamkl.attention_kl_varlen"
    check_varlen_tensors(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, where=where)
    scale_s, scale_t = default_scales(q_s, q_t, scale_s, scale_t)
    check_options(scale_s, scale_t, divergence, reduction, where=where)
    check_window(window_size, where=where)
    check_beta(beta, where=where)
    _ops.refuse_cuda_teacher_grad_grouping(q_s, k_s, q_t, k_t, where=where)
    kl, _, _, _ = _ops.ops.attention_kl_varlen_fwd(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                   max_seqlen_k, scale_s, scale_t, bool(causal), divergence,
                                                   int(window_size[0]), int(window_size[1]), float(beta))
    return reduce_rows(kl, reduction)


class AttentionKLVarlenLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`attention_kl_varlen`;
    ``forward(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)``.
    Default reduction is ``"mean"``."""

    def __init__(self, *, causal: bool = False, scale_s: Optional[float] = None, scale_t: Optional[float] = None,
                 divergence: str = "forward", reduction: str = "mean", window_size: Tuple[int, int] = (-1, -1),
                 beta: float = 0.5):
        super().__init__()
        where = "streamkl.AttentionKLVarlenLoss"
        check_divergence(divergence, where=where)
        if reduction not in REDUCTIONS:
            raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        check_window(window_size, where=where)
        check_beta(beta, where=where)
        self.causal, self.scale_s, self.scale_t = causal, scale_s, scale_t
        self.divergence, self.reduction, self.window_size, self.beta = divergence, reduction, tuple(window_size), beta

    def forward(self, q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        return attention_kl_varlen(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   causal=self.causal, scale_s=self.scale_s, scale_t=self.scale_t,
                                   divergence=self.divergence, window_size=self.window_size,
                                   reduction=self.reduction, beta=self.beta)

    def extra_repr(self):
        return (f"causal={self.causal}, scale_s={self.scale_s}, scale_t={self.scale_t}, "
                f"divergence={self.divergence!r}, reduction={self.reduction!r}, window_size={self.window_size}")

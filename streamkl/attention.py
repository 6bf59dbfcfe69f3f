"""Public attention-KL API: ``attention_kl`` and the ``AttentionKLLoss`` module."""

import math
from typing import Optional, Tuple

import torch

from . import _ops
from ._validation import (REDUCTIONS, TEACHER_HEAD_REDUCTIONS, check_attention_tensors, check_beta,
                          check_divergence, check_options, check_teacher_lse, check_window)


def attention_kl(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, *,
                 causal: bool = False, scale_s: Optional[float] = None, scale_t: Optional[float] = None,
                 divergence: str = "forward", reduction: str = "none",
                 window_size: Tuple[int, int] = (-1, -1), beta: float = 0.5, teacher_head_reduce: str = "none",
                 teacher_lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Row-wise divergence between a teacher's and a student's attention distributions.

    For every batch ``b``, head ``h`` and query row ``i``::

        P_s = softmax(scale_s * q_s[b, h, i] @ k_s[b, h].T)      (student)
        P_t = softmax(scale_t * q_t[b, h, i] @ k_t[b, h].T)      (teacher)
        divergence="forward":  KL(P_t || P_s)   (the usual distillation loss)
        divergence="reverse":  KL(P_s || P_t)
        divergence="jsd":      generalized Jensen-Shannon divergence with parameter beta in [0, 1]
            (TRL / Liger convention, shared with streamkl.linear_kl):
            0 < beta < 1:  beta KL(P_t || M) + (1 - beta) KL(P_s || M),   M = beta P_t + (1 - beta) P_s
            beta = 0:      KL(P_t || P_s)   (forward KL, exactly)
            beta = 1:      KL(P_s || P_t)   (reverse KL, exactly)
            The formula is 0 at the ends; the KLs there are its limits divided by beta, resp. 1 - beta.
            beta = 0.5 is the symmetric JSD (<= log 2).

    The KL divergences take one streaming pass over key tiles; the JSD two (both log-sum-exps, then the
    mixture, in log-sum-exp form: no NaN, never negative). Neither ``[B, H, N_q, N_k]`` matrix is ever built.

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
            ``-1`` leaves a side unbounded; ``causal=True`` sets ``right = 0``. CPU and CUDA.
        divergence: ``"forward"``, ``"reverse"`` or ``"jsd"`` (see above; all three run on CPU and CUDA).
        beta: the JSD's parameter in [0, 1] (the teacher's mixture weight); ignored by the KL divergences.
        teacher_head_reduce: ``"none"``, or ``"mean"`` for a head-aggregated teacher: ``q_t`` has ``H_t = r * H``
            heads (``k_t``: ``H_kv_t`` dividing ``H_t``) and the target of student head ``h`` is the mean of the
            attention probabilities of teacher heads ``h*r .. h*r+r-1`` (DeepSeek DSA's indexer target when
            ``H = 1``). Needs the teacher's LSEs first: a second streaming pass, still no quadratic memory. All
            three divergences work; the teacher gets no gradient (``q_t``/``k_t`` must not require grad: detach
            them). CPU and CUDA (on CUDA: head dims 64 and 128, Ampere-path kernels on every GPU).
        teacher_lse: optional ``[B, H_t, N_q]`` log-sum-exps of the teacher's scores (natural log, computed with
            this ``scale_t``; e.g. FlashAttention's ``softmax_lse`` when its ``softmax_scale`` equals ``scale_t``),
            which skips the teacher's LSE pass. Only with ``teacher_head_reduce="mean"``.
        reduction: ``"none"`` returns ``[B, H, N_q]``; ``"sum"``; ``"mean"`` averages over all
            ``B * H * N_q`` rows (fully masked rows count as rows with divergence 0).

    Returns:
        float32 tensor (float64 for float64 inputs): statistics are accumulated in fp32 whatever the
        input dtype. Gradients flow to ``q_s, k_s``, and to ``q_t, k_t`` when they require grad.

    Memory and determinism (CUDA): the forward keeps 12 bytes per query row. On Hopper GPUs the backward with
    student-only gradients at student head dim 128 (both sides with the same number of key heads, no aggregated
    teacher) is fused, the fastest: it adds dQ into an fp32 workspace of ``B * H * N_q * D_s * 4`` bytes through
    reductions in no fixed order, so ``q_s.grad`` is not bitwise reproducible (``k_s.grad`` is). The workspace is
    capped at ``STREAMKL_DQ_WORKSPACE_MB`` MiB (default 1024): a larger problem runs the fused kernel over ranges of
    key heads, each with a workspace of its own (at least one key head per run, whatever the cap). Under
    ``torch.use_deterministic_algorithms(True)``, or with the environment variable ``STREAMKL_FUSED_BACKWARD=0``,
    a two-kernel backward runs instead: deterministic, no workspace, about 9% slower at N=8192 (bench/RESULTS.md).
    ``STREAMKL_FUSED_BACKWARD=1`` also fuses the Ampere path's KL backward (padded layout; slower there, and not
    bitwise reproducible either); otherwise every other configuration, and the CPU, is deterministic.
    """
    where = "streamkl.attention_kl"
    check_attention_tensors(q_s, k_s, q_t, k_t, where=where, teacher_head_reduce=teacher_head_reduce)
    scale_s, scale_t = default_scales(q_s, q_t, scale_s, scale_t)
    check_options(scale_s, scale_t, divergence, reduction, where=where)
    check_window(window_size, where=where)
    check_beta(beta, where=where)
    check_teacher_lse(teacher_lse, q_t, teacher_head_reduce, where=where)
    if teacher_head_reduce == "mean":
        if torch.is_grad_enabled() and (q_t.requires_grad or k_t.requires_grad):
            raise NotImplementedError(f"{where}: gradients to an aggregated teacher (teacher_head_reduce='mean') are "
                                      f"not supported; pass q_t.detach(), k_t.detach() (the teacher is a fixed target)")
    _ops.refuse_cuda_teacher_grad_grouping(q_s, k_s, q_t, k_t, where=where)
    tail = (int(window_size[0]), int(window_size[1]), teacher_head_reduce, teacher_lse)
    if divergence == "jsd":
        jsd, _, _, _ = _ops.ops.attention_jsd_fwd(q_s, k_s, q_t, k_t, scale_s, scale_t, bool(causal), float(beta),
                                                  *tail)
        return reduce_rows(jsd, reduction)
    kl, _, _ = _ops.ops.attention_kl_fwd(q_s, k_s, q_t, k_t, scale_s, scale_t, bool(causal), divergence, *tail)
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
    """``nn.Module`` form of :func:`attention_kl`; ``forward(q_s, k_s, q_t, k_t, teacher_lse=None)``.

    Default reduction is ``"mean"``, as is usual for a training loss.
    """

    def __init__(self, *, causal: bool = False, scale_s: Optional[float] = None, scale_t: Optional[float] = None,
                 divergence: str = "forward", reduction: str = "mean", window_size: Tuple[int, int] = (-1, -1),
                 beta: float = 0.5, teacher_head_reduce: str = "none"):
        super().__init__()
        where = "streamkl.AttentionKLLoss"
        check_divergence(divergence, where=where)
        if reduction not in REDUCTIONS:
            raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if teacher_head_reduce not in TEACHER_HEAD_REDUCTIONS:
            raise ValueError(f"{where}: teacher_head_reduce must be one of {TEACHER_HEAD_REDUCTIONS}, got "
                             f"{teacher_head_reduce!r}")
        check_window(window_size, where=where)
        check_beta(beta, where=where)
        self.causal, self.scale_s, self.scale_t = causal, scale_s, scale_t
        self.divergence, self.reduction, self.window_size, self.beta = divergence, reduction, tuple(window_size), beta
        self.teacher_head_reduce = teacher_head_reduce

    def forward(self, q_s, k_s, q_t, k_t, teacher_lse=None):
        return attention_kl(q_s, k_s, q_t, k_t, causal=self.causal, scale_s=self.scale_s, scale_t=self.scale_t,
                            divergence=self.divergence, reduction=self.reduction, window_size=self.window_size,
                            beta=self.beta, teacher_head_reduce=self.teacher_head_reduce, teacher_lse=teacher_lse)

    def extra_repr(self):
        return (f"causal={self.causal}, scale_s={self.scale_s}, scale_t={self.scale_t}, "
                f"divergence={self.divergence!r}, reduction={self.reduction!r}, window_size={self.window_size}"
                + (f", beta={self.beta}" if self.divergence == "jsd" else "")
                + (f", teacher_head_reduce={self.teacher_head_reduce!r}" if self.teacher_head_reduce != "none" else ""))

"""Float64 materializing reference for tests and benchmarks.

Builds the full ``[B, H, N_q, N_k]`` score matrices: exact, simple, and quadratic in memory on purpose.
Differentiable, so tests can compare gradients too. ``dtype=None`` keeps the input dtype (used as the
"eager PyTorch" baseline in benchmarks).
"""

import math
from typing import Optional

import torch


def causal_mask(n_q: int, n_k: int, device, offset: Optional[int] = None) -> torch.Tensor:
    """True where query i may see key j: ``j <= i + offset``; by default ``offset = n_k - n_q``
    (bottom-right alignment). A block of rows starting at row ``r0`` of a longer query uses
    ``offset = r0 + N_k - N_q``."""
    return attention_mask(n_q, n_k, device, causal=True, offset=offset)


def _widen(x: torch.Tensor) -> torch.Tensor:
    """Half-precision scores to fp32 for the softmax; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def attention_mask(n_q: int, n_k: int, device, *, causal: bool = False, window_size=(-1, -1),
                   offset: Optional[int] = None) -> Optional[torch.Tensor]:
    """Visible keys of each query row for a causal mask and/or sliding window (None: everything visible).

    Row i sees key j iff ``i + offset - left <= j <= i + offset + right`` (unbounded sides skipped), with
    ``right = 0`` when causal and ``offset = n_k - n_q`` by default (bottom-right alignment)."""
    left, right = window_size
    right = 0 if causal else right
    if left < 0 and right < 0:
        return None
    offset = n_k - n_q if offset is None else offset
    i = torch.arange(n_q, device=device).unsqueeze(1)
    j = torch.arange(n_k, device=device).unsqueeze(0)
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if right >= 0:
        allowed &= j <= i + offset + right
    if left >= 0:
        allowed &= j >= i + offset - left
    return allowed


def kl_from_log_probs(log_p_w: torch.Tensor, log_p_o: torch.Tensor,
                      allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row ``KL(P_w || P_o) = sum_j p_w,j (log p_w,j - log p_o,j)`` from log-probabilities (``-inf`` where
    masked; ``allowed`` marks the visible keys, or None for no mask)."""
    log_ratio = log_p_w - log_p_o
    if allowed is not None:
        # Masked entries have p_w = 0 and a log-ratio of -inf - -inf; select 0 there *before* multiplying so
        # the backward sees no 0 * nan.
        log_ratio = torch.where(allowed, log_ratio, torch.zeros_like(log_ratio))
    return (log_p_w.exp() * log_ratio).sum(-1)


def _kl_to_mixture(p: torch.Tensor, log_p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``sum_j p_j log(p_j / m_j)`` per row over the keys with ``p_j > 0`` (0 log 0 = 0; there ``m_j > 0``)."""
    seen = p > 0
    log_m = torch.log(torch.where(seen, m, torch.ones_like(m)))
    return (p * torch.where(seen, log_p - log_m, torch.zeros_like(log_p))).sum(-1)


def jsd_from_log_probs(log_p_t: torch.Tensor, log_p_s: torch.Tensor, beta: float,
                       allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Generalized JSD per row in the TRL / Liger convention, from log-probabilities (``-inf`` where masked)::

        beta * KL(P_t || M) + (1 - beta) * KL(P_s || M),   M = beta * P_t + (1 - beta) * P_s,

    and, where that formula is 0, its limits divided by the vanishing weight: ``KL(P_t || P_s)`` at ``beta = 0``,
    ``KL(P_s || P_t)`` at ``beta = 1``. Written the plain way, with ``M`` materialized as probabilities (the
    kernels' log-sum-exp algebra is what this checks)."""
    if beta == 0:
        return kl_from_log_probs(log_p_t, log_p_s, allowed)
    if beta == 1:
        return kl_from_log_probs(log_p_s, log_p_t, allowed)
    p_t, p_s = log_p_t.exp(), log_p_s.exp()
    m = beta * p_t + (1 - beta) * p_s
    return beta * _kl_to_mixture(p_t, log_p_t, m) + (1 - beta) * _kl_to_mixture(p_s, log_p_s, m)


def kl_from_scores(s: torch.Tensor, t: torch.Tensor, *, allowed: Optional[torch.Tensor] = None,
                   divergence: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence from materialized student / teacher scores ``[..., N_q, N_k]``.

    ``allowed`` (bool ``[N_q, N_k]``, or None for no mask) marks the visible keys; rows that see no key
    contribute 0 with finite (zero) gradients. ``divergence="jsd"`` uses ``beta`` (see jsd_from_log_probs).
    """
    if allowed is not None:
        empty_row = ~allowed.any(-1, keepdim=True)
        # Rows that see no key are given every key (finite softmax, finite gradient) and zeroed at the end.
        allowed = allowed | empty_row
        s = s.masked_fill(~allowed, float("-inf"))
        t = t.masked_fill(~allowed, float("-inf"))
    log_p_s = torch.log_softmax(_widen(s), dim=-1)
    log_p_t = torch.log_softmax(_widen(t), dim=-1)
    if divergence == "jsd":
        kl = jsd_from_log_probs(log_p_t, log_p_s, beta, allowed)
    elif divergence == "forward":
        kl = kl_from_log_probs(log_p_t, log_p_s, allowed)
    elif divergence == "reverse":
        kl = kl_from_log_probs(log_p_s, log_p_t, allowed)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    if allowed is not None:
        kl = kl * (~empty_row.squeeze(-1)).to(kl.dtype)
    return kl


def attention_kl_reference(q_s, k_s, q_t, k_t, *, causal: bool = False, scale_s: Optional[float] = None,
                           scale_t: Optional[float] = None, divergence: str = "forward",
                           dtype: Optional[torch.dtype] = torch.float64, window_size=(-1, -1),
                           beta: float = 0.5, teacher_head_reduce: str = "none") -> torch.Tensor:
    """Per-row divergence ``[B, H, N_q]`` computed by materializing both attention distributions
    (``divergence`` "forward", "reverse" or "jsd" with ``beta``). ``teacher_head_reduce="mean"``: q_t has
    ``r * H`` heads and each student head's target is the mean of its r teacher heads' attention."""
    scale_s = 1.0 / math.sqrt(q_s.shape[-1]) if scale_s is None else scale_s
    scale_t = 1.0 / math.sqrt(q_t.shape[-1]) if scale_t is None else scale_t
    if dtype is not None:
        q_s, k_s, q_t, k_t = (x.to(dtype) for x in (q_s, k_s, q_t, k_t))
    # GQA / MQA: query head h reads key head h // (H / H_kv).
    k_s = k_s.repeat_interleave(q_s.shape[1] // k_s.shape[1], dim=1) if k_s.shape[1] else k_s
    k_t = k_t.repeat_interleave(q_t.shape[1] // k_t.shape[1], dim=1) if k_t.shape[1] else k_t
    s = scale_s * (q_s @ k_s.transpose(-1, -2))
    t = scale_t * (q_t @ k_t.transpose(-1, -2))
    allowed = attention_mask(s.shape[-2], s.shape[-1], s.device, causal=causal, window_size=window_size)
    if teacher_head_reduce == "mean":
        t = mean_head_log_probs(t, s.shape[1], allowed)
    return kl_from_scores(s, t, allowed=allowed, divergence=divergence, beta=beta)


def mean_head_log_probs(t: torch.Tensor, heads: int, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """Teacher scores ``[B, r*H, N_q, N_k]`` -> ``log((1/r) sum_g softmax(t_{h*r+g}))`` ``[B, H, N_q, N_k]``: the
    head-mean attention in log space, usable as scores (its softmax is itself). Rows that see no key use every
    key, like kl_from_scores, so they stay finite."""
    if allowed is not None:
        t = t.masked_fill(~(allowed | ~allowed.any(-1, keepdim=True)), float("-inf"))
    log_p = torch.log_softmax(_widen(t), dim=-1)
    B, Ht, Nq, Nk = log_p.shape
    return torch.logsumexp(log_p.view(B, heads, Ht // heads, Nq, Nk), dim=2) - math.log(Ht // heads)


def attention_kl_varlen_reference(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, *, causal: bool = False,
                                  scale_s: Optional[float] = None, scale_t: Optional[float] = None,
                                  divergence: str = "forward", dtype: Optional[torch.dtype] = torch.float64,
                                  window_size=(-1, -1), **divergence_options) -> torch.Tensor:
    """Per-row divergence ``[total_q, H]`` of packed sequences: one padded reference call per sequence (each
    with its own bottom-right mask alignment). A sequence with no keys gives zeros (still connected to the
    inputs, so gradients are zeros rather than missing)."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    pieces = []
    for b in range(len(bounds_q) - 1):
        qs, qe, ks, ke = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        seq = [x[lo:hi].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
               for x, (lo, hi) in ((q_s, (qs, qe)), (k_s, (ks, ke)), (q_t, (qs, qe)), (k_t, (ks, ke)))]
        if ke == ks:
            zero = sum(x.sum() for x in seq) * 0
            out = torch.zeros(seq[0].shape[1], qe - qs, dtype=dtype or q_s.dtype, device=q_s.device) + zero
        else:
            out = attention_kl_reference(*seq, causal=causal, scale_s=scale_s, scale_t=scale_t,
                                         divergence=divergence, dtype=dtype, window_size=window_size,
                                         **divergence_options)[0]
        pieces.append(out.transpose(0, 1))  # [n_q, H]
    if not pieces:
        return torch.zeros(0, q_s.shape[1], dtype=dtype or q_s.dtype, device=q_s.device)
    return torch.cat(pieces, dim=0)

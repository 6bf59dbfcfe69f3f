"""Float64 materializing reference for tests and benchmarks.

Builds the full ``[B, H, N_q, N_k]`` score matrices: exact, simple, and quadratic in memory on purpose.
Differentiable, so tests can compare gradients too. ``dtype=None`` keeps the input dtype (used as the
"eager PyTorch" baseline in benchmarks).
"""

import math
from typing import Optional

import torch


def causal_mask(n_q: int, n_k: int, device) -> torch.Tensor:
    """Bottom-right aligned causal mask: True where query i may see key j (j <= i + n_k - n_q)."""
    i = torch.arange(n_q, device=device).unsqueeze(1)
    j = torch.arange(n_k, device=device).unsqueeze(0)
    return j <= i + (n_k - n_q)


def attention_kl_reference(q_s, k_s, q_t, k_t, *, causal: bool = False, scale_s: Optional[float] = None,
                           scale_t: Optional[float] = None, divergence: str = "forward",
                           dtype: Optional[torch.dtype] = torch.float64) -> torch.Tensor:
    """Per-row divergence ``[B, H, N_q]`` computed by materializing both attention distributions."""
    scale_s = 1.0 / math.sqrt(q_s.shape[-1]) if scale_s is None else scale_s
    scale_t = 1.0 / math.sqrt(q_t.shape[-1]) if scale_t is None else scale_t
    if dtype is not None:
        q_s, k_s, q_t, k_t = (x.to(dtype) for x in (q_s, k_s, q_t, k_t))
    s = scale_s * (q_s @ k_s.transpose(-1, -2))
    t = scale_t * (q_t @ k_t.transpose(-1, -2))
    n_q, n_k = s.shape[-2], s.shape[-1]
    if causal:
        allowed = causal_mask(n_q, n_k, s.device)
        empty_row = ~allowed.any(-1, keepdim=True)
        # Rows that see no key are given every key (finite softmax, finite gradient) and zeroed at the end.
        allowed = allowed | empty_row
        s = s.masked_fill(~allowed, float("-inf"))
        t = t.masked_fill(~allowed, float("-inf"))
    log_p_s = torch.log_softmax(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1)
    log_p_t = torch.log_softmax(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t, dim=-1)
    if divergence == "forward":
        log_p_w, log_p_o = log_p_t, log_p_s
    elif divergence == "reverse":
        log_p_w, log_p_o = log_p_s, log_p_t
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    log_ratio = log_p_w - log_p_o
    if causal:
        # Masked entries have p_w = 0 and a log-ratio of -inf - -inf; select 0 there *before* multiplying so
        # the backward sees no 0 * nan.
        log_ratio = torch.where(allowed, log_ratio, torch.zeros_like(log_ratio))
    kl = (log_p_w.exp() * log_ratio).sum(-1)
    if causal:
        kl = kl * (~empty_row.squeeze(-1)).to(kl.dtype)
    return kl

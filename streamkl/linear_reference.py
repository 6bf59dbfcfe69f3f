"""Float64 materializing reference of :func:`streamkl.linear_kl`, for tests and benchmarks.

Builds both ``[T, V]`` logit matrices: exact, simple, and O(T * V) in memory on purpose. Differentiable, so
tests can compare gradients too. ``dtype=None`` keeps the input dtype for the products (softmax statistics in
fp32 or wider), i.e. what one writes by hand in eager PyTorch.
"""

import math
from typing import Optional

import torch

from .reference import kl_from_scores


def jsd_from_scores(s: torch.Tensor, t: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row generalized JSD from materialized logits ``[..., V]``:
    ``beta * KL(P_t || M) + (1 - beta) * KL(P_s || M)``, ``M = beta * P_t + (1 - beta) * P_s``, with the
    TRL / Liger endpoints ``beta = 0`` -> ``KL(P_t || P_s)`` and ``beta = 1`` -> ``KL(P_s || P_t)``. The mixture
    is formed in log-sum-exp form."""
    if beta == 0:
        return kl_from_scores(s, t, divergence="forward")
    if beta == 1:
        return kl_from_scores(s, t, divergence="reverse")
    log_p_s = torch.log_softmax(s, dim=-1)
    log_p_t = torch.log_softmax(t, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p_t + math.log(beta), log_p_s + math.log1p(-beta)]), dim=0)
    kl_t_m = (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
    kl_s_m = (log_p_s.exp() * (log_p_s - log_m)).sum(-1)
    return beta * kl_t_m + (1 - beta) * kl_s_m


def logits(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    """``(x @ w.T + b) / temperature``, widened to fp32 for half-precision inputs (after the product)."""
    z = x @ w.T
    if b is not None:
        z = z + b
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return z / temperature


def linear_kl_reference(x_s, w_s, x_t, w_t, *, b_s=None, b_t=None, temperature: float = 1.0,
                        divergence: str = "forward", beta: float = 0.5, labels=None, ignore_index: int = -100,
                        reduction: str = "mean", scale_by_temperature_sq: bool = False, ce_weight: float = 0.0,
                        dtype: Optional[torch.dtype] = torch.float64) -> torch.Tensor:
    """Same semantics as :func:`streamkl.linear_kl`, computed by materializing both logit matrices.

    ``reduction="none"`` returns the per-row loss shaped like ``x_s.shape[:-1]``; ``"mean"`` divides the sum
    by the number of rows whose label is not ``ignore_index`` (all rows without labels).
    """
    if dtype is not None:
        x_s, w_s, x_t, w_t = (v.to(dtype) for v in (x_s, w_s, x_t, w_t))
        b_s = None if b_s is None else b_s.to(dtype)
        b_t = None if b_t is None else b_t.to(dtype)
    lead = x_s.shape[:-1]
    s = logits(x_s.reshape(-1, x_s.shape[-1]), w_s, b_s, temperature)
    t = logits(x_t.reshape(-1, x_t.shape[-1]), w_t, b_t, temperature)
    if divergence == "jsd":
        rows = jsd_from_scores(s, t, beta)
    else:
        rows = kl_from_scores(s, t, divergence=divergence)
    if scale_by_temperature_sq:
        rows = rows * temperature ** 2
    valid = None
    if labels is not None:
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        if ce_weight:
            safe = torch.where(valid, flat, torch.zeros_like(flat))
            ce = torch.logsumexp(s, -1) - s.gather(1, safe[:, None]).squeeze(1)
            rows = rows + ce_weight * ce
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    count = rows.numel() if valid is None else int(valid.sum())
    return rows.sum() / max(count, 1)

"""Float64 materializing reference of :func:`streamkl.linear_kl`, for tests and benchmarks.

Builds both ``[T, V]`` logit matrices: exact, simple, and O(T * V) in memory on purpose. Differentiable, so
tests can compare gradients too. ``dtype=None`` keeps the input dtype for the products (softmax statistics in
fp32 or wider), i.e. what one writes by hand in eager PyTorch.
"""

from typing import Optional

import torch

from .reference import kl_from_scores


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
    rows = kl_from_scores(s, t, divergence=divergence, beta=beta)  # the attention reference's formulas
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

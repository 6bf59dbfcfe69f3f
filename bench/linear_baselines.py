"""Baselines of the hidden-state logit-distillation benchmark (bench/linear.py).

Every baseline has the signature of ``streamkl.linear_kl`` restricted to what the benchmark uses:
``fn(x_s, w_s, x_t, w_t, *, divergence, beta, temperature, labels) -> scalar mean loss``.

    eager     full [T, V] logits in the input dtype (bf16 matmul output), softmax statistics in fp32:
              what one writes by hand (streamkl.linear_kl_reference with dtype=None)
    compile   torch.compile of eager
    chunked   vocabulary-chunked PyTorch (the Nitrobrew approach): the forward streams over chunks of V with
              an online log-sum-exp, the backward recomputes each chunk's logits from the saved LSEs; the
              per-chunk steps are torch.compile'd. Forward KL only; ignore_index -100 masks rows.
    liger     Liger-Kernel's LigerFusedLinearJSD (Triton; jsd_beta = 0 / 1 is forward / reverse KL)
    liger_chunked  Liger-Kernel's chunked distillation loss LigerFusedLinearJSDLoss (soft loss only)
"""

from typing import Callable, Optional

import torch

import streamkl


def eager_linear_kl(x_s, w_s, x_t, w_t, *, divergence="forward", beta=0.5, temperature=1.0, labels=None):
    """Materializing baseline: both [T, V] logit matrices in the input dtype, statistics in fp32."""
    return streamkl.linear_kl_reference(x_s, w_s, x_t, w_t, divergence=divergence, beta=beta,
                                        temperature=temperature, labels=labels, dtype=None)


def compiled_linear_kl() -> Callable:
    """A fresh static-shape torch.compile of the eager baseline."""
    torch._dynamo.reset()
    return torch.compile(eager_linear_kl, dynamic=False)


# ------------------------------------------------------------------------------- vocabulary-chunked (Nitrobrew)

def _chunk_stats(x_s, w_s, x_t, w_t, inv_tau: float):
    """Tempered fp32 logits of one vocabulary chunk and their row maxima / exp-sums / teacher-weighted sums."""
    s = (x_s @ w_s.T).float() * inv_tau
    t = (x_t @ w_t.T).float() * inv_tau
    m_s, m_t = s.amax(-1), t.amax(-1)
    e_t = torch.exp(t - m_t[:, None])
    return m_s, torch.exp(s - m_s[:, None]).sum(-1), m_t, e_t.sum(-1), (e_t * (t - s)).sum(-1)


def _chunk_grads(x_s, w_s, x_t, w_t, lse_s, lse_t, g, inv_tau: float):
    """dx_s contribution and dw_s of one chunk for forward KL: dL/dz_s = g / tau * (p_s - p_t)."""
    s = (x_s @ w_s.T).float() * inv_tau
    t = (x_t @ w_t.T).float() * inv_tau
    grad = ((torch.exp(s - lse_s[:, None]) - torch.exp(t - lse_t[:, None])) * (g * inv_tau)[:, None]).to(x_s.dtype)
    return grad @ w_s, grad.T @ x_s


class _ChunkedForwardKL(torch.autograd.Function):
    """Forward KL per row, streaming over vocabulary chunks; gradients to x_s and w_s only."""

    @staticmethod
    def forward(ctx, x_s, w_s, x_t, w_t, inv_tau, chunk, stats_fn, grads_fn):
        rows = x_s.shape[0]
        m_s = torch.full((rows,), float("-inf"), device=x_s.device)
        m_t, l_s, l_t, acc = m_s.clone(), *(torch.zeros(rows, device=x_s.device) for _ in range(3))
        for v0 in range(0, w_s.shape[0], chunk):
            cm_s, cl_s, cm_t, cl_t, cacc = stats_fn(x_s, w_s[v0:v0 + chunk], x_t, w_t[v0:v0 + chunk], inv_tau)
            new_s, new_t = torch.maximum(m_s, cm_s), torch.maximum(m_t, cm_t)
            a_s, c_s = torch.exp(m_s - new_s), torch.exp(cm_s - new_s)
            a_t, c_t = torch.exp(m_t - new_t), torch.exp(cm_t - new_t)
            l_s, l_t, acc = l_s * a_s + cl_s * c_s, l_t * a_t + cl_t * c_t, acc * a_t + cacc * c_t
            m_s, m_t = new_s, new_t
        lse_s, lse_t = m_s + torch.log(l_s), m_t + torch.log(l_t)
        ctx.save_for_backward(x_s, w_s, x_t, w_t, lse_s, lse_t)
        ctx.options = (inv_tau, chunk, grads_fn)
        return acc / l_t - lse_t + lse_s

    @staticmethod
    def backward(ctx, g):
        x_s, w_s, x_t, w_t, lse_s, lse_t = ctx.saved_tensors
        inv_tau, chunk, grads_fn = ctx.options
        dx_s = torch.zeros(x_s.shape, device=x_s.device, dtype=torch.float32)
        dw_s = torch.empty_like(w_s)
        for v0 in range(0, w_s.shape[0], chunk):
            dx, dw = grads_fn(x_s, w_s[v0:v0 + chunk], x_t, w_t[v0:v0 + chunk], lse_s, lse_t, g, inv_tau)
            dx_s += dx
            dw_s[v0:v0 + chunk] = dw
        return dx_s.to(x_s.dtype), dw_s, None, None, None, None, None, None


def chunked_linear_kl_factory(chunk: int = 8192, compile_steps: bool = True) -> Callable:
    """The vocabulary-chunked baseline with freshly compiled per-chunk steps."""
    torch._dynamo.reset()
    stats_fn = torch.compile(_chunk_stats, dynamic=False) if compile_steps else _chunk_stats
    grads_fn = torch.compile(_chunk_grads, dynamic=False) if compile_steps else _chunk_grads

    def fn(x_s, w_s, x_t, w_t, *, divergence="forward", beta=0.5, temperature=1.0, labels=None):
        if divergence != "forward":
            raise NotImplementedError("the chunked baseline implements forward KL only")
        rows = _ChunkedForwardKL.apply(x_s, w_s, x_t.detach(), w_t.detach(), 1.0 / temperature, chunk, stats_fn,
                                       grads_fn)
        if labels is None:
            return rows.mean()
        valid = labels != -100
        return torch.where(valid, rows, torch.zeros_like(rows)).sum() / valid.sum().clamp_min(1)

    return fn


# ------------------------------------------------------------------------------- Liger-Kernel

def liger_unavailable_reason(device) -> Optional[str]:
    """Why the Liger baselines cannot run here, or None."""
    if torch.device(device).type != "cuda":
        return "Liger-Kernel needs a CUDA device (Triton)"
    try:
        import liger_kernel  # noqa: F401
    except Exception as exc:  # ImportError, or a triton that fails to initialise
        return f"liger-kernel not importable ({type(exc).__name__}: {exc}); pip install liger-kernel"
    return None


def _liger_beta(divergence: str, beta: float) -> float:
    """Liger's jsd_beta: 0 = forward KL, 1 = reverse KL, otherwise the same generalized JSD as ours."""
    return {"forward": 0.0, "reverse": 1.0}.get(divergence, beta)


def liger_fused_linear_jsd_factory() -> Callable:
    from liger_kernel.transformers import LigerFusedLinearJSD

    def fn(x_s, w_s, x_t, w_t, *, divergence="forward", beta=0.5, temperature=1.0, labels=None):
        loss = LigerFusedLinearJSD(jsd_beta=_liger_beta(divergence, beta), temperature=temperature)
        return loss(x_s, w_s, x_t, w_t, labels)

    return fn


def liger_chunked_jsd_factory() -> Callable:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    def fn(x_s, w_s, x_t, w_t, *, divergence="forward", beta=0.5, temperature=1.0, labels=None):
        if labels is None:
            raise ValueError("the Liger chunked loss needs labels")
        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                       beta=_liger_beta(divergence, beta), temperature=temperature)
        return loss(x_s, w_s, x_t, w_t, labels)

    return fn

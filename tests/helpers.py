"""Input factories and error metrics shared by the StreamKL tests.

Every test draws fresh random inputs from its own seeded ``torch.Generator``; ``seed_of(...)`` derives the
seed from the test's parameters so that each parameter set sees different data, reproducibly.
"""

import math
import zlib

import pytest
import torch

import streamkl

TINY = 1e-30

# Marks of every CUDA test module: skipped unless a GPU is visible and this build has the CUDA kernels (CI has
# neither; tools/device_check.sh runs them on a GPU).
CUDA_TEST_MARKS = [
    pytest.mark.cuda,
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.skipif(not (torch.cuda.is_available() and streamkl.cuda_available()),
                       reason="needs a CUDA device and the CUDA build of streamkl"),
]


def seed_of(*params) -> int:
    """A reproducible seed that differs between parameter sets."""
    return zlib.crc32(repr(params).encode()) & 0x7FFFFFFF


def randn(shape, generator, *, dtype=torch.float32, device="cpu", scale=1.0):
    """Standard normal values (drawn in float64 on the CPU, then cast), times ``scale``."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return x.to(device=device, dtype=dtype)


def make_inputs(B, H, Nq, Nk, Ds, Dt, *, seed, dtype=torch.float32, device="cpu", sharpness=1.0,
                requires_grad=False, teacher_requires_grad=None):
    """Random (q_s, k_s, q_t, k_t) of shapes [B,H,Nq,Ds], [B,H,Nk,Ds], [B,H,Nq,Dt], [B,H,Nk,Dt].

    ``sharpness`` multiplies the queries, hence every logit: 50 gives near one-hot attention rows.
    ``teacher_requires_grad`` defaults to ``requires_grad``.
    """
    g = torch.Generator().manual_seed(seed)
    q_s = randn((B, H, Nq, Ds), g, dtype=dtype, device=device, scale=sharpness)
    k_s = randn((B, H, Nk, Ds), g, dtype=dtype, device=device)
    q_t = randn((B, H, Nq, Dt), g, dtype=dtype, device=device, scale=sharpness)
    k_t = randn((B, H, Nk, Dt), g, dtype=dtype, device=device)
    if teacher_requires_grad is None:
        teacher_requires_grad = requires_grad
    q_s.requires_grad_(requires_grad)
    k_s.requires_grad_(requires_grad)
    q_t.requires_grad_(teacher_requires_grad)
    k_t.requires_grad_(teacher_requires_grad)
    return q_s, k_s, q_t, k_t


def gqa_inputs(B, H, kv_s, kv_t, Nq, Nk, Ds, Dt, *, seed, dtype=torch.float64, device="cpu", requires_grad=True,
               teacher_requires_grad=None):
    """Random (q_s, k_s, q_t, k_t) with grouped key heads: [B,H,Nq,Ds], [B,kv_s,Nk,Ds], [B,H,Nq,Dt], [B,kv_t,Nk,Dt].

    ``teacher_requires_grad`` defaults to ``requires_grad``.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, Nq, Ds), (B, kv_s, Nk, Ds), (B, H, Nq, Dt), (B, kv_t, Nk, Dt)]
    tensors = [randn(s, g, dtype=dtype, device=device) for s in shapes]
    if teacher_requires_grad is None:
        teacher_requires_grad = requires_grad
    for i, t in enumerate(tensors):
        t.requires_grad_(requires_grad if i < 2 else teacher_requires_grad)
    return tensors


def cu_seqlens(lengths, *, device="cpu"):
    """int32 [B + 1] cumulative lengths starting at 0 (FlashAttention's cu_seqlens)."""
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def varlen_inputs(lengths, H, kv_s, kv_t, Ds, Dt, *, seed, dtype=torch.float64, device="cpu", requires_grad=True,
                  teacher_requires_grad=None):
    """Packed (q_s, k_s, q_t, k_t) of shapes [total_q,H,Ds], [total_k,kv_s,Ds], [total_q,H,Dt], [total_k,kv_t,Dt]
    for per-sequence ``lengths`` [(N_q, N_k), ...], and the layout (cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k) on the same device. ``teacher_requires_grad`` defaults to ``requires_grad``."""
    nq = [n for n, _ in lengths]
    nk = [n for _, n in lengths]
    g = torch.Generator().manual_seed(seed)
    shapes = [(sum(nq), H, Ds), (sum(nk), kv_s, Ds), (sum(nq), H, Dt), (sum(nk), kv_t, Dt)]
    tensors = [randn(s, g, dtype=dtype, device=device) for s in shapes]
    teacher_requires_grad = requires_grad if teacher_requires_grad is None else teacher_requires_grad
    for i, t in enumerate(tensors):
        t.requires_grad_(requires_grad if i < 2 else teacher_requires_grad)
    layout = (cu_seqlens(nq, device=device), cu_seqlens(nk, device=device), max(nq, default=0), max(nk, default=0))
    return tensors, layout


def varlen_reference_grads(tensors, layout, grad_out, **kwargs):
    """The float64 varlen reference and the gradients of sum(grad_out * reference) w.r.t. the inputs that require
    grad (None for the others)."""
    leaves = detached_copies(tensors, dtype=torch.float64)
    ref = streamkl.attention_kl_varlen_reference(*leaves, *layout[:2], **kwargs)
    wrt = [x for x in leaves if x.requires_grad]
    grads = iter(torch.autograd.grad(ref, wrt, grad_out.to(ref.device, torch.float64)))
    return ref.detach(), [next(grads) if x.requires_grad else None for x in leaves]


def upstream_grad(shape, seed, *, device="cpu", dtype=torch.float32):
    """A random (not all-ones) incoming gradient for the per-row output."""
    g = torch.Generator().manual_seed(seed + 1)
    return randn(shape, g, dtype=dtype, device=device)


def detached_copies(tensors, *, dtype=None, requires_grad=True):
    """Leaf copies (optionally upcast) that track their own gradients, e.g. for the reference."""
    out = []
    for t in tensors:
        c = t.detach().clone()
        if dtype is not None:
            c = c.to(dtype)
        out.append(c.requires_grad_(requires_grad and t.requires_grad))
    return out


def rel_err(out, ref) -> float:
    """||out - ref|| / max(||ref||, tiny), computed in float64."""
    out64 = out.detach().to(device="cpu", dtype=torch.float64)
    ref64 = ref.detach().to(device="cpu", dtype=torch.float64)
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}"
    return ((out64 - ref64).norm() / max(ref64.norm().item(), TINY)).item()


def assert_rel_close(out, ref, tol, what="output"):
    """No NaN/inf where the reference is finite, and the norm-relative error below ``tol``."""
    assert not torch.isnan(out).any(), f"{what} has NaN"
    assert torch.isfinite(out).all(), f"{what} has inf"
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"
    return err


def assert_grads_close(grads, ref_grads, tol, *, names=("q_s", "k_s", "q_t", "k_t"), floor_frac=0.0):
    """Per-tensor norm-relative error of gradients, each below ``tol``; None must match None.

    With ``floor_frac > 0`` a tensor whose true gradient is tiny compared with the others (e.g. the weighting
    side of a near one-hot row, where the exact gradient is a cancellation of O(logit) terms) is measured
    against ``floor_frac * ||all reference gradients||`` instead of its own norm.
    """
    present = [r for r in ref_grads if r is not None]
    total = torch.cat([r.detach().double().flatten().cpu() for r in present]).norm().item() if present else 0.0
    for name, g, r in zip(names, grads, ref_grads):
        if r is None:
            assert g is None, f"{name} got a gradient but does not require grad"
            continue
        assert g is not None, f"{name}.grad is None"
        assert g.shape == r.shape, f"{name}.grad shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert not torch.isnan(g).any(), f"{name}.grad has NaN"
        assert torch.isfinite(g).all(), f"{name}.grad has inf"
        diff = (g.detach().double().cpu() - r.detach().double().cpu()).norm().item()
        denom = max(r.detach().double().norm().item(), floor_frac * total, TINY)
        assert diff / denom < tol, f"{name}.grad: relative error {diff / denom:.3e} >= {tol:.1e}"


def masked_rows(Nq, Nk, causal):
    """Boolean [Nq]: rows that see no key (bottom-right aligned causal mask, or no keys at all)."""
    if Nk == 0:
        return torch.ones(Nq, dtype=torch.bool)
    if not causal:
        return torch.zeros(Nq, dtype=torch.bool)
    i = torch.arange(Nq)
    return i + (Nk - Nq) < 0


def reference_grads(inputs, grad_out, **kwargs):
    """Gradients of sum(grad_out * reference) w.r.t. the inputs that require grad (None for the others)."""
    leaves = detached_copies(inputs, dtype=torch.float64)
    ref = streamkl.attention_kl_reference(*leaves, **kwargs)
    wrt = [x for x in leaves if x.requires_grad]
    grads = iter(torch.autograd.grad(ref, wrt, grad_out.to(ref.device, torch.float64)))
    return ref.detach(), [next(grads) if x.requires_grad else None for x in leaves]


def default_scale(d):
    return 1.0 / math.sqrt(d)


def assert_compile_matches_eager(loss_fn, inputs, *extra):
    """``torch.compile(loss_fn, fullgraph=True)`` on ``(*inputs, *extra)``: a finite loss equal to eager's (1e-5) and
    the same gradients of ``inputs`` (1e-2), eager running on detached copies of the same values."""
    eager_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=False)
    loss = compiled(*inputs, *extra)
    loss.backward()
    eager = loss_fn(*eager_inputs, *extra)
    eager.backward()
    assert torch.isfinite(loss)
    assert_rel_close(loss, eager, 1e-5, "compiled loss")
    assert_grads_close([x.grad for x in inputs], [x.grad for x in eager_inputs], 1e-2)

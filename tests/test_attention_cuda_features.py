"""CUDA kernels with sliding windows and GQA/MQA, against the float64 reference (values and gradients).

Skipped unless a GPU is visible and this build has the CUDA kernels. Inputs are drawn on the CPU from a
seeded generator, rounded to bf16/fp16, and the reference runs in float64 on the same rounded values.
"""

import pytest
import torch

import streamkl
from helpers import (CUDA_TEST_MARKS, assert_grads_close, assert_rel_close, gqa_inputs, make_inputs, reference_grads,
                     seed_of, upstream_grad)

pytestmark = CUDA_TEST_MARKS

DEVICE = "cuda"
FWD_TOL = 1e-2
GRAD_TOL = 2e-2


def _check(inputs, grad_out, **kwargs):
    out = streamkl.attention_kl(*inputs, **kwargs)
    wrt = [x for x in inputs if x.requires_grad]
    got = iter(torch.autograd.grad(out, wrt, grad_out))
    grads = [next(got) if x.requires_grad else None for x in inputs]
    assert out.dtype == torch.float32 and out.device.type == DEVICE
    if kwargs.get("window_size") == (0, 0):
        # Every row sees exactly one key: both distributions are the same point mass, so the divergence
        # and its gradients are 0 up to rounding (a relative comparison with ~0 would be meaningless).
        assert torch.isfinite(out).all() and out.abs().max() < 1e-5
        assert all(torch.isfinite(g).all() and g.abs().max() < 1e-3 for g in grads if g is not None)
        return out, grads
    ref, ref_grads = reference_grads(inputs, grad_out, **kwargs)
    assert_rel_close(out, ref, FWD_TOL)
    assert_grads_close(grads, ref_grads, GRAD_TOL)
    return out, grads


# (N_q, N_k, D_s, D_t)
WINDOW_SHAPES = [
    pytest.param((257, 257, 64, 64), id="n257-d64"),
    pytest.param((100, 300, 128, 64), id="nq100-nk300-ds128-dt64"),
    pytest.param((300, 100, 64, 128), id="nq300-nk100-ds64-dt128"),
    pytest.param((1000, 1000, 128, 128), id="n1000-d128"),
]
WINDOWS = [(16, 0), (40, 8), (0, 0), (-1, 20), (100, -1), (3, 70)]


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
@pytest.mark.parametrize("shape", WINDOW_SHAPES)
def test_cuda_window_matches_reference(shape, window, causal, divergence, dtype):
    if dtype == torch.float16 and (divergence == "reverse" or shape[0] == 1000):
        pytest.skip("fp16 is covered on the smaller forward-KL shapes")
    Nq, Nk, Ds, Dt = shape
    seed = seed_of("cuda-window", shape, window, causal, divergence, dtype)
    inputs = make_inputs(1, 2, Nq, Nk, Ds, Dt, seed=seed, dtype=dtype, device=DEVICE, requires_grad=True)
    grad_out = upstream_grad((1, 2, Nq), seed, device=DEVICE)
    out, grads = _check(inputs, grad_out, causal=causal, divergence=divergence, window_size=window)
    # Rows whose window holds no key give exactly 0 and zero gradients (never NaN).
    i = torch.arange(Nq, device=DEVICE) + (Nk - Nq)
    right = 0 if causal else window[1]
    lo = (i - window[0]).clamp_min(0) if window[0] >= 0 else torch.zeros_like(i)
    hi = (i + right).clamp_max(Nk - 1) if right >= 0 else torch.full_like(i, Nk - 1)
    empty = hi < lo
    if empty.any():
        assert (out[..., empty] == 0).all()
        assert (grads[0][:, :, empty] == 0).all()


# (H, H_kv student, H_kv teacher): GQA, MQA, one side grouped, different groupings.
HEADS = [(4, 2, 2), (8, 1, 1), (6, 3, 6), (6, 6, 2), (8, 2, 4)]


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
@pytest.mark.parametrize("mask", [dict(causal=False), dict(causal=True), dict(causal=True, window_size=(50, 0))],
                         ids=["full", "causal", "causal-w50"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}-kvs{h[1]}-kvt{h[2]}")
@pytest.mark.parametrize("shape", [pytest.param((200, 200, 64, 64), id="n200-d64"),
                                   pytest.param((150, 333, 128, 64), id="nq150-nk333-ds128-dt64")])
def test_cuda_gqa_matches_reference(shape, heads, mask, divergence, dtype):
    H, kv_s, kv_t = heads
    Nq, Nk, Ds, Dt = shape
    teacher_grad = kv_s == kv_t  # the CUDA dK kernel gives teacher gradients when both sides group alike
    seed = seed_of("cuda-gqa", shape, heads, tuple(mask.items()), divergence, dtype)
    inputs = gqa_inputs(1, H, kv_s, kv_t, Nq, Nk, Ds, Dt, seed=seed, dtype=dtype, device=DEVICE,
                        teacher_requires_grad=teacher_grad)
    grad_out = upstream_grad((1, H, Nq), seed, device=DEVICE)
    _, grads = _check(inputs, grad_out, divergence=divergence, **mask)
    assert grads[1].shape == inputs[1].shape


def test_cuda_gqa_teacher_grads_need_same_grouping():
    inputs = gqa_inputs(1, 4, 2, 4, 64, 64, 64, 64, seed=seed_of("cuda-gqa-refuse"), dtype=torch.bfloat16,
                        device=DEVICE)
    with pytest.raises(NotImplementedError, match="key heads"):
        streamkl.attention_kl(*inputs).sum().backward()
    # Student-only gradients run for the same shapes.
    detached = [x.detach().requires_grad_(i < 2) for i, x in enumerate(inputs)]
    streamkl.attention_kl(*detached).sum().backward()
    assert detached[1].grad is not None and torch.isfinite(detached[1].grad).all()


@pytest.mark.xfail(reason="the GPU test machine's torch 2.11 environment crashes (SIGSEGV) on any C++ error message "
                          "that formats a number, in any extension (tools/repro_c10_str.py); passes elsewhere",
                   strict=False)
def test_cuda_gqa_teacher_grads_refused_by_the_op():
    """The op itself refuses too (checked in a subprocess: it runs outside the autograd engine)."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import torch, streamkl
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
        q_s, k_s, q_t, k_t = mk(1, 4, 64, 64), mk(1, 2, 64, 64), mk(1, 4, 64, 64), mk(1, 4, 64, 64)
        kl, lse_s, lse_t = torch.ops.streamkl.attention_kl_fwd(q_s, k_s, q_t, k_t, 0.125, 0.125, False, "forward")
        try:
            torch.ops.streamkl.attention_kl_bwd(torch.ones_like(kl), q_s, k_s, q_t, k_t, kl, lse_s, lse_t, 0.125,
                                                0.125, False, "forward", True)
        except NotImplementedError as e:
            assert "key heads" in str(e), e
            print("refused")
    """)
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "refused" in run.stdout, run.stdout + run.stderr


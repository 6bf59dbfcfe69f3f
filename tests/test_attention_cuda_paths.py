"""Both CUDA paths on one GPU: the Ampere path (mma.sync, every GPU; forced with STREAMKL_CUDA_PATH=ampere) and the
Hopper path (warp-specialized wgmma + TMA kernels, the default on compute capability 9.x for every divergence at
head dims 64 and 128: the forward, and the backward with student gradients; also named with STREAMKL_CUDA_PATH=hopper).

Each path is checked against the float64 reference on fresh random inputs, and the dispatch is checked by
the kernel names the profiler records (so a silent fall-back to the other path would fail here). The full
CUDA suite (test_attention_cuda*.py) runs on whichever path the environment selects; tools/device_check.sh
runs it under both.
"""

import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import streamkl
from helpers import (CUDA_TEST_MARKS, assert_grads_close, assert_rel_close, gqa_inputs, make_inputs, reference_grads,
                     seed_of, upstream_grad, varlen_inputs, varlen_reference_grads)

pytestmark = CUDA_TEST_MARKS

PATHS = ("ampere", "hopper")
DISPATCH_PATHS = PATHS + ("default",)  # "default": STREAMKL_CUDA_PATH unset
FWD_TOL = 1e-2
GRAD_TOL = 2e-2


def _is_hopper():
    return torch.cuda.get_device_capability()[0] == 9


def _select(monkeypatch, path):
    if path == "default":
        monkeypatch.delenv("STREAMKL_CUDA_PATH", raising=False)
    else:
        monkeypatch.setenv("STREAMKL_CUDA_PATH", path)


def _forward_kernel_names(fn):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "attention_kl_fwd" in e.name]


@pytest.mark.parametrize("path", DISPATCH_PATHS)
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (64, 128), (128, 64), (96, 96)], ids=lambda d: f"d{d[0]}x{d[1]}")
def test_dispatch_picks_the_expected_path(monkeypatch, path, dims):
    _select(monkeypatch, path)
    inputs = make_inputs(1, 2, 300, 300, *dims, seed=seed_of("dispatch", path, dims), dtype=torch.bfloat16,
                         device="cuda")
    names = _forward_kernel_names(lambda: streamkl.attention_kl(*inputs))
    assert names, "no forward kernel ran"
    hopper_kernel = any("KernelTraitsSm90" in n for n in names)
    expect_hopper = path != "ampere" and _is_hopper() and dims[0] in (64, 128) and dims[1] in (64, 128)
    assert hopper_kernel == expect_hopper, names
    assert all("attention_kl_fwd_sm90_kernel" in n for n in names) == expect_hopper, names


@pytest.mark.parametrize("path", PATHS)
def test_forward_without_keys(monkeypatch, path):
    """No key at all: every row's divergence is 0 (the Hopper path hands such problems to the Ampere kernel, since a
    TMA tensor map cannot have a zero extent)."""
    _select(monkeypatch, path)
    q_s, k_s, q_t, k_t = make_inputs(1, 2, 50, 0, 64, 64, seed=seed_of("no-keys", path), dtype=torch.bfloat16,
                                     device="cuda")
    out = streamkl.attention_kl(q_s, k_s, q_t, k_t)
    assert out.shape == (1, 2, 50) and (out == 0).all()


def test_unknown_path_is_refused(monkeypatch):
    monkeypatch.setenv("STREAMKL_CUDA_PATH", "hoper")
    inputs = make_inputs(1, 1, 16, 16, 64, 64, seed=seed_of("bad-path"), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="STREAMKL_CUDA_PATH"):
        streamkl.attention_kl(*inputs)


# (B, H, N_q, N_k, D_s, D_t): tails of every kind around the 128 x 128 tiles of the Hopper path.
SHAPES = [
    pytest.param((1, 2, 1, 1, 64, 64), id="n1"),
    pytest.param((2, 3, 127, 129, 128, 128), id="nq127-nk129"),
    pytest.param((1, 2, 257, 100, 64, 128), id="nq257-nk100-ds64-dt128"),
    pytest.param((1, 1, 1000, 1000, 128, 64), id="n1000-ds128-dt64"),
    pytest.param((1, 1, 64, 2000, 128, 128), id="nq64-nk2000"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_paths_match_reference(monkeypatch, path, shape, causal, divergence, dtype):
    _select(monkeypatch, path)
    inputs = make_inputs(*shape, seed=seed_of("paths", shape, causal, divergence, dtype), dtype=dtype, device="cuda",
                         sharpness=2.0)
    out = streamkl.attention_kl(*inputs, causal=causal, divergence=divergence)
    ref = streamkl.attention_kl_reference(*[x.double().cpu() for x in inputs], causal=causal, divergence=divergence)
    if shape[3] == 1:  # one key: both distributions are the same point mass
        assert out.abs().max() < 1e-4
        return
    assert_rel_close(out, ref, FWD_TOL)


def _drifting_scores_inputs(order, seed, n=640, d=64):
    """Inputs whose scores (scale 1) move by ~25 nats per 64-key tile over the keys, both sides, 0 -> 240 ("rise")
    or 240 -> 0 ("fall"), plus noise: the forward keeps each row's running maxima from tile to tile, so a rise of
    more than ~42 nats above them must be caught (and the tile folded again), and a fall must lose nothing."""
    g = torch.Generator().manual_seed(seed)
    u = torch.ones(d) / d ** 0.5
    level = torch.linspace(0.0, 240.0, n) if order == "rise" else torch.linspace(240.0, 0.0, n)

    def side():
        q = (u * d ** 0.5 + 0.3 * torch.randn(1, 2, n, d, generator=g))
        k = level[:, None] * u / d ** 0.5 + 0.3 * torch.randn(1, 2, n, d, generator=g)
        return q.to(torch.bfloat16).cuda(), k.to(torch.bfloat16).cuda()

    q_s, k_s = side()
    q_t, k_t = side()
    return q_s, k_s, q_t, k_t


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("order", ["rise", "fall"])
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_forward_paths_scores_drifting_far_across_tiles(monkeypatch, path, order, divergence):
    _select(monkeypatch, path)
    q_s, k_s, q_t, k_t = _drifting_scores_inputs(order, seed_of("drift", path, order, divergence))
    kl, lse_s, lse_t = torch.ops.streamkl.attention_kl_fwd(q_s, k_s, q_t, k_t, 1.0, 1.0, False, divergence)
    ref = streamkl.attention_kl_reference(q_s, k_s, q_t, k_t, scale_s=1.0, scale_t=1.0, divergence=divergence)
    for lse, q, k in ((lse_s, q_s, k_s), (lse_t, q_t, k_t)):
        scores = q.double() @ k.double().transpose(-1, -2)
        assert scores.amax(-1).min() - scores[..., :64].amax(-1).max() > 150 or order == "fall"
        assert_rel_close(lse, torch.logsumexp(scores, dim=-1), 1e-5, "lse")
    assert_rel_close(kl, ref, FWD_TOL)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [(64, 0), (100, 37), (-1, 5)], ids=str)
def test_forward_paths_windows_and_gqa(monkeypatch, path, window):
    _select(monkeypatch, path)
    inputs = gqa_inputs(2, 8, 2, 4, 333, 333, 128, 64, seed=seed_of("paths-gqa", path, window), dtype=torch.bfloat16,
                        device="cuda", requires_grad=False)
    out = streamkl.attention_kl(*inputs, window_size=window)
    ref = streamkl.attention_kl_reference(*[x.double().cpu() for x in inputs], window_size=window)
    assert_rel_close(out, ref, FWD_TOL)


@pytest.mark.parametrize("path", DISPATCH_PATHS)
def test_jsd_dispatch(monkeypatch, path):
    """The JSD's two forward passes and its backward run on the Hopper path there (pass 2: the JSD-sums kernel)."""
    _select(monkeypatch, path)
    q_s, k_s, q_t, k_t = make_inputs(1, 2, 300, 300, 128, 128, seed=seed_of("jsd-dispatch", path),
                                     dtype=torch.bfloat16, device="cuda")
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        streamkl.attention_kl(q_s, k_s, q_t, k_t, divergence="jsd", beta=0.3).sum().backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "streamkl" in e.name]
    hopper = path != "ampere" and _is_hopper()
    for kernel in ("attention_kl_fwd_sm90_kernel", "attention_jsd_sums_sm90_kernel", "attention_kl_bwd_dk_sm90_kernel"):
        assert any(kernel in n for n in names) == hopper, (kernel, names)
    assert any("attention_jsd_sums_kernel" in n for n in names) != hopper, names
    # Student head dim 128: the fused backward (one dK kernel that also produces dQ; test_attention_cuda_fused.py).
    assert any("FusedGradTraitsSm90" in n for n in names) == hopper, names
    assert not any("attention_kl_bwd_dq_sm90_kernel" in n for n in names), names


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kv", [(2, 2), (2, 4)], ids=["kv2-2", "kv2-4"])
@pytest.mark.parametrize("window", [(64, 0), (100, 37)], ids=str)
def test_jsd_paths_windows_and_gqa(monkeypatch, path, kv, window):
    """The JSD (beta 0.3) forward and student backward with windows and GQA, on both paths."""
    _select(monkeypatch, path)
    seed = seed_of("jsd-paths-gqa", kv, window)
    inputs = gqa_inputs(2, 8, *kv, 333, 333, 128, 64, seed=seed, dtype=torch.bfloat16, device="cuda",
                        teacher_requires_grad=False)
    kwargs = dict(window_size=window, divergence="jsd", beta=0.3)
    out = streamkl.attention_kl(*inputs, **kwargs)
    grad_out = upstream_grad(tuple(out.shape), seed, device="cuda")
    out.backward(grad_out)
    ref, ref_grads = reference_grads(inputs, grad_out, **kwargs)
    assert_rel_close(out, ref, FWD_TOL)
    assert_grads_close([x.grad for x in inputs], ref_grads, GRAD_TOL)


# ------------------------------------------------------------------------------------------------- backward
# The Hopper-path backward (warp-specialized dQ and dK kernels; the Ampere-path dK kernel when the teacher groups its
# key heads differently) takes student gradients only, every divergence, at head dims 64/128; teacher gradients and
# other head dims run the Ampere path.

def _backward_kernel_names(fn):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "attention_kl_bwd" in e.name]


@pytest.mark.parametrize("path", ("ampere", "hopper", "default"))
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "teacher-too"])
@pytest.mark.parametrize("dims", [(128, 128), (64, 128), (96, 96)], ids=lambda d: f"d{d[0]}x{d[1]}")
def test_backward_dispatch_picks_the_expected_path(monkeypatch, path, teacher_grad, dims):
    _select(monkeypatch, path)
    q_s, k_s, q_t, k_t = make_inputs(1, 2, 300, 300, *dims, seed=seed_of("bwd-dispatch", path, dims),
                                     dtype=torch.bfloat16, device="cuda")
    for x in (q_s, k_s) + ((q_t, k_t) if teacher_grad else ()):
        x.requires_grad_(True)
    out = streamkl.attention_kl(q_s, k_s, q_t, k_t)
    names = _backward_kernel_names(lambda: out.sum().backward())
    assert names, "no backward kernel ran"
    expect_hopper = (path != "ampere" and _is_hopper() and not teacher_grad and dims[0] in (64, 128)
                     and dims[1] in (64, 128))
    # At student head dim 128 the Hopper path runs the fused backward (its dK kernel also produces dQ).
    expect_fused = expect_hopper and dims[0] == 128
    assert any("attention_kl_bwd_dq_sm90_kernel" in n for n in names) == (expect_hopper and not expect_fused), names
    assert any("attention_kl_bwd_dk_sm90_kernel" in n for n in names) == expect_hopper, names
    assert any("FusedGradTraitsSm90" in n for n in names) == expect_fused, names
    assert any("attention_kl_bwd_dk_kernel" in n for n in names) != expect_hopper, names


@pytest.mark.parametrize("path", ("ampere", "hopper"))
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s.values[0][3] > 1])
def test_student_backward_paths_match_reference(monkeypatch, path, shape, causal, divergence):
    _select(monkeypatch, path)
    seed = seed_of("bwd-paths", shape, causal, divergence)
    inputs = make_inputs(*shape, seed=seed, dtype=torch.bfloat16, device="cuda")
    inputs[0].requires_grad_(True)
    inputs[1].requires_grad_(True)
    out = streamkl.attention_kl(*inputs, causal=causal, divergence=divergence)
    grad_out = upstream_grad(tuple(out.shape), seed, device="cuda")
    out.backward(grad_out)
    _, ref_grads = reference_grads(inputs, grad_out, causal=causal, divergence=divergence)
    assert_grads_close([x.grad for x in inputs], ref_grads, GRAD_TOL)


# kv (2, 2): the Hopper dK kernel over groups of 4 query heads; (2, 4): teacher heads grouped differently, the Hopper
# dQ kernel with the Ampere-path dK kernel.
@pytest.mark.parametrize("path", ("ampere", "hopper"))
@pytest.mark.parametrize("kv", [(2, 2), (2, 4)], ids=["kv2-2", "kv2-4"])
@pytest.mark.parametrize("window", [(64, 0), (100, 37), (-1, 5)], ids=str)
def test_student_backward_paths_windows_and_gqa(monkeypatch, path, kv, window):
    _select(monkeypatch, path)
    seed = seed_of("bwd-paths-gqa", kv, window)
    inputs = gqa_inputs(2, 8, *kv, 333, 333, 128, 64, seed=seed, dtype=torch.bfloat16, device="cuda",
                        teacher_requires_grad=False)
    out = streamkl.attention_kl(*inputs, window_size=window)
    grad_out = upstream_grad(tuple(out.shape), seed, device="cuda")
    out.backward(grad_out)
    _, ref_grads = reference_grads(inputs, grad_out, window_size=window)
    assert_grads_close([x.grad for x in inputs], ref_grads, GRAD_TOL)


@pytest.mark.parametrize("path", ("ampere", "hopper"))
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_student_backward_paths_varlen(monkeypatch, path, causal, divergence):
    _select(monkeypatch, path)
    seed = seed_of("bwd-paths-varlen", causal, divergence)
    lengths = [(37, 70), (0, 9), (200, 131), (1, 250), (300, 97)]
    tensors, layout = varlen_inputs(lengths, 4, 2, 2, 64, 128, seed=seed, dtype=torch.bfloat16, device="cuda",
                                    teacher_requires_grad=False)
    kwargs = dict(causal=causal, divergence=divergence, beta=0.6)
    out = streamkl.attention_kl_varlen(*tensors, *layout, **kwargs)
    grad_out = upstream_grad(tuple(out.shape), seed, device="cuda")
    out.backward(grad_out)
    ref, ref_grads = varlen_reference_grads(tensors, layout, grad_out, **kwargs)
    assert_rel_close(out, ref, FWD_TOL)
    assert_grads_close([x.grad for x in tensors], ref_grads, GRAD_TOL)


_FIRST_BACKWARD = """
import torch, streamkl
g = torch.Generator(device="cuda").manual_seed(7)
q_s, k_s, q_t, k_t = (torch.randn(1, 2, 128, 64, device="cuda", generator=g).bfloat16() for _ in range(4))
q_s.requires_grad_(True); k_s.requires_grad_(True)
out = streamkl.attention_kl(q_s, k_s, q_t, k_t)
dq, dk = torch.autograd.grad(out, (q_s, k_s), torch.rand_like(out))
torch.cuda.synchronize()
assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
print("ok")
"""


def test_first_backward_of_a_fresh_process():
    """The first backward of a process runs on autograd's device thread, where no CUDA context may be current yet; the
    Hopper path's descriptor encoding needs one (it crashed there before the fix in tma_loads_sm90.cuh)."""
    r = subprocess.run([sys.executable, "-c", _FIRST_BACKWARD], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-2000:])

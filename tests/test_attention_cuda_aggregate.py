"""CUDA kernels for head-aggregated teachers (teacher_head_reduce="mean"): the student head's target is the mean of
the attention probabilities of r teacher heads. Values and student gradients against the float64 reference for all
three divergences, masks, GQA/MQA on either side, head-dim pairs, DSA's one-head student, a caller-given teacher LSE,
and the refusals; on both GPU paths (the default, which is the Hopper-path kernels on compute capability 9.x, and
STREAMKL_CUDA_PATH=ampere), and that the Hopper-path kernels are the ones that run there.

Skipped unless a GPU is visible and this build has the CUDA kernels. Inputs are drawn on the CPU from a seeded
generator, rounded to bf16/fp16, and the reference runs in float64 on the same rounded values.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import streamkl
from helpers import CUDA_TEST_MARKS, assert_grads_close, assert_rel_close, randn, reference_grads, seed_of, upstream_grad

pytestmark = CUDA_TEST_MARKS

DEVICE = "cuda"
FWD_TOL = 1e-2
GRAD_TOL = 2e-2


def aggregate_inputs(B, H, r, kv_s, kv_t, Nq, Nk, Ds, Dt, *, seed, dtype=torch.bfloat16):
    """Student [B, H, ...] (requires grad), teacher with H * r query heads and kv_t key heads (no grad)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, Nq, Ds), (B, kv_s, Nk, Ds), (B, H * r, Nq, Dt), (B, kv_t, Nk, Dt)]
    out = [randn(s, g, dtype=dtype, device=DEVICE) for s in shapes]
    out[0].requires_grad_(True)
    out[1].requires_grad_(True)
    return out


def check_against_reference(inputs, grad_out, **kwargs):
    out = streamkl.attention_kl(*inputs, teacher_head_reduce="mean", **kwargs)
    grads = list(torch.autograd.grad(out, inputs[:2], grad_out)) + [None, None]
    assert out.dtype == torch.float32 and out.device.type == DEVICE
    ref, ref_grads = reference_grads(inputs, grad_out, teacher_head_reduce="mean", **kwargs)
    assert_rel_close(out, ref, FWD_TOL)
    assert_grads_close(grads, ref_grads, GRAD_TOL)
    return out


# (H_s, r, H_kv student, H_kv teacher): DSA's indexer (one student head, teacher GQA), a multi-head student with MQA
# keys and an MHA teacher, r = 3 (odd), and a teacher whose key heads each serve several student heads.
HEADS = [pytest.param((1, 8, 1, 2), id="h1-r8-kvt2"), pytest.param((3, 2, 1, 6), id="h3-r2-mqa-s"),
         pytest.param((2, 3, 2, 6), id="h2-r3"), pytest.param((4, 2, 2, 2), id="h4-r2-kvt2")]
MASKS = [pytest.param(dict(causal=False), id="full"), pytest.param(dict(causal=True), id="causal"),
         pytest.param(dict(causal=True, window_size=(40, 0)), id="causal-w40"),
         pytest.param(dict(window_size=(30, 17)), id="w30_17")]
PATHS = ["default", "ampere"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """The GPU path: "default" (Hopper-path kernels on compute capability 9.x) or the Ampere-path kernels."""
    if request.param == "ampere":
        monkeypatch.setenv("STREAMKL_CUDA_PATH", "ampere")
    return request.param


DIVERGENCES = [pytest.param(dict(divergence="forward"), id="forward"),
               pytest.param(dict(divergence="reverse"), id="reverse"),
               pytest.param(dict(divergence="jsd", beta=0.3), id="jsd0.3")]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("heads", HEADS)
def test_cuda_aggregate_matches_reference(path, heads, mask, divergence):
    H, r, kv_s, kv_t = heads
    seed = seed_of("cuda-aggregate", heads, mask, divergence)
    inputs = aggregate_inputs(2, H, r, kv_s, kv_t, 150, 190, 64, 128, seed=seed)
    grad_out = upstream_grad((2, H, 150), seed, device=DEVICE)
    check_against_reference(inputs, grad_out, **mask, **divergence)


# (N_q, N_k, D_s, D_t): every compiled head-dim pair, tile-edge lengths, more queries than keys.
SHAPES = [pytest.param((64, 64, 64, 64), id="n64-d64"), pytest.param((257, 300, 128, 64), id="nq257-nk300-d128x64"),
          pytest.param((300, 129, 128, 128), id="nq300-nk129-d128"), pytest.param((33, 1000, 64, 128), id="nq33-nk1000")]


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_aggregate_shapes(path, shape, causal, dtype):
    Nq, Nk, Ds, Dt = shape
    seed = seed_of("cuda-aggregate-shape", shape, causal, dtype)
    inputs = aggregate_inputs(1, 2, 4, 2, 4, Nq, Nk, Ds, Dt, seed=seed, dtype=dtype)
    grad_out = upstream_grad((1, 2, Nq), seed, device=DEVICE)
    check_against_reference(inputs, grad_out, causal=causal)


def test_cuda_aggregate_dsa_shape(path):
    """DeepSeek DSA's indexer target: one student head (D=64) against the mean of 64 teacher heads (D=128)."""
    seed = seed_of("cuda-aggregate-dsa")
    inputs = aggregate_inputs(1, 1, 64, 1, 64, 512, 512, 64, 128, seed=seed)
    grad_out = upstream_grad((1, 1, 512), seed, device=DEVICE)
    check_against_reference(inputs, grad_out, causal=True)


def test_cuda_aggregate_given_teacher_lse_matches():
    """A caller-given teacher LSE (here the CUDA op's own pass 1, as a FlashAttention forward would give it) skips
    pass 1 and gives the same result; shifting one head's LSE changes it (so it is really read; a shift of every head
    alike would cancel in the renormalized mean)."""
    seed = seed_of("cuda-aggregate-lse")
    inputs = aggregate_inputs(1, 2, 4, 2, 4, 200, 200, 64, 128, seed=seed)
    kl, lse_s, lse_t = torch.ops.streamkl.attention_kl_fwd(*[x.detach() for x in inputs], 0.125, 128 ** -0.5, True,
                                                           "forward", -1, -1, "mean", None)
    assert lse_t.shape == (1, 8, 200)
    given = streamkl.attention_kl(*inputs, causal=True, teacher_head_reduce="mean", teacher_lse=lse_t)
    assert_rel_close(given, kl, 1e-6)
    ref = streamkl.attention_kl_reference(*[x.detach().double() for x in inputs], causal=True,
                                          teacher_head_reduce="mean")
    assert_rel_close(given, ref, FWD_TOL)
    shifted_lse = lse_t.clone()
    shifted_lse[:, 0] += 2.0
    shifted = streamkl.attention_kl(*inputs, causal=True, teacher_head_reduce="mean", teacher_lse=shifted_lse)
    assert (shifted - kl).abs().max() > 0.1


def test_cuda_aggregate_refuses_teacher_gradients():
    seed = seed_of("cuda-aggregate-teacher-grad")
    inputs = aggregate_inputs(1, 1, 4, 1, 4, 64, 64, 64, 64, seed=seed)
    inputs[2].requires_grad_(True)
    with pytest.raises(NotImplementedError, match="aggregated teacher"):
        streamkl.attention_kl(*inputs, teacher_head_reduce="mean")



def _kernel_names(fn):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the Hopper-path kernels run on compute capability 9.x")
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_cuda_aggregate_runs_hopper_kernels_on_hopper(divergence):
    """On 9.x the aggregated teacher runs the warp-specialized kernels, not the Ampere-path ones (a silent fallback
    would pass the value tests too)."""
    inputs = aggregate_inputs(1, 2, 4, 1, 4, 300, 300, 64, 128, seed=seed_of("cuda-aggregate-hopper", divergence))
    kwargs = dict(teacher_head_reduce="mean", causal=True, divergence=divergence)
    out = streamkl.attention_kl(*inputs, **kwargs)
    fwd = _kernel_names(lambda: streamkl.attention_kl(*inputs, **kwargs))
    bwd = _kernel_names(lambda: out.sum().backward())
    assert any("attention_kl_fwd_sm90_kernel" in n for n in fwd), fwd
    assert not any("attention_kl_fwd_kernel<" in n or "attention_jsd_sums_kernel<" in n for n in fwd), fwd
    assert any("attention_kl_bwd_dq_sm90_kernel" in n for n in bwd), bwd
    assert any("attention_kl_bwd_dk_sm90_kernel" in n for n in bwd), bwd
    assert not any("attention_kl_bwd_dq_kernel<" in n or "attention_kl_bwd_dk_kernel<" in n for n in bwd), bwd

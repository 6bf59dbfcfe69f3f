"""Split streams on the CUDA kernels of both paths: several CTAs share one X block's tiles (forward: partial row states
merged by a combine kernel; dQ / dK: partial gradients in fp32 slices summed by an epilogue), for problems with too
few blocks to fill the GPU. Values and student gradients with splits forced (STREAMKL_STREAM_SPLITS=n), never (=1) and automatic,
against the float64 reference: head-aggregated teachers (DSA's one-head student) on both paths, plain teachers on each path,
masks whose key ranges start mid-tile, GQA, varlen packing, the JSD (both forward passes and the backward split), and
that the split kernels do run when asked.

Skipped unless a GPU is visible and this build has the CUDA kernels. Inputs are drawn on the CPU from a seeded
generator, rounded to bf16, and the reference runs in float64 on the same rounded values.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import streamkl
from helpers import (CUDA_TEST_MARKS, assert_grads_close, assert_rel_close, gqa_inputs, randn, reference_grads,
                     seed_of, upstream_grad, varlen_inputs, varlen_reference_grads)

pytestmark = CUDA_TEST_MARKS

DEVICE = "cuda"
FWD_TOL = 1e-2
GRAD_TOL = 2e-2
# "1": never split; "3", "16": at most that many CTAs per block (16 > tiles for the shorter streams: every tile its
# own CTA); "auto": the launchers' choice (these small grids split).
SPLITS = ["1", "3", "16", "auto"]
MASKS = [pytest.param(dict(causal=False), id="full"), pytest.param(dict(causal=True), id="causal"),
         pytest.param(dict(causal=True, window_size=(90, 0)), id="causal-w90"),
         pytest.param(dict(window_size=(45, 17)), id="w45_17")]


def _aggregated_inputs(H, r, kv_t, Nq, Nk, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, H, Nq, 64), (1, H, Nk, 64), (1, H * r, Nq, 128), (1, kv_t, Nk, 128)]
    out = [randn(s, g, dtype=torch.bfloat16, device=DEVICE) for s in shapes]
    out[0].requires_grad_(True)
    out[1].requires_grad_(True)
    return out


def _check(inputs, **kwargs):
    out = streamkl.attention_kl(*inputs, **kwargs)
    grad_out = upstream_grad(tuple(out.shape), seed_of("splits-grad", tuple(out.shape)), device=DEVICE)
    wrt = [x for x in inputs if x.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, grad_out))
    ref, ref_grads = reference_grads(inputs, grad_out, **kwargs)
    assert_rel_close(out, ref, FWD_TOL)
    assert_grads_close([next(grads) if x.requires_grad else None for x in inputs], ref_grads, GRAD_TOL)


@pytest.mark.parametrize("divergence", [pytest.param(dict(divergence="forward"), id="forward"),
                                        pytest.param(dict(divergence="reverse"), id="reverse"),
                                        pytest.param(dict(divergence="jsd", beta=0.4), id="jsd0.4")])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("path", ["default", "ampere"])
def test_aggregated_teacher_with_splits(monkeypatch, path, splits, mask, divergence):
    """DSA's indexer shape in small: one student head, 8 teacher heads over 2 key heads, 700 keys (22 tiles)."""
    if path == "ampere":
        monkeypatch.setenv("STREAMKL_CUDA_PATH", "ampere")
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", splits)
    inputs = _aggregated_inputs(1, 8, 2, 300, 700, seed_of("splits-agg", splits, mask, divergence))
    _check(inputs, teacher_head_reduce="mean", **mask, **divergence)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("path", ["default", "ampere"])
def test_plain_teacher_with_splits(monkeypatch, path, splits, mask, divergence):
    """Plain teachers on each path (the default is the Hopper-path kernels on compute capability 9.x; the Ampere path
    is the one on other GPUs), GQA on the student side."""
    if path == "ampere":
        monkeypatch.setenv("STREAMKL_CUDA_PATH", "ampere")
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", splits)
    seed = seed_of("splits-ampere" if path == "ampere" else "splits-default", splits, mask, divergence)
    # One teacher key head on the default path, so that the Hopper-path dK kernel (which needs the teacher to group
    # its query heads like the student) runs too.
    kv_t = 2 if path == "ampere" else 1
    inputs = gqa_inputs(1, 2, 1, kv_t, 333, 900, 64, 128, seed=seed, dtype=torch.bfloat16, device=DEVICE,
                        teacher_requires_grad=False)
    _check(inputs, divergence=divergence, **mask)


@pytest.mark.parametrize("splits", ["1", "5"])
def test_teacher_gradients_never_split(monkeypatch, splits):
    """Teacher gradients keep one CTA per block (the split workspace holds the student's only); still exact."""
    monkeypatch.setenv("STREAMKL_CUDA_PATH", "ampere")
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", splits)
    inputs = gqa_inputs(1, 2, 2, 2, 200, 600, 64, 64, seed=seed_of("splits-teacher", splits), dtype=torch.bfloat16,
                        device=DEVICE)
    _check(inputs, causal=True)


@pytest.mark.parametrize("path", ["ampere", "default"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_with_splits(monkeypatch, path, causal):
    """Sequences of different lengths (one empty) in one packed batch, splits of 2 tiles."""
    if path == "ampere":
        monkeypatch.setenv("STREAMKL_CUDA_PATH", "ampere")
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", "7")
    lengths = [(37, 70), (0, 9), (200, 431), (1, 250), (300, 97)]
    tensors, layout = varlen_inputs(lengths, 2, 1, 2 if path == "ampere" else 1, 64, 128, seed=seed_of("splits-varlen", path, causal),
                                    dtype=torch.bfloat16, device=DEVICE, teacher_requires_grad=False)
    out = streamkl.attention_kl_varlen(*tensors, *layout, causal=causal)
    grad_out = upstream_grad(tuple(out.shape), seed_of("splits-varlen-grad", causal), device=DEVICE)
    grads = torch.autograd.grad(out, tensors[:2], grad_out)
    ref, ref_grads = varlen_reference_grads(tensors, layout, grad_out, causal=causal)
    assert_rel_close(out, ref, FWD_TOL)
    assert_grads_close(list(grads) + [None, None], ref_grads, GRAD_TOL)


def test_split_gradients_are_deterministic(monkeypatch):
    """Each split writes its own partial slice and an epilogue sums them in split order (no atomics): two runs agree
    bit for bit."""
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", "6")
    inputs = _aggregated_inputs(1, 8, 2, 300, 900, seed_of("splits-deterministic"))
    runs = []
    for _ in range(2):
        out = streamkl.attention_kl(*inputs, teacher_head_reduce="mean", causal=True)
        runs.append((out,) + torch.autograd.grad(out.sum(), inputs[:2]))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def _kernel_names(fn):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
@pytest.mark.parametrize("splits", ["1", "4", "auto"])
def test_split_kernels_run_when_asked(monkeypatch, splits, divergence):
    """The combine kernels and the gradient epilogue run exactly when the streams split (a silent unsplit run would
    pass the value tests too); the JSD's second pass has its own combine kernel."""
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", splits)
    inputs = _aggregated_inputs(1, 4, 1, 512, 1024, seed_of("splits-names", splits))
    kwargs = dict(teacher_head_reduce="mean", causal=True, divergence=divergence)
    out = streamkl.attention_kl(*inputs, **kwargs)
    fwd = _kernel_names(lambda: streamkl.attention_kl(*inputs, **kwargs))
    bwd = _kernel_names(lambda: out.sum().backward())
    expect = splits != "1"
    assert any("combine_split_rows_kernel" in n for n in fwd) == expect, fwd
    assert any("combine_jsd_split_rows_kernel" in n for n in fwd) == (expect and divergence == "jsd"), fwd
    assert sum("sum_split_partials_kernel" in n for n in bwd) == (2 if expect else 0), bwd


def test_bad_split_request_is_refused(monkeypatch):
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", "many")
    inputs = _aggregated_inputs(1, 2, 1, 64, 64, seed_of("splits-bad"))
    with pytest.raises(ValueError, match="STREAMKL_STREAM_SPLITS"):
        streamkl.attention_kl(*inputs, teacher_head_reduce="mean")

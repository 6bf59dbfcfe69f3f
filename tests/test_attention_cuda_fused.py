"""The fused Hopper backward: on compute capability 9.x, student-only gradients (teacher detached, not aggregated) at
student head dim 128 with the same number of key heads on both sides run ONE kernel (the dK kernel instantiated with
FusedGradTraitsSm90, which also adds each query tile's dQ share into an fp32 workspace) plus the dQ epilogue
(sum_split_partials_kernel), instead of the dQ kernel and the dK kernel. STREAMKL_FUSED_BACKWARD: unset = fused on the
Hopper path (padded and varlen layouts), "0" = the two-kernel
backward everywhere, "1" = fused on both paths (the Ampere path's fused kernel in the padded layout for the KL only),
anything else is refused; torch.use_deterministic_algorithms(True) always runs the two-kernel backward.

Checked here, on fresh random inputs against the float64 reference (the tolerances of test_attention_cuda_paths.py):
the fused student gradients for every divergence, with and without the causal mask, tails of the 128-key tiles,
bf16 and fp16, GQA/MQA, windows, varlen packing and forced stream splits; fused vs two-kernel on the same inputs;
which kernels run (by the names the profiler records, so a silent fall-back would fail here); the refusal of a bad
STREAMKL_FUSED_BACKWARD; and that the fused dK (one writer per row) is bitwise reproducible while dQ (atomics) is
only close. Every test restores the environment it changes (monkeypatch) and starts from the default path.

Skipped unless a GPU is visible and this build has the CUDA kernels; the Hopper-specific tests also need compute
capability 9.x.
"""

import contextlib

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import streamkl
from helpers import (CUDA_TEST_MARKS, assert_grads_close, gqa_inputs, make_inputs, reference_grads, seed_of,
                     upstream_grad, varlen_inputs, varlen_reference_grads)

pytestmark = CUDA_TEST_MARKS

DEVICE = "cuda"
GRAD_TOL = 2e-2

requires_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9),
    reason="the fused Hopper backward needs compute capability 9.x")

FUSED_KERNEL = "FusedGradTraitsSm90"  # in the name of the fused dK kernel's instantiation
HOPPER_DQ_KERNEL = "attention_kl_bwd_dq_sm90_kernel"
AMPERE_DQ_KERNEL = "attention_kl_bwd_dq_kernel"
EPILOGUE_KERNEL = "sum_split_partials_kernel"  # the fused dQ epilogue, also the split-stream gradient epilogue

DIVERGENCES = [pytest.param(dict(divergence="forward"), id="forward"),
               pytest.param(dict(divergence="reverse"), id="reverse"),
               pytest.param(dict(divergence="jsd", beta=0.3), id="jsd0.3")]
CAUSAL = [pytest.param(False, id="full"), pytest.param(True, id="causal")]


@pytest.fixture(autouse=True)
def _default_environment(monkeypatch):
    """Every test starts on the default path: no forced GPU path, fused choice or split count from the caller's
    environment (tools/device_check.sh runs suites under STREAMKL_CUDA_PATH=ampere)."""
    for var in ("STREAMKL_CUDA_PATH", "STREAMKL_FUSED_BACKWARD", "STREAMKL_STREAM_SPLITS"):
        monkeypatch.delenv(var, raising=False)


@contextlib.contextmanager
def _deterministic_algorithms():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _backward(out, tensors, grad_out):
    """Gradients of sum(grad_out * out) w.r.t. the tensors that require grad (None for the others), and the names
    of every CUDA kernel the backward ran."""
    wrt = [x for x in tensors if x.requires_grad]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = torch.autograd.grad(out, wrt, grad_out)
        torch.cuda.synchronize()
    it = iter(got)
    return [next(it) if x.requires_grad else None for x in tensors], [e.name for e in prof.events()]


def _fused_ran(names):
    return any(FUSED_KERNEL in n for n in names)


def _two_kernel_ran(names):
    return any(HOPPER_DQ_KERNEL in n or AMPERE_DQ_KERNEL in n for n in names)


def _assert_fused(names):
    bwd = [n for n in names if "attention_kl_bwd" in n]
    assert _fused_ran(bwd), f"the fused backward did not run: {bwd}"
    assert not _two_kernel_ran(bwd), f"a dQ kernel ran beside the fused backward: {bwd}"
    assert any(EPILOGUE_KERNEL in n for n in names), "the fused dQ epilogue did not run"


def _padded_case(shape, dtype, seed, **kwargs):
    """Fused-path student gradients of attention_kl on make_inputs(*shape) (teacher detached), checked against
    the float64 reference; returns (inputs, grad_out, grads)."""
    inputs = make_inputs(*shape, seed=seed, dtype=dtype, device=DEVICE)
    inputs[0].requires_grad_(True)
    inputs[1].requires_grad_(True)
    return _check_fused(inputs, seed, **kwargs)


def _check_fused(inputs, seed, **kwargs):
    """The backward of attention_kl(*inputs) ran the fused kernel and its gradients match the float64 reference;
    returns (inputs, grad_out, grads)."""
    out = streamkl.attention_kl(*inputs, **kwargs)
    grad_out = upstream_grad(tuple(out.shape), seed, device=DEVICE)
    grads, names = _backward(out, inputs, grad_out)
    _assert_fused(names)
    _, ref_grads = reference_grads(inputs, grad_out, **kwargs)
    assert_grads_close(grads, ref_grads, GRAD_TOL)
    return inputs, grad_out, grads


# (B, H, N_q, N_k): tails around the 128-key / 64-query tiles, N_q > N_k (causal rows that see no key) and N_q < N_k.
SHAPES = [pytest.param((2, 3, 200, 333), id="b2h3-nq200-nk333"), pytest.param((1, 2, 64, 64), id="n64"),
          pytest.param((1, 4, 517, 130), id="h4-nq517-nk130")]
DIMS = [pytest.param((128, 128), id="d128"), pytest.param((128, 64), id="ds128-dt64")]


@requires_hopper
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_student_grads_match_reference(shape, dims, causal, divergence):
    seed = seed_of("fused-ref", shape, dims, causal, divergence)
    _padded_case((*shape, *dims), torch.bfloat16, seed, causal=causal, **divergence)


@requires_hopper
@pytest.mark.parametrize("divergence", [DIVERGENCES[0], DIVERGENCES[2]])
def test_fused_student_grads_fp16(divergence):
    seed = seed_of("fused-fp16", divergence)
    _padded_case((2, 3, 200, 333, 128, 64), torch.float16, seed, causal=True, **divergence)


@requires_hopper
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_and_two_kernel_agree(monkeypatch, divergence, causal):
    """The same inputs through the fused (default) and the two-kernel (STREAMKL_FUSED_BACKWARD=0) backward: both
    close to the reference and to each other."""
    seed = seed_of("fused-vs-two", divergence, causal)
    kwargs = dict(causal=causal, **divergence)
    inputs, grad_out, fused = _padded_case((2, 3, 200, 333, 128, 128), torch.bfloat16, seed, **kwargs)
    monkeypatch.setenv("STREAMKL_FUSED_BACKWARD", "0")
    out = streamkl.attention_kl(*inputs, **kwargs)
    two, names = _backward(out, inputs, grad_out)
    assert not _fused_ran(names) and any(HOPPER_DQ_KERNEL in n for n in names), names
    _, ref_grads = reference_grads(inputs, grad_out, **kwargs)
    assert_grads_close(two, ref_grads, GRAD_TOL)
    assert_grads_close(fused, two, GRAD_TOL)


@requires_hopper
@pytest.mark.parametrize("kv", [2, 1], ids=["kv2", "mqa"])
@pytest.mark.parametrize("mask", [pytest.param(dict(), id="full"), pytest.param(dict(causal=True), id="causal"),
                                  pytest.param(dict(window_size=(100, 37)), id="w100_37")])
@pytest.mark.parametrize("divergence", [DIVERGENCES[0], DIVERGENCES[2]])
def test_fused_gqa(kv, mask, divergence):
    """Both sides with kv key heads for 8 query heads: the fused kernel's key block serves a group of query heads."""
    seed = seed_of("fused-gqa", kv, mask, divergence)
    inputs = gqa_inputs(2, 8, kv, kv, 333, 333, 128, 64, seed=seed, dtype=torch.bfloat16, device=DEVICE,
                        teacher_requires_grad=False)
    _check_fused(inputs, seed, **mask, **divergence)


# Per-sequence (N_q, N_k): a sequence without queries, one without keys, one query, ragged lengths.
RAGGED = [(37, 70), (0, 9), (5, 0), (200, 131), (1, 250), (300, 97)]


@requires_hopper
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_varlen(dims, causal, divergence):
    """Packed sequences through the fused kernel (the default there). Key blocks end inside a 128-key block next to
    the following sequence's keys, which must get dS = 0 (before the session-10 fix, non-causal dQ took them in)."""
    seed = seed_of("fused-varlen", dims, causal, divergence)
    tensors, layout = varlen_inputs(RAGGED, 4, 2, 2, *dims, seed=seed, dtype=torch.bfloat16, device=DEVICE,
                                    teacher_requires_grad=False)
    kwargs = dict(causal=causal, **divergence)
    out = streamkl.attention_kl_varlen(*tensors, *layout, **kwargs)
    grad_out = upstream_grad(tuple(out.shape), seed, device=DEVICE)
    grads, names = _backward(out, tensors, grad_out)
    _assert_fused(names)
    _, ref_grads = varlen_reference_grads(tensors, layout, grad_out, **kwargs)
    assert_grads_close(grads, ref_grads, GRAD_TOL)
    # The sequence without keys gives its queries zero gradients, the one without queries its keys.
    cu_q, cu_k = layout[0].tolist(), layout[1].tolist()
    no_keys, no_queries = RAGGED.index((5, 0)), RAGGED.index((0, 9))
    assert (grads[0][cu_q[no_keys]:cu_q[no_keys + 1]] == 0).all()
    assert (grads[1][cu_k[no_queries]:cu_k[no_queries + 1]] == 0).all()


@requires_hopper
def test_varlen_two_kernel_backward_on_request(monkeypatch):
    """STREAMKL_FUSED_BACKWARD=0 runs the deterministic two-kernel backward in the varlen layout too."""
    monkeypatch.setenv("STREAMKL_FUSED_BACKWARD", "0")
    tensors, layout = varlen_inputs(RAGGED, 4, 2, 2, 128, 128, seed=seed_of("fused-varlen-two-kernel"),
                                    dtype=torch.bfloat16, device=DEVICE, teacher_requires_grad=False)
    out = streamkl.attention_kl_varlen(*tensors, *layout)
    grad_out = upstream_grad(tuple(out.shape), seed_of("fused-varlen-two-kernel"), device=DEVICE)
    grads, names = _backward(out, tensors, grad_out)
    assert not _fused_ran(names) and any(HOPPER_DQ_KERNEL in n for n in names), names
    _, ref_grads = varlen_reference_grads(tensors, layout, grad_out)
    assert_grads_close(grads, ref_grads, GRAD_TOL)


@requires_hopper
@pytest.mark.parametrize("splits", ["3", "16"])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_with_stream_splits(monkeypatch, splits, causal, divergence):
    """Few key blocks (3 per key head, one key head for 4 query heads) and a long query stream, splits forced: the
    fused kernel's split CTAs write dK partials (summed by the split epilogue) and add into the same dQ workspace."""
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", splits)
    seed = seed_of("fused-splits", splits, causal, divergence)
    inputs = gqa_inputs(1, 4, 1, 1, 700, 300, 128, 64, seed=seed, dtype=torch.bfloat16, device=DEVICE,
                        teacher_requires_grad=False)
    kwargs = dict(causal=causal, **divergence)
    out = streamkl.attention_kl(*inputs, **kwargs)
    grad_out = upstream_grad(tuple(out.shape), seed, device=DEVICE)
    grads, names = _backward(out, inputs, grad_out)
    _assert_fused(names)
    # Two epilogues: the split dK partials' and the fused dQ's (one only would mean the stream did not split).
    assert sum(EPILOGUE_KERNEL in n for n in names) == 2, names
    _, ref_grads = reference_grads(inputs, grad_out, **kwargs)
    assert_grads_close(grads, ref_grads, GRAD_TOL)


# ------------------------------------------------------------------------------------------------- dispatch
# (STREAMKL_FUSED_BACKWARD or None, (D_s, D_t), (H, kv_s, kv_t), teacher gradients, fused expected)
DISPATCH = [
    pytest.param(None, (128, 128), (4, 4, 4), False, True, id="default-d128"),
    pytest.param(None, (128, 64), (4, 4, 4), False, True, id="default-ds128-dt64"),
    pytest.param(None, (128, 128), (4, 2, 2), False, True, id="default-gqa"),
    pytest.param("1", (128, 128), (4, 4, 4), False, True, id="on-d128"),
    pytest.param("0", (128, 128), (4, 4, 4), False, False, id="off-d128"),
    pytest.param(None, (64, 128), (4, 4, 4), False, False, id="default-ds64"),
    pytest.param("1", (64, 64), (4, 4, 4), False, False, id="on-ds64"),
    pytest.param(None, (128, 128), (4, 2, 4), False, False, id="default-kv-differ"),
    pytest.param(None, (128, 128), (4, 4, 4), True, False, id="default-teacher-grads"),
]


@requires_hopper
@pytest.mark.parametrize("env,dims,heads,teacher_grad,expect_fused", DISPATCH)
def test_backward_dispatch(monkeypatch, env, dims, heads, teacher_grad, expect_fused):
    """Fused: the FusedGradTraitsSm90 kernel and one epilogue, no dQ kernel; otherwise a dQ kernel (the Hopper one, or
    the Ampere one with teacher gradients) and no fused kernel. Splits off, so that the only epilogue is the fused
    dQ's."""
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", "1")
    if env is not None:
        monkeypatch.setenv("STREAMKL_FUSED_BACKWARD", env)
    seed = seed_of("fused-dispatch", env, dims, heads, teacher_grad)
    inputs = gqa_inputs(1, *heads, 300, 300, *dims, seed=seed, dtype=torch.bfloat16, device=DEVICE,
                        teacher_requires_grad=teacher_grad)
    out = streamkl.attention_kl(*inputs)
    grads, names = _backward(out, inputs, upstream_grad(tuple(out.shape), seed, device=DEVICE))
    bwd = [n for n in names if "attention_kl_bwd" in n]
    assert bwd, "no backward kernel ran"
    assert _fused_ran(bwd) == expect_fused, bwd
    assert _two_kernel_ran(bwd) != expect_fused, bwd
    assert sum(EPILOGUE_KERNEL in n for n in names) == (1 if expect_fused else 0), names
    if not teacher_grad:  # the Hopper path whenever the teacher is detached (head dims 64 / 128)
        assert expect_fused or any(HOPPER_DQ_KERNEL in n for n in bwd), bwd
    assert all(g is not None and torch.isfinite(g).all() for g in grads[:2])


@requires_hopper
def test_deterministic_algorithms_run_the_two_kernel_backward():
    """Under torch.use_deterministic_algorithms(True) the default (fused) configuration runs the dQ and dK kernels:
    two runs agree bit for bit, and the gradients match the reference (computed after leaving deterministic mode)."""
    seed = seed_of("fused-deterministic")
    inputs = make_inputs(1, 4, 300, 300, 128, 128, seed=seed, dtype=torch.bfloat16, device=DEVICE)
    inputs[0].requires_grad_(True)
    inputs[1].requires_grad_(True)
    grad_out = upstream_grad((1, 4, 300), seed, device=DEVICE)
    runs = []
    was_enabled = torch.are_deterministic_algorithms_enabled()
    with _deterministic_algorithms():
        for _ in range(2):
            out = streamkl.attention_kl(*inputs, causal=True)
            grads, names = _backward(out, inputs, grad_out)
            bwd = [n for n in names if "attention_kl_bwd" in n]
            assert not _fused_ran(bwd) and any(HOPPER_DQ_KERNEL in n for n in bwd), bwd
            runs.append(grads[:2])
    assert torch.are_deterministic_algorithms_enabled() == was_enabled
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    _, ref_grads = reference_grads(inputs, grad_out, causal=True)
    assert_grads_close(runs[0] + [None, None], ref_grads, GRAD_TOL)


@pytest.mark.parametrize("value", ["2", "yes"])
def test_bad_fused_backward_request_is_refused(monkeypatch, value):
    """Read when the backward picks its kernels (D = 128, padded forward KL: consulted on either GPU path); the
    forward does not read it. The message formats strings only (see tools/repro_c10_str.py)."""
    monkeypatch.setenv("STREAMKL_FUSED_BACKWARD", value)
    q_s, k_s, q_t, k_t = make_inputs(1, 2, 64, 64, 128, 128, seed=seed_of("fused-bad", value), dtype=torch.bfloat16,
                                     device=DEVICE)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    out = streamkl.attention_kl(q_s, k_s, q_t, k_t)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="STREAMKL_FUSED_BACKWARD"):
        out.sum().backward()


@requires_hopper
@pytest.mark.parametrize("divergence", [DIVERGENCES[0], DIVERGENCES[2]])
def test_fused_dk_is_reproducible(divergence):
    """The fused kernel writes each dK row once (dK bit for bit the same across runs); dQ is summed with atomics in
    a varying order (only close)."""
    seed = seed_of("fused-reproducible", divergence)
    inputs = make_inputs(2, 3, 200, 333, 128, 128, seed=seed, dtype=torch.bfloat16, device=DEVICE)
    inputs[0].requires_grad_(True)
    inputs[1].requires_grad_(True)
    grad_out = upstream_grad((2, 3, 200), seed, device=DEVICE)
    runs = []
    for _ in range(2):
        out = streamkl.attention_kl(*inputs, causal=True, **divergence)
        grads, names = _backward(out, inputs, grad_out)
        _assert_fused(names)
        runs.append(grads)
    assert torch.equal(runs[0][1], runs[1][1])
    assert_grads_close(runs[1][:1], runs[0][:1], 1e-2, names=("q_s",))


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_ampere_path_fused_on_request(monkeypatch, divergence):
    """STREAMKL_FUSED_BACKWARD=1 with the Ampere path (any GPU): its fused kernel (the dK kernel, no dQ kernel, the dQ
    epilogue) for the padded KL, close to the reference."""
    monkeypatch.setenv("STREAMKL_CUDA_PATH", "ampere")
    monkeypatch.setenv("STREAMKL_FUSED_BACKWARD", "1")
    seed = seed_of("fused-ampere", divergence)
    inputs = make_inputs(2, 3, 200, 333, 128, 64, seed=seed, dtype=torch.bfloat16, device=DEVICE)
    inputs[0].requires_grad_(True)
    inputs[1].requires_grad_(True)
    out = streamkl.attention_kl(*inputs, causal=True, divergence=divergence)
    grad_out = upstream_grad(tuple(out.shape), seed, device=DEVICE)
    grads, names = _backward(out, inputs, grad_out)
    bwd = [n for n in names if "attention_kl_bwd" in n]
    assert any("attention_kl_bwd_dk_kernel" in n for n in bwd) and not _two_kernel_ran(bwd), bwd
    assert not any("sm90" in n for n in bwd), bwd
    assert sum(EPILOGUE_KERNEL in n for n in names) == 1, names
    _, ref_grads = reference_grads(inputs, grad_out, causal=True, divergence=divergence)
    assert_grads_close(grads, ref_grads, GRAD_TOL)


# ------------------------------------------------------------------------------------- dQ workspace cap
def _expected_runs(numel_q, kv_heads, budget_mib):
    """Key-head runs of the fused backward under STREAMKL_DQ_WORKSPACE_MB (as attention_kl_cuda.cpp plans them)."""
    per_kv_head = numel_q // kv_heads * 4
    per_run = min(kv_heads, max(budget_mib * 2**20 // per_kv_head, 1))
    return -(-kv_heads // per_run)


def _capped_and_whole(monkeypatch, run_backward, budget_mib):
    """(gradients, kernel names) of run_backward() with the workspace capped at budget_mib MiB, then uncapped; splits
    off both times, so that each key block is one CTA and dK is computed the same way in both."""
    monkeypatch.setenv("STREAMKL_STREAM_SPLITS", "1")
    monkeypatch.setenv("STREAMKL_DQ_WORKSPACE_MB", str(budget_mib))
    capped = run_backward()
    monkeypatch.delenv("STREAMKL_DQ_WORKSPACE_MB")
    return capped, run_backward()


@requires_hopper
@pytest.mark.parametrize("kv,budget_mib", [(4, 1), (4, 3), (2, 1)], ids=["kv4-cap1", "kv4-cap3", "kv2-cap1"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_dq_workspace_cap_runs_by_key_heads(monkeypatch, kv, budget_mib, divergence):
    """Above STREAMKL_DQ_WORKSPACE_MB the fused backward runs once per range of key heads (each run a launch of the
    fused kernel with its own fp32 dQ workspace; kv4-cap3 has an uneven last run): gradients match the reference,
    dQ is close to the uncapped run's and dK is bit for bit the same (one writer per row, the same CTAs)."""
    seed = seed_of("fused-cap", kv, budget_mib, divergence)
    inputs = gqa_inputs(2, 4, kv, kv, 1000, 700, 128, 64, seed=seed, dtype=torch.bfloat16, device=DEVICE,
                        teacher_requires_grad=False)
    kwargs = dict(causal=True, **divergence)
    grad_out = upstream_grad((2, 4, 1000), seed, device=DEVICE)

    def run():
        return _backward(streamkl.attention_kl(*inputs, **kwargs), inputs, grad_out)

    (capped, names), (whole, whole_names) = _capped_and_whole(monkeypatch, run, budget_mib)
    runs = _expected_runs(inputs[0].numel(), kv, budget_mib)
    assert runs > 1
    _assert_fused(names)
    assert sum(FUSED_KERNEL in n for n in names) == runs, names
    assert sum(FUSED_KERNEL in n for n in whole_names) == 1, whole_names
    _, ref_grads = reference_grads(inputs, grad_out, **kwargs)
    assert_grads_close(capped, ref_grads, GRAD_TOL)
    assert_grads_close(capped[:1], whole[:1], 1e-2, names=("q_s",))
    assert torch.equal(capped[1], whole[1])


@requires_hopper
def test_fused_dq_workspace_cap_varlen_and_broadcast_grad(monkeypatch):
    """The capped runs in the packed layout (per-row inputs [total_q, H]) with the gradient of a mean (one value
    broadcast to every row, read in place)."""
    seed = seed_of("fused-cap-varlen")
    tensors, layout = varlen_inputs(RAGGED, 4, 2, 2, 128, 128, seed=seed, dtype=torch.bfloat16, device=DEVICE,
                                    teacher_requires_grad=False)
    kwargs = dict(causal=True)
    wrt = [t for t in tensors if t.requires_grad]

    def run():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = torch.autograd.grad(streamkl.attention_kl_varlen(*tensors, *layout, **kwargs).mean(), wrt)
            torch.cuda.synchronize()
        return list(got), [e.name for e in prof.events()]

    (capped, names), (whole, _) = _capped_and_whole(monkeypatch, run, 1)
    runs = _expected_runs(tensors[0].numel(), 2, 1)
    assert runs == 2
    assert sum(FUSED_KERNEL in n for n in names) == runs, names
    rows = (tensors[0].shape[0], 4)  # [total_q, H]: the mean's gradient is 1 / (total_q * H) on every row
    _, ref_grads = varlen_reference_grads(tensors, layout, torch.full(rows, 1.0 / (rows[0] * rows[1]), device=DEVICE),
                                          **kwargs)
    assert_grads_close(capped + [None, None], ref_grads, GRAD_TOL)
    assert torch.equal(capped[1], whole[1])


@requires_hopper
@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_bad_dq_workspace_cap_is_refused(monkeypatch, value):
    monkeypatch.setenv("STREAMKL_DQ_WORKSPACE_MB", value)
    q_s, k_s, q_t, k_t = make_inputs(1, 2, 64, 64, 128, 128, seed=seed_of("fused-cap-bad", value),
                                     dtype=torch.bfloat16, device=DEVICE)
    q_s.requires_grad_(True)
    out = streamkl.attention_kl(q_s, k_s, q_t, k_t)
    with pytest.raises(ValueError, match="STREAMKL_DQ_WORKSPACE_MB"):
        out.sum().backward()


def test_ampere_path_fused_dq_workspace_cap(monkeypatch):
    """The Ampere path's fused backward (on request) runs by key heads under the cap too."""
    monkeypatch.setenv("STREAMKL_CUDA_PATH", "ampere")
    monkeypatch.setenv("STREAMKL_FUSED_BACKWARD", "1")
    seed = seed_of("fused-cap-ampere")
    inputs = make_inputs(2, 3, 1000, 333, 128, 64, seed=seed, dtype=torch.bfloat16, device=DEVICE)
    inputs[0].requires_grad_(True)
    inputs[1].requires_grad_(True)
    grad_out = upstream_grad((2, 3, 1000), seed, device=DEVICE)

    def run():
        return _backward(streamkl.attention_kl(*inputs, causal=True), inputs, grad_out)

    (capped, names), (whole, _) = _capped_and_whole(monkeypatch, run, 1)
    assert sum("attention_kl_bwd_dk_kernel" in n for n in names) == 3, names
    assert not _two_kernel_ran(names), names
    _, ref_grads = reference_grads(inputs, grad_out, causal=True)
    assert_grads_close(capped, ref_grads, GRAD_TOL)
    assert torch.equal(capped[1], whole[1])

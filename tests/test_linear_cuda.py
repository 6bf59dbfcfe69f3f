"""linear_kl on CUDA tensors: the interim "hybrid" backend (cuBLAS logit chunks, StreamKL epilogue kernels)
against the float64 reference on the same inputs, opcheck, torch.compile, the vocabulary chunking (forced small
workspace budgets, V not a multiple of 128), the bounded extra memory, and bf16 precision at an LLM vocabulary.

Skipped without a GPU. Fresh random inputs everywhere (never zeros); no timing asserts.
"""

import pytest
import torch

import streamkl
from helpers import CUDA_TEST_MARKS, assert_grads_close, assert_rel_close, rel_err, seed_of, upstream_grad
from linear_helpers import (NAMES, call, compile_and_compare, linear_op_args, make_labels, make_linear_inputs,
                            ours_and_grads, reference_and_grads)

pytestmark = CUDA_TEST_MARKS

DEVICE = "cuda"
WORKSPACE_ENV = "STREAMKL_LINEAR_WORKSPACE_MB"
fwd_op = torch.ops.streamkl.linear_kl_fwd.default
bwd_op = torch.ops.streamkl.linear_kl_bwd.default

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
DIVERGENCES = [pytest.param("forward", 0.5, id="forward"), pytest.param("reverse", 0.5, id="reverse"),
               pytest.param("jsd", 0.0, id="jsd-beta0"), pytest.param("jsd", 0.3, id="jsd-beta0.3"),
               pytest.param("jsd", 1.0, id="jsd-beta1")]
# Norm-relative tolerances against float64 on the same inputs. The loss only sees fp32 logits and statistics
# (true fp32 products for fp32 inputs); the gradients are rounded to the input dtype twice (the logit gradients
# before the cuBLAS products, then the outputs).
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _check_against_reference(inputs, dtype, grad_out=None, **kwargs):
    out, grads = ours_and_grads(inputs, grad_out, **kwargs)
    ref, ref_grads = reference_and_grads(inputs, grad_out, **kwargs)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert_rel_close(out, ref, LOSS_TOL[dtype], "loss")
    assert_grads_close(grads, ref_grads, GRAD_TOL[dtype], names=NAMES)
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_divergences_and_dtypes(divergence, beta, dtype):
    """Biases, temperature with the tau^2 factor, D_s != D_t, ignored rows, teacher gradients. Reduction "sum"
    keeps the float16 logit gradients in float16's normal range (a mean would need loss scaling)."""
    T, V, Ds, Dt = 37, 1000, 48, 80
    seed = seed_of("linear-cuda-ref", divergence, beta, dtype)
    inputs = make_linear_inputs((T,), V, Ds, Dt, seed=seed, dtype=dtype, device=DEVICE, bias=(True, True),
                                teacher_requires_grad=True)
    labels = make_labels((T,), V, seed=seed, ignore_every=5, device=DEVICE)
    _check_against_reference(inputs, dtype, divergence=divergence, beta=beta, temperature=2.0,
                             scale_by_temperature_sq=True, labels=labels, reduction="sum")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("ce_weight", [0.0, 0.7], ids=["no-ce", "ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_labels_ce_and_reductions(reduction, ce_weight, dtype):
    """Labels with ignore_index (a custom one), the cross-entropy term, every reduction, 2-D leading dims; a
    random upstream gradient for reduction="none"."""
    lead, V, Ds, Dt = (3, 13), 517, 32, 24
    seed = seed_of("linear-cuda-labels", reduction, ce_weight, dtype)
    inputs = make_linear_inputs(lead, V, Ds, Dt, seed=seed, dtype=dtype, device=DEVICE, bias=(True, False))
    labels = make_labels(lead, V, seed=seed, ignore_every=4, ignore_index=-1, device=DEVICE)
    grad_out = upstream_grad(lead, seed, device=DEVICE) if reduction == "none" else None
    _check_against_reference(inputs, dtype, grad_out, divergence="forward", labels=labels, ignore_index=-1,
                             reduction=reduction, ce_weight=ce_weight)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("divergence,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)],
                         ids=["forward", "reverse", "jsd"])
def test_several_vocab_chunks(monkeypatch, divergence, beta, dtype):
    """A 0.1 MiB workspace budget at T = 37 forces chunks of 256 columns in the forward (4 chunks, the last of
    232) and of 128 in the backward (8 chunks, the last of 104): V = 1000 is not a multiple of 128. The online
    state, the label logit of the CE term, the JSD's second sweep, dx's accumulation across chunks and the
    per-chunk dW / db products are all exercised."""
    monkeypatch.setenv(WORKSPACE_ENV, "0.1")
    T, V, Ds, Dt = 37, 1000, 40, 56
    seed = seed_of("linear-cuda-chunks", divergence, dtype)
    inputs = make_linear_inputs((T,), V, Ds, Dt, seed=seed, dtype=dtype, device=DEVICE, bias=(True, True),
                                teacher_requires_grad=True)
    labels = make_labels((T,), V, seed=seed, ignore_every=6, device=DEVICE)
    chunked, chunked_grads = _check_against_reference(inputs, dtype, divergence=divergence, beta=beta,
                                                      labels=labels, ce_weight=0.5)
    monkeypatch.delenv(WORKSPACE_ENV)
    whole, whole_grads = ours_and_grads(inputs, divergence=divergence, beta=beta, labels=labels, ce_weight=0.5)
    assert rel_err(chunked, whole) < 1e-5
    for name, g, w in zip(NAMES, chunked_grads, whole_grads):
        if w is not None:
            assert rel_err(g, w) < GRAD_TOL[dtype], f"{name}.grad: chunked vs one chunk"


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
@pytest.mark.parametrize("T", [1, 2, 1031])
def test_row_counts(T, divergence):
    """One row, two rows, and a prime number of rows above 1024 (one thread block per row)."""
    seed = seed_of("linear-cuda-rows", T, divergence)
    inputs = make_linear_inputs((T,), 300, 24, 40, seed=seed, device=DEVICE, bias=(False, True),
                                teacher_requires_grad=True)
    _check_against_reference(inputs, torch.float32, divergence=divergence)


def test_strided_inputs():
    """x with a row stride larger than D (read in place by cuBLAS) and a transposed w (copied once)."""
    T, V, Ds, Dt = 29, 333, 16, 24
    seed = seed_of("linear-cuda-strided")
    x_s, w_s, b_s, x_t, w_t, b_t = make_linear_inputs((T,), V, Ds, Dt, seed=seed, device=DEVICE, bias=(True, True),
                                                      requires_grad=False)
    wide = torch.randn(T, 3 * Ds, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    wide[:, :Ds] = x_s
    x_s_strided = wide[:, :Ds]
    w_t_transposed = w_t.t().contiguous().t()
    assert x_s_strided.stride(0) == 3 * Ds and w_t_transposed.stride(1) != 1
    kwargs = dict(b_s=b_s, b_t=b_t, divergence="jsd", beta=0.4)
    out = streamkl.linear_kl(x_s_strided, w_s, x_t, w_t_transposed, **kwargs)
    ref = streamkl.linear_kl_reference(x_s, w_s, x_t, w_t, **kwargs)
    assert_rel_close(out, ref, LOSS_TOL[torch.float32])


def test_all_rows_ignored():
    T, V = 12, 200
    inputs = make_linear_inputs((T,), V, 16, 16, seed=seed_of("linear-cuda-ignored"), device=DEVICE,
                                bias=(True, True), teacher_requires_grad=True)
    labels = torch.full((T,), -100, device=DEVICE)
    out, grads = ours_and_grads(inputs, labels=labels, ce_weight=1.0, reduction="sum")
    assert out.item() == 0.0
    for name, g in zip(NAMES, grads):
        assert g is not None and not g.any(), f"{name}.grad is not zero"


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_peaked_rows_stay_finite(divergence):
    """Logits of standard deviation ~40 in bf16 (near one-hot rows): no NaN or inf, loss still accurate."""
    seed = seed_of("linear-cuda-peaked", divergence)
    inputs = make_linear_inputs((33,), 700, 32, 32, seed=seed, dtype=torch.bfloat16, device=DEVICE,
                                logit_scale=40.0)
    out, grads = ours_and_grads(inputs, divergence=divergence)
    ref, _ = reference_and_grads(inputs, divergence=divergence)
    assert_rel_close(out, ref, 1e-4, "loss")
    for name, g in zip(NAMES, grads):
        if g is not None:
            assert torch.isfinite(g).all(), f"{name}.grad is not finite"


def test_float64_is_refused_naming_the_supported_dtypes():
    inputs = make_linear_inputs((4,), 64, 8, 8, seed=seed_of("linear-cuda-fp64"), dtype=torch.float64,
                                device=DEVICE)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        call(streamkl.linear_kl, inputs)


def test_extra_memory_is_bounded(monkeypatch):
    """With a 1 MiB workspace budget the forward's extra memory is O(T) plus the budget, and the backward's is
    its outputs plus the budget: far below one [T, V] fp32 logit matrix (64 MiB here)."""
    monkeypatch.setenv(WORKSPACE_ENV, "1")
    T, V, D = 512, 32768, 64
    logits_bytes = T * V * 4
    inputs = make_linear_inputs((T,), V, D, D, seed=seed_of("linear-cuda-memory"), device=DEVICE)
    x_s, w_s, _, x_t, w_t, _ = inputs
    streamkl.linear_kl(x_s, w_s, x_t, w_t).backward()  # warm-up: cuBLAS workspace, allocator pools
    x_s.grad = w_s.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = streamkl.linear_kl(x_s, w_s, x_t, w_t)
    torch.cuda.synchronize()
    forward_extra = torch.cuda.max_memory_allocated() - base
    assert forward_extra < logits_bytes / 16, f"forward used {forward_extra} extra bytes"
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss.backward()
    torch.cuda.synchronize()
    backward_extra = torch.cuda.max_memory_allocated() - base
    grad_bytes = (x_s.numel() + w_s.numel()) * 4
    assert backward_extra < grad_bytes + logits_bytes / 16, f"backward used {backward_extra} extra bytes"


OPCHECK_CASES = [  # (divergence, beta, dtype, bias, labels, with_ce)
    pytest.param("forward", 0.5, torch.float32, False, False, False, id="forward-fp32"),
    pytest.param("reverse", 0.5, torch.float16, True, True, False, id="reverse-fp16-bias-labels"),
    pytest.param("jsd", 0.3, torch.bfloat16, True, True, True, id="jsd-bf16-bias-ce"),
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "requires-grad"])
@pytest.mark.parametrize("divergence,beta,dtype,bias,labels,with_ce", OPCHECK_CASES)
def test_opcheck_fwd_cuda(divergence, beta, dtype, bias, labels, with_ce, requires_grad):
    seed = seed_of("linear-cuda-opcheck-fwd", divergence, dtype)
    torch.library.opcheck(fwd_op, linear_op_args(divergence, beta, dtype, bias, labels, with_ce, seed=seed,
                                                 device=DEVICE, requires_grad=requires_grad))


@pytest.mark.parametrize("mask", [(True, True, True, False, False, False), (True, False, False, True, True, True),
                                  (False, True, True, False, True, False)], ids=["student", "x_s+teacher", "weights"])
@pytest.mark.parametrize("divergence,beta,dtype,bias,labels,with_ce", OPCHECK_CASES)
def test_opcheck_bwd_cuda(divergence, beta, dtype, bias, labels, with_ce, mask):
    seed = seed_of("linear-cuda-opcheck-bwd", divergence, dtype, mask)
    args = linear_op_args(divergence, beta, dtype, bias, labels, with_ce, seed=seed, device=DEVICE)
    loss, _, stats = fwd_op(*args)
    grad_loss = upstream_grad(loss.shape, seed, device=DEVICE)
    grad_ce = upstream_grad(loss.shape, seed + 1, device=DEVICE)
    mask = [m and (bias or k not in (2, 5)) for k, m in enumerate(mask)]
    x_s, w_s, b_s, x_t, w_t, b_t, lab, *options = args
    torch.library.opcheck(bwd_op, (grad_loss, grad_ce, x_s, w_s, b_s, x_t, w_t, b_t, lab, loss, stats, *options,
                                   mask))


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_compile_fullgraph_inductor_cuda(divergence, teacher_grad):
    compile_and_compare("inductor", divergence, torch.float32, teacher_grad, 1e-5, device=DEVICE)


def test_compile_fullgraph_aot_eager_cuda_bf16():
    compile_and_compare("aot_eager", "reverse", torch.bfloat16, True, 1e-6, device=DEVICE)


V_QWEN2 = 152064


@pytest.mark.parametrize("divergence,beta", [("forward", 0.5), ("jsd", 0.5)], ids=["forward", "jsd"])
def test_bf16_gradients_at_qwen_vocab(divergence, beta):
    """bf16 at V = 152064: logits never rounded to bf16, so gradients stay within 1e-2 of float64."""
    T, D = 64, 256
    seed = seed_of("linear-cuda-qwen-vocab", divergence)
    inputs = make_linear_inputs((T,), V_QWEN2, D, D, seed=seed, dtype=torch.bfloat16, device=DEVICE,
                                bias=(True, False), teacher_requires_grad=True, logit_scale=4.0)
    labels = make_labels((T,), V_QWEN2, seed=seed, ignore_every=5, device=DEVICE)
    kwargs = dict(divergence=divergence, beta=beta, labels=labels)
    out, grads = ours_and_grads(inputs, **kwargs)
    ref, ref_grads = reference_and_grads(inputs, **kwargs)
    assert rel_err(out, ref) < 1e-4
    for name, g, r in zip(NAMES, grads, ref_grads):
        if r is not None:
            assert rel_err(g, r) <= 1e-2, f"{name}.grad"

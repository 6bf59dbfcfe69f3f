"""torch.library.opcheck of linear_kl_fwd / linear_kl_bwd and torch.compile(fullgraph=True) of linear_kl."""

import pytest
import torch

import streamkl
from helpers import assert_grads_close, assert_rel_close, seed_of, upstream_grad
from linear_helpers import make_labels, make_linear_inputs

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

fwd_op = torch.ops.streamkl.linear_kl_fwd.default
bwd_op = torch.ops.streamkl.linear_kl_bwd.default

CASES = [  # (divergence, beta, dtype, bias, labels, with_ce)
    pytest.param("forward", 0.5, torch.float32, False, False, False, id="forward-fp32"),
    pytest.param("reverse", 0.5, torch.float64, True, True, False, id="reverse-fp64-bias-labels"),
    pytest.param("jsd", 0.3, torch.float32, True, True, True, id="jsd-fp32-bias-ce"),
    pytest.param("forward", 0.5, torch.bfloat16, False, True, True, id="forward-bf16-ce"),
]


def _op_args(divergence, beta, dtype, bias, labels, with_ce, *, seed, requires_grad=False):
    x_s, w_s, b_s, x_t, w_t, b_t = make_linear_inputs((37,), 70, 8, 16, seed=seed, dtype=dtype, bias=(bias, bias),
                                                      requires_grad=requires_grad)
    lab = make_labels((37,), 70, seed=seed, ignore_every=5) if labels else None
    return (x_s, w_s, b_s, x_t, w_t, b_t, lab, 1.0, divergence, beta, -100, with_ce)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "requires-grad"])
@pytest.mark.parametrize("divergence,beta,dtype,bias,labels,with_ce", CASES)
def test_opcheck_fwd(divergence, beta, dtype, bias, labels, with_ce, requires_grad):
    seed = seed_of("linear-opcheck-fwd", divergence, dtype, bias, labels, with_ce)
    torch.library.opcheck(fwd_op, _op_args(divergence, beta, dtype, bias, labels, with_ce, seed=seed,
                                           requires_grad=requires_grad))


@pytest.mark.parametrize("mask", [(True, True, True, False, False, False), (True, False, False, True, True, True),
                                  (False, True, True, False, True, False)], ids=["student", "x_s+teacher", "weights"])
@pytest.mark.parametrize("divergence,beta,dtype,bias,labels,with_ce", CASES)
def test_opcheck_bwd(divergence, beta, dtype, bias, labels, with_ce, mask):
    seed = seed_of("linear-opcheck-bwd", divergence, dtype, bias, labels, with_ce, mask)
    args = _op_args(divergence, beta, dtype, bias, labels, with_ce, seed=seed)
    loss, ce, stats = fwd_op(*args)
    grad_loss = upstream_grad(loss.shape, seed, dtype=loss.dtype)
    grad_ce = upstream_grad(loss.shape, seed + 1, dtype=loss.dtype)
    mask = tuple(m and (bias or k not in (2, 5)) for k, m in enumerate(mask))
    x_s, w_s, b_s, x_t, w_t, b_t, lab, *options = args
    torch.library.opcheck(bwd_op, (grad_loss, grad_ce, x_s, w_s, b_s, x_t, w_t, b_t, lab, loss, stats, *options,
                                   list(mask)))


def _loss_fn(x_s, w_s, b_s, x_t, w_t, b_t, labels, *, divergence):
    return streamkl.linear_kl(x_s, w_s, x_t, w_t, b_s=b_s, b_t=b_t, labels=labels, divergence=divergence, beta=0.3,
                              ce_weight=0.5, scale_by_temperature_sq=True)


def _compile_and_compare(backend, divergence, dtype, teacher_grad, tol):
    seed = seed_of("linear-compile", backend, divergence, dtype, teacher_grad)
    inputs = make_linear_inputs((3, 13), 90, 8, 16, seed=seed, dtype=dtype, bias=(True, True),
                                teacher_requires_grad=teacher_grad)
    labels = make_labels((3, 13), 90, seed=seed, ignore_every=4)
    eager_inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    torch._dynamo.reset()
    compiled = torch.compile(_loss_fn, fullgraph=True, backend=backend, dynamic=False)
    loss = compiled(*inputs, labels, divergence=divergence)
    loss.backward()
    eager = _loss_fn(*eager_inputs, labels, divergence=divergence)
    eager.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert_rel_close(loss, eager, tol, "compiled loss")
    wanted = [t for t in inputs if t.requires_grad]
    assert_grads_close([t.grad for t in wanted], [t.grad for t in eager_inputs if t.requires_grad], tol,
                       names=[f"input{i}" for i in range(len(wanted))])


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_compile_fullgraph_aot_eager(divergence, teacher_grad):
    _compile_and_compare("aot_eager", divergence, torch.float32, teacher_grad, 1e-6)


def test_compile_fullgraph_aot_eager_bf16():
    _compile_and_compare("aot_eager", "forward", torch.bfloat16, True, 1e-6)


def test_compile_fullgraph_inductor():
    _compile_and_compare("inductor", "jsd", torch.float32, True, 1e-5)


def test_compile_does_not_recompile_for_new_values():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(_loss_fn, fullgraph=True, backend=counter, dynamic=False)
    for i in range(3):
        inputs = make_linear_inputs((20,), 50, 8, 8, seed=seed_of("linear-recompile", i), bias=(True, True))
        labels = make_labels((20,), 50, seed=i, ignore_every=3)
        out = compiled(*inputs, labels, divergence="forward")
        x_s, w_s, b_s, x_t, w_t, b_t = inputs
        ref = streamkl.linear_kl_reference(x_s, w_s, x_t, w_t, b_s=b_s, b_t=b_t, labels=labels, beta=0.3,
                                           ce_weight=0.5, scale_by_temperature_sq=True)
        assert_rel_close(out, ref, 1e-5)
    assert counter.frame_count == 1

"""torch.library.opcheck of linear_kl_fwd / linear_kl_bwd and torch.compile(fullgraph=True) of linear_kl."""

import pytest
import torch

import streamkl
from helpers import assert_rel_close, seed_of, upstream_grad
from linear_helpers import compile_and_compare, compile_loss_fn, linear_op_args, make_labels, make_linear_inputs

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

fwd_op = torch.ops.streamkl.linear_kl_fwd.default
bwd_op = torch.ops.streamkl.linear_kl_bwd.default

CASES = [  # (divergence, beta, dtype, bias, labels, with_ce)
    pytest.param("forward", 0.5, torch.float32, False, False, False, id="forward-fp32"),
    pytest.param("reverse", 0.5, torch.float64, True, True, False, id="reverse-fp64-bias-labels"),
    pytest.param("jsd", 0.3, torch.float32, True, True, True, id="jsd-fp32-bias-ce"),
    pytest.param("forward", 0.5, torch.bfloat16, False, True, True, id="forward-bf16-ce"),
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "requires-grad"])
@pytest.mark.parametrize("divergence,beta,dtype,bias,labels,with_ce", CASES)
def test_opcheck_fwd(divergence, beta, dtype, bias, labels, with_ce, requires_grad):
    seed = seed_of("linear-opcheck-fwd", divergence, dtype, bias, labels, with_ce)
    torch.library.opcheck(fwd_op, linear_op_args(divergence, beta, dtype, bias, labels, with_ce, seed=seed,
                                                 requires_grad=requires_grad))


@pytest.mark.parametrize("mask", [(True, True, True, False, False, False), (True, False, False, True, True, True),
                                  (False, True, True, False, True, False)], ids=["student", "x_s+teacher", "weights"])
@pytest.mark.parametrize("divergence,beta,dtype,bias,labels,with_ce", CASES)
def test_opcheck_bwd(divergence, beta, dtype, bias, labels, with_ce, mask):
    seed = seed_of("linear-opcheck-bwd", divergence, dtype, bias, labels, with_ce, mask)
    args = linear_op_args(divergence, beta, dtype, bias, labels, with_ce, seed=seed)
    loss, ce, stats = fwd_op(*args)
    grad_loss = upstream_grad(loss.shape, seed, dtype=loss.dtype)
    grad_ce = upstream_grad(loss.shape, seed + 1, dtype=loss.dtype)
    mask = tuple(m and (bias or k not in (2, 5)) for k, m in enumerate(mask))
    x_s, w_s, b_s, x_t, w_t, b_t, lab, *options = args
    torch.library.opcheck(bwd_op, (grad_loss, grad_ce, x_s, w_s, b_s, x_t, w_t, b_t, lab, loss, stats, *options,
                                   list(mask)))


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_compile_fullgraph_aot_eager(divergence, teacher_grad):
    compile_and_compare("aot_eager", divergence, torch.float32, teacher_grad, 1e-6)


def test_compile_fullgraph_aot_eager_bf16():
    compile_and_compare("aot_eager", "forward", torch.bfloat16, True, 1e-6)


def test_compile_fullgraph_inductor():
    compile_and_compare("inductor", "jsd", torch.float32, True, 1e-5)


def test_compile_does_not_recompile_for_new_values():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(compile_loss_fn, fullgraph=True, backend=counter, dynamic=False)
    for i in range(3):
        inputs = make_linear_inputs((20,), 50, 8, 8, seed=seed_of("linear-recompile", i), bias=(True, True))
        labels = make_labels((20,), 50, seed=i, ignore_every=3)
        out = compiled(*inputs, labels, divergence="forward")
        x_s, w_s, b_s, x_t, w_t, b_t = inputs
        ref = streamkl.linear_kl_reference(x_s, w_s, x_t, w_t, b_s=b_s, b_t=b_t, labels=labels, beta=0.3,
                                           ce_weight=0.5, scale_by_temperature_sq=True)
        assert_rel_close(out, ref, 1e-5)
    assert counter.frame_count == 1

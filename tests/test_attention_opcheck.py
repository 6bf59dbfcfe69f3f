"""torch.library.opcheck of the streamkl ops and torch.compile(fullgraph=True) of the public function."""

import time

import pytest
import torch

import streamkl
from helpers import assert_grads_close, assert_rel_close, make_inputs, seed_of, upstream_grad

# opcheck runs torch.jit internally, which warns about its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

fwd_op = torch.ops.streamkl.attention_kl_fwd.default
bwd_op = torch.ops.streamkl.attention_kl_bwd.default

# (B, H, N_q, N_k, D_s, D_t)
OP_SHAPES = [
    pytest.param((2, 2, 37, 70, 8, 16), id="nq37-nk70"),
    pytest.param((1, 1, 70, 33, 4, 4), id="nq70-nk33"),
    pytest.param((1, 3, 1, 5, 16, 8), id="nq1-nk5"),
]

CASES = [  # (causal, divergence, dtype)
    pytest.param(False, "forward", torch.float32, id="full-forward-fp32"),
    pytest.param(True, "reverse", torch.float32, id="causal-reverse-fp32"),
    pytest.param(True, "forward", torch.float64, id="causal-forward-fp64"),
    pytest.param(False, "reverse", torch.bfloat16, id="full-reverse-bf16"),
]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "requires-grad"])
@pytest.mark.parametrize("causal,divergence,dtype", CASES)
@pytest.mark.parametrize("shape", OP_SHAPES)
def test_opcheck_fwd(shape, causal, divergence, dtype, requires_grad):
    inputs = make_inputs(*shape, seed=seed_of("opcheck-fwd", shape, causal, divergence, dtype), dtype=dtype,
                         requires_grad=requires_grad)
    torch.library.opcheck(fwd_op, (*inputs, 0.35, 0.25, causal, divergence))


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
@pytest.mark.parametrize("causal,divergence,dtype", CASES)
@pytest.mark.parametrize("shape", OP_SHAPES)
def test_opcheck_bwd(shape, causal, divergence, dtype, teacher_grad):
    seed = seed_of("opcheck-bwd", shape, causal, divergence, dtype, teacher_grad)
    inputs = make_inputs(*shape, seed=seed, dtype=dtype)
    kl, lse_s, lse_t = fwd_op(*inputs, 0.35, 0.25, causal, divergence)
    grad_kl = upstream_grad(kl.shape, seed, dtype=kl.dtype)
    torch.library.opcheck(bwd_op, (grad_kl, *inputs, kl, lse_s, lse_t, 0.35, 0.25, causal, divergence, teacher_grad))


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
def test_bwd_op_outputs(teacher_grad):
    """The raw bwd op: gradient shapes/dtypes, [0]-shaped teacher outputs without teacher_grad, and values."""
    shape = (2, 2, 33, 40, 8, 16)
    seed = seed_of("bwd-op", teacher_grad)
    inputs = make_inputs(*shape, seed=seed, dtype=torch.float64)
    kl, lse_s, lse_t = fwd_op(*inputs, 0.5, 0.3, True, "forward")
    grad_kl = upstream_grad(kl.shape, seed, dtype=torch.float64)
    dq_s, dk_s, dq_t, dk_t = bwd_op(grad_kl, *inputs, kl, lse_s, lse_t, 0.5, 0.3, True, "forward", teacher_grad)
    leaves = [x.clone().requires_grad_() for x in inputs]
    ref = streamkl.attention_kl_reference(*leaves, causal=True, scale_s=0.5, scale_t=0.3)
    ref_grads = torch.autograd.grad(ref, leaves, grad_kl)
    assert_grads_close([dq_s, dk_s], ref_grads[:2], 1e-10, names=("dq_s", "dk_s"))
    if teacher_grad:
        assert_grads_close([dq_t, dk_t], ref_grads[2:], 1e-10, names=("dq_t", "dk_t"))
    else:
        assert dq_t.shape == (0,) and dk_t.shape == (0,)


def _loss_fn(q_s, k_s, q_t, k_t, *, causal, divergence):
    return streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=causal, divergence=divergence, reduction="mean")


def _compile_and_compare(backend, shape, causal, divergence, dtype, teacher_grad, tol):
    seed = seed_of("compile", backend, shape, causal, divergence, dtype, teacher_grad)
    inputs = make_inputs(*shape, seed=seed, dtype=dtype, requires_grad=True, teacher_requires_grad=teacher_grad)
    eager_inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    torch._dynamo.reset()
    compiled = torch.compile(_loss_fn, fullgraph=True, backend=backend, dynamic=False)
    loss = compiled(*inputs, causal=causal, divergence=divergence)
    loss.backward()
    eager = _loss_fn(*eager_inputs, causal=causal, divergence=divergence)
    eager.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert_rel_close(loss, eager, tol, "compiled loss")
    assert_grads_close([x.grad for x in inputs], [x.grad for x in eager_inputs], tol)


@pytest.mark.parametrize("teacher_grad", [False, True], ids=["student", "student+teacher"])
@pytest.mark.parametrize("causal,divergence", [(False, "forward"), (True, "reverse"), (True, "forward")])
def test_compile_fullgraph_aot_eager(causal, divergence, teacher_grad):
    _compile_and_compare("aot_eager", (2, 2, 37, 70, 8, 16), causal, divergence, torch.float32, teacher_grad, 1e-6)


def test_compile_fullgraph_aot_eager_low_precision():
    _compile_and_compare("aot_eager", (1, 2, 40, 40, 16, 8), True, "forward", torch.bfloat16, True, 1e-6)


def test_compile_fullgraph_inductor():
    """Default (inductor) backend: ~17 s on a 2-core CPU with a cold compile cache (~5 s warm), under the 20 s
    threshold for @pytest.mark.slow."""
    start = time.perf_counter()
    _compile_and_compare("inductor", (2, 2, 37, 70, 8, 16), True, "forward", torch.float32, True, 1e-5)
    print(f"inductor compile + run: {time.perf_counter() - start:.1f} s")


def test_compile_does_not_recompile_for_new_values():
    """Same shapes, new values: the compiled function is reused and follows the new inputs."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(_loss_fn, fullgraph=True, backend=counter, dynamic=False)
    for i in range(3):
        inputs = make_inputs(1, 2, 20, 30, 8, 8, seed=seed_of("recompile", i), requires_grad=True)
        out = compiled(*inputs, causal=True, divergence="forward")
        ref = streamkl.attention_kl_reference(*inputs, causal=True).mean()
        assert_rel_close(out, ref, 1e-5)
    assert counter.frame_count == 1

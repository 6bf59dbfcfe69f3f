"""Head-aggregated teacher (teacher_head_reduce="mean") on the CPU: the student head's target is the mean of
the attention probabilities of r teacher heads (DeepSeek DSA's indexer target when H_s = 1). Values and student
gradients against the float64 reference for all three divergences, a precomputed teacher LSE, structural
identities, gradcheck, opcheck, torch.compile, and the errors (teacher gradients are refused)."""

import pytest
import torch

import streamkl
from helpers import assert_grads_close, assert_rel_close, seed_of, upstream_grad

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

kl_fwd, kl_bwd = torch.ops.streamkl.attention_kl_fwd, torch.ops.streamkl.attention_kl_bwd
jsd_fwd, jsd_bwd = torch.ops.streamkl.attention_jsd_fwd, torch.ops.streamkl.attention_jsd_bwd


def aggregate_inputs(B, H, r, kv_s, kv_t, Nq, Nk, Ds, Dt, *, seed, dtype=torch.float64, requires_grad=True):
    """Student [B, H, ...] (requires grad), teacher with H * r query heads and kv_t key heads (detached)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, Nq, Ds), (B, kv_s, Nk, Ds), (B, H * r, Nq, Dt), (B, kv_t, Nk, Dt)]
    out = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    out[0].requires_grad_(requires_grad)
    out[1].requires_grad_(requires_grad)
    return out


# (H_s, r, H_kv student, H_kv teacher): DSA's indexer (one student head, 8 teacher heads, teacher GQA), and a
# multi-head student with MQA keys.
HEADS = [pytest.param((1, 8, 1, 2), id="dsa-h1-r8"), pytest.param((3, 2, 1, 6), id="h3-r2")]
MASKS = [pytest.param(False, (-1, -1), id="full"), pytest.param(True, (-1, -1), id="causal"),
         pytest.param(False, (9, 4), id="win9_4")]
DIVERGENCES = [pytest.param("forward", 0.5, id="forward"), pytest.param("reverse", 0.5, id="reverse"),
               pytest.param("jsd", 0.3, id="jsd0.3")]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("causal,window", MASKS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_aggregate_matches_reference(heads, causal, window, divergence, beta):
    H, r, kv_s, kv_t = heads
    seed = seed_of("aggregate", heads, causal, window, divergence)
    inputs = aggregate_inputs(2, H, r, kv_s, kv_t, 45, 70, 8, 12, seed=seed)
    kwargs = dict(causal=causal, window_size=window, divergence=divergence, beta=beta, teacher_head_reduce="mean")
    out = streamkl.attention_kl(*inputs, **kwargs)
    assert out.shape == (2, H, 45)
    grad_out = upstream_grad(tuple(out.shape), seed, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs[:2], grad_out)
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    ref = streamkl.attention_kl_reference(*leaves, **kwargs)
    ref_grads = torch.autograd.grad(ref, leaves[:2], grad_out)
    assert_rel_close(out, ref, 1e-10)
    assert_grads_close(grads, ref_grads, 1e-9, names=("q_s", "k_s"))


def test_aggregate_float32():
    inputs = aggregate_inputs(1, 2, 4, 2, 8, 70, 90, 16, 16, seed=seed_of("aggregate-fp32"), dtype=torch.float32,
                              requires_grad=False)
    out = streamkl.attention_kl(*inputs, causal=True, teacher_head_reduce="mean")
    ref = streamkl.attention_kl_reference(*inputs, causal=True, teacher_head_reduce="mean")
    assert out.dtype == torch.float32
    assert_rel_close(out, ref, 1e-5)


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_given_teacher_lse_skips_the_pass(divergence):
    """The teacher LSE the op computes, passed back in, gives the same result; a shifted one gives another
    (it is really used, not recomputed)."""
    q_s, k_s, q_t, k_t = aggregate_inputs(1, 2, 3, 2, 3, 40, 50, 8, 8, seed=seed_of("aggregate-lse", divergence),
                                          requires_grad=False)
    opts = (0.35, 0.3, True)
    if divergence == "jsd":
        run = lambda lse: jsd_fwd(q_s, k_s, q_t, k_t, *opts, 0.5, -1, -1, "mean", lse)  # noqa: E731
    else:
        run = lambda lse: kl_fwd(q_s, k_s, q_t, k_t, *opts, "forward", -1, -1, "mean", lse)  # noqa: E731
    computed = run(None)
    lse_t = computed[2]
    assert lse_t.shape == (1, 6, 40)
    given = run(lse_t.clone())
    assert torch.allclose(given[0], computed[0], rtol=0, atol=1e-14)
    shifted = run(lse_t + torch.linspace(0, 1, 6, dtype=lse_t.dtype).view(1, 6, 1))
    assert (shifted[0] - computed[0]).abs().max() > 1e-3


def test_mean_of_one_head_is_no_aggregation():
    inputs = aggregate_inputs(2, 3, 1, 3, 1, 30, 40, 8, 8, seed=seed_of("aggregate-r1"), requires_grad=False)
    for divergence in ("forward", "reverse", "jsd"):
        a = streamkl.attention_kl(*inputs, divergence=divergence, teacher_head_reduce="mean", causal=True)
        b = streamkl.attention_kl(*inputs, divergence=divergence, causal=True)
        assert_rel_close(a, b, 1e-12, divergence)


def test_identical_teacher_heads_average_to_themselves():
    """r copies of one teacher head have that head's attention as their mean."""
    q_s, k_s, q_t, k_t = aggregate_inputs(1, 2, 1, 2, 2, 33, 47, 8, 8, seed=seed_of("aggregate-copies"),
                                          requires_grad=False)
    single = streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=True)
    copies = streamkl.attention_kl(q_s, k_s, q_t.repeat_interleave(4, dim=1), k_t.repeat_interleave(4, dim=1),
                                   causal=True, teacher_head_reduce="mean")
    assert_rel_close(copies, single, 1e-12)


@pytest.mark.parametrize("divergence", ["forward", "jsd"])
def test_aggregate_gradcheck(divergence):
    inputs = aggregate_inputs(1, 2, 2, 1, 2, 5, 7, 3, 4, seed=seed_of("aggregate-gc", divergence))

    def fn(q_s, k_s):
        return streamkl.attention_kl(q_s, k_s, *inputs[2:], causal=True, divergence=divergence, beta=0.4,
                                     teacher_head_reduce="mean")

    assert torch.autograd.gradcheck(fn, inputs[:2], eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("with_lse", [False, True], ids=["lse-pass", "lse-given"])
def test_aggregate_opcheck(with_lse):
    q_s, k_s, q_t, k_t = aggregate_inputs(2, 2, 2, 1, 2, 37, 70, 8, 16, seed=seed_of("aggregate-opcheck", with_lse),
                                          dtype=torch.float32)
    lse = None
    if with_lse:
        lse = kl_fwd(q_s.detach(), k_s.detach(), q_t, k_t, 0.3, 0.25, True, "reverse", 5, -1, "mean")[2]
    torch.library.opcheck(kl_fwd, (q_s, k_s, q_t, k_t, 0.3, 0.25, True, "reverse", 5, -1, "mean", lse))
    torch.library.opcheck(jsd_fwd, (q_s, k_s, q_t, k_t, 0.3, 0.25, True, 0.6, 5, -1, "mean", lse))
    detached = [q_s.detach(), k_s.detach(), q_t, k_t]
    kl, lse_s, lse_t = kl_fwd(*detached, 0.3, 0.25, True, "reverse", 5, -1, "mean", lse)
    g = upstream_grad(tuple(kl.shape), seed_of("aggregate-opcheck-g"))
    torch.library.opcheck(kl_bwd, (g, *detached, kl, lse_s, lse_t, 0.3, 0.25, True, "reverse", False, 5, -1, "mean"))
    jsd, lse_s, lse_t, stats = jsd_fwd(*detached, 0.3, 0.25, True, 0.6, 5, -1, "mean", lse)
    torch.library.opcheck(jsd_bwd, (g, *detached, jsd, lse_s, lse_t, stats, 0.3, 0.25, True, 0.6, False, 5, -1,
                                    "mean"))


def test_aggregate_compile_fullgraph():
    q_s, k_s, q_t, k_t = aggregate_inputs(1, 1, 4, 1, 2, 33, 47, 8, 8, seed=seed_of("aggregate-compile"),
                                          dtype=torch.float32)

    def loss(q_s, k_s, q_t, k_t):
        return streamkl.attention_kl(q_s, k_s, q_t, k_t, causal=True, teacher_head_reduce="mean", reduction="mean")

    eager = loss(q_s, k_s, q_t, k_t)
    eager_grads = torch.autograd.grad(eager, (q_s, k_s))
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(q_s, k_s, q_t, k_t)
    assert_rel_close(compiled, eager, 1e-6)
    assert_grads_close(torch.autograd.grad(compiled, (q_s, k_s)), eager_grads, 1e-6, names=("q_s", "k_s"))


def test_aggregate_module():
    inputs = aggregate_inputs(1, 1, 4, 1, 4, 20, 20, 8, 8, seed=seed_of("aggregate-module"), requires_grad=False)
    loss = streamkl.AttentionKLLoss(teacher_head_reduce="mean", reduction="sum")
    assert "teacher_head_reduce='mean'" in repr(loss)
    expected = streamkl.attention_kl(*inputs, teacher_head_reduce="mean").sum()
    assert torch.allclose(loss(*inputs), expected)
    lse = kl_fwd(*inputs, 1 / 8 ** 0.5, 1 / 8 ** 0.5, False, "forward", -1, -1, "mean")[2]
    assert torch.allclose(loss(*inputs, teacher_lse=lse), expected)


# ------------------------------------------------------------------------------------------------------ errors

def test_teacher_heads_must_be_a_multiple():
    inputs = aggregate_inputs(1, 2, 1, 2, 3, 4, 6, 8, 8, seed=seed_of("aggregate-bad-heads"), requires_grad=False)
    inputs[2] = torch.randn(1, 3, 4, 8, dtype=torch.float64)  # 3 teacher heads for 2 student heads
    with pytest.raises(ValueError, match="multiple"):
        streamkl.attention_kl(*inputs, teacher_head_reduce="mean")
    with pytest.raises(ValueError, match="multiple"):
        kl_fwd(*inputs, 0.5, 0.5, False, "forward", -1, -1, "mean")
    with pytest.raises(ValueError, match="q_t"):  # without "mean", heads must match as before
        streamkl.attention_kl(*inputs)


@pytest.mark.parametrize("value", ["sum", "max", "", None], ids=repr)
def test_unknown_teacher_head_reduce(value):
    inputs = aggregate_inputs(1, 2, 2, 2, 2, 4, 6, 8, 8, seed=seed_of("aggregate-bad-reduce"), requires_grad=False)
    with pytest.raises(ValueError, match="teacher_head_reduce"):
        streamkl.attention_kl(*inputs, teacher_head_reduce=value)
    with pytest.raises(ValueError, match="teacher_head_reduce"):
        streamkl.AttentionKLLoss(teacher_head_reduce=value)
    if value is not None:
        with pytest.raises(ValueError, match="teacher_head_reduce"):
            kl_fwd(*inputs, 0.5, 0.5, False, "forward", -1, -1, value)


def test_teacher_gradients_are_refused():
    inputs = aggregate_inputs(1, 2, 2, 2, 2, 4, 6, 8, 8, seed=seed_of("aggregate-teacher-grad"))
    inputs[2].requires_grad_(True)
    with pytest.raises(NotImplementedError, match="detach"):
        streamkl.attention_kl(*inputs, teacher_head_reduce="mean")
    with torch.no_grad():  # no graph, no teacher gradient: fine
        assert torch.isfinite(streamkl.attention_kl(*inputs, teacher_head_reduce="mean")).all()
    detached = [x.detach() for x in inputs]
    kl, lse_s, lse_t = kl_fwd(*detached, 0.5, 0.5, False, "forward", -1, -1, "mean")
    with pytest.raises(NotImplementedError, match="aggregated teacher"):
        kl_bwd(kl, *detached, kl, lse_s, lse_t, 0.5, 0.5, False, "forward", True, -1, -1, "mean")


def test_bad_teacher_lse():
    inputs = aggregate_inputs(1, 2, 2, 2, 2, 4, 6, 8, 8, seed=seed_of("aggregate-bad-lse"), requires_grad=False)
    good = torch.zeros(1, 4, 4, dtype=torch.float64)
    plain = aggregate_inputs(1, 2, 1, 2, 2, 4, 6, 8, 8, seed=seed_of("aggregate-bad-lse-r1"), requires_grad=False)
    with pytest.raises(ValueError, match="teacher_head_reduce='mean'"):  # a teacher LSE only with "mean"
        streamkl.attention_kl(*plain, teacher_lse=good[:, :2])
    with pytest.raises(ValueError, match="teacher_head_reduce='mean'"):
        kl_fwd(*plain, 0.5, 0.5, False, "forward", -1, -1, "none", good[:, :2])
    with pytest.raises(ValueError, match="teacher_lse"):
        streamkl.attention_kl(*inputs, teacher_head_reduce="mean", teacher_lse=good[:, :2])
    with pytest.raises(ValueError, match="teacher_lse"):
        kl_fwd(*inputs, 0.5, 0.5, False, "forward", -1, -1, "mean", good[:, :2])
    with pytest.raises(ValueError, match="teacher_lse"):
        streamkl.attention_kl(*inputs, teacher_head_reduce="mean", teacher_lse=good.long())


def test_bwd_checks_lse_t_against_teacher_heads():
    inputs = aggregate_inputs(1, 2, 2, 2, 2, 4, 6, 8, 8, seed=seed_of("aggregate-bad-bwd"), requires_grad=False)
    kl, lse_s, lse_t = kl_fwd(*inputs, 0.5, 0.5, False, "forward", -1, -1, "mean")
    with pytest.raises(ValueError, match="lse_t"):
        kl_bwd(kl, *inputs, kl, lse_s, lse_t[:, :2], 0.5, 0.5, False, "forward", False, -1, -1, "mean")


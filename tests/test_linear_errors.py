"""Input validation of streamkl.linear_kl / LinearKLLoss and of the raw ops."""

import pytest
import torch

import streamkl
from helpers import seed_of

fwd_op = torch.ops.streamkl.linear_kl_fwd

# Valid reference shapes: lead (2, 5) -> T = 10, V = 11, D_s = 4, D_t = 6.
GOOD = {"x_s": (2, 5, 4), "w_s": (11, 4), "x_t": (2, 5, 6), "w_t": (11, 6)}


def _inputs(dtypes=None, **shapes):
    g = torch.Generator().manual_seed(seed_of("linear-errors", sorted(shapes.items())))
    dtypes = dtypes or {}
    return [torch.randn(shapes.get(n, GOOD[n]), generator=g).to(dtypes.get(n, torch.float32)) for n in GOOD]


SHAPE_ERRORS = [  # (case id, overridden shapes, text the message must contain)
    ("vocab-mismatch", {"w_t": (12, 6)}, "share the vocabulary"),
    ("hidden-w_s", {"w_s": (11, 5)}, "w_s"),
    ("hidden-w_t", {"w_t": (11, 4)}, "w_t"),
    ("rows-x_t", {"x_t": (2, 4, 6)}, "x_t"),
    ("rank-w_s", {"w_s": (11, 4, 1)}, "w_s"),
    ("rank-w_t", {"w_t": (66,)}, "w_t"),
    ("empty-vocab", {"w_s": (0, 4), "w_t": (0, 6)}, "vocabulary is empty"),
]


@pytest.mark.parametrize("shapes,msg", [pytest.param(s, m, id=i) for i, s, m in SHAPE_ERRORS])
def test_shape_errors(shapes, msg):
    inputs = _inputs(**shapes)
    with pytest.raises(ValueError, match=msg):
        streamkl.linear_kl(*inputs)
    with pytest.raises(ValueError, match=msg):
        streamkl.LinearKLLoss()(*inputs)


@pytest.mark.parametrize("shapes,msg", [pytest.param(s, m, id=i) for i, s, m in SHAPE_ERRORS])
def test_shape_errors_raw_op(shapes, msg):
    """The op validates on its own (callable without the Python wrapper)."""
    x_s, w_s, x_t, w_t = _inputs(**shapes)
    with pytest.raises((ValueError, RuntimeError), match=msg):
        fwd_op(x_s.reshape(-1, x_s.shape[-1]), w_s, None, x_t.reshape(-1, x_t.shape[-1]), w_t, None, None, 1.0,
               "forward", 0.5, -100, False)


@pytest.mark.parametrize("name", ["w_s", "x_t", "w_t"])
def test_dtype_mismatch(name):
    inputs = _inputs(dtypes={name: torch.float64})
    with pytest.raises(ValueError, match=f"dtype.*{name}"):
        streamkl.linear_kl(*inputs)


def test_dtype_mismatch_raw_op():
    x_s, w_s, x_t, w_t = _inputs(dtypes={"w_t": torch.bfloat16})
    with pytest.raises(ValueError, match="w_t"):
        fwd_op(x_s.flatten(0, 1), w_s, None, x_t.flatten(0, 1), w_t, None, None, 1.0, "forward", 0.5, -100, False)


def test_bias_errors():
    x_s, w_s, x_t, w_t = _inputs()
    with pytest.raises(ValueError, match="b_s"):
        streamkl.linear_kl(x_s, w_s, x_t, w_t, b_s=torch.zeros(10))
    with pytest.raises(ValueError, match="b_t.*dtype|dtype.*b_t"):
        streamkl.linear_kl(x_s, w_s, x_t, w_t, b_t=torch.zeros(11, dtype=torch.float64))


def test_device_mismatch_meta():
    x_s, w_s, x_t, w_t = _inputs()
    with pytest.raises(ValueError, match="device"):
        streamkl.linear_kl(x_s, w_s, x_t.to("meta"), w_t)


def test_integer_inputs_rejected():
    x_s, w_s, x_t, w_t = _inputs()
    with pytest.raises(ValueError, match="floating point"):
        streamkl.linear_kl(x_s.long(), w_s, x_t, w_t)


@pytest.mark.parametrize("labels,msg", [
    pytest.param(torch.zeros(10, dtype=torch.long), "leading shape", id="flat-instead-of-2x5"),
    pytest.param(torch.zeros(2, 4, dtype=torch.long), "leading shape", id="wrong-rows"),
    pytest.param(torch.zeros(2, 5), "integer", id="float-labels"),
    pytest.param(torch.zeros(2, 5, dtype=torch.bool), "integer", id="bool-labels"),
])
def test_bad_labels(labels, msg):
    with pytest.raises(ValueError, match=msg):
        streamkl.linear_kl(*_inputs(), labels=labels)


@pytest.mark.parametrize("value", [11, -2, 1000])
def test_label_values_out_of_range(value):
    labels = torch.zeros(2, 5, dtype=torch.long)
    labels[1, 3] = value
    with pytest.raises(ValueError, match=r"labels\[8\]"):
        streamkl.linear_kl(*_inputs(), labels=labels)


def test_raw_op_needs_int64_labels():
    x_s, w_s, x_t, w_t = _inputs()
    with pytest.raises((ValueError, RuntimeError), match="int64"):
        fwd_op(x_s.flatten(0, 1), w_s, None, x_t.flatten(0, 1), w_t, None, torch.zeros(10, dtype=torch.int32), 1.0,
               "forward", 0.5, -100, False)


@pytest.mark.parametrize("kwargs,msg", [
    pytest.param(dict(divergence="kl"), "divergence", id="divergence"),
    pytest.param(dict(beta=1.5), "beta", id="beta-high"),
    pytest.param(dict(beta=-0.1), "beta", id="beta-low"),
    pytest.param(dict(temperature=0.0), "temperature", id="temperature-zero"),
    pytest.param(dict(temperature=float("inf")), "temperature", id="temperature-inf"),
    pytest.param(dict(reduction="avg"), "reduction", id="reduction"),
    pytest.param(dict(ce_weight=1.0), "needs labels", id="ce-without-labels"),
    pytest.param(dict(ce_weight=1.0, temperature=2.0, labels=torch.zeros(2, 5, dtype=torch.long)),
                 "temperature 1", id="ce-at-temperature-2"),
    pytest.param(dict(ce_weight=float("nan"), labels=torch.zeros(2, 5, dtype=torch.long)), "ce_weight",
                 id="ce-nan"),
])
def test_bad_options(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        streamkl.linear_kl(*_inputs(), **kwargs)


@pytest.mark.parametrize("kwargs,msg", [
    pytest.param(dict(divergence="kl"), "divergence", id="divergence"),
    pytest.param(dict(reduction="avg"), "reduction", id="reduction"),
    pytest.param(dict(ce_weight=1.0, temperature=2.0), "temperature 1", id="ce-at-temperature-2"),
])
def test_module_rejects_bad_options_at_construction(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        streamkl.LinearKLLoss(**kwargs)


def test_raw_op_rejects_bad_scalars():
    x_s, w_s, x_t, w_t = _inputs()
    args = (x_s.flatten(0, 1), w_s, None, x_t.flatten(0, 1), w_t, None, None)
    with pytest.raises((ValueError, RuntimeError), match="inv_temperature"):
        fwd_op(*args, -1.0, "forward", 0.5, -100, False)
    with pytest.raises((ValueError, RuntimeError), match="divergence"):
        fwd_op(*args, 1.0, "tvd", 0.5, -100, False)
    with pytest.raises((ValueError, RuntimeError), match="needs labels"):
        fwd_op(*args, 1.0, "forward", 0.5, -100, True)


def test_empty_rows():
    """T = 0: empty per-row output, zero sum and mean (no NaN), and empty gradients."""
    x_s = torch.randn(0, 4, requires_grad=True)
    w_s = torch.randn(11, 4, requires_grad=True)
    x_t, w_t = torch.randn(0, 6), torch.randn(11, 6)
    assert streamkl.linear_kl(x_s, w_s, x_t, w_t, reduction="none").shape == (0,)
    loss = streamkl.linear_kl(x_s, w_s, x_t, w_t)
    assert loss.item() == 0
    loss.backward()
    assert (w_s.grad == 0).all()

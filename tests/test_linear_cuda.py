"""linear_kl on CUDA tensors.

Until the CUDA kernel exists, the public function must refuse CUDA tensors with a clear NotImplementedError
(tested when a GPU is visible). Once a CUDA kernel is registered for streamkl::linear_kl_fwd, the accuracy
tests below run instead: bf16 inputs against the float64 reference at V = 152064.
"""

import pytest
import torch

import streamkl
from helpers import rel_err, seed_of
from linear_helpers import NAMES, make_labels, make_linear_inputs, ours_and_grads, reference_and_grads

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HAS_CUDA_KERNEL = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "streamkl::linear_kl_fwd", "CUDA")


@pytest.mark.skipif(HAS_CUDA_KERNEL, reason="a CUDA kernel is registered")
def test_cuda_inputs_raise_not_implemented():
    inputs = make_linear_inputs((8,), 64, 16, 16, seed=1, device="cuda")
    x_s, w_s, _, x_t, w_t, _ = inputs
    with pytest.raises(NotImplementedError, match="CUDA"):
        streamkl.linear_kl(x_s, w_s, x_t, w_t)


@pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="no CUDA kernel for linear_kl yet")
@pytest.mark.parametrize("divergence,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5)])
@pytest.mark.parametrize("T,Ds,Dt", [(1, 128, 128), (300, 256, 384), (1000, 64, 128)])
def test_bf16_against_reference(T, Ds, Dt, divergence, beta):
    V = 152064
    seed = seed_of("linear-cuda", T, Ds, Dt, divergence)
    inputs = make_linear_inputs((T,), V, Ds, Dt, seed=seed, dtype=torch.bfloat16, device="cuda", bias=(True, True),
                                teacher_requires_grad=True, logit_scale=4.0)
    labels = make_labels((T,), V, seed=seed, ignore_every=5, device="cuda")
    kwargs = dict(divergence=divergence, beta=beta, labels=labels)
    out, grads = ours_and_grads(inputs, **kwargs)
    ref, ref_grads = reference_and_grads(inputs, **kwargs)
    assert rel_err(out, ref) < 1e-3
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert rel_err(g, r) <= 1e-2, f"{name}.grad"

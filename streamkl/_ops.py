"""Loads the native extension and registers fake (meta) kernels and autograd for ``torch.ops.streamkl``.

The op schemas live in C++ (``csrc/ops/schema.cpp``); this module adds what makes them first-class in
PyTorch: shape propagation for ``torch.compile`` / meta tensors, and a backward that calls another
registered op so the whole graph stays traceable.
"""

import torch

from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
from ._validation import check_attention_tensors, check_options, check_window

ops = torch.ops.streamkl


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("streamkl::attention_kl_fwd")
def _attention_kl_fwd_fake(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, divergence, window_left=-1, window_right=-1):
    check_attention_tensors(q_s, k_s, q_t, k_t, where="streamkl::attention_kl_fwd")
    check_options(scale_s, scale_t, divergence, where="streamkl::attention_kl_fwd")
    check_window((window_left, window_right), where="streamkl::attention_kl_fwd")
    rows = q_s.new_empty(q_s.shape[:3], dtype=_stats_dtype(q_s.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.register_fake("streamkl::attention_kl_bwd")
def _attention_kl_bwd_fake(grad_kl, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, scale_s, scale_t, causal, divergence,
                           teacher_grad, window_left=-1, window_right=-1):
    check_attention_tensors(q_s, k_s, q_t, k_t, where="streamkl::attention_kl_bwd")
    check_options(scale_s, scale_t, divergence, where="streamkl::attention_kl_bwd")
    check_window((window_left, window_right), where="streamkl::attention_kl_bwd")
    for name, t in (("grad_kl", grad_kl), ("kl", kl), ("lse_s", lse_s), ("lse_t", lse_t)):
        if tuple(t.shape) != tuple(q_s.shape[:3]):
            raise ValueError(f"streamkl::attention_kl_bwd: {name} must have shape [B, H, N_q] = "
                             f"{tuple(q_s.shape[:3])}, got {tuple(t.shape)}")
    dq_s = torch.empty_like(q_s, memory_format=torch.contiguous_format)
    dk_s = torch.empty_like(k_s, memory_format=torch.contiguous_format)
    if teacher_grad:
        dq_t = torch.empty_like(q_t, memory_format=torch.contiguous_format)
        dk_t = torch.empty_like(k_t, memory_format=torch.contiguous_format)
    else:
        dq_t, dk_t = q_t.new_empty((0,)), k_t.new_empty((0,))
    return dq_s, dk_s, dq_t, dk_t


def _attention_kl_setup_context(ctx, inputs, output):
    q_s, k_s, q_t, k_t, scale_s, scale_t, causal, divergence, *window = inputs
    kl, lse_s, lse_t = output
    ctx.save_for_backward(q_s, k_s, q_t, k_t, kl, lse_s, lse_t)
    ctx.options = (scale_s, scale_t, causal, divergence)
    ctx.window = tuple(window) + (-1, -1)[len(window):]  # the schema's defaults when not passed
    ctx.num_options = 4 + len(window)


def _attention_kl_backward(ctx, grad_kl, _grad_lse_s, _grad_lse_t):
    q_s, k_s, q_t, k_t, kl, lse_s, lse_t = ctx.saved_tensors
    scale_s, scale_t, causal, divergence = ctx.options
    teacher_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    if teacher_grad and q_s.is_cuda and k_s.shape[1] != k_t.shape[1]:
        # The CUDA op refuses this too; raising here keeps the error out of the autograd engine's worker
        # thread (a C++ exception thrown there crashed the process on the H100 test machine).
        raise NotImplementedError(
            f"streamkl: teacher gradients on CUDA need the same number of key heads on both sides (student "
            f"{k_s.shape[1]}, teacher {k_t.shape[1]}); detach the teacher, or run this configuration on the CPU")
    dq_s, dk_s, dq_t, dk_t = ops.attention_kl_bwd(grad_kl, q_s, k_s, q_t, k_t, kl, lse_s, lse_t, scale_s, scale_t,
                                                  causal, divergence, teacher_grad, *ctx.window)
    if not teacher_grad:
        dq_t = dk_t = None
    return (dq_s, dk_s, dq_t, dk_t) + (None,) * ctx.num_options


torch.library.register_autograd("streamkl::attention_kl_fwd", _attention_kl_backward,
                                setup_context=_attention_kl_setup_context)

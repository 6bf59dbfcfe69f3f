"""StreamKL: KL divergence between two softmax distributions without materializing them.

Public API:
    attention_kl, AttentionKLLoss   -- attention distillation (teacher vs student attention maps)
    attention_kl_varlen, AttentionKLVarlenLoss -- the same on varlen-packed sequences (cu_seqlens)
    attention_kl_reference, attention_kl_varlen_reference -- float64 materializing references
    cuda_available()                -- whether the CUDA kernels were built into this install
Operators: torch.ops.streamkl.attention_kl_fwd / _bwd (forward / reverse KL), attention_jsd_fwd / _bwd
(generalized JSD), attention_kl_varlen_fwd / _bwd (packed sequences, all three divergences).
"""

from . import _ops  # noqa: F401  (loads the extension, registers fake kernels and autograd)
from .attention import AttentionKLLoss, attention_kl
from .reference import attention_kl_reference, attention_kl_varlen_reference
from .varlen import AttentionKLVarlenLoss, attention_kl_varlen

__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when this build has CUDA kernels registered for the streamkl ops."""
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("streamkl::attention_kl_fwd", "CUDA")


__all__ = ["attention_kl", "AttentionKLLoss", "attention_kl_varlen", "AttentionKLVarlenLoss", "attention_kl_reference",
           "attention_kl_varlen_reference", "cuda_available", "__version__"]

# Logit distillation from hidden states (issue 6): linear_kl, LinearKLLoss, linear_kl_reference; operators
# torch.ops.streamkl.linear_kl_fwd / linear_kl_bwd.
from .linear import LinearKLLoss, linear_kl  # noqa: E402
from .linear_reference import linear_kl_reference  # noqa: E402

__all__ += ["linear_kl", "LinearKLLoss", "linear_kl_reference"]

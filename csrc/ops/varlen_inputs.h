// Varlen packing for the attention-KL ops (FlashAttention conventions): checks of cu_seqlens and the
// parameter fields that switch the kernels to the packed layout. Shared by every backend.
#pragma once

#include <ATen/ATen.h>

#include "../kernels/attention_params.h"
#include "attention_inputs.h"

namespace streamkl {

struct VarlenArgs {
  at::Tensor cu_seqlens_q, cu_seqlens_k;  // int32 [B + 1], 0 first, non-decreasing, last = total tokens
  int64_t max_seqlen_q, max_seqlen_k;     // >= every sequence's length (they size the kernels' grids)
};

// Throws a ValueError naming the argument for: cu_seqlens not int32 or not 1-D, on another device than q_s,
// of different lengths (batch sizes), empty, not starting at 0, decreasing, not ending at the packed total
// (q_s.size(0) / k_s.size(0)), and max_seqlen below a sequence's length. Reads the values (a device-to-host
// copy for CUDA tensors).
void check_varlen_args(const VarlenArgs& v, const at::Tensor& q_s, const at::Tensor& k_s);

// Points the parameters at the (contiguous, validated) cu_seqlens and sets batch and the maximum lengths.
// The tensors in `v` must outlive the kernels.
void set_varlen_params(AttentionKLParams& p, const VarlenArgs& v);

// cu_seqlens made contiguous (the kernels index them as plain int32 arrays).
VarlenArgs contiguous_varlen_args(const VarlenArgs& v);

// Everything a varlen op checks before touching data, shared by the CPU and CUDA ops: the packed tensors
// (check_attention_inputs), the cu_seqlens (check_varlen_args), the mask options and the divergence name
// ("forward", "reverse" or "jsd"). The returned cu_seqlens are contiguous.
struct VarlenCall {
  OpOptions options;
  VarlenArgs varlen;
};
VarlenCall check_varlen_call(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                             const at::Tensor& k_t, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                             int64_t max_seqlen_q, int64_t max_seqlen_k, double scale_s, double scale_t, bool causal,
                             const std::string& divergence, int64_t window_left, int64_t window_right);

// Parameters of a varlen op on the (backend-prepared) packed tensors: sizes, strides, pointers, flags and the
// varlen fields; beta is checked for the JSD. Output pointers are the caller's.
AttentionKLParams make_varlen_params(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                                     const at::Tensor& k_t, const VarlenCall& call, double scale_s, double scale_t,
                                     double beta);

}  // namespace streamkl

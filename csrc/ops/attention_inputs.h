// Torch-side input validation and parameter packing for the attention-KL ops, shared by the CPU and
// CUDA implementations so both backends accept and reject exactly the same inputs.
#pragma once

#include <string>

#include <ATen/ATen.h>

#include "../kernels/attention_params.h"

namespace streamkl {

Divergence parse_divergence(const std::string& name);

// Validates ranks, shapes, dtypes and devices; throws c10::Error (RuntimeError/ValueError in Python)
// naming the argument and the expected shape.
void check_attention_inputs(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                            const at::Tensor& k_t, double scale_s, double scale_t);

// Last dim must be contiguous for the kernels; other strides are passed through.
at::Tensor with_contiguous_last_dim(const at::Tensor& t);

// dtype of kl / lse: float64 for float64 inputs, float32 otherwise.
at::ScalarType stats_dtype(at::ScalarType input_dtype);

// Fills sizes, strides, pointers and flags (not the output pointers) from already-validated inputs.
AttentionKLParams make_attention_params(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                                        const at::Tensor& k_t, double scale_s, double scale_t, bool causal,
                                        Divergence divergence);

// Points a side's dq / dk at contiguous gradient buffers shaped like its q / k.
void set_side_gradients(AttentionSide& side, at::Tensor& dq, at::Tensor& dk);

}  // namespace streamkl

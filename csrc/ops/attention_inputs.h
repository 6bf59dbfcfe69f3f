// Torch-side input validation and parameter packing for the attention-KL ops, shared by the CPU and
// CUDA implementations so both backends accept and reject exactly the same inputs.
#pragma once

#include <string>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "../kernels/attention_params.h"

namespace streamkl {

// "forward" / "reverse": the KL divergences every op supports.
Divergence parse_divergence(const std::string& name);
// Also "jsd" (generalized JSD), for the ops that return its per-row statistics.
Divergence parse_divergence_or_jsd(const std::string& name);
// beta of the generalized JSD: finite and in [0, 1] (ValueError otherwise).
void check_jsd_beta(double beta);
// What the kernels run for an op's parameters: a generalized JSD at beta = 0 / 1 becomes the forward / reverse KL
// it is defined to be there (jsd_divergence_for_beta in kernels/online_kl.h, the mapping linear_kl uses too), so
// the JSD kernels only see 0 < beta < 1. The one place where every attention op (padded and varlen, any backend)
// applies the end points; the op's parameters keep kJsd so that its outputs keep the JSD's shapes.
AttentionKLParams kernel_attention_params(const AttentionKLParams& op_params);

// Which dimension of a q / k tensor holds what: padded [batch, heads, seq, head_dim] or varlen-packed
// [total_tokens, heads, head_dim] (no batch dimension: sequences are delimited by cu_seqlens).
struct TensorLayout {
  int rank;
  int batch_dim;  // -1 when packed
  int head_dim, seq_dim, feature_dim;
  const char* shape_name;
};
constexpr TensorLayout kPaddedLayout{4, 0, 1, 2, 3, "[batch, heads, seq, head_dim]"};
constexpr TensorLayout kPackedLayout{3, -1, 1, 0, 2, "[total_tokens, heads, head_dim]"};

// Validates ranks, shapes, dtypes and devices; throws c10::Error (RuntimeError/ValueError in Python)
// naming the argument and the expected shape.
// teacher_head_group (r): the teacher has r query heads per student head (head-aggregated teacher), and its
// key heads must divide its own r * H query heads.
void check_attention_inputs(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                            const at::Tensor& k_t, double scale_s, double scale_t,
                            const TensorLayout& layout = kPaddedLayout, int64_t teacher_head_group = 1);

// teacher_head_reduce: "none" (one teacher head per student head) or "mean" (the student head h is compared
// with the mean attention of teacher heads h*r .. h*r+r-1, r = H_t / H_s). Returns r; ValueError for another
// name or for H_t not a multiple of H_s.
int64_t parse_teacher_head_reduce(const std::string& name, const at::Tensor& q_s, const at::Tensor& q_t,
                                  const TensorLayout& layout = kPaddedLayout);

// A caller-provided teacher LSE: shape q_t's without its head dim ([B, H_t, N_q]), floating point, on q_t's
// device; returned contiguous in the statistics dtype.
at::Tensor prepare_teacher_lse(const at::Tensor& teacher_lse, const at::Tensor& q_t, at::ScalarType stats);

// Last dim must be contiguous for the kernels; other strides are passed through.
at::Tensor with_contiguous_last_dim(const at::Tensor& t);

// dtype of kl / lse: float64 for float64 inputs, float32 otherwise.
at::ScalarType stats_dtype(at::ScalarType input_dtype);

// Which keys each query row sees: causal and/or a sliding window (-1 = unbounded side).
struct MaskOptions {
  bool causal;
  int64_t window_left, window_right;
};
// Throws a ValueError for window sides below -1.
MaskOptions check_mask_options(bool causal, int64_t window_left, int64_t window_right);

// A varlen op's mask options and divergence (varlen_inputs.h).
struct OpOptions {
  MaskOptions mask;
  Divergence divergence;
};

// Padded-layout ops (attention_kl_* and attention_jsd_*, CPU and CUDA): the checks every padded op shares (tensors,
// mask options, teacher heads) and what they settle.
struct PaddedCall {
  MaskOptions mask;
  int64_t teacher_head_group;  // r: teacher heads averaged per student head (1: none)
};
PaddedCall check_padded_call(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
                             double scale_s, double scale_t, bool causal, int64_t window_left, int64_t window_right,
                             const std::string& teacher_head_reduce);
// teacher_lse (optional) goes with an aggregated teacher ("mean"), whose per-head LSEs it replaces: checked
// (prepare_teacher_lse) and returned in the statistics dtype, or an undefined tensor when not given.
at::Tensor checked_teacher_lse(const c10::optional<at::Tensor>& teacher_lse, const std::string& teacher_head_reduce,
                               const at::Tensor& q_t, at::ScalarType stats);
// Teacher gradients through the head mean need per-teacher-head row sums (another pass): refused on every backend.
void refuse_aggregated_teacher_grad(const PaddedCall& call, bool teacher_grad);

// Fills sizes, strides, pointers and flags (not the output pointers) from already-validated padded inputs.
AttentionKLParams make_attention_params(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                                        const at::Tensor& k_t, double scale_s, double scale_t, const MaskOptions& mask,
                                        Divergence divergence);
// Same with the call's mask and teacher head group.
AttentionKLParams make_padded_params(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                                     const at::Tensor& k_t, const PaddedCall& call, double scale_s, double scale_t,
                                     Divergence divergence);
// Same for either layout; the varlen fields (cu_seqlens, max lengths) are the caller's (see varlen_inputs.h).
AttentionKLParams make_layout_params(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                                     const at::Tensor& k_t, double scale_s, double scale_t, const MaskOptions& mask,
                                     Divergence divergence, const TensorLayout& layout);

// Points p's operands at (views of) the four inputs: pointers, strides, head dims, row extents and head counts, its
// other fields (scales, mask, layout, divergence, outputs) kept. How a backend runs a slice of a problem, e.g. a range
// of heads, through the same kernels.
void point_params_at_inputs(AttentionKLParams& p, const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                            const at::Tensor& k_t, const TensorLayout& layout);

// The backward's per-row inputs, shape-checked against q_s's leading dims ([B, H, N_q] padded, [total_q, H]
// varlen) and made contiguous in the statistics dtype; a grad_kl that broadcasts one value to every row (all strides
// 0) is kept as it is (grad_kl_broadcast). Keep the struct alive until the kernels have run.
struct BackwardRowInputs {
  at::Tensor grad_kl, kl, lse_s, lse_t;
  bool grad_kl_broadcast = false;
};
BackwardRowInputs prepare_backward_rows(const at::Tensor& q_s, const at::Tensor& grad_kl, const at::Tensor& kl,
                                        const at::Tensor& lse_s, const at::Tensor& lse_t, at::ScalarType stats);
// Same, with lse_t shaped like q_t's rows (the per-head LSEs of a head-aggregated teacher).
BackwardRowInputs prepare_backward_rows(const at::Tensor& q_s, const at::Tensor& q_t, const at::Tensor& grad_kl,
                                        const at::Tensor& kl, const at::Tensor& lse_s, const at::Tensor& lse_t,
                                        at::ScalarType stats);

// The JSD's per-row statistics saved by the forward: shape q_s.shape[:-1] + [JsdRowStats::kCount], made contiguous
// in the statistics dtype.
at::Tensor prepare_jsd_stats(const at::Tensor& q_s, const at::Tensor& jsd_stats, at::ScalarType stats);

// Adds the backward's per-row inputs and gradient outputs (contiguous, shaped like q / k; the teacher's only when
// teacher_grad) to forward parameters of either layout.
void set_backward_params(AttentionKLParams& p, const BackwardRowInputs& rows, at::Tensor& dq_s, at::Tensor& dk_s,
                         at::Tensor& dq_t, at::Tensor& dk_t, bool teacher_grad, const TensorLayout& layout);

}  // namespace streamkl

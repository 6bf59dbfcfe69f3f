// The six attention ops' entry points (attention_kl_fwd / _bwd, attention_jsd_fwd / _bwd, attention_kl_varlen_fwd /
// _bwd), written once for both backends: the shared checks (attention_inputs.h, varlen_inputs.h), the inputs as the
// backend's kernels read them, the kernel parameters, then the backend's forward or backward. A Backend provides
//   using Inputs = ...;        constructed from (q_s, k_s, q_t, k_t): the tensors as its kernels read them
//   using Guard = ...;         constructed from q_s: the device guard (CUDA), or nothing
//   static at::ScalarType stats(const Inputs&);                     the statistics dtype
//   static void check_teacher_grad(bool teacher_grad, const at::Tensor& k_s, const at::Tensor& k_t);
//   static <outputs with kl, lse_s, lse_t, jsd_stats> forward(AttentionKLParams&, const Inputs&,
//                                                               const at::Tensor& teacher_lse);
//   static Gradients backward(AttentionKLParams&, const Inputs&, const BackwardRowInputs&,
//                             const at::Tensor& jsd_stats, bool teacher_grad, const TensorLayout&);
// and registers them with register_attention_ops<Backend>(m) in its TORCH_LIBRARY_IMPL block.
#pragma once

#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "attention_inputs.h"
#include "varlen_inputs.h"

namespace streamkl {

using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename Backend>
struct AttentionEntryPoints {
  using Tensor = at::Tensor;
  using Inputs = typename Backend::Inputs;
  using Guard = typename Backend::Guard;

  static std::tuple<Tensor, Tensor, Tensor> kl_fwd(const Tensor& q_s, const Tensor& k_s, const Tensor& q_t,
                                                   const Tensor& k_t, double scale_s, double scale_t, bool causal,
                                                   c10::string_view divergence, int64_t window_left,
                                                   int64_t window_right, c10::string_view teacher_head_reduce,
                                                   const c10::optional<Tensor>& teacher_lse) {
    const PaddedCall call = check_padded_call(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, window_left, window_right,
                                              std::string(teacher_head_reduce));
    const Divergence div = parse_divergence(std::string(divergence));
    const Guard guard(q_s);
    const Inputs in(q_s, k_s, q_t, k_t);
    AttentionKLParams p = make_padded_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, div);
    const auto out = Backend::forward(
        p, in, checked_teacher_lse(teacher_lse, std::string(teacher_head_reduce), in.q_t, Backend::stats(in)));
    return {out.kl, out.lse_s, out.lse_t};
  }

  static Gradients kl_bwd(const Tensor& grad_kl, const Tensor& q_s, const Tensor& k_s, const Tensor& q_t,
                          const Tensor& k_t, const Tensor& kl, const Tensor& lse_s, const Tensor& lse_t,
                          double scale_s, double scale_t, bool causal, c10::string_view divergence, bool teacher_grad,
                          int64_t window_left, int64_t window_right, c10::string_view teacher_head_reduce) {
    const PaddedCall call = check_padded_call(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, window_left, window_right,
                                              std::string(teacher_head_reduce));
    const Divergence div = parse_divergence(std::string(divergence));
    refuse_aggregated_teacher_grad(call, teacher_grad);
    Backend::check_teacher_grad(teacher_grad, k_s, k_t);
    const Guard guard(q_s);
    const Inputs in(q_s, k_s, q_t, k_t);
    const BackwardRowInputs rows = prepare_backward_rows(in.q_s, in.q_t, grad_kl, kl, lse_s, lse_t, Backend::stats(in));
    AttentionKLParams p = make_padded_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, div);
    return Backend::backward(p, in, rows, Tensor(), teacher_grad, kPaddedLayout);
  }

  // The generalized JSD on the padded layout: the KL ops' outputs plus the per-row statistics.
  static std::tuple<Tensor, Tensor, Tensor, Tensor> jsd_fwd(const Tensor& q_s, const Tensor& k_s, const Tensor& q_t,
                                                            const Tensor& k_t, double scale_s, double scale_t,
                                                            bool causal, double beta, int64_t window_left,
                                                            int64_t window_right, c10::string_view teacher_head_reduce,
                                                            const c10::optional<Tensor>& teacher_lse) {
    const PaddedCall call = check_padded_call(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, window_left, window_right,
                                              std::string(teacher_head_reduce));
    check_jsd_beta(beta);
    const Guard guard(q_s);
    const Inputs in(q_s, k_s, q_t, k_t);
    AttentionKLParams p =
        make_padded_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, Divergence::kJsd);
    p.beta = beta;
    const auto out = Backend::forward(
        p, in, checked_teacher_lse(teacher_lse, std::string(teacher_head_reduce), in.q_t, Backend::stats(in)));
    return {out.kl, out.lse_s, out.lse_t, out.jsd_stats};
  }

  static Gradients jsd_bwd(const Tensor& grad_jsd, const Tensor& q_s, const Tensor& k_s, const Tensor& q_t,
                           const Tensor& k_t, const Tensor& jsd, const Tensor& lse_s, const Tensor& lse_t,
                           const Tensor& jsd_stats, double scale_s, double scale_t, bool causal, double beta,
                           bool teacher_grad, int64_t window_left, int64_t window_right,
                           c10::string_view teacher_head_reduce) {
    const PaddedCall call = check_padded_call(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, window_left, window_right,
                                              std::string(teacher_head_reduce));
    check_jsd_beta(beta);
    refuse_aggregated_teacher_grad(call, teacher_grad);
    Backend::check_teacher_grad(teacher_grad, k_s, k_t);
    const Guard guard(q_s);
    const Inputs in(q_s, k_s, q_t, k_t);
    const BackwardRowInputs rows =
        prepare_backward_rows(in.q_s, in.q_t, grad_jsd, jsd, lse_s, lse_t, Backend::stats(in));
    AttentionKLParams p =
        make_padded_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, Divergence::kJsd);
    p.beta = beta;
    return Backend::backward(p, in, rows, jsd_stats, teacher_grad, kPaddedLayout);
  }

  // Varlen: the packed-layout checks and the cu_seqlens (varlen_inputs.h), then the same kernels.
  static std::tuple<Tensor, Tensor, Tensor, Tensor> varlen_fwd(
      const Tensor& q_s, const Tensor& k_s, const Tensor& q_t, const Tensor& k_t, const Tensor& cu_seqlens_q,
      const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale_s, double scale_t,
      bool causal, c10::string_view divergence, int64_t window_left, int64_t window_right, double beta) {
    const VarlenCall call = check_varlen_call(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              max_seqlen_k, scale_s, scale_t, causal, std::string(divergence),
                                              window_left, window_right);
    const Guard guard(q_s);
    const Inputs in(q_s, k_s, q_t, k_t);
    AttentionKLParams p = make_varlen_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, beta);
    const auto out = Backend::forward(p, in, Tensor());
    return {out.kl, out.lse_s, out.lse_t, out.jsd_stats};
  }

  static Gradients varlen_bwd(const Tensor& grad_kl, const Tensor& q_s, const Tensor& k_s, const Tensor& q_t,
                              const Tensor& k_t, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                              int64_t max_seqlen_q, int64_t max_seqlen_k, const Tensor& kl, const Tensor& lse_s,
                              const Tensor& lse_t, const Tensor& jsd_stats, double scale_s, double scale_t,
                              bool causal, c10::string_view divergence, bool teacher_grad, int64_t window_left,
                              int64_t window_right, double beta) {
    const VarlenCall call = check_varlen_call(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              max_seqlen_k, scale_s, scale_t, causal, std::string(divergence),
                                              window_left, window_right);
    Backend::check_teacher_grad(teacher_grad, k_s, k_t);
    const Guard guard(q_s);
    const Inputs in(q_s, k_s, q_t, k_t);
    const BackwardRowInputs rows = prepare_backward_rows(in.q_s, grad_kl, kl, lse_s, lse_t, Backend::stats(in));
    AttentionKLParams p = make_varlen_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, beta);
    return Backend::backward(p, in, rows, jsd_stats, teacher_grad, kPackedLayout);
  }
};

template <typename Backend>
void register_attention_ops(torch::Library& m) {
  using Ops = AttentionEntryPoints<Backend>;
  m.impl("attention_kl_fwd", &Ops::kl_fwd);
  m.impl("attention_kl_bwd", &Ops::kl_bwd);
  m.impl("attention_jsd_fwd", &Ops::jsd_fwd);
  m.impl("attention_jsd_bwd", &Ops::jsd_bwd);
  m.impl("attention_kl_varlen_fwd", &Ops::varlen_fwd);
  m.impl("attention_kl_varlen_bwd", &Ops::varlen_bwd);
}

}  // namespace streamkl

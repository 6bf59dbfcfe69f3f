// CPU implementations of streamkl::attention_kl_fwd / attention_kl_bwd.
// float32 and float64 run natively; float16 / bfloat16 inputs are upcast to float32 once (O(N * D) memory,
// the size of the inputs) and gradients are cast back, so statistics are always accumulated in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ops/attention_inputs.h"
#include "attention_kl_cpu_kernel.h"

namespace streamkl {
namespace {

auto aten_parallel_for = [](int64_t begin, int64_t end, auto&& body) {
  at::parallel_for(begin, end, /*grain_size=*/1, body);
};

at::ScalarType compute_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor prepare(const at::Tensor& t) {
  return with_contiguous_last_dim(t.to(compute_dtype(t.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_kl_fwd_cpu(const at::Tensor& q_s_in, const at::Tensor& k_s_in,
                                                                     const at::Tensor& q_t_in, const at::Tensor& k_t_in,
                                                                     double scale_s, double scale_t, bool causal,
                                                                     c10::string_view divergence, int64_t window_left,
                                                                     int64_t window_right) {
  const OpOptions options = check_op_arguments(q_s_in, k_s_in, q_t_in, k_t_in, scale_s, scale_t, causal,
                                                std::string(divergence), window_left, window_right);
  const MaskOptions& mask = options.mask;
  const Divergence div = options.divergence;
  const at::Tensor q_s = prepare(q_s_in), k_s = prepare(k_s_in), q_t = prepare(q_t_in), k_t = prepare(k_t_in);
  const auto opts = q_s.options().dtype(stats_dtype(q_s_in.scalar_type()));
  at::Tensor kl = at::empty({q_s.size(0), q_s.size(1), q_s.size(2)}, opts);
  at::Tensor lse_s = at::empty_like(kl), lse_t = at::empty_like(kl);
  if (kl.numel() == 0) return {kl, lse_s, lse_t};

  AttentionKLParams p = make_attention_params(q_s, k_s, q_t, k_t, scale_s, scale_t, mask, div);
  p.kl = kl.data_ptr();
  p.lse_student = lse_s.data_ptr();
  p.lse_teacher = lse_t.data_ptr();
  if (q_s.scalar_type() == at::kDouble)
    cpu::run_attention_kl_forward<double>(p, aten_parallel_for);
  else
    cpu::run_attention_kl_forward<float>(p, aten_parallel_for);
  return {kl, lse_s, lse_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_kl_bwd_cpu(
    const at::Tensor& grad_kl, const at::Tensor& q_s_in, const at::Tensor& k_s_in, const at::Tensor& q_t_in,
    const at::Tensor& k_t_in, const at::Tensor& kl, const at::Tensor& lse_s, const at::Tensor& lse_t, double scale_s,
    double scale_t, bool causal, c10::string_view divergence, bool teacher_grad, int64_t window_left,
    int64_t window_right) {
  const OpOptions options = check_op_arguments(q_s_in, k_s_in, q_t_in, k_t_in, scale_s, scale_t, causal,
                                                std::string(divergence), window_left, window_right);
  const MaskOptions& mask = options.mask;
  const Divergence div = options.divergence;
  const at::Tensor q_s = prepare(q_s_in), k_s = prepare(k_s_in), q_t = prepare(q_t_in), k_t = prepare(k_t_in);
  const BackwardRowInputs rows =
      prepare_backward_rows(q_s, grad_kl, kl, lse_s, lse_t, stats_dtype(q_s_in.scalar_type()));
  at::Tensor dq_s = at::zeros(q_s.sizes(), q_s.options()), dk_s = at::zeros(k_s.sizes(), k_s.options());
  at::Tensor dq_t = teacher_grad ? at::zeros(q_t.sizes(), q_t.options()) : at::empty({0}, q_t.options());
  at::Tensor dk_t = teacher_grad ? at::zeros(k_t.sizes(), k_t.options()) : at::empty({0}, k_t.options());
  if (kl.numel() != 0 && k_s.size(2) != 0) {
    const AttentionKLParams p = make_backward_params(q_s, k_s, q_t, k_t, scale_s, scale_t, mask, div, rows, dq_s,
                                                     dk_s, dq_t, dk_t, teacher_grad);
    if (q_s.scalar_type() == at::kDouble)
      cpu::run_attention_kl_backward<double>(p, aten_parallel_for);
    else
      cpu::run_attention_kl_backward<float>(p, aten_parallel_for);
  }
  const auto in_dt = q_s_in.scalar_type();
  return {dq_s.to(in_dt), dk_s.to(in_dt), dq_t.to(in_dt), dk_t.to(in_dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(streamkl, CPU, m) {
  m.impl("attention_kl_fwd", &attention_kl_fwd_cpu);
  m.impl("attention_kl_bwd", &attention_kl_bwd_cpu);
}

}  // namespace streamkl

// CPU implementations of the streamkl attention-KL ops (padded and varlen layouts): validation shared with
// the CUDA path (csrc/ops), then one kernel template for both layouts (attention_kl_cpu_kernel.h).
// float32 and float64 run natively; float16 / bfloat16 inputs are upcast to float32 once (O(N * D) memory,
// the size of the inputs) and gradients are cast back, so statistics are always accumulated in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../ops/attention_inputs.h"
#include "../ops/varlen_inputs.h"
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

// The four inputs in the kernels' compute dtype, and the dtype the gradients go back to.
struct CpuInputs {
  at::Tensor q_s, k_s, q_t, k_t;
  at::ScalarType input_dtype;
  CpuInputs(const at::Tensor& q_s_in, const at::Tensor& k_s_in, const at::Tensor& q_t_in, const at::Tensor& k_t_in)
      : q_s(prepare(q_s_in)), k_s(prepare(k_s_in)), q_t(prepare(q_t_in)), k_t(prepare(k_t_in)),
        input_dtype(q_s_in.scalar_type()) {}
  at::ScalarType stats() const { return stats_dtype(input_dtype); }
};

struct ForwardOutputs {
  at::Tensor kl, lse_s, lse_t;
  at::Tensor jsd_stats;  // [rows..., JsdRowStats::kCount] for the JSD (zeros at beta = 0 / 1), [0] otherwise
};

// Per-row outputs shaped like q_s without its head dim (lse_t like q_t's: an aggregated teacher has more heads),
// then the kernel (unless there is no row at all). teacher_lse: the teacher's LSEs given by the caller, or
// undefined. Here and in run_backward the kernels get kernel_attention_params(p), which runs a JSD at beta = 0 / 1
// as the KL it equals; its statistics, unused then, stay zero.
ForwardOutputs run_forward(AttentionKLParams& p, const CpuInputs& in, const at::Tensor& teacher_lse = at::Tensor()) {
  const auto opts = in.q_s.options().dtype(in.stats());
  const at::IntArrayRef rows = in.q_s.sizes().slice(0, in.q_s.dim() - 1);
  std::vector<int64_t> stats_shape = {0};
  if (p.divergence == Divergence::kJsd) {
    stats_shape.assign(rows.begin(), rows.end());
    stats_shape.push_back(JsdRowStats<float>::kCount);
  }
  ForwardOutputs out{at::empty(rows, opts), at::empty(rows, opts),
                     at::empty(in.q_t.sizes().slice(0, in.q_t.dim() - 1), opts), at::zeros(stats_shape, opts)};
  if (teacher_lse.defined()) {
    out.lse_t.copy_(teacher_lse);  // a copy: an op output must not alias an input
    p.teacher_lse_ready = true;
  }
  if (out.kl.numel() == 0) return out;
  p.kl = out.kl.data_ptr();
  p.lse_student = out.lse_s.data_ptr();
  p.lse_teacher = out.lse_t.data_ptr();
  p.jsd_stats = p.divergence == Divergence::kJsd ? out.jsd_stats.data_ptr() : nullptr;
  const AttentionKLParams kernel = kernel_attention_params(p);
  if (in.q_s.scalar_type() == at::kDouble)
    cpu::run_attention_kl_forward<double>(kernel, aten_parallel_for);
  else
    cpu::run_attention_kl_forward<float>(kernel, aten_parallel_for);
  return out;
}

using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Zeroed gradient buffers (the kernels accumulate), the backward kernels, and the cast back to the input dtype.
// jsd_stats: the forward's JSD statistics (read only for Divergence::kJsd).
Gradients run_backward(AttentionKLParams& p, const CpuInputs& in, const BackwardRowInputs& rows,
                       const at::Tensor& jsd_stats, bool teacher_grad, const TensorLayout& layout) {
  const at::Tensor stats =
      p.divergence == Divergence::kJsd ? prepare_jsd_stats(in.q_s, jsd_stats, in.stats()) : at::Tensor();
  if (stats.defined()) p.jsd_stats = const_cast<void*>(stats.data_ptr());
  at::Tensor dq_s = at::zeros(in.q_s.sizes(), in.q_s.options()), dk_s = at::zeros(in.k_s.sizes(), in.k_s.options());
  at::Tensor dq_t = teacher_grad ? at::zeros(in.q_t.sizes(), in.q_t.options()) : at::empty({0}, in.q_t.options());
  at::Tensor dk_t = teacher_grad ? at::zeros(in.k_t.sizes(), in.k_t.options()) : at::empty({0}, in.k_t.options());
  if (rows.kl.numel() != 0 && in.k_s.size(layout.seq_dim) != 0) {
    set_backward_params(p, rows, dq_s, dk_s, dq_t, dk_t, teacher_grad, layout);
    const AttentionKLParams kernel = kernel_attention_params(p);
    if (in.q_s.scalar_type() == at::kDouble)
      cpu::run_attention_kl_backward<double>(kernel, aten_parallel_for);
    else
      cpu::run_attention_kl_backward<float>(kernel, aten_parallel_for);
  }
  const auto dt = in.input_dtype;
  return {dq_s.to(dt), dk_s.to(dt), dq_t.to(dt), dk_t.to(dt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_kl_fwd_cpu(
    const at::Tensor& q_s_in, const at::Tensor& k_s_in, const at::Tensor& q_t_in, const at::Tensor& k_t_in,
    double scale_s, double scale_t, bool causal, c10::string_view divergence, int64_t window_left,
    int64_t window_right, c10::string_view teacher_head_reduce, const c10::optional<at::Tensor>& teacher_lse) {
  const PaddedCall call = check_padded_call(q_s_in, k_s_in, q_t_in, k_t_in, scale_s, scale_t, causal, window_left,
                                            window_right, std::string(teacher_head_reduce));
  const Divergence div = parse_divergence(std::string(divergence));
  const CpuInputs in(q_s_in, k_s_in, q_t_in, k_t_in);
  AttentionKLParams p = make_padded_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, div);
  const ForwardOutputs out =
      run_forward(p, in, checked_teacher_lse(teacher_lse, std::string(teacher_head_reduce), in.q_t, in.stats()));
  return {out.kl, out.lse_s, out.lse_t};
}

Gradients attention_kl_bwd_cpu(const at::Tensor& grad_kl, const at::Tensor& q_s_in, const at::Tensor& k_s_in,
                               const at::Tensor& q_t_in, const at::Tensor& k_t_in, const at::Tensor& kl,
                               const at::Tensor& lse_s, const at::Tensor& lse_t, double scale_s, double scale_t,
                               bool causal, c10::string_view divergence, bool teacher_grad, int64_t window_left,
                               int64_t window_right, c10::string_view teacher_head_reduce) {
  const PaddedCall call = check_padded_call(q_s_in, k_s_in, q_t_in, k_t_in, scale_s, scale_t, causal, window_left,
                                            window_right, std::string(teacher_head_reduce));
  const Divergence div = parse_divergence(std::string(divergence));
  refuse_aggregated_teacher_grad(call, teacher_grad);
  const CpuInputs in(q_s_in, k_s_in, q_t_in, k_t_in);
  const BackwardRowInputs rows = prepare_backward_rows(in.q_s, in.q_t, grad_kl, kl, lse_s, lse_t, in.stats());
  AttentionKLParams p = make_padded_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, div);
  return run_backward(p, in, rows, at::Tensor(), teacher_grad, kPaddedLayout);
}

// The generalized JSD on the padded layout: the KL ops' outputs plus the per-row statistics.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_jsd_fwd_cpu(
    const at::Tensor& q_s_in, const at::Tensor& k_s_in, const at::Tensor& q_t_in, const at::Tensor& k_t_in,
    double scale_s, double scale_t, bool causal, double beta, int64_t window_left, int64_t window_right,
    c10::string_view teacher_head_reduce, const c10::optional<at::Tensor>& teacher_lse) {
  const PaddedCall call = check_padded_call(q_s_in, k_s_in, q_t_in, k_t_in, scale_s, scale_t, causal, window_left,
                                            window_right, std::string(teacher_head_reduce));
  check_jsd_beta(beta);
  const CpuInputs in(q_s_in, k_s_in, q_t_in, k_t_in);
  AttentionKLParams p = make_padded_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, Divergence::kJsd);
  p.beta = beta;
  const ForwardOutputs out =
      run_forward(p, in, checked_teacher_lse(teacher_lse, std::string(teacher_head_reduce), in.q_t, in.stats()));
  return {out.kl, out.lse_s, out.lse_t, out.jsd_stats};
}

Gradients attention_jsd_bwd_cpu(const at::Tensor& grad_jsd, const at::Tensor& q_s_in, const at::Tensor& k_s_in,
                                const at::Tensor& q_t_in, const at::Tensor& k_t_in, const at::Tensor& jsd,
                                const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& jsd_stats,
                                double scale_s, double scale_t, bool causal, double beta, bool teacher_grad,
                                int64_t window_left, int64_t window_right, c10::string_view teacher_head_reduce) {
  const PaddedCall call = check_padded_call(q_s_in, k_s_in, q_t_in, k_t_in, scale_s, scale_t, causal, window_left,
                                            window_right, std::string(teacher_head_reduce));
  check_jsd_beta(beta);
  refuse_aggregated_teacher_grad(call, teacher_grad);
  const CpuInputs in(q_s_in, k_s_in, q_t_in, k_t_in);
  const BackwardRowInputs rows = prepare_backward_rows(in.q_s, in.q_t, grad_jsd, jsd, lse_s, lse_t, in.stats());
  AttentionKLParams p = make_padded_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, Divergence::kJsd);
  p.beta = beta;
  return run_backward(p, in, rows, jsd_stats, teacher_grad, kPaddedLayout);
}

// Varlen: the packed-layout checks and the cu_seqlens (csrc/ops/varlen_inputs.h), then the same kernels.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_kl_varlen_fwd_cpu(
    const at::Tensor& q_s_in, const at::Tensor& k_s_in, const at::Tensor& q_t_in, const at::Tensor& k_t_in,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale_s, double scale_t, bool causal, c10::string_view divergence, int64_t window_left,
    int64_t window_right, double beta) {
  const VarlenCall call = check_varlen_call(q_s_in, k_s_in, q_t_in, k_t_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, scale_s, scale_t, causal, std::string(divergence),
                                            window_left, window_right);
  const CpuInputs in(q_s_in, k_s_in, q_t_in, k_t_in);
  AttentionKLParams p = make_varlen_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, beta);
  const ForwardOutputs out = run_forward(p, in);
  return {out.kl, out.lse_s, out.lse_t, out.jsd_stats};
}

Gradients attention_kl_varlen_bwd_cpu(const at::Tensor& grad_kl, const at::Tensor& q_s_in, const at::Tensor& k_s_in,
                                      const at::Tensor& q_t_in, const at::Tensor& k_t_in,
                                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                      int64_t max_seqlen_q, int64_t max_seqlen_k, const at::Tensor& kl,
                                      const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& jsd_stats,
                                      double scale_s, double scale_t, bool causal, c10::string_view divergence,
                                      bool teacher_grad, int64_t window_left, int64_t window_right, double beta) {
  const VarlenCall call = check_varlen_call(q_s_in, k_s_in, q_t_in, k_t_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, scale_s, scale_t, causal, std::string(divergence),
                                            window_left, window_right);
  const CpuInputs in(q_s_in, k_s_in, q_t_in, k_t_in);
  const BackwardRowInputs rows = prepare_backward_rows(in.q_s, grad_kl, kl, lse_s, lse_t, in.stats());
  AttentionKLParams p = make_varlen_params(in.q_s, in.k_s, in.q_t, in.k_t, call, scale_s, scale_t, beta);
  return run_backward(p, in, rows, jsd_stats, teacher_grad, kPackedLayout);
}

}  // namespace

TORCH_LIBRARY_IMPL(streamkl, CPU, m) {
  m.impl("attention_kl_fwd", &attention_kl_fwd_cpu);
  m.impl("attention_kl_bwd", &attention_kl_bwd_cpu);
  m.impl("attention_jsd_fwd", &attention_jsd_fwd_cpu);
  m.impl("attention_jsd_bwd", &attention_jsd_bwd_cpu);
  m.impl("attention_kl_varlen_fwd", &attention_kl_varlen_fwd_cpu);
  m.impl("attention_kl_varlen_bwd", &attention_kl_varlen_bwd_cpu);
}

}  // namespace streamkl

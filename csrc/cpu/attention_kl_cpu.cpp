// CPU implementations of the streamkl attention-KL ops (padded and varlen layouts): validation shared with
// the CUDA path (csrc/ops), then one kernel template for both layouts (attention_kl_cpu_kernel.h).
// float32 and float64 run natively; float16 / bfloat16 inputs are upcast to float32 once (O(N * D) memory,
// the size of the inputs) and gradients are cast back, so statistics are always accumulated in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../ops/attention_entry_points.h"
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

// The backend of the shared entry points (csrc/ops/attention_entry_points.h).
struct CpuBackend {
  using Inputs = CpuInputs;
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  static at::ScalarType stats(const Inputs& in) { return in.stats(); }
  static void check_teacher_grad(bool, const at::Tensor&, const at::Tensor&) {}
  static ForwardOutputs forward(AttentionKLParams& p, const Inputs& in, const at::Tensor& teacher_lse) {
    return run_forward(p, in, teacher_lse);
  }
  static Gradients backward(AttentionKLParams& p, const Inputs& in, const BackwardRowInputs& rows,
                            const at::Tensor& jsd_stats, bool teacher_grad, const TensorLayout& layout) {
    return run_backward(p, in, rows, jsd_stats, teacher_grad, layout);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(streamkl, CPU, m) { register_attention_ops<CpuBackend>(m); }

}  // namespace streamkl

// CPU implementations of streamkl::linear_kl_fwd / linear_kl_bwd.
// float32 and float64 run natively; float16 / bfloat16 inputs are upcast to float32 once (the size of the
// inputs) and gradients are cast back, so logits and statistics are always fp32 or wider, never rounded to
// the input dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ops/linear_inputs.h"
#include "cpu_op_helpers.h"
#include "linear_kl_cpu_kernel.h"

namespace streamkl {
namespace {

using c10::optional;

// The inputs in the compute dtype, row-contiguous, and the options, checked.
struct LinearInputs {
  at::Tensor x_s, w_s, x_t, w_t;
  optional<at::Tensor> b_s, b_t, labels;
  LinearOptions options;
  at::ScalarType input_dtype;

  LinearInputs(const at::Tensor& x_s_in, const at::Tensor& w_s_in, const optional<at::Tensor>& b_s_in,
               const at::Tensor& x_t_in, const at::Tensor& w_t_in, const optional<at::Tensor>& b_t_in,
               const optional<at::Tensor>& labels_in, double inv_temperature, c10::string_view divergence, double beta,
               int64_t ignore_index, bool with_ce)
      : options(check_linear_arguments(x_s_in, w_s_in, b_s_in, x_t_in, w_t_in, b_t_in, labels_in, inv_temperature,
                                       std::string(divergence), beta, ignore_index, with_ce)),
        input_dtype(x_s_in.scalar_type()) {
    if (labels_in.has_value()) {
      check_label_values(*labels_in, w_s_in.size(0), ignore_index);
      labels = labels_in->contiguous();
    }
    x_s = cpu::to_compute(x_s_in);
    w_s = cpu::to_compute(w_s_in);
    x_t = cpu::to_compute(x_t_in);
    w_t = cpu::to_compute(w_t_in);
    if (b_s_in.has_value()) b_s = cpu::to_compute(*b_s_in).contiguous();
    if (b_t_in.has_value()) b_t = cpu::to_compute(*b_t_in).contiguous();
  }

  bool fp64() const { return x_s.scalar_type() == at::kDouble; }
  LinearKLParams params() const { return make_linear_params(x_s, w_s, b_s, x_t, w_t, b_t, labels, options); }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_kl_fwd_cpu(
    const at::Tensor& x_s, const at::Tensor& w_s, const optional<at::Tensor>& b_s, const at::Tensor& x_t,
    const at::Tensor& w_t, const optional<at::Tensor>& b_t, const optional<at::Tensor>& labels, double inv_temperature,
    c10::string_view divergence, double beta, int64_t ignore_index, bool with_ce) {
  const LinearInputs in(x_s, w_s, b_s, x_t, w_t, b_t, labels, inv_temperature, divergence, beta, ignore_index, with_ce);
  const int64_t rows = in.x_s.size(0);
  const auto opts = in.x_s.options().dtype(stats_dtype(in.input_dtype));
  at::Tensor loss = at::empty({rows}, opts), ce = at::empty({rows}, opts);
  at::Tensor stats = at::empty({kLinearNumStats, rows}, opts);
  if (rows == 0) return {loss, ce, stats};
  LinearKLParams p = in.params();
  p.loss_rows = loss.data_ptr();
  p.ce_rows = ce.data_ptr();
  p.stats = stats.data_ptr();
  if (in.fp64())
    cpu::linear::run_linear_kl_forward<double>(p, cpu::AtenParallelFor{});
  else
    cpu::linear::run_linear_kl_forward<float>(p, cpu::AtenParallelFor{});
  return {loss, ce, stats};
}

// A zeroed gradient shaped like `like` when wanted, else an empty [0] tensor.
at::Tensor gradient_buffer(bool wanted, const at::Tensor& like) {
  return wanted ? at::zeros(like.sizes(), like.options()) : at::empty({0}, like.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_kl_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& grad_ce, const at::Tensor& x_s, const at::Tensor& w_s,
    const optional<at::Tensor>& b_s, const at::Tensor& x_t, const at::Tensor& w_t, const optional<at::Tensor>& b_t,
    const optional<at::Tensor>& labels, const at::Tensor& loss, const at::Tensor& stats, double inv_temperature,
    c10::string_view divergence, double beta, int64_t ignore_index, bool with_ce, std::array<bool, 6> output_mask) {
  const LinearInputs in(x_s, w_s, b_s, x_t, w_t, b_t, labels, inv_temperature, divergence, beta, ignore_index, with_ce);
  check_grad_mask(output_mask, b_s, b_t);
  const int64_t rows = in.x_s.size(0);
  const LinearBackwardRows saved =
      prepare_linear_backward_rows(rows, grad_loss, grad_ce, loss, stats, stats_dtype(in.input_dtype));
  at::Tensor dx_s = gradient_buffer(output_mask[0], in.x_s), dw_s = gradient_buffer(output_mask[1], in.w_s);
  at::Tensor dx_t = gradient_buffer(output_mask[3], in.x_t), dw_t = gradient_buffer(output_mask[4], in.w_t);
  at::Tensor db_s = output_mask[2] ? at::zeros({in.w_s.size(0)}, in.w_s.options()) : at::empty({0}, in.w_s.options());
  at::Tensor db_t = output_mask[5] ? at::zeros({in.w_t.size(0)}, in.w_t.options()) : at::empty({0}, in.w_t.options());
  if (rows != 0) {
    LinearKLParams p = in.params();
    p.loss_rows = saved.loss.data_ptr();
    p.stats = saved.stats.data_ptr();
    p.grad_loss = saved.grad_loss.data_ptr();
    p.grad_ce = saved.grad_ce.data_ptr();
    const at::Tensor* outs[] = {&dx_s, &dw_s, &db_s, &dx_t, &dw_t, &db_t};
    void** slots[] = {&p.student.dx, &p.student.dw, &p.student.db, &p.teacher.dx, &p.teacher.dw, &p.teacher.db};
    for (int k = 0; k < 6; ++k) *slots[k] = output_mask[k] ? outs[k]->data_ptr() : nullptr;
    if (in.fp64())
      cpu::linear::run_linear_kl_backward<double>(p, cpu::AtenParallelFor{});
    else
      cpu::linear::run_linear_kl_backward<float>(p, cpu::AtenParallelFor{});
  }
  const auto dt = in.input_dtype;
  return {dx_s.to(dt), dw_s.to(dt), db_s.to(dt), dx_t.to(dt), dw_t.to(dt), db_t.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(streamkl, CPU, m) {
  m.impl("linear_kl_fwd", &linear_kl_fwd_cpu);
  m.impl("linear_kl_bwd", &linear_kl_bwd_cpu);
}

}  // namespace streamkl

// Torch-side argument checks and parameter packing for the hidden-state logit-distillation ops
// (linear_kl_fwd / linear_kl_bwd), shared by every backend's implementation so all of them accept and reject
// exactly the same inputs.
#pragma once

#include <array>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "../kernels/linear_params.h"

namespace streamkl {

// The op's scalar options, checked. "jsd" with beta = 0 / 1 becomes forward / reverse KL (the TRL / Liger
// end points, jsd_divergence_for_beta in kernels/online_kl.h).
struct LinearOptions {
  LinearLoss loss;
  double inv_temperature;
  double beta;
  int64_t ignore_index;
  bool with_ce;
};

// Ranks, shapes, dtypes and devices of x_s [T, D_s], w_s [V, D_s], b_s [V]?, x_t [T, D_t], w_t [V, D_t],
// b_t [V]?, labels [T] int64?, and the scalar options; throws ValueError naming the argument.
LinearOptions check_linear_arguments(const at::Tensor& x_s, const at::Tensor& w_s, const c10::optional<at::Tensor>& b_s,
                                     const at::Tensor& x_t, const at::Tensor& w_t, const c10::optional<at::Tensor>& b_t,
                                     const c10::optional<at::Tensor>& labels, double inv_temperature,
                                     const std::string& divergence, double beta, int64_t ignore_index, bool with_ce);

// Every label is in [0, V) or equals ignore_index (reads the labels: a device sync on accelerators).
void check_label_values(const at::Tensor& labels, int64_t vocab, int64_t ignore_index);

// Sizes, strides, pointers and options (not the output pointers) from checked, row-contiguous inputs.
LinearKLParams make_linear_params(const at::Tensor& x_s, const at::Tensor& w_s, const c10::optional<at::Tensor>& b_s,
                                  const at::Tensor& x_t, const at::Tensor& w_t, const c10::optional<at::Tensor>& b_t,
                                  const c10::optional<at::Tensor>& labels, const LinearOptions& options);

// The backward's per-row inputs (grad_loss, grad_ce, loss: [T]; stats: [kLinearNumStats, T]), shape-checked
// and made contiguous in the statistics dtype. Keep the struct alive until the kernels have run.
struct LinearBackwardRows {
  at::Tensor grad_loss, grad_ce, loss, stats;
};
LinearBackwardRows prepare_linear_backward_rows(int64_t num_rows, const at::Tensor& grad_loss,
                                                const at::Tensor& grad_ce, const at::Tensor& loss,
                                                const at::Tensor& stats, at::ScalarType stats_dtype);

// Which gradients linear_kl_bwd returns: (dx_s, dw_s, db_s, dx_t, dw_t, db_t); db_* needs the bias.
using LinearGradMask = std::array<bool, 6>;
void check_grad_mask(const LinearGradMask& mask, const c10::optional<at::Tensor>& b_s,
                     const c10::optional<at::Tensor>& b_t);

}  // namespace streamkl

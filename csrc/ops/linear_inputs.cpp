#include "linear_inputs.h"

#include <cmath>

#include <c10/util/Exception.h>

namespace streamkl {
namespace {

LinearLoss parse_linear_loss(const std::string& name, double beta) {
  if (name == "forward") return LinearLoss::kForwardKL;
  if (name == "reverse") return LinearLoss::kReverseKL;
  if (name == "jsd") return linear_loss_of(jsd_divergence_for_beta(beta));  // beta = 0 / 1: the KLs
  TORCH_CHECK_VALUE(false, "streamkl: divergence must be 'forward', 'reverse' or 'jsd', got '", name, "'");
}

void check_float_tensor(const at::Tensor& t, const char* name, const at::Tensor& x_s) {
  TORCH_CHECK_VALUE(t.scalar_type() == x_s.scalar_type(), "streamkl: x_s, w_s, x_t, w_t and the biases must share one "
                    "dtype; x_s is ", x_s.scalar_type(), " but ", name, " is ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x_s.device(), "streamkl: all inputs must be on one device; x_s is on ", x_s.device(),
                    " but ", name, " is on ", t.device());
}

void check_side(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, const char* xn,
                const char* wn, const char* bn, const at::Tensor& x_s) {
  TORCH_CHECK_VALUE(x.dim() == 2, "streamkl: ", xn, " must be 2-D [T, D] (leading dims flattened), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2, "streamkl: ", wn, " must be 2-D [V, D], got shape ", w.sizes());
  check_float_tensor(x, xn, x_s);
  check_float_tensor(w, wn, x_s);
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), "streamkl: ", wn, " must have the hidden size of ", xn, " (", x.size(1),
                    "): expected [V, ", x.size(1), "], got ", w.sizes());
  if (b.has_value()) {
    check_float_tensor(*b, bn, x_s);
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == w.size(0), "streamkl: ", bn, " must be 1-D [V] = [", w.size(0),
                      "], got shape ", b->sizes());
  }
}

}  // namespace

LinearOptions check_linear_arguments(const at::Tensor& x_s, const at::Tensor& w_s, const c10::optional<at::Tensor>& b_s,
                                     const at::Tensor& x_t, const at::Tensor& w_t, const c10::optional<at::Tensor>& b_t,
                                     const c10::optional<at::Tensor>& labels, double inv_temperature,
                                     const std::string& divergence, double beta, int64_t ignore_index, bool with_ce) {
  const auto dt = x_s.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                    "streamkl: inputs must be float16, bfloat16, float32 or float64, got ", dt);
  check_side(x_s, w_s, b_s, "x_s", "w_s", "b_s", x_s);
  check_side(x_t, w_t, b_t, "x_t", "w_t", "b_t", x_s);
  TORCH_CHECK_VALUE(x_t.size(0) == x_s.size(0), "streamkl: x_t must have the rows of x_s: expected [", x_s.size(0),
                    ", D_t], got ", x_t.sizes());
  TORCH_CHECK_VALUE(w_t.size(0) == w_s.size(0), "streamkl: student and teacher must share the vocabulary: w_s has V=",
                    w_s.size(0), " but w_t has V=", w_t.size(0));
  TORCH_CHECK_VALUE(w_s.size(0) > 0, "streamkl: the vocabulary is empty (w_s has shape ", w_s.sizes(), ")");
  if (labels.has_value()) {
    TORCH_CHECK_VALUE(labels->scalar_type() == at::kLong, "streamkl: labels must be int64 (torch.long), got ",
                      labels->scalar_type());
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == x_s.size(0), "streamkl: labels must have shape [T] = [",
                      x_s.size(0), "], got ", labels->sizes());
    TORCH_CHECK_VALUE(labels->device() == x_s.device(), "streamkl: labels must be on the device of x_s (",
                      x_s.device(), "), got ", labels->device());
  }
  TORCH_CHECK_VALUE(inv_temperature > 0 && std::isfinite(inv_temperature),
                    "streamkl: inv_temperature must be positive and finite, got ", inv_temperature);
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, "streamkl: beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(!with_ce || labels.has_value(), "streamkl: the cross-entropy term (with_ce) needs labels");
  TORCH_CHECK_VALUE(!with_ce || inv_temperature == 1.0, "streamkl: the cross-entropy term is only supported at "
                    "temperature 1 (it is the plain student cross-entropy); got inv_temperature=", inv_temperature);
  return LinearOptions{parse_linear_loss(divergence, beta), inv_temperature, beta, ignore_index, with_ce};
}

void check_label_values(const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  if (labels.numel() == 0) return;
  const at::Tensor bad = (labels != ignore_index).logical_and((labels < 0).logical_or(labels >= vocab));
  if (!bad.any().item<bool>()) return;
  const int64_t first = bad.nonzero().select(1, 0)[0].item<int64_t>();
  TORCH_CHECK_VALUE(false, "streamkl: labels must be in [0, V) = [0, ", vocab, ") or equal ignore_index (",
                    ignore_index, "); labels[", first, "] = ", labels[first].item<int64_t>());
}

static void fill_side(LinearSide& side, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  side.x = x.data_ptr();
  side.w = w.data_ptr();
  side.bias = b.has_value() ? b->data_ptr() : nullptr;
  side.x_row_stride = x.stride(0);
  side.w_row_stride = w.stride(0);
  side.dim = static_cast<int>(x.size(1));
}

LinearKLParams make_linear_params(const at::Tensor& x_s, const at::Tensor& w_s, const c10::optional<at::Tensor>& b_s,
                                  const at::Tensor& x_t, const at::Tensor& w_t, const c10::optional<at::Tensor>& b_t,
                                  const c10::optional<at::Tensor>& labels, const LinearOptions& options) {
  LinearKLParams p;
  fill_side(p.student, x_s, w_s, b_s);
  fill_side(p.teacher, x_t, w_t, b_t);
  p.num_rows = x_s.size(0);
  p.vocab = w_s.size(0);
  p.loss = options.loss;
  p.inv_temperature = options.inv_temperature;
  p.beta = options.beta;
  p.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  p.ignore_index = options.ignore_index;
  p.with_ce = options.with_ce;
  return p;
}

LinearBackwardRows prepare_linear_backward_rows(int64_t num_rows, const at::Tensor& grad_loss,
                                                const at::Tensor& grad_ce, const at::Tensor& loss,
                                                const at::Tensor& stats, at::ScalarType stats_dtype) {
  const std::vector<int64_t> rows = {num_rows};
  TORCH_CHECK_VALUE(grad_loss.sizes() == at::IntArrayRef(rows) && grad_ce.sizes() == at::IntArrayRef(rows) &&
                        loss.sizes() == at::IntArrayRef(rows),
                    "streamkl: linear_kl_bwd expects grad_loss, grad_ce and loss of shape [T] = [", num_rows, "]");
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == kLinearNumStats && stats.size(1) == num_rows,
                    "streamkl: linear_kl_bwd expects stats of shape [", int(kLinearNumStats), ", T] = [",
                    int(kLinearNumStats), ", ", num_rows, "], got ", stats.sizes());
  return LinearBackwardRows{grad_loss.to(stats_dtype).contiguous(), grad_ce.to(stats_dtype).contiguous(),
                            loss.to(stats_dtype).contiguous(), stats.to(stats_dtype).contiguous()};
}

void check_grad_mask(const LinearGradMask& mask, const c10::optional<at::Tensor>& b_s,
                     const c10::optional<at::Tensor>& b_t) {
  TORCH_CHECK_VALUE(!mask[2] || b_s.has_value(), "streamkl: output_mask asks for db_s but b_s is None");
  TORCH_CHECK_VALUE(!mask[5] || b_t.has_value(), "streamkl: output_mask asks for db_t but b_t is None");
}

}  // namespace streamkl

// Autograd of the attention-divergence ops (attention_kl_fwd, attention_jsd_fwd, attention_kl_varlen_fwd), in C++
// for every backend: the forward op below autograd, its inputs and per-row outputs saved, and the matching backward
// op called through the dispatcher (so torch.compile traces it like any other op; fake kernels: streamkl/_ops.py).
//
// Why C++: the same logic registered from Python (torch.library.register_autograd) cost ~0.2 ms of host time per
// forward + backward (argument default filling, a Python autograd.Function and redispatch), more than the kernels at
// N = 1024 on H100 (bench/RESULTS.md, sessions 6-7).
//
// Only the divergence (output 0) carries a gradient: the LSEs and the JSD's statistics are inputs of the backward,
// marked non-differentiable, and their undefined gradients are not materialized. Teacher gradients are computed
// when q_t or k_t requires one.
#include <string>
#include <tuple>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace streamkl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using Rows3 = std::tuple<Tensor, Tensor, Tensor>;
using Rows4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Saves the four inputs and the per-row outputs, marks the statistics non-differentiable; outputs as a list.
variable_list save_rows(AutogradContext* ctx, const Tensor& q_s, const Tensor& k_s, const Tensor& q_t,
                        const Tensor& k_t, variable_list rows, variable_list extra_saved = {}) {
  variable_list saved = {q_s, k_s, q_t, k_t};
  saved.insert(saved.end(), extra_saved.begin(), extra_saved.end());
  saved.insert(saved.end(), rows.begin(), rows.end());
  ctx->save_for_backward(saved);
  ctx->mark_non_differentiable(variable_list(rows.begin() + 1, rows.end()));
  ctx->set_materialize_grads(false);
  return rows;
}

bool wants_teacher_grad(AutogradContext* ctx) { return ctx->needs_input_grad(2) || ctx->needs_input_grad(3); }

// The gradient list of a forward with `num_inputs` arguments: the four tensors' (the teacher's only when asked
// for), then none for the options.
variable_list input_grads(const Rows4& grads, bool teacher_grad, size_t num_inputs) {
  variable_list out(num_inputs);
  out[0] = std::get<0>(grads);
  out[1] = std::get<1>(grads);
  if (teacher_grad) {
    out[2] = std::get<2>(grads);
    out[3] = std::get<3>(grads);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------------ padded
// attention_kl_fwd and attention_jsd_fwd share their inputs but for the 8th (divergence / beta).
constexpr size_t kPaddedInputs = 12;

// The options every backward op takes back: the scales and the mask.
void save_mask_options(AutogradContext* ctx, double scale_s, double scale_t, bool causal, int64_t window_left,
                       int64_t window_right) {
  ctx->saved_data["scale_s"] = scale_s;
  ctx->saved_data["scale_t"] = scale_t;
  ctx->saved_data["causal"] = causal;
  ctx->saved_data["window_left"] = window_left;
  ctx->saved_data["window_right"] = window_right;
}

// The padded ops' options: those and the teacher head reduction.
void save_padded_options(AutogradContext* ctx, double scale_s, double scale_t, bool causal, int64_t window_left,
                         int64_t window_right, c10::string_view teacher_head_reduce) {
  save_mask_options(ctx, scale_s, scale_t, causal, window_left, window_right);
  ctx->saved_data["teacher_head_reduce"] = std::string(teacher_head_reduce);
}

struct AttentionKLFunction : torch::autograd::Function<AttentionKLFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q_s, const Tensor& k_s, const Tensor& q_t,
                               const Tensor& k_t, double scale_s, double scale_t, bool causal,
                               c10::string_view divergence, int64_t window_left, int64_t window_right,
                               c10::string_view teacher_head_reduce, const c10::optional<Tensor>& teacher_lse) {
    static const auto fwd = op_handle<Rows3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double,
                                            bool, c10::string_view, int64_t, int64_t, c10::string_view,
                                            const c10::optional<Tensor>&)>("streamkl::attention_kl_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Rows3 r = fwd.call(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, divergence, window_left, window_right,
                             teacher_head_reduce, teacher_lse);
    save_padded_options(ctx, scale_s, scale_t, causal, window_left, window_right, teacher_head_reduce);
    ctx->saved_data["divergence"] = std::string(divergence);
    return save_rows(ctx, q_s, k_s, q_t, k_t, {std::get<0>(r), std::get<1>(r), std::get<2>(r)});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return variable_list(kPaddedInputs);  // the divergence was not used
    static const auto bwd = op_handle<Rows4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, const Tensor&, const Tensor&, double, double, bool,
                                            c10::string_view, bool, int64_t, int64_t, c10::string_view)>(
        "streamkl::attention_kl_bwd");
    const variable_list s = ctx->get_saved_variables();  // q_s, k_s, q_t, k_t, kl, lse_s, lse_t
    const bool teacher_grad = wants_teacher_grad(ctx);
    auto& d = ctx->saved_data;
    const Rows4 grads = bwd.call(grad_outputs[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], d["scale_s"].toDouble(),
                                 d["scale_t"].toDouble(), d["causal"].toBool(), d["divergence"].toStringRef(),
                                 teacher_grad, d["window_left"].toInt(), d["window_right"].toInt(),
                                 d["teacher_head_reduce"].toStringRef());
    return input_grads(grads, teacher_grad, kPaddedInputs);
  }
};

struct AttentionJSDFunction : torch::autograd::Function<AttentionJSDFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q_s, const Tensor& k_s, const Tensor& q_t,
                               const Tensor& k_t, double scale_s, double scale_t, bool causal, double beta,
                               int64_t window_left, int64_t window_right, c10::string_view teacher_head_reduce,
                               const c10::optional<Tensor>& teacher_lse) {
    static const auto fwd = op_handle<Rows4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double,
                                            bool, double, int64_t, int64_t, c10::string_view,
                                            const c10::optional<Tensor>&)>("streamkl::attention_jsd_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Rows4 r = fwd.call(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, beta, window_left, window_right,
                             teacher_head_reduce, teacher_lse);
    save_padded_options(ctx, scale_s, scale_t, causal, window_left, window_right, teacher_head_reduce);
    ctx->saved_data["beta"] = beta;
    return save_rows(ctx, q_s, k_s, q_t, k_t, {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return variable_list(kPaddedInputs);
    static const auto bwd = op_handle<Rows4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double,
                                            bool, double, bool, int64_t, int64_t, c10::string_view)>(
        "streamkl::attention_jsd_bwd");
    const variable_list s = ctx->get_saved_variables();  // q_s, k_s, q_t, k_t, jsd, lse_s, lse_t, jsd_stats
    const bool teacher_grad = wants_teacher_grad(ctx);
    auto& d = ctx->saved_data;
    const Rows4 grads = bwd.call(grad_outputs[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                                 d["scale_s"].toDouble(), d["scale_t"].toDouble(), d["causal"].toBool(),
                                 d["beta"].toDouble(), teacher_grad, d["window_left"].toInt(),
                                 d["window_right"].toInt(), d["teacher_head_reduce"].toStringRef());
    return input_grads(grads, teacher_grad, kPaddedInputs);
  }
};

// ------------------------------------------------------------------------------------------------------ varlen
constexpr size_t kVarlenInputs = 15;

struct AttentionKLVarlenFunction : torch::autograd::Function<AttentionKLVarlenFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q_s, const Tensor& k_s, const Tensor& q_t,
                               const Tensor& k_t, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                               int64_t max_seqlen_q, int64_t max_seqlen_k, double scale_s, double scale_t,
                               bool causal, c10::string_view divergence, int64_t window_left, int64_t window_right,
                               double beta) {
    static const auto fwd = op_handle<Rows4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, int64_t, int64_t, double, double, bool, c10::string_view,
                                            int64_t, int64_t, double)>("streamkl::attention_kl_varlen_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Rows4 r = fwd.call(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale_s,
                             scale_t, causal, divergence, window_left, window_right, beta);
    save_mask_options(ctx, scale_s, scale_t, causal, window_left, window_right);
    ctx->saved_data["divergence"] = std::string(divergence);
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["max_seqlen_q"] = max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = max_seqlen_k;
    return save_rows(ctx, q_s, k_s, q_t, k_t, {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)},
                     {cu_seqlens_q, cu_seqlens_k});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (!grad_outputs[0].defined()) return variable_list(kVarlenInputs);
    static const auto bwd = op_handle<Rows4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                            const Tensor&, const Tensor&, int64_t, int64_t, const Tensor&,
                                            const Tensor&, const Tensor&, const Tensor&, double, double, bool,
                                            c10::string_view, bool, int64_t, int64_t, double)>(
        "streamkl::attention_kl_varlen_bwd");
    // q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k, kl, lse_s, lse_t, jsd_stats
    const variable_list s = ctx->get_saved_variables();
    const bool teacher_grad = wants_teacher_grad(ctx);
    auto& d = ctx->saved_data;
    const Rows4 grads = bwd.call(grad_outputs[0], s[0], s[1], s[2], s[3], s[4], s[5], d["max_seqlen_q"].toInt(),
                                 d["max_seqlen_k"].toInt(), s[6], s[7], s[8], s[9], d["scale_s"].toDouble(),
                                 d["scale_t"].toDouble(), d["causal"].toBool(), d["divergence"].toStringRef(),
                                 teacher_grad, d["window_left"].toInt(), d["window_right"].toInt(),
                                 d["beta"].toDouble());
    return input_grads(grads, teacher_grad, kVarlenInputs);
  }
};

// ------------------------------------------------------------------------------------------ Autograd kernels
Rows3 attention_kl_fwd_autograd(const Tensor& q_s, const Tensor& k_s, const Tensor& q_t, const Tensor& k_t,
                                double scale_s, double scale_t, bool causal, c10::string_view divergence,
                                int64_t window_left, int64_t window_right, c10::string_view teacher_head_reduce,
                                const c10::optional<Tensor>& teacher_lse) {
  const variable_list r = AttentionKLFunction::apply(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, divergence,
                                                     window_left, window_right, teacher_head_reduce, teacher_lse);
  return {r[0], r[1], r[2]};
}

Rows4 attention_jsd_fwd_autograd(const Tensor& q_s, const Tensor& k_s, const Tensor& q_t, const Tensor& k_t,
                                 double scale_s, double scale_t, bool causal, double beta, int64_t window_left,
                                 int64_t window_right, c10::string_view teacher_head_reduce,
                                 const c10::optional<Tensor>& teacher_lse) {
  const variable_list r = AttentionJSDFunction::apply(q_s, k_s, q_t, k_t, scale_s, scale_t, causal, beta, window_left,
                                                      window_right, teacher_head_reduce, teacher_lse);
  return {r[0], r[1], r[2], r[3]};
}

Rows4 attention_kl_varlen_fwd_autograd(const Tensor& q_s, const Tensor& k_s, const Tensor& q_t, const Tensor& k_t,
                                       const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, double scale_s, double scale_t, bool causal,
                                       c10::string_view divergence, int64_t window_left, int64_t window_right,
                                       double beta) {
  const variable_list r = AttentionKLVarlenFunction::apply(q_s, k_s, q_t, k_t, cu_seqlens_q, cu_seqlens_k,
                                                           max_seqlen_q, max_seqlen_k, scale_s, scale_t, causal,
                                                           divergence, window_left, window_right, beta);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(streamkl, Autograd, m) {
  m.impl("attention_kl_fwd", &attention_kl_fwd_autograd);
  m.impl("attention_jsd_fwd", &attention_jsd_fwd_autograd);
  m.impl("attention_kl_varlen_fwd", &attention_kl_varlen_fwd_autograd);
}

}  // namespace streamkl

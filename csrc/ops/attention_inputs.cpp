#include "attention_inputs.h"

#include <cmath>
#include <vector>

#include <c10/util/Exception.h>

namespace streamkl {

Divergence parse_divergence(const std::string& name) {
  if (name == "forward") return Divergence::kForward;
  if (name == "reverse") return Divergence::kReverse;
  TORCH_CHECK_VALUE(false, "streamkl: divergence must be 'forward' or 'reverse', got '", name,
                    "' (the generalized JSD has its own ops: attention_jsd_fwd / attention_jsd_bwd)");
}

Divergence parse_divergence_or_jsd(const std::string& name) {
  if (name == "jsd") return Divergence::kJsd;
  TORCH_CHECK_VALUE(name == "forward" || name == "reverse",
                    "streamkl: divergence must be 'forward', 'reverse' or 'jsd', got '", name, "'");
  return parse_divergence(name);
}

void check_jsd_beta(double beta) {
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "streamkl: beta must be in [0, 1] (0: forward KL, 1: reverse KL), got ",
                    beta);
}

AttentionKLParams kernel_attention_params(const AttentionKLParams& op_params) {
  AttentionKLParams p = op_params;
  if (p.divergence == Divergence::kJsd) p.divergence = jsd_divergence_for_beta(p.beta);
  return p;
}

void check_attention_inputs(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                            const at::Tensor& k_t, double scale_s, double scale_t, const TensorLayout& layout,
                            int64_t teacher_head_group) {
  const char* names[] = {"q_s", "k_s", "q_t", "k_t"};
  const at::Tensor* ts[] = {&q_s, &k_s, &q_t, &k_t};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK_VALUE(ts[i]->dim() == layout.rank, "streamkl: ", names[i], " must be ", layout.rank, "-D ",
                      layout.shape_name, ", got ", ts[i]->dim(), "-D tensor of shape ", ts[i]->sizes());
    TORCH_CHECK_VALUE(ts[i]->scalar_type() == q_s.scalar_type(), "streamkl: all inputs must share one dtype; q_s is ",
                      q_s.scalar_type(), " but ", names[i], " is ", ts[i]->scalar_type());
    TORCH_CHECK_VALUE(ts[i]->device() == q_s.device(), "streamkl: all inputs must be on one device; q_s is on ",
                      q_s.device(), " but ", names[i], " is on ", ts[i]->device());
  }
  const auto dt = q_s.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                    "streamkl: inputs must be float16, bfloat16, float32 or float64, got ", dt);
  const bool padded = layout.batch_dim >= 0;
  const int64_t H = q_s.size(layout.head_dim), Nq = q_s.size(layout.seq_dim);
  const int64_t B = padded ? q_s.size(layout.batch_dim) : 0;
  const int64_t H_t = H * teacher_head_group;
  const bool q_t_matches = q_t.size(layout.head_dim) == H_t && q_t.size(layout.seq_dim) == Nq &&
                           (!padded || q_t.size(layout.batch_dim) == B);
  if (padded) {
    TORCH_CHECK_VALUE(q_t_matches, "streamkl: q_t must match q_s in batch, heads and query length: expected [", B,
                      ", ", H_t, ", ", Nq, ", D_t], got ", q_t.sizes());
  } else {
    TORCH_CHECK_VALUE(q_t_matches, "streamkl: q_t must match q_s in total query tokens and heads: expected [", Nq,
                      ", ", H_t, ", D_t], got ", q_t.sizes());
  }
  auto check_keys = [&](const at::Tensor& q, const at::Tensor& k, const char* qn, const char* kn) {
    const int64_t kv_heads = k.size(layout.head_dim), dim = q.size(layout.feature_dim);
    const int64_t H = q.size(layout.head_dim);  // each side's own query heads
    if (padded)
      TORCH_CHECK_VALUE(k.size(layout.batch_dim) == B, "streamkl: ", kn, " must have the batch of ", qn, ": expected [",
                        B, ", H_kv, N_k, ", dim, "], got ", k.sizes());
    // GQA / MQA: contiguous groups of H / H_kv query heads share a key head.
    TORCH_CHECK_VALUE(kv_heads > 0 ? H % kv_heads == 0 : H == 0, "streamkl: ", kn, " has ", kv_heads,
                      " heads, which must divide the ", H, " query heads of ", qn, " (GQA/MQA); got shape ",
                      k.sizes());
    TORCH_CHECK_VALUE(k.size(layout.feature_dim) == dim, "streamkl: ", kn, " must have the head dim of ", qn, " (",
                      dim, "), got ", k.size(layout.feature_dim), " (shape ", k.sizes(), ")");
  };
  check_keys(q_s, k_s, "q_s", "k_s");
  check_keys(q_t, k_t, "q_t", "k_t");
  TORCH_CHECK_VALUE(k_s.size(layout.seq_dim) == k_t.size(layout.seq_dim),
                    "streamkl: student and teacher must attend over the same keys: k_s has ",
                    padded ? "N_k=" : "total_k=", k_s.size(layout.seq_dim), " but k_t has ",
                    padded ? "N_k=" : "total_k=", k_t.size(layout.seq_dim));
  TORCH_CHECK_VALUE(scale_s > 0 && scale_t > 0 && std::isfinite(scale_s) && std::isfinite(scale_t),
                    "streamkl: softmax scales must be positive and finite, got scale_s=", scale_s, ", scale_t=", scale_t);
}

int64_t parse_teacher_head_reduce(const std::string& name, const at::Tensor& q_s, const at::Tensor& q_t,
                                  const TensorLayout& layout) {
  TORCH_CHECK_VALUE(name == "none" || name == "mean", "streamkl: teacher_head_reduce must be 'none' or 'mean', got '",
                    name, "'");
  if (name == "none" || q_s.dim() != layout.rank || q_t.dim() != layout.rank) return 1;  // ranks: checked later
  const int64_t H = q_s.size(layout.head_dim), H_t = q_t.size(layout.head_dim);
  TORCH_CHECK_VALUE(H > 0 ? H_t % H == 0 && H_t > 0 : H_t == 0, "streamkl: teacher_head_reduce='mean' needs the ", H_t,
                    " teacher query heads of q_t to be a positive multiple of the ", H, " student heads of q_s");
  return H > 0 ? H_t / H : 1;
}

at::Tensor prepare_teacher_lse(const at::Tensor& teacher_lse, const at::Tensor& q_t, at::ScalarType stats) {
  const at::IntArrayRef rows = q_t.sizes().slice(0, q_t.dim() - 1);
  TORCH_CHECK_VALUE(teacher_lse.sizes() == rows, "streamkl: teacher_lse must have shape ", rows,
                    " (q_t's shape without its head dim: one LSE per teacher head and query), got ",
                    teacher_lse.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(teacher_lse.scalar_type()), "streamkl: teacher_lse must be floating point, got ",
                    teacher_lse.scalar_type());
  TORCH_CHECK_VALUE(teacher_lse.device() == q_t.device(), "streamkl: teacher_lse must be on the device of q_t (",
                    q_t.device(), "), got ", teacher_lse.device());
  return teacher_lse.to(stats).contiguous();
}

at::Tensor with_contiguous_last_dim(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

at::ScalarType stats_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Batch, head and row strides of a q / k tensor (or its gradient) in either layout; the packed layout has no
// batch dimension (0: sequences are located through cu_seqlens instead).
struct RowStrides {
  int64_t batch, head, row;
};
static RowStrides row_strides(const at::Tensor& t, const TensorLayout& layout) {
  return RowStrides{layout.batch_dim >= 0 ? t.stride(layout.batch_dim) : 0, t.stride(layout.head_dim),
                    t.stride(layout.seq_dim)};
}

static void fill_side(AttentionSide& side, const at::Tensor& q, const at::Tensor& k, double scale,
                      const TensorLayout& layout) {
  side.q = q.data_ptr();
  side.k = k.data_ptr();
  const RowStrides qs = row_strides(q, layout), ks = row_strides(k, layout);
  side.q_batch_stride = qs.batch, side.q_head_stride = qs.head, side.q_row_stride = qs.row;
  side.k_batch_stride = ks.batch, side.k_head_stride = ks.head, side.k_row_stride = ks.row;
  side.head_dim = static_cast<int>(q.size(layout.feature_dim));
  side.q_rows = q.size(layout.seq_dim);
  side.k_rows = k.size(layout.seq_dim);
  side.num_kv_heads = static_cast<int>(k.size(layout.head_dim));
  side.scale = scale;
}

MaskOptions check_mask_options(bool causal, int64_t window_left, int64_t window_right) {
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                    "streamkl: window_size sides must be >= 0, or -1 for unbounded; got (", window_left, ", ",
                    window_right, ")");
  TORCH_CHECK_VALUE(window_left < (int64_t(1) << 31) && window_right < (int64_t(1) << 31),
                    "streamkl: window_size sides must fit in int32; got (", window_left, ", ", window_right, ")");
  return MaskOptions{causal, window_left, window_right};
}

PaddedCall check_padded_call(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
                             double scale_s, double scale_t, bool causal, int64_t window_left, int64_t window_right,
                             const std::string& teacher_head_reduce) {
  const int64_t r = parse_teacher_head_reduce(teacher_head_reduce, q_s, q_t);
  check_attention_inputs(q_s, k_s, q_t, k_t, scale_s, scale_t, kPaddedLayout, r);
  return PaddedCall{check_mask_options(causal, window_left, window_right), r};
}

at::Tensor checked_teacher_lse(const c10::optional<at::Tensor>& teacher_lse, const std::string& teacher_head_reduce,
                               const at::Tensor& q_t, at::ScalarType stats) {
  if (!teacher_lse.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(teacher_head_reduce == "mean",
                    "streamkl: teacher_lse is the per-head LSE of an aggregated teacher: pass it with "
                    "teacher_head_reduce='mean'");
  return prepare_teacher_lse(*teacher_lse, q_t, stats);
}

void refuse_aggregated_teacher_grad(const PaddedCall& call, bool teacher_grad) {
  TORCH_CHECK_NOT_IMPLEMENTED(!(teacher_grad && call.teacher_head_group > 1),
                              "streamkl: gradients to an aggregated teacher (teacher_head_reduce='mean') are not "
                              "supported; detach q_t and k_t (the teacher is a fixed target)");
}

AttentionKLParams make_padded_params(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                                     const at::Tensor& k_t, const PaddedCall& call, double scale_s, double scale_t,
                                     Divergence divergence) {
  AttentionKLParams p = make_attention_params(q_s, k_s, q_t, k_t, scale_s, scale_t, call.mask, divergence);
  p.teacher_head_group = static_cast<int>(call.teacher_head_group);
  return p;
}

AttentionKLParams make_layout_params(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                                     const at::Tensor& k_t, double scale_s, double scale_t, const MaskOptions& mask,
                                     Divergence divergence, const TensorLayout& layout) {
  AttentionKLParams p;
  fill_side(p.student, q_s, k_s, scale_s, layout);
  fill_side(p.teacher, q_t, k_t, scale_t, layout);
  p.batch = layout.batch_dim >= 0 ? static_cast<int>(q_s.size(layout.batch_dim)) : 0;
  p.num_heads = static_cast<int>(q_s.size(layout.head_dim));
  p.seqlen_q = static_cast<int>(q_s.size(layout.seq_dim));
  p.seqlen_k = static_cast<int>(k_s.size(layout.seq_dim));
  p.causal = mask.causal;
  p.window_left = static_cast<int>(mask.window_left);
  p.window_right = static_cast<int>(mask.window_right);
  p.divergence = divergence;
  return p;
}

void point_params_at_inputs(AttentionKLParams& p, const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                            const at::Tensor& k_t, const TensorLayout& layout) {
  fill_side(p.student, q_s, k_s, p.student.scale, layout);
  fill_side(p.teacher, q_t, k_t, p.teacher.scale, layout);
  p.num_heads = static_cast<int>(q_s.size(layout.head_dim));
}

AttentionKLParams make_attention_params(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                                        const at::Tensor& k_t, double scale_s, double scale_t, const MaskOptions& mask,
                                        Divergence divergence) {
  return make_layout_params(q_s, k_s, q_t, k_t, scale_s, scale_t, mask, divergence, kPaddedLayout);
}

static void set_side_gradients(AttentionSide& side, at::Tensor& dq, at::Tensor& dk, const TensorLayout& layout) {
  side.dq = dq.data_ptr();
  side.dk = dk.data_ptr();
  const RowStrides qs = row_strides(dq, layout), ks = row_strides(dk, layout);
  side.dq_batch_stride = qs.batch, side.dq_head_stride = qs.head, side.dq_row_stride = qs.row;
  side.dk_batch_stride = ks.batch, side.dk_head_stride = ks.head, side.dk_row_stride = ks.row;
}

BackwardRowInputs prepare_backward_rows(const at::Tensor& q_s, const at::Tensor& grad_kl, const at::Tensor& kl,
                                        const at::Tensor& lse_s, const at::Tensor& lse_t, at::ScalarType stats) {
  return prepare_backward_rows(q_s, q_s, grad_kl, kl, lse_s, lse_t, stats);
}

BackwardRowInputs prepare_backward_rows(const at::Tensor& q_s, const at::Tensor& q_t, const at::Tensor& grad_kl,
                                        const at::Tensor& kl, const at::Tensor& lse_s, const at::Tensor& lse_t,
                                        at::ScalarType stats) {
  const at::IntArrayRef rows = q_s.sizes().slice(0, q_s.dim() - 1);
  const at::IntArrayRef teacher_rows = q_t.sizes().slice(0, q_t.dim() - 1);
  TORCH_CHECK_VALUE(kl.sizes() == rows && grad_kl.sizes() == rows && lse_s.sizes() == rows,
                    "streamkl: the backward expects grad_kl, kl, lse_s of shape ", rows,
                    " (q_s's shape without its head dim)");
  TORCH_CHECK_VALUE(lse_t.sizes() == teacher_rows, "streamkl: the backward expects lse_t of shape ", teacher_rows,
                    " (q_t's shape without its head dim), got ", lse_t.sizes());
  // The gradient of a sum or mean is one value expanded over the rows: no copy (a kernel launch and an allocation
  // per backward, measurable at small N).
  bool broadcast = grad_kl.numel() > 1 && grad_kl.scalar_type() == stats;
  for (int64_t d = 0; d < grad_kl.dim(); ++d) broadcast = broadcast && grad_kl.stride(d) == 0;
  return BackwardRowInputs{broadcast ? grad_kl : grad_kl.to(stats).contiguous(), kl.to(stats).contiguous(),
                           lse_s.to(stats).contiguous(), lse_t.to(stats).contiguous(), broadcast};
}

at::Tensor prepare_jsd_stats(const at::Tensor& q_s, const at::Tensor& jsd_stats, at::ScalarType stats) {
  std::vector<int64_t> shape(q_s.sizes().begin(), q_s.sizes().end() - 1);
  shape.push_back(JsdRowStats<float>::kCount);
  TORCH_CHECK_VALUE(jsd_stats.sizes() == at::IntArrayRef(shape),
                    "streamkl: the JSD backward expects jsd_stats of shape ", at::IntArrayRef(shape), " (as returned by the forward), got ", jsd_stats.sizes());
  return jsd_stats.to(stats).contiguous();
}

void set_backward_params(AttentionKLParams& p, const BackwardRowInputs& rows, at::Tensor& dq_s, at::Tensor& dk_s,
                         at::Tensor& dq_t, at::Tensor& dk_t, bool teacher_grad, const TensorLayout& layout) {
  p.kl = const_cast<void*>(rows.kl.data_ptr());
  p.lse_student = const_cast<void*>(rows.lse_s.data_ptr());
  p.lse_teacher = const_cast<void*>(rows.lse_t.data_ptr());
  p.grad_kl = rows.grad_kl.data_ptr();
  p.grad_kl_stride = rows.grad_kl_broadcast ? 0 : 1;
  p.teacher_grad = teacher_grad;
  set_side_gradients(p.student, dq_s, dk_s, layout);
  if (teacher_grad) set_side_gradients(p.teacher, dq_t, dk_t, layout);
}

}  // namespace streamkl

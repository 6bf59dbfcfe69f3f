#include "varlen_inputs.h"

#include <c10/util/Exception.h>

namespace streamkl {
namespace {

// One cu_seqlens tensor against the packed length it delimits; returns the longest sequence.
int64_t check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, const char* total_name,
                         const at::Tensor& q_s) {
  TORCH_CHECK_VALUE(cu.scalar_type() == at::kInt, "streamkl: ", name,
                    " must be int32 (FlashAttention convention), got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, "streamkl: ", name,
                    " must be a 1-D tensor of length batch + 1 >= 1, got shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == q_s.device(), "streamkl: ", name, " must be on the device of q_s (", q_s.device(),
                    "), got ", cu.device());
  const at::Tensor host = cu.to(at::kCPU).contiguous();
  const int32_t* c = host.data_ptr<int32_t>();
  const int64_t n = host.numel();
  TORCH_CHECK_VALUE(c[0] == 0, "streamkl: ", name, " must start at 0, got ", c[0]);
  int64_t longest = 0;
  for (int64_t b = 0; b + 1 < n; ++b) {
    TORCH_CHECK_VALUE(c[b + 1] >= c[b], "streamkl: ", name, " must be non-decreasing, but ", name, "[", b + 1,
                      "] = ", c[b + 1], " < ", name, "[", b, "] = ", c[b]);
    longest = std::max<int64_t>(longest, c[b + 1] - c[b]);
  }
  TORCH_CHECK_VALUE(c[n - 1] == total, "streamkl: ", name, " must end at the number of packed tokens, ", total_name,
                    " = ", total, ", got ", name, "[-1] = ", c[n - 1]);
  return longest;
}

}  // namespace

void check_varlen_args(const VarlenArgs& v, const at::Tensor& q_s, const at::Tensor& k_s) {
  const int64_t longest_q = check_cu_seqlens(v.cu_seqlens_q, "cu_seqlens_q", q_s.size(0), "q_s.size(0)", q_s);
  const int64_t longest_k = check_cu_seqlens(v.cu_seqlens_k, "cu_seqlens_k", k_s.size(0), "k_s.size(0)", q_s);
  TORCH_CHECK_VALUE(v.cu_seqlens_q.numel() == v.cu_seqlens_k.numel(),
                    "streamkl: cu_seqlens_q and cu_seqlens_k must both have length batch + 1, got ",
                    v.cu_seqlens_q.numel(), " and ", v.cu_seqlens_k.numel());
  TORCH_CHECK_VALUE(v.max_seqlen_q >= longest_q && v.max_seqlen_q < (int64_t(1) << 31),
                    "streamkl: max_seqlen_q = ", v.max_seqlen_q, " must be >= the longest query sequence (", longest_q,
                    ") and fit in int32");
  TORCH_CHECK_VALUE(v.max_seqlen_k >= longest_k && v.max_seqlen_k < (int64_t(1) << 31),
                    "streamkl: max_seqlen_k = ", v.max_seqlen_k, " must be >= the longest key sequence (", longest_k,
                    ") and fit in int32");
}

VarlenArgs contiguous_varlen_args(const VarlenArgs& v) {
  return VarlenArgs{v.cu_seqlens_q.contiguous(), v.cu_seqlens_k.contiguous(), v.max_seqlen_q, v.max_seqlen_k};
}

void set_varlen_params(AttentionKLParams& p, const VarlenArgs& v) {
  p.cu_seqlens_q = v.cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = v.cu_seqlens_k.data_ptr<int32_t>();
  p.batch = static_cast<int>(v.cu_seqlens_q.numel() - 1);
  p.seqlen_q = static_cast<int>(v.max_seqlen_q);
  p.seqlen_k = static_cast<int>(v.max_seqlen_k);
}

VarlenCall check_varlen_call(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                             const at::Tensor& k_t, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                             int64_t max_seqlen_q, int64_t max_seqlen_k, double scale_s, double scale_t, bool causal,
                             const std::string& divergence, int64_t window_left, int64_t window_right) {
  check_attention_inputs(q_s, k_s, q_t, k_t, scale_s, scale_t, kPackedLayout);
  const VarlenArgs varlen{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  check_varlen_args(varlen, q_s, k_s);
  const OpOptions options{check_mask_options(causal, window_left, window_right), parse_divergence_or_jsd(divergence)};
  return VarlenCall{options, contiguous_varlen_args(varlen)};
}

AttentionKLParams make_varlen_params(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                                     const at::Tensor& k_t, const VarlenCall& call, double scale_s, double scale_t,
                                     double beta) {
  AttentionKLParams p = make_layout_params(q_s, k_s, q_t, k_t, scale_s, scale_t, call.options.mask,
                                           call.options.divergence, kPackedLayout);
  set_varlen_params(p, call.varlen);
  if (p.divergence == Divergence::kJsd) check_jsd_beta(beta);
  p.beta = beta;
  return p;
}

}  // namespace streamkl

// The operator schemas of StreamKL, defined once. Backend implementations register against them from
// csrc/cpu (CPU) and csrc/cuda (CUDA); fake (meta) kernels and autograd are registered in Python
// (streamkl/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(streamkl, m) {
  // Per-row divergence between softmax(scale_s * q_s k_s^T) and softmax(scale_t * q_t k_t^T).
  // q_*: [B, H, N_q, D_*], k_*: [B, H, N_k, D_*]. Returns kl, lse_s, lse_t, each [B, H, N_q], float32
  // (float64 for float64 inputs). divergence: "forward" = KL(P_t || P_s), "reverse" = KL(P_s || P_t).
  // Sliding window (FlashAttention semantics, bottom-right aligned): row i sees keys
  // [i + N_k - N_q - window_left, i + N_k - N_q + window_right]; -1 = unbounded; causal sets window_right = 0.
  // teacher_head_reduce="mean": q_t has H_t = r * H heads and student head h is compared with the mean attention
  // probabilities of teacher heads h*r .. h*r+r-1; lse_t is then the teacher's per-head LSE [B, H_t, N_q],
  // computed by a first pass unless given as teacher_lse (natural log, same scale_t). No teacher gradients
  // then (teacher_grad must be false).
  m.def(
      "attention_kl_fwd(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, float scale_s, float scale_t, "
      "bool causal, str divergence, int window_left=-1, int window_right=-1, str teacher_head_reduce=\"none\", "
      "Tensor? teacher_lse=None) -> (Tensor kl, Tensor lse_s, Tensor lse_t)");
  // Gradients of sum(grad_kl * kl) w.r.t. q_s, k_s (and q_t, k_t when teacher_grad; otherwise those two
  // outputs are empty tensors of shape [0]).
  m.def(
      "attention_kl_bwd(Tensor grad_kl, Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor kl, "
      "Tensor lse_s, Tensor lse_t, float scale_s, float scale_t, bool causal, str divergence, "
      "bool teacher_grad, int window_left=-1, int window_right=-1, str teacher_head_reduce=\"none\") -> "
      "(Tensor dq_s, Tensor dk_s, Tensor dq_t, Tensor dk_t)");

  // Generalized Jensen-Shannon divergence with parameter beta in [0, 1] (same inputs and masks as above), the
  // convention of linear_kl (TRL / Liger; csrc/kernels/online_kl.h, jsd_divergence_for_beta):
  //   JSD_beta = beta KL(P_t || M) + (1 - beta) KL(P_s || M),  M = beta P_t + (1 - beta) P_s,  0 < beta < 1,
  // and exactly forward KL(P_t || P_s) at beta = 0, reverse KL(P_s || P_t) at beta = 1. Two passes (both LSEs,
  // then the mixture; one pass at beta = 0 / 1). Returns jsd, lse_s, lse_t ([B, H, N_q]) and jsd_stats
  // [B, H, N_q, 2], the per-row (KL(P_t||M), KL(P_s||M)) the backward needs (JsdRowStats; zeros at beta = 0 / 1).
  m.def(
      "attention_jsd_fwd(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, float scale_s, float scale_t, "
      "bool causal, float beta, int window_left=-1, int window_right=-1, str teacher_head_reduce=\"none\", "
      "Tensor? teacher_lse=None) -> (Tensor jsd, Tensor lse_s, Tensor lse_t, Tensor jsd_stats)");
  m.def(
      "attention_jsd_bwd(Tensor grad_jsd, Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor jsd, "
      "Tensor lse_s, Tensor lse_t, Tensor jsd_stats, float scale_s, float scale_t, bool causal, float beta, "
      "bool teacher_grad, int window_left=-1, int window_right=-1, str teacher_head_reduce=\"none\") -> "
      "(Tensor dq_s, Tensor dk_s, Tensor dq_t, Tensor dk_t)");

  // Varlen (FlashAttention packing): q_*: [total_q, H, D_*], k_*: [total_k, H_kv, D_*]; sequence b is rows
  // cu_seqlens_*[b] .. cu_seqlens_*[b+1] (int32, length B + 1, starting at 0, non-decreasing, ending at the
  // total); max_seqlen_* >= every sequence's length. Masks are aligned bottom-right per sequence.
  // divergence: "forward", "reverse" or "jsd" (with beta, as attention_jsd_fwd). Returns kl, lse_s, lse_t, each
  // [total_q, H], and jsd_stats ([total_q, H, 2] for "jsd", an empty [0] tensor for the KL divergences). A
  // sequence with no keys gives 0 and zero gradients.
  m.def(
      "attention_kl_varlen_fwd(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale_s, float scale_t, bool causal, "
      "str divergence, int window_left=-1, int window_right=-1, float beta=0.5) -> (Tensor kl, Tensor lse_s, "
      "Tensor lse_t, Tensor jsd_stats)");
  m.def(
      "attention_kl_varlen_bwd(Tensor grad_kl, Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor kl, Tensor lse_s, "
      "Tensor lse_t, Tensor jsd_stats, float scale_s, float scale_t, bool causal, str divergence, "
      "bool teacher_grad, int window_left=-1, int window_right=-1, float beta=0.5) -> (Tensor dq_s, Tensor dk_s, "
      "Tensor dq_t, Tensor dk_t)");
}

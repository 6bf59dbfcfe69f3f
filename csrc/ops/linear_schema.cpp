// Operator schemas of the hidden-state logit-distillation path (a fragment of the streamkl library defined in
// schema.cpp). Backend implementations register from csrc/cpu and csrc/cuda (linear_kl_cuda.cpp); fake kernels and
// autograd are registered in Python (streamkl/_linear_ops.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(streamkl, m) {
  // Per-row divergence between softmax(t) and softmax(s), s = (x_s w_s^T + b_s) * inv_temperature,
  // t = (x_t w_t^T + b_t) * inv_temperature, without materializing either [T, V] logit matrix.
  // x_s: [T, D_s], w_s: [V, D_s], b_s: [V]?, x_t: [T, D_t], w_t: [V, D_t], b_t: [V]?, labels: int64 [T]?.
  // divergence: "forward" = KL(P_t || P_s), "reverse" = KL(P_s || P_t), "jsd" = beta KL(P_t || M) +
  // (1 - beta) KL(P_s || M), M = beta P_t + (1 - beta) P_s (beta = 0 / 1: forward / reverse KL).
  // Rows whose label is ignore_index get loss 0, ce 0, zero statistics and zero gradients. with_ce (needs
  // labels, inv_temperature == 1): ce = -log softmax(s)[label] per row, else zeros.
  // Returns loss [T], ce [T] and stats [4, T] (lse_s, lse_t, KL(P_s || M), KL(P_t || M); the last two 0
  // unless JSD), float32 (float64 for float64 inputs).
  m.def(
      "linear_kl_fwd(Tensor x_s, Tensor w_s, Tensor? b_s, Tensor x_t, Tensor w_t, Tensor? b_t, Tensor? labels, "
      "float inv_temperature, str divergence, float beta, int ignore_index, bool with_ce) -> (Tensor loss, "
      "Tensor ce, Tensor stats)");
  // Gradients of sum(grad_loss * loss + grad_ce * ce) w.r.t. (x_s, w_s, b_s, x_t, w_t, b_t), each computed
  // only where output_mask says so (otherwise an empty [0] tensor); in the dtype of the inputs.
  m.def(
      "linear_kl_bwd(Tensor grad_loss, Tensor grad_ce, Tensor x_s, Tensor w_s, Tensor? b_s, Tensor x_t, "
      "Tensor w_t, Tensor? b_t, Tensor? labels, Tensor loss, Tensor stats, float inv_temperature, "
      "str divergence, float beta, int ignore_index, bool with_ce, bool[6] output_mask) -> (Tensor dx_s, "
      "Tensor dw_s, Tensor db_s, Tensor dx_t, Tensor dw_t, Tensor db_t)");
}

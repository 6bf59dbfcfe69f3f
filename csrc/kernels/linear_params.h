// Plain parameter structs for the hidden-state logit-distillation kernels (CPU and CUDA). Torch-free.
//
// Per row i (a token) and vocabulary entry v, with tau the temperature:
//     s_iv = (<x_s,i, w_s,v> + b_s,v) / tau     (student logits)
//     t_iv = (<x_t,i, w_t,v> + b_t,v) / tau     (teacher logits)
// and the row's divergence between P_t = softmax(t_i) and P_s = softmax(s_i) (see LinearLoss). Neither
// [T, V] logit matrix is ever stored: kernels stream over vocabulary tiles and keep O(1) state per row.
//
// Layout: x is [T, D] and w is [V, D] per side, last dim contiguous, row strides given; biases [V]
// contiguous or null. D may differ between the sides; V and T may not. Per-row outputs are contiguous [T].
//
// Rows whose label equals ignore_index contribute nothing: loss 0, ce 0, statistics 0, zero gradient.
// Labels (when given) are in [0, V) or equal to ignore_index (the op checks this before calling a kernel).
#pragma once

#include <cstdint>

#include "online_kl.h"

namespace streamkl {

// Which per-row divergence the kernels compute.
enum class LinearLoss : int {
  kForwardKL = 0,  // KL(P_t || P_s)
  kReverseKL = 1,  // KL(P_s || P_t)
  // Generalized JSD, 0 < beta < 1 (convention and end points: jsd_divergence_for_beta in online_kl.h; the op maps
  // beta = 0 / 1 to kForwardKL / kReverseKL through linear_loss_of).
  kJSD = 2,
};

// For the KL losses: the shared online core's divergence (weighting side).
SKL_HOST_DEVICE Divergence kl_divergence_of(LinearLoss loss) {
  return loss == LinearLoss::kReverseKL ? Divergence::kReverse : Divergence::kForward;
}

// The loss that computes a divergence of the shared core.
SKL_HOST_DEVICE LinearLoss linear_loss_of(Divergence divergence) {
  if (divergence == Divergence::kForward) return LinearLoss::kForwardKL;
  if (divergence == Divergence::kReverse) return LinearLoss::kReverseKL;
  return LinearLoss::kJSD;
}

// Rows of the per-row statistics block `stats` ([kLinearNumStats, T], float / double, contiguous): what
// the forward saves for the backward besides the loss itself.
enum LinearStat : int {
  kStatLseStudent = 0,     // log-sum-exp of the student's tempered logits s_i
  kStatLseTeacher = 1,     // log-sum-exp of the teacher's tempered logits t_i
  kStatKlStudentMix = 2,   // JSD only: KL(P_s || M) (0 otherwise)
  kStatKlTeacherMix = 3,   // JSD only: KL(P_t || M) (0 otherwise)
  kLinearNumStats = 4,
};

// One model's side (student or teacher).
struct LinearSide {
  const void* x = nullptr;     // [T, dim], row stride x_row_stride
  const void* w = nullptr;     // [V, dim], row stride w_row_stride
  const void* bias = nullptr;  // [V] or null
  int64_t x_row_stride = 0, w_row_stride = 0;
  int dim = 0;

  // Backward outputs of the CPU kernel (contiguous; null when not requested). dw and db are written by exactly
  // one task per vocabulary row, dx by exactly one task per token row: no atomics on the CPU. (The CUDA backend
  // produces them with cuBLAS from the gradient chunks of LinearLogitChunk instead.)
  void* dx = nullptr;  // [T, dim]
  void* dw = nullptr;  // [V, dim]
  void* db = nullptr;  // [V]
};

struct LinearKLParams {
  LinearSide student, teacher;

  int64_t num_rows = 0;  // T (leading dims of x flattened)
  int64_t vocab = 0;     // V

  LinearLoss loss = LinearLoss::kForwardKL;
  double inv_temperature = 1.0;  // 1 / tau, applied to both sides' logits
  double beta = 0.5;             // JSD mixture weight of the teacher (kJSD only)

  // Optional int64 labels [T]; null = every row counts and no cross-entropy.
  const int64_t* labels = nullptr;
  int64_t ignore_index = -100;
  // Hard-label cross-entropy of the student, -log softmax(s_i)[label_i], computed in the same pass (needs
  // labels; the op allows it at temperature 1 only, where s_i are the student's plain logits).
  bool with_ce = false;

  // Forward outputs (backward inputs), element type float (double for float64 inputs on the CPU).
  void* loss_rows = nullptr;  // [T] the divergence of each row
  void* ce_rows = nullptr;    // [T] the cross-entropy of each row (0 without with_ce)
  void* stats = nullptr;      // [kLinearNumStats, T], see LinearStat

  // Backward only: incoming gradients of loss_rows and ce_rows ([T] each, contiguous).
  const void* grad_loss = nullptr;
  const void* grad_ce = nullptr;

  SKL_HOST_DEVICE bool row_ignored(int64_t row) const {
    return labels != nullptr && labels[row] == ignore_index;
  }
};

// The CUDA backend's interim "hybrid" design (csrc/cuda/linear_kl_cuda.cpp): cuBLAS writes one vocabulary chunk
// [v0, v0 + cols) of both sides' raw logits z = x w^T in fp32, and StreamKL's epilogue kernels apply bias and
// 1/tau and fold the chunk into per-row online state (forward) or turn it into logit gradients (backward).
// This is the epilogue kernels' view of one chunk. All pointers are device memory.
struct LinearLogitChunk {
  // [T, ld] row-major: z_student[r * ld + c] = <x_s,r, w_s,v0+c> for c < cols (no bias, no 1/tau).
  const float* z_student = nullptr;
  const float* z_teacher = nullptr;
  int64_t ld = 0;
  int64_t v0 = 0;
  int cols = 0;
  // The first chunk of a streaming pass: per-row state starts here instead of being read back.
  bool first = false;

  // Backward only: dL/dz of each side for this chunk, [T, ld] row-major in the input dtype (the 1/tau factor
  // included, ignored rows zero; its column sums are the bias gradient); null when that side is not wanted.
  void* grad_student = nullptr;
  void* grad_teacher = nullptr;
};

}  // namespace streamkl

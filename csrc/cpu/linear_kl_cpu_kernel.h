// Streaming hidden-state logit-distillation kernels for the CPU. Torch-free: the caller passes a parallel-for.
//
// The [T, V] logits are produced tile by tile (kTokenBlock token rows x kVocabTile vocabulary entries) into
// fixed-size buffers and fed to the shared online two-softmax core (kernels/online_kl.h). Extra memory is
// O(T) for the per-row outputs plus O((kTokenBlock + kVocabTile) * D) scratch per task.
//
// A logit tile is computed transposed, tile^T[c][r] = <w[v0 + c], x[row0 + r]>, as a plain row-major GEMM of
// the weight rows (read in place) with a once-transposed token block, then transposed back with the bias and
// 1/tau applied: no weight tile is ever copied.
//
// Forward: tasks are token blocks. KL losses take one pass over the vocabulary; JSD takes two (the two
// log-sum-exps, then the mixture terms). Backward: the logit tiles are recomputed from the saved statistics;
// dx comes from a sweep over token blocks and dw / db from a sweep over vocabulary tiles, so every output
// row has exactly one writer: no atomics, deterministic results.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../kernels/linear_params.h"
#include "../kernels/linear_row_outputs.h"
#include "../kernels/online_kl.h"
#include "cpu_math.h"

namespace streamkl {
namespace cpu {
namespace linear {

constexpr int kTokenBlock = 32;
constexpr int kVocabTile = 64;

inline int64_t blocks_of(int64_t n, int64_t block) { return (n + block - 1) / block; }

// One side's inputs, typed.
template <typename T>
struct SideView {
  const T* x;
  const T* w;
  const T* bias;  // null without bias
  int64_t x_row_stride, w_row_stride;
  int dim;

  static SideView make(const LinearSide& s) {
    return SideView{static_cast<const T*>(s.x), static_cast<const T*>(s.w), static_cast<const T*>(s.bias),
                    s.x_row_stride, s.w_row_stride, s.dim};
  }
};

// Per-task scratch, sized for the wider side.
template <typename T>
struct Scratch {
  std::vector<T> x_student_t, x_teacher_t;  // [dim][kTokenBlock] transposed token blocks
  std::vector<T> tile_t;                    // [kVocabTile][kTokenBlock] GEMM output; also the transposed gradient
  std::vector<T> student, teacher;          // [kTokenBlock][kVocabTile] logits, then their gradients
  std::vector<T> ce_grad;                   // [kVocabTile] one row's cross-entropy gradient

  Scratch(int dim_s, int dim_t)
      : x_student_t(static_cast<size_t>(dim_s) * kTokenBlock), x_teacher_t(static_cast<size_t>(dim_t) * kTokenBlock),
        tile_t(kVocabTile * kTokenBlock), student(kTokenBlock * kVocabTile), teacher(kTokenBlock * kVocabTile),
        ce_grad(kVocabTile) {}
};

// x_t[d][r] = x[row0 + r][d] for r < rows.
template <typename T>
void load_token_block(const SideView<T>& side, int64_t row0, int rows, T* x_t) {
  for (int r = 0; r < rows; ++r) {
    const T* x_row = side.x + (row0 + r) * side.x_row_stride;
    for (int d = 0; d < side.dim; ++d) x_t[d * kTokenBlock + r] = x_row[d];
  }
}

// logits[r][c] = (<x[row0 + r], w[v0 + c]> + bias[v0 + c]) * inv_tau for r < rows, c < cols.
template <typename T>
void logit_tile(const SideView<T>& side, const T* x_t, int rows, int64_t v0, int cols, T inv_tau, T* tile_t,
                T* logits) {
  std::fill(tile_t, tile_t + kVocabTile * kTokenBlock, T(0));
  gemm_accumulate(cols, rows, side.dim, side.w + v0 * side.w_row_stride, side.w_row_stride, x_t, kTokenBlock, tile_t,
                  kTokenBlock);
  for (int r = 0; r < rows; ++r) {
    T* out = logits + r * kVocabTile;
    for (int c = 0; c < cols; ++c) out[c] = tile_t[c * kTokenBlock + r];
    if (side.bias)
      for (int c = 0; c < cols; ++c) out[c] += side.bias[v0 + c];
    for (int c = 0; c < cols; ++c) out[c] *= inv_tau;
  }
}

// Everything a task needs about the problem, typed once.
template <typename T>
struct Problem {
  const LinearKLParams& p;
  SideView<T> student, teacher;
  T inv_tau;

  explicit Problem(const LinearKLParams& params)
      : p(params), student(SideView<T>::make(params.student)), teacher(SideView<T>::make(params.teacher)),
        inv_tau(static_cast<T>(params.inv_temperature)) {}

  int tile_cols(int64_t v0) const { return static_cast<int>(std::min<int64_t>(kVocabTile, p.vocab - v0)); }
  int block_rows(int64_t row0) const { return static_cast<int>(std::min<int64_t>(kTokenBlock, p.num_rows - row0)); }

  bool block_fully_ignored(int64_t row0, int rows) const {
    for (int r = 0; r < rows; ++r)
      if (!p.row_ignored(row0 + r)) return false;
    return true;
  }

  // Both logit tiles of token rows [row0, row0 + rows) whose token blocks are already in scratch.
  void logit_tiles(int rows, int64_t v0, int cols, Scratch<T>& scratch) const {
    logit_tile(student, scratch.x_student_t.data(), rows, v0, cols, inv_tau, scratch.tile_t.data(),
               scratch.student.data());
    logit_tile(teacher, scratch.x_teacher_t.data(), rows, v0, cols, inv_tau, scratch.tile_t.data(),
               scratch.teacher.data());
  }

  void load_token_blocks(int64_t row0, int rows, Scratch<T>& scratch) const {
    load_token_block(student, row0, rows, scratch.x_student_t.data());
    load_token_block(teacher, row0, rows, scratch.x_teacher_t.data());
  }

  T stat(int which, int64_t row) const { return static_cast<const T*>(p.stats)[which * p.num_rows + row]; }
};

// One streaming pass of the online two-softmax core over the whole vocabulary for a token block: on return
// state[r] holds both log-sum-exps and the KL of the loss's weighting side, and label_logit[r] the student's
// logit at the row's label (when with_ce).
template <typename T>
void online_pass(const Problem<T>& pb, int64_t row0, int rows, Divergence divergence, Scratch<T>& scratch,
                 OnlineKLState<T, CpuBase<T>>* state, T* label_logit) {
  const bool teacher_weights = teacher_is_weighting_side(divergence);
  for (int r = 0; r < rows; ++r) state[r].init();
  for (int64_t v0 = 0; v0 < pb.p.vocab; v0 += kVocabTile) {
    const int cols = pb.tile_cols(v0);
    pb.logit_tiles(rows, v0, cols, scratch);
    for (int r = 0; r < rows; ++r) {
      if (pb.p.row_ignored(row0 + r)) continue;
      const T* s = scratch.student.data() + r * kVocabTile;
      const T* t = scratch.teacher.data() + r * kVocabTile;
      const T* w = teacher_weights ? t : s;
      const T* o = teacher_weights ? s : t;
      T max_w = neg_infinity<T>(), max_o = neg_infinity<T>();
      for (int c = 0; c < cols; ++c) {
        max_w = max_of(max_w, w[c]);
        max_o = max_of(max_o, o[c]);
      }
      state[r].rescale(max_w, max_o);
      const ExpSums<T> sums = exp_sums(w, o, cols, state[r].max_w, state[r].max_o);
      state[r].add_sums(sums.sum_w, sums.sum_o, sums.acc);
      if (pb.p.with_ce) {
        const int64_t label = pb.p.labels[row0 + r];
        if (label >= v0 && label < v0 + cols) label_logit[r] = s[label - v0];
      }
    }
  }
}

// Second JSD pass: the JsdRowSums (KL(P_t || M), KL(P_s || M)) of each row, given both log-sum-exps.
template <typename T>
void jsd_mixture_pass(const Problem<T>& pb, int64_t row0, int rows, const T* lse_s, const T* lse_t,
                      Scratch<T>& scratch, JsdRowSums<T>* sums) {
  const T beta = static_cast<T>(pb.p.beta);
  for (int r = 0; r < rows; ++r) sums[r].init();
  for (int64_t v0 = 0; v0 < pb.p.vocab; v0 += kVocabTile) {
    const int cols = pb.tile_cols(v0);
    pb.logit_tiles(rows, v0, cols, scratch);
    for (int r = 0; r < rows; ++r) {
      if (pb.p.row_ignored(row0 + r)) continue;
      sums[r].merge(jsd_sums(scratch.student.data() + r * kVocabTile, scratch.teacher.data() + r * kVocabTile, cols,
                             lse_s[r], lse_t[r], beta));
    }
  }
}

// Forward of one token block: loss_rows, ce_rows and stats of rows [row0, row0 + rows).
template <typename T>
void linear_kl_forward_block(const Problem<T>& pb, int64_t row0, int rows, Scratch<T>& scratch) {
  const LinearKLParams& p = pb.p;
  const bool jsd = p.loss == LinearLoss::kJSD;
  // JSD's first pass only needs the two log-sum-exps; any weighting side gives them.
  const Divergence divergence = jsd ? Divergence::kForward : kl_divergence_of(p.loss);
  const bool teacher_weights = teacher_is_weighting_side(divergence);
  OnlineKLState<T, CpuBase<T>> state[kTokenBlock];
  T label_logit[kTokenBlock] = {}, lse_s[kTokenBlock], lse_t[kTokenBlock];
  JsdRowSums<T> mixture[kTokenBlock] = {};  // stay 0 unless JSD
  pb.load_token_blocks(row0, rows, scratch);
  online_pass(pb, row0, rows, divergence, scratch, state, label_logit);
  if (jsd) {
    for (int r = 0; r < rows; ++r) student_teacher_lse(state[r], teacher_weights, lse_s[r], lse_t[r]);
    jsd_mixture_pass(pb, row0, rows, lse_s, lse_t, scratch, mixture);
  }
  const JsdWeights<T> weights = JsdWeights<T>::mixture_weighted(static_cast<T>(p.beta));
  for (int r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    if (p.row_ignored(row)) {
      LinearRowOutputs<T>::zeros().store(p, row);
      continue;
    }
    // finalize clamps the KL terms at 0.
    const JsdRowStats<T> jsd_terms =
        jsd ? JsdRowStats<T>::template finalize<CpuBase<T>>(mixture[r]) : JsdRowStats<T>{};
    LinearRowOutputs<T>::finish(p, state[r], teacher_weights, jsd_terms, weights, label_logit[r]).store(p, row);
  }
}

// Gradient tiles of the loss with respect to the raw logits z = x w^T + b (not divided by tau) for token
// rows [row0, row0 + rows) x vocabulary [v0, v0 + cols), written over scratch.student / scratch.teacher
// (token blocks must already be loaded). Ignored rows get exact zeros.
//     dL/dz_s = g_i / tau * dD/ds + g_ce,i * (softmax(s)_v - [v == label_i])   (ce at tau = 1)
//     dL/dz_t = g_i / tau * dD/dt
template <typename T>
void gradient_tiles(const Problem<T>& pb, int64_t row0, int rows, int64_t v0, int cols, Scratch<T>& scratch) {
  const LinearKLParams& p = pb.p;
  pb.logit_tiles(rows, v0, cols, scratch);
  const T* grad_loss = static_cast<const T*>(p.grad_loss);
  const T* grad_ce = static_cast<const T*>(p.grad_ce);
  const T* loss = static_cast<const T*>(p.loss_rows);
  for (int r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    T* s = scratch.student.data() + r * kVocabTile;
    T* t = scratch.teacher.data() + r * kVocabTile;
    if (p.row_ignored(row)) {
      std::fill(s, s + cols, T(0));
      std::fill(t, t + cols, T(0));
      continue;
    }
    const T lse_s = pb.stat(kStatLseStudent, row), lse_t = pb.stat(kStatLseTeacher, row);
    const T g = grad_loss[row] * pb.inv_tau;
    const T g_ce = p.with_ce ? grad_ce[row] : T(0);
    T* ce_grad = scratch.ce_grad.data();
    if (g_ce != T(0))  // softmax(s) before s is overwritten by the divergence's gradient
      for (int c = 0; c < cols; ++c) ce_grad[c] = g_ce * CpuBase<T>::exp(s[c] - lse_s);
    if (p.loss == LinearLoss::kJSD) {
      const JsdRowStats<T> mix{pb.stat(kStatKlTeacherMix, row), pb.stat(kStatKlStudentMix, row)};
      jsd_score_grads_row(s, t, cols, lse_s, lse_t, static_cast<T>(p.beta), mix, g);
    } else {
      const bool teacher_weights = teacher_is_weighting_side(kl_divergence_of(p.loss));
      score_grads_row(s, t, cols, teacher_weights, teacher_weights ? lse_t : lse_s, teacher_weights ? lse_s : lse_t,
                      loss[row], g);
    }
    if (g_ce != T(0)) {
      for (int c = 0; c < cols; ++c) s[c] += ce_grad[c];
      const int64_t label = p.labels[row];
      if (label >= v0 && label < v0 + cols) s[label - v0] -= g_ce;
    }
  }
}

// dx[row0 + r] += sum_c grad[r][c] * w[v0 + c]
template <typename T>
void accumulate_dx(const SideView<T>& side, T* dx, int64_t row0, int rows, int64_t v0, int cols, const T* grad) {
  gemm_accumulate(rows, side.dim, cols, grad, kVocabTile, side.w + v0 * side.w_row_stride, side.w_row_stride,
                  dx + row0 * side.dim, side.dim);
}

// dw[v0 + c] += sum_r grad[r][c] * x[row0 + r] and db[v0 + c] += sum_r grad[r][c] (either may be null).
template <typename T>
void accumulate_dw_db(const SideView<T>& side, T* dw, T* db, int64_t row0, int rows, int64_t v0, int cols,
                      const T* grad, T* grad_t /* [kVocabTile][kTokenBlock] */) {
  for (int c = 0; c < cols; ++c)
    for (int r = 0; r < rows; ++r) grad_t[c * kTokenBlock + r] = grad[r * kVocabTile + c];
  if (dw)
    gemm_accumulate(cols, side.dim, rows, grad_t, kTokenBlock, side.x + row0 * side.x_row_stride, side.x_row_stride,
                    dw + v0 * side.dim, side.dim);
  if (db)
    for (int c = 0; c < cols; ++c) {
      T sum = 0;
      for (int r = 0; r < rows; ++r) sum += grad_t[c * kTokenBlock + r];
      db[v0 + c] += sum;
    }
}

// Backward sweep 1: dx of the sides that want it, for one token block (dx must start zeroed).
template <typename T>
void linear_kl_backward_dx_block(const Problem<T>& pb, int64_t row0, int rows, Scratch<T>& scratch) {
  if (pb.block_fully_ignored(row0, rows)) return;
  T* dx_s = static_cast<T*>(pb.p.student.dx);
  T* dx_t = static_cast<T*>(pb.p.teacher.dx);
  pb.load_token_blocks(row0, rows, scratch);
  for (int64_t v0 = 0; v0 < pb.p.vocab; v0 += kVocabTile) {
    const int cols = pb.tile_cols(v0);
    gradient_tiles(pb, row0, rows, v0, cols, scratch);
    if (dx_s) accumulate_dx(pb.student, dx_s, row0, rows, v0, cols, scratch.student.data());
    if (dx_t) accumulate_dx(pb.teacher, dx_t, row0, rows, v0, cols, scratch.teacher.data());
  }
}

// Backward sweep 2: dw / db of the sides that want them, for one vocabulary tile (outputs start zeroed).
template <typename T>
void linear_kl_backward_dw_tile(const Problem<T>& pb, int64_t v0, Scratch<T>& scratch) {
  const LinearSide& s = pb.p.student;
  const LinearSide& t = pb.p.teacher;
  const int cols = pb.tile_cols(v0);
  for (int64_t row0 = 0; row0 < pb.p.num_rows; row0 += kTokenBlock) {
    const int rows = pb.block_rows(row0);
    if (pb.block_fully_ignored(row0, rows)) continue;
    pb.load_token_blocks(row0, rows, scratch);
    gradient_tiles(pb, row0, rows, v0, cols, scratch);
    if (s.dw || s.db)
      accumulate_dw_db(pb.student, static_cast<T*>(s.dw), static_cast<T*>(s.db), row0, rows, v0, cols,
                       scratch.student.data(), scratch.tile_t.data());
    if (t.dw || t.db)
      accumulate_dw_db(pb.teacher, static_cast<T*>(t.dw), static_cast<T*>(t.db), row0, rows, v0, cols,
                       scratch.teacher.data(), scratch.tile_t.data());
  }
}

// Entry points. ParallelFor: callable (int64_t begin, int64_t end, F body) running body(lo, hi) on
// sub-ranges, e.g. a wrapper around at::parallel_for.
template <typename T, typename ParallelFor>
void run_linear_kl_forward(const LinearKLParams& p, ParallelFor&& parallel_for) {
  const Problem<T> pb(p);
  parallel_for(int64_t(0), blocks_of(p.num_rows, kTokenBlock), [&](int64_t lo, int64_t hi) {
    Scratch<T> scratch(p.student.dim, p.teacher.dim);
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t row0 = blk * kTokenBlock;
      linear_kl_forward_block(pb, row0, pb.block_rows(row0), scratch);
    }
  });
}

template <typename T, typename ParallelFor>
void run_linear_kl_backward(const LinearKLParams& p, ParallelFor&& parallel_for) {
  const Problem<T> pb(p);
  if (p.student.dx || p.teacher.dx) {
    parallel_for(int64_t(0), blocks_of(p.num_rows, kTokenBlock), [&](int64_t lo, int64_t hi) {
      Scratch<T> scratch(p.student.dim, p.teacher.dim);
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t row0 = blk * kTokenBlock;
        linear_kl_backward_dx_block(pb, row0, pb.block_rows(row0), scratch);
      }
    });
  }
  if (p.student.dw || p.student.db || p.teacher.dw || p.teacher.db) {
    parallel_for(int64_t(0), blocks_of(p.vocab, kVocabTile), [&](int64_t lo, int64_t hi) {
      Scratch<T> scratch(p.student.dim, p.teacher.dim);
      for (int64_t tile = lo; tile < hi; ++tile) linear_kl_backward_dw_tile(pb, tile * kVocabTile, scratch);
    });
  }
}

}  // namespace linear
}  // namespace cpu
}  // namespace streamkl

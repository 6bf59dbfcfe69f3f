// Streaming attention-KL kernels for the CPU. Torch-free: the caller passes a parallel-for.
//
// Work is split into (batch, head, block of kRowBlock query rows) tasks. Each task walks the key tiles its
// rows may see, computes the student and teacher score tiles into small fixed-size buffers, and feeds them
// to the shared online two-softmax core. Nothing proportional to N_q * N_k is ever allocated: the scratch
// per task is O((kRowBlock + D) * kKeyTile). One template serves the padded and the varlen layouts
// (AttentionKLParams::sequence / row_index locate each sequence's rows).
//
// Forward and reverse KL take one pass. The generalized JSD and head-aggregated teachers take two: pass 1
// computes the log-sum-exps the second needs (side_lse_rows), pass 2 the divergence from log-probabilities
// (a head-aggregated teacher's log pbar is folded from its heads' tiles by TeacherTiles).
//
// The backward recomputes the score tiles from the saved log-sum-exps. dQ and dK are produced by two
// sweeps (over row blocks, then over key blocks), so every output element has exactly one writer: no
// atomics, deterministic results.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../kernels/attention_mask.h"
#include "../kernels/attention_params.h"
#include "../kernels/online_kl.h"
#include "cpu_math.h"

namespace streamkl {
namespace cpu {

constexpr int kRowBlock = 32;
constexpr int kKeyTile = 64;

// Pointers of one (sequence, head) slice of one side, typed. The sequence's start rows are 0 in the padded
// layout and cu_seqlens[b] in the varlen one (whose batch strides are 0), so one formula serves both.
template <typename T>
struct SideSlice {
  const T* q;
  const T* k;
  int64_t q_row_stride, k_row_stride;
  int dim;
  T scale;

  static SideSlice make(const AttentionSide& s, int b, int h, int num_heads, const AttentionKLParams::Sequence& seq) {
    const int kv_head = h / (num_heads / s.num_kv_heads);
    SideSlice out;
    out.q = static_cast<const T*>(s.q) + b * s.q_batch_stride + seq.q_start * s.q_row_stride + h * s.q_head_stride;
    out.k = static_cast<const T*>(s.k) + b * s.k_batch_stride + seq.k_start * s.k_row_stride +
            kv_head * s.k_head_stride;
    out.q_row_stride = s.q_row_stride;
    out.k_row_stride = s.k_row_stride;
    out.dim = s.head_dim;
    out.scale = static_cast<T>(s.scale);
    return out;
  }
};

// scores[r][c] = scale * <q[row0 + r], k[key0 + c]> for r < rows, c < cols. The key tile is transposed
// first so the product is a plain row-major GEMM over contiguous keys (cpu_math.h).
template <typename T>
void score_tile(const SideSlice<T>& side, int row0, int rows, int key0, int cols, T* key_t /* [dim][kKeyTile] */,
                T* scores /* [kRowBlock][kKeyTile] */) {
  for (int c = 0; c < cols; ++c) {
    const T* k_row = side.k + (key0 + c) * side.k_row_stride;
    for (int d = 0; d < side.dim; ++d) key_t[d * kKeyTile + c] = k_row[d];
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) scores[r * kKeyTile + c] = T(0);
  gemm_accumulate(rows, cols, side.dim, side.q + row0 * side.q_row_stride, side.q_row_stride, key_t, kKeyTile, scores,
                  kKeyTile);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) scores[r * kKeyTile + c] *= side.scale;
}

// Per-task scratch: two score tiles, one transposed key tile sized for the wider side, and one more tile for
// a teacher head being folded into an aggregated teacher.
template <typename T>
struct TileScratch {
  std::vector<T> student_scores, teacher_scores, key_t, grad_t, head_scores;
  explicit TileScratch(int max_dim)
      : student_scores(kRowBlock * kKeyTile), teacher_scores(kRowBlock * kKeyTile),
        key_t(static_cast<size_t>(max_dim) * kKeyTile), grad_t(kKeyTile * kRowBlock),
        head_scores(kRowBlock * kKeyTile) {}
};

// Columns [begin, end) of a tile of keys [key0, key0 + cols) that a row with allowed keys `keys` may see.
inline KeyRange tile_columns(const KeyRange& keys, int key0, int cols) {
  const int begin = std::min(std::max(keys.begin - key0, 0), cols);
  return KeyRange{begin, std::max(std::min(keys.end - key0, cols), begin)};
}

// The sweep every row-block pass shares: for each tile of the keys rows [row0, row0 + rows) may see,
// tile(key0, cols) computes what the pass needs, then row(r, columns) runs for each row that sees at least one
// key of the tile (columns: its allowed part of the tile).
template <typename TileFn, typename RowFn>
void sweep_key_tiles(const AttentionMask& mask, int row0, int rows, TileFn&& tile, RowFn&& row) {
  const KeyRange block_keys = mask.keys_for_rows(row0, row0 + rows);
  for (int key0 = block_keys.begin; key0 < block_keys.end; key0 += kKeyTile) {
    const int cols = std::min(kKeyTile, block_keys.end - key0);
    tile(key0, cols);
    for (int r = 0; r < rows; ++r) {
      const KeyRange columns = tile_columns(mask.keys_for_row(row0 + r), key0, cols);
      if (!columns.empty()) row(r, columns);
    }
  }
}

template <typename T>
T row_max(const T* x, int n) {
  T m = neg_infinity<T>();
  for (int c = 0; c < n; ++c) m = max_of(m, x[c]);
  return m;
}

// Turns a tile of scores into log-probabilities: row r minus its log-sum-exp, read from `lse` at
// row_index_for_heads(b, h, row, heads).
template <typename T>
void subtract_row_lse(const AttentionKLParams& p, const T* lse, int b, int h, int heads, int row0, int rows, int cols,
                      T* tile) {
  for (int r = 0; r < rows; ++r) {
    const T row_lse = lse[p.row_index_for_heads(b, h, row0 + r, heads)];
    for (int c = 0; c < cols; ++c) tile[r * kKeyTile + c] -= row_lse;
  }
}

// The teacher's side of student head h. Without aggregation, the score tile of teacher head h (raw scores,
// or log-probabilities when `normalized`); with r teacher heads per student head, always the log of the mean
// of their probabilities, log pbar (which needs their LSEs, in lse_teacher, first). Rows or keys a row cannot
// see hold garbage: consumers read only each row's allowed columns.
template <typename T>
struct TeacherTiles {
  const AttentionKLParams& p;
  int b, h;
  AttentionKLParams::Sequence seq;
  SideSlice<T> single;  // teacher head h when not aggregated

  TeacherTiles(const AttentionKLParams& params, int b_, int h_)
      : p(params), b(b_), h(h_), seq(params.sequence(b_)),
        single(SideSlice<T>::make(params.teacher, b_, h_, params.num_teacher_heads(), seq)) {}

  bool aggregated() const { return p.teacher_head_group > 1; }

  void fill(int row0, int rows, int key0, int cols, TileScratch<T>& scratch, bool normalized) const {
    T* out = scratch.teacher_scores.data();
    const T* lse = static_cast<const T*>(p.lse_teacher);
    const int heads = p.num_teacher_heads();
    if (!aggregated()) {
      score_tile(single, row0, rows, key0, cols, scratch.key_t.data(), out);
      if (normalized) subtract_row_lse(p, lse, b, h, heads, row0, rows, cols, out);
      return;
    }
    const int r = p.teacher_head_group;
    T* head = scratch.head_scores.data();
    for (int g = 0; g < r; ++g) {
      const SideSlice<T> slice = SideSlice<T>::make(p.teacher, b, h * r + g, heads, seq);
      score_tile(slice, row0, rows, key0, cols, scratch.key_t.data(), g == 0 ? out : head);
      subtract_row_lse(p, lse, b, h * r + g, heads, row0, rows, cols, g == 0 ? out : head);
      if (g == 0) continue;
      for (int i = 0; i < rows; ++i)
        for (int c = 0; c < cols; ++c)
          out[i * kKeyTile + c] = log_add_exp<T, CpuBase<T>>(out[i * kKeyTile + c], head[i * kKeyTile + c]);
    }
    for (int i = 0; i < rows; ++i)
      for (int c = 0; c < cols; ++c)
        out[i * kKeyTile + c] = log_mean_from_log_sum<T, CpuBase<T>>(out[i * kKeyTile + c], r);
  }
};

// What every pass over query rows of one (sequence b, student head h) works with.
template <typename T>
struct HeadView {
  AttentionKLParams::Sequence seq;
  SideSlice<T> student;
  TeacherTiles<T> teacher;
  AttentionMask mask;
  HeadView(const AttentionKLParams& p, int b, int h)
      : seq(p.sequence(b)), student(SideSlice<T>::make(p.student, b, h, p.num_heads, seq)), teacher(p, b, h),
        mask(AttentionMask::from_params(p, seq.seqlen_q, seq.seqlen_k)) {}
};

template <typename T>
void attention_kl_forward(const AttentionKLParams& p, int b, int h, int row0, int rows, TileScratch<T>& scratch) {
  const HeadView<T> view(p, b, h);
  const bool teacher_weights = teacher_is_weighting_side(p.divergence);

  OnlineKLState<T, CpuBase<T>> state[kRowBlock];
  for (int r = 0; r < rows; ++r) state[r].init();
  sweep_key_tiles(
      view.mask, row0, rows,
      [&](int key0, int cols) {
        score_tile(view.student, row0, rows, key0, cols, scratch.key_t.data(), scratch.student_scores.data());
        view.teacher.fill(row0, rows, key0, cols, scratch, /*normalized=*/false);  // log pbar when aggregated
      },
      [&](int r, const KeyRange& columns) {
        const T* w = (teacher_weights ? scratch.teacher_scores : scratch.student_scores).data() + r * kKeyTile;
        const T* o = (teacher_weights ? scratch.student_scores : scratch.teacher_scores).data() + r * kKeyTile;
        const int n = columns.end - columns.begin;
        state[r].rescale(row_max(w + columns.begin, n), row_max(o + columns.begin, n));
        const ExpSums<T> sums = exp_sums(w + columns.begin, o + columns.begin, n, state[r].max_w, state[r].max_o);
        state[r].add_sums(sums.sum_w, sums.sum_o, sums.acc);
      });

  T* kl = static_cast<T*>(p.kl);
  T* lse_s = static_cast<T*>(p.lse_student);
  T* lse_t = static_cast<T*>(p.lse_teacher);
  for (int r = 0; r < rows; ++r) {
    const int64_t idx = p.row_index(b, h, row0 + r);
    kl[idx] = state[r].divergence();
    lse_s[idx] = teacher_weights ? state[r].lse_o() : state[r].lse_w();
    // An aggregated teacher's lse_teacher holds its per-head LSEs (inputs of this pass), not this row's.
    if (!view.teacher.aggregated()) lse_t[idx] = teacher_weights ? state[r].lse_w() : state[r].lse_o();
  }
}

// Pass 1 of the two-pass divergences: the log-sum-exp of one side's rows [row0, row0 + rows) of head h (of
// `heads` query heads), written at row_index_for_heads into `lse`.
template <typename T>
void side_lse_rows(const AttentionKLParams& p, const AttentionSide& side, int heads, int b, int h, int row0, int rows,
                   T* lse, TileScratch<T>& scratch) {
  const AttentionKLParams::Sequence seq = p.sequence(b);
  const SideSlice<T> slice = SideSlice<T>::make(side, b, h, heads, seq);
  const AttentionMask mask = AttentionMask::from_params(p, seq.seqlen_q, seq.seqlen_k);
  OnlineLSE<T, CpuBase<T>> state[kRowBlock];
  for (int r = 0; r < rows; ++r) state[r].init();
  T* scores = scratch.student_scores.data();
  sweep_key_tiles(
      mask, row0, rows,
      [&](int key0, int cols) { score_tile(slice, row0, rows, key0, cols, scratch.key_t.data(), scores); },
      [&](int r, const KeyRange& columns) {
        const T* x = scores + r * kKeyTile + columns.begin;
        const int n = columns.end - columns.begin;
        state[r].rescale(row_max(x, n));
        state[r].add_sum(exp_sum(x, n, state[r].max));
      });
  for (int r = 0; r < rows; ++r) lse[p.row_index_for_heads(b, h, row0 + r, heads)] = state[r].lse();
}

// Pass 2 of the generalized JSD for rows [row0, row0 + rows) of head h: the row sums from both sides'
// log-probabilities (the LSEs come from pass 1), then the divergence and the statistics the backward needs.
// The ops map beta = 0 / 1 to the KL kernels, so 0 < beta < 1 here (jsd_divergence_for_beta, online_kl.h).
template <typename T>
void jsd_forward(const AttentionKLParams& p, int b, int h, int row0, int rows, TileScratch<T>& scratch) {
  const HeadView<T> view(p, b, h);
  const T beta = static_cast<T>(p.beta);
  JsdRowSums<T> sums[kRowBlock];
  for (int r = 0; r < rows; ++r) sums[r].init();
  sweep_key_tiles(
      view.mask, row0, rows,
      [&](int key0, int cols) {
        score_tile(view.student, row0, rows, key0, cols, scratch.key_t.data(), scratch.student_scores.data());
        subtract_row_lse(p, static_cast<const T*>(p.lse_student), b, h, p.num_heads, row0, rows, cols,
                         scratch.student_scores.data());
        view.teacher.fill(row0, rows, key0, cols, scratch, /*normalized=*/true);
      },
      [&](int r, const KeyRange& columns) {
        const T* log_p_s = scratch.student_scores.data() + r * kKeyTile + columns.begin;
        const T* log_p_t = scratch.teacher_scores.data() + r * kKeyTile + columns.begin;
        // The tiles hold log-probabilities already: row log-sum-exps 0.
        sums[r].merge(jsd_sums(log_p_s, log_p_t, columns.end - columns.begin, T(0), T(0), beta));
      });
  const JsdWeights<T> weights = JsdWeights<T>::mixture_weighted(beta);
  for (int r = 0; r < rows; ++r) {
    const int64_t idx = p.row_index(b, h, row0 + r);
    const JsdRowStats<T> stats = JsdRowStats<T>::template finalize<CpuBase<T>>(sums[r]);
    stats.store(static_cast<T*>(p.jsd_stats) + idx * JsdRowStats<T>::kCount);
    static_cast<T*>(p.kl)[idx] = stats.divergence(weights);
  }
}

// Gradient tiles dD/ds and dD/dt (times the row's incoming gradient) for rows [row0, row0+rows) x keys
// [key0, key0+cols), written over the score buffers; masked entries become 0.
template <typename T>
void gradient_tiles(const AttentionKLParams& p, const SideSlice<T>& student, const TeacherTiles<T>& teacher,
                    const AttentionMask& mask, int b, int h, int row0, int rows, int key0, int cols,
                    TileScratch<T>& scratch) {
  score_tile(student, row0, rows, key0, cols, scratch.key_t.data(), scratch.student_scores.data());
  teacher.fill(row0, rows, key0, cols, scratch, /*normalized=*/false);
  const bool teacher_weights = teacher_is_weighting_side(p.divergence);
  const T* kl = static_cast<const T*>(p.kl);
  const T* lse_s = static_cast<const T*>(p.lse_student);
  const T* grad_kl = static_cast<const T*>(p.grad_kl);
  const T* jsd_stats = static_cast<const T*>(p.jsd_stats);
  for (int r = 0; r < rows; ++r) {
    const int64_t idx = p.row_index(b, h, row0 + r);
    T* s = scratch.student_scores.data() + r * kKeyTile;
    T* t = scratch.teacher_scores.data() + r * kKeyTile;
    const KeyRange columns = tile_columns(mask.keys_for_row(row0 + r), key0, cols);
    const int c_begin = columns.begin, c_end = columns.end;
    for (int c = 0; c < c_begin; ++c) s[c] = t[c] = T(0);  // masked keys get no gradient
    for (int c = c_end; c < cols; ++c) s[c] = t[c] = T(0);
    const T row_lse_t = p.row_teacher_lse<T>(idx);  // 0 for log pbar
    if (p.divergence == Divergence::kJsd) {
      const JsdRowStats<T> stats = JsdRowStats<T>::load(jsd_stats + idx * JsdRowStats<T>::kCount);
      jsd_score_grads_row(s + c_begin, t + c_begin, c_end - c_begin, lse_s[idx], row_lse_t, static_cast<T>(p.beta),
                          stats, grad_kl[idx * p.grad_kl_stride]);
      continue;
    }
    const T lse_w = teacher_weights ? row_lse_t : lse_s[idx];
    const T lse_o = teacher_weights ? lse_s[idx] : row_lse_t;
    score_grads_row(s + c_begin, t + c_begin, c_end - c_begin, teacher_weights, lse_w, lse_o, kl[idx],
                    grad_kl[idx * p.grad_kl_stride]);
  }
}

// dq[row0 + r] += scale * sum_c grad[r][c] * k[key0 + c]   (grad is scaled in place)
template <typename T>
void accumulate_dq(const SideSlice<T>& side, T* dq, int64_t dq_row_stride, int row0, int rows, int key0, int cols,
                   T* grad) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) grad[r * kKeyTile + c] *= side.scale;
  gemm_accumulate(rows, side.dim, cols, grad, kKeyTile, side.k + key0 * side.k_row_stride, side.k_row_stride,
                  dq + row0 * dq_row_stride, dq_row_stride);
}

// dk[key0 + c] += scale * sum_r grad[r][c] * q[row0 + r]   (through a scaled transposed copy of grad)
template <typename T>
void accumulate_dk(const SideSlice<T>& side, T* dk, int64_t dk_row_stride, int row0, int rows, int key0, int cols,
                   const T* grad, T* grad_t /* [kKeyTile][kRowBlock] */) {
  for (int c = 0; c < cols; ++c)
    for (int r = 0; r < rows; ++r) grad_t[c * kRowBlock + r] = grad[r * kKeyTile + c] * side.scale;
  gemm_accumulate(cols, side.dim, rows, grad_t, kRowBlock, side.q + row0 * side.q_row_stride, side.q_row_stride,
                  dk + key0 * dk_row_stride, dk_row_stride);
}

// Gradient rows of one (sequence, head) slice: dq[b, h] (or dk[b, kv_head]) starting at the sequence's first row.
template <typename T>
T* side_dq_ptr(const AttentionSide& s, int b, int h, const AttentionKLParams::Sequence& seq) {
  return static_cast<T*>(s.dq) + b * s.dq_batch_stride + h * s.dq_head_stride + seq.q_start * s.dq_row_stride;
}
template <typename T>
T* side_dk_ptr(const AttentionSide& s, int b, int kv_head, const AttentionKLParams::Sequence& seq) {
  return static_cast<T*>(s.dk) + b * s.dk_batch_stride + kv_head * s.dk_head_stride + seq.k_start * s.dk_row_stride;
}

// Sweep 1 of the backward: dQ of both sides for one block of query rows (dq must start zeroed).
template <typename T>
void attention_kl_backward_dq(const AttentionKLParams& p, int b, int h, int row0, int rows, TileScratch<T>& scratch) {
  const HeadView<T> view(p, b, h);
  T* dq_s = side_dq_ptr<T>(p.student, b, h, view.seq);
  T* dq_t = p.teacher_grad ? side_dq_ptr<T>(p.teacher, b, h, view.seq) : nullptr;
  const KeyRange block_keys = view.mask.keys_for_rows(row0, row0 + rows);
  for (int key0 = block_keys.begin; key0 < block_keys.end; key0 += kKeyTile) {
    const int cols = std::min(kKeyTile, block_keys.end - key0);
    gradient_tiles(p, view.student, view.teacher, view.mask, b, h, row0, rows, key0, cols, scratch);
    accumulate_dq(view.student, dq_s, p.student.dq_row_stride, row0, rows, key0, cols, scratch.student_scores.data());
    if (dq_t)
      accumulate_dq(view.teacher.single, dq_t, p.teacher.dq_row_stride, row0, rows, key0, cols,
                    scratch.teacher_scores.data());
  }
}

// Which side's dK a sweep-2 task writes. Without GQA one task writes both (the score tiles are shared);
// with GQA on either side each side has its own key-head grouping, so each gets its own tasks.
enum class DkSides { kBoth, kStudent, kTeacher };

// Sweep 2 of the backward: dK for one block of kKeyTile keys of key head kv_head (dk must start zeroed),
// summed over the query heads that share that key head. One writer per dK row: no atomics.
template <typename T>
void attention_kl_backward_dk(const AttentionKLParams& p, int b, int kv_head, DkSides sides, int key0, int cols,
                              TileScratch<T>& scratch) {
  const AttentionKLParams::Sequence seq = p.sequence(b);
  const AttentionMask mask = AttentionMask::from_params(p, seq.seqlen_q, seq.seqlen_k);
  const bool student = sides != DkSides::kTeacher;
  const bool teacher = sides != DkSides::kStudent && p.teacher_grad;
  const AttentionSide& grouping = sides == DkSides::kTeacher ? p.teacher : p.student;
  const int group = p.num_heads / grouping.num_kv_heads;
  T* dk_s = student ? side_dk_ptr<T>(p.student, b, kv_head, seq) : nullptr;
  T* dk_t = teacher ? side_dk_ptr<T>(p.teacher, b, kv_head, seq) : nullptr;
  for (int h = kv_head * group; h < (kv_head + 1) * group; ++h) {
    const SideSlice<T> student_slice = SideSlice<T>::make(p.student, b, h, p.num_heads, seq);
    const TeacherTiles<T> teacher_slice(p, b, h);
    for (int row0 = 0; row0 < seq.seqlen_q; row0 += kRowBlock) {
      const int rows = std::min(kRowBlock, seq.seqlen_q - row0);
      const KeyRange block_keys = mask.keys_for_rows(row0, row0 + rows);
      if (block_keys.end <= key0 || block_keys.begin >= key0 + cols) continue;
      gradient_tiles(p, student_slice, teacher_slice, mask, b, h, row0, rows, key0, cols, scratch);
      if (dk_s)
        accumulate_dk(student_slice, dk_s, p.student.dk_row_stride, row0, rows, key0, cols,
                      scratch.student_scores.data(), scratch.grad_t.data());
      if (dk_t)
        accumulate_dk(teacher_slice.single, dk_t, p.teacher.dk_row_stride, row0, rows, key0, cols,
                      scratch.teacher_scores.data(), scratch.grad_t.data());
    }
  }
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Runs body(b, x, block_begin, block_len) for every (sequence b, index x < inner, block of `block` items
// within the sequence's `length_of(seq)` items) in parallel; tasks past a sequence's end (varlen: the grid is
// sized by the longest sequence) do nothing. ParallelFor: callable (int64_t begin, int64_t end, F body)
// running body(lo, hi) on sub-ranges, e.g. a wrapper around at::parallel_for.
template <typename T, typename ParallelFor, typename LengthOf, typename Body>
void for_each_block(const AttentionKLParams& p, int inner, int max_length, int block, ParallelFor&& parallel_for,
                    LengthOf&& length_of, Body&& body) {
  const int blocks = ceil_div(max_length, block);
  const int max_dim = std::max(p.student.head_dim, p.teacher.head_dim);
  parallel_for(int64_t(0), int64_t(p.batch) * inner * blocks, [&](int64_t lo, int64_t hi) {
    TileScratch<T> scratch(max_dim);
    for (int64_t task = lo; task < hi; ++task) {
      const int begin = static_cast<int>(task % blocks) * block;
      const int64_t bx = task / blocks;
      const int b = static_cast<int>(bx / inner);
      const int length = length_of(p.sequence(b));
      if (begin < length) body(b, static_cast<int>(bx % inner), begin, std::min(block, length - begin), scratch);
    }
  });
}

inline int query_length(const AttentionKLParams::Sequence& s) { return s.seqlen_q; }
inline int key_length(const AttentionKLParams::Sequence& s) { return s.seqlen_k; }

// Entry points.
// Forward: KL in one pass (online core); the generalized JSD and aggregated teachers in two (LSEs, then the
// divergence).
template <typename T, typename ParallelFor>
void run_attention_kl_forward(const AttentionKLParams& p, ParallelFor&& parallel_for) {
  const bool jsd = p.divergence == Divergence::kJsd;
  auto lse_pass = [&](const AttentionSide& side, int heads, void* lse) {
    for_each_block<T>(p, heads, p.seqlen_q, kRowBlock, parallel_for, query_length,
                      [&](int b, int h, int row0, int rows, TileScratch<T>& scratch) {
                        side_lse_rows<T>(p, side, heads, b, h, row0, rows, static_cast<T*>(lse), scratch);
                      });
  };
  // Pass 1: what the divergence pass needs to know first. The JSD's mixture needs both sides normalized; an
  // aggregated teacher needs its heads' LSEs (unless the caller gave them).
  if ((jsd || p.teacher_head_group > 1) && !p.teacher_lse_ready)
    lse_pass(p.teacher, p.num_teacher_heads(), p.lse_teacher);
  if (jsd) lse_pass(p.student, p.num_heads, p.lse_student);
  // Pass 2 (the only one for a plain KL): the divergence.
  for_each_block<T>(p, p.num_heads, p.seqlen_q, kRowBlock, parallel_for, query_length,
                    [&](int b, int h, int row0, int rows, TileScratch<T>& scratch) {
                      if (jsd)
                        jsd_forward<T>(p, b, h, row0, rows, scratch);
                      else
                        attention_kl_forward<T>(p, b, h, row0, rows, scratch);
                    });
}

template <typename T, typename ParallelFor>
void run_attention_kl_backward(const AttentionKLParams& p, ParallelFor&& parallel_for) {
  for_each_block<T>(p, p.num_heads, p.seqlen_q, kRowBlock, parallel_for, query_length,
                    [&](int b, int h, int row0, int rows, TileScratch<T>& scratch) {
                      attention_kl_backward_dq<T>(p, b, h, row0, rows, scratch);
                    });
  auto dk_sweep = [&](DkSides sides, int kv_heads) {
    for_each_block<T>(p, kv_heads, p.seqlen_k, kKeyTile, parallel_for, key_length,
                      [&](int b, int kv_head, int key0, int cols, TileScratch<T>& scratch) {
                        attention_kl_backward_dk<T>(p, b, kv_head, sides, key0, cols, scratch);
                      });
  };
  const bool grouped = p.student.num_kv_heads != p.num_heads || p.teacher.num_kv_heads != p.num_heads;
  if (!grouped) {
    dk_sweep(DkSides::kBoth, p.num_heads);
  } else {
    dk_sweep(DkSides::kStudent, p.student.num_kv_heads);
    if (p.teacher_grad) dk_sweep(DkSides::kTeacher, p.teacher.num_kv_heads);
  }
}

}  // namespace cpu
}  // namespace streamkl

// Backward attention-KL kernels (Ampere path). Both recompute the score tiles from the saved log-sum-exps
// and turn them into score gradients with a score-gradient rule (score_grad_rules.cuh: the forward / reverse KL's
// divergence_score_grads or the JSD's jsd_score_grads from online_kl.h), a template parameter of the policies:
//
//   dQ kernel: a CTA owns a block of query rows and streams the key tiles:  dQ = scale * dS K.
//   dK kernel: a CTA owns a block of keys and streams the query tiles, computing the transposed scores
//              K Q^T directly:                                            dK = scale * dS^T Q.
//
// Every dQ / dK row has exactly one writer (no atomics, deterministic); the price is that both kernels
// recompute the score tiles. The gradient product takes dS straight from the score accumulators (converted
// to the input type, in registers) and the Y tile through ldmatrix.trans.
#pragma once

#include "../kernels/attention_mask.h"
#include "../kernels/attention_params.h"
#include "../kernels/online_kl.h"
#include "device_common.cuh"
#include "score_grad_rules.cuh"
#include "aggregated_teacher.cuh"
#include "query_block.cuh"
#include "score_stream.cuh"
#include "stream_splits.cuh"

namespace streamkl {
namespace cuda {

// The second product of both backward kernels: acc_grad += dS * Y for the student, and the teacher when
// kTeacherGrad. `y_*_transposed` are the [dim, kBlockN] views of the current Y tiles.
template <typename Traits, bool kTeacherGrad, typename TiledMma, typename Acc, typename AccS, typename AccT,
          typename SYs, typename SYt>
__device__ __forceinline__ void accumulate_grad_products(TiledMma tiled_mma, Acc& ds, Acc& dt, AccS& acc_grad_s,
                                                         AccT& acc_grad_t, const SYs& y_s_transposed,
                                                         const SYt& y_t_transposed) {
  using Element = typename Traits::Element;
  Tensor ds_el = convert_fragment<Element>(ds);
  Tensor ds_a = make_tensor(ds_el.data(), acc_as_operand_a(ds_el.layout()));
  gemm_regs_smem<true>(tiled_mma, acc_grad_s, ds_a, y_s_transposed, threadIdx.x);
  if constexpr (kTeacherGrad) {
    Tensor dt_el = convert_fragment<Element>(dt);
    Tensor dt_a = make_tensor(dt_el.data(), acc_as_operand_a(dt_el.layout()));
    gemm_regs_smem<true>(tiled_mma, acc_grad_t, dt_a, y_t_transposed, threadIdx.x);
  }
}

// Write a gradient accumulator [kRows, kDim] (times the side's scale) to rows [row0, row0 + valid_rows) of dK
// (keys = true) or dQ of head h, batch b. row0 counts from the tensor's row 0 of batch entry b: the sequence's
// start row (varlen) plus the block's first row in it. split_slice (split streams, student side only): write to this
// fp32 slice with dK's / dQ's offsets instead (stream_splits.cuh).
template <int kRows, int kDim, typename Element, typename TiledMma, typename Acc>
__device__ __forceinline__ void store_grad_rows(TiledMma tiled_mma, const AttentionSide& side, const Acc& acc, bool keys,
                                                int b, int h, int64_t row0, int valid_rows,
                                                float* split_slice = nullptr) {
  const int64_t row_stride = keys ? side.dk_row_stride : side.dq_row_stride;
  const int64_t offset = b * (keys ? side.dk_batch_stride : side.dq_batch_stride) +
                         h * (keys ? side.dk_head_stride : side.dq_head_stride) + row0 * row_stride;
  const float scale = static_cast<float>(side.scale);
  if (split_slice != nullptr)
    store_rows_f32<kRows, kDim>(tiled_mma, acc, scale, split_slice + offset, row_stride, valid_rows, threadIdx.x);
  else
    store_rows<kRows, kDim>(tiled_mma, acc, scale, static_cast<Element*>(keys ? side.dk : side.dq) + offset,
                            row_stride, valid_rows, threadIdx.x);
}

// Score gradients of a (query rows x keys) tile of the dQ kernels, in place: the recomputed raw scores in acc_s /
// acc_t become (dS_s, dS_t). rows: the thread's per-row inputs; fully_visible: every score of the tile is allowed
// (then no per-element mask arithmetic runs).
template <int kBlockM, int kBlockN, typename ScoreGrads, typename TiledMma, typename Acc>
__device__ __forceinline__ void query_tile_score_grads(const ScoreGrads& rule, const typename ScoreGrads::Row* rows,
                                                       const AttentionMask& mask, bool fully_visible, int row0, int y0,
                                                       float scale_s2, float scale_t2, TiledMma tiled_mma, Acc& acc_s,
                                                       Acc& acc_t) {
  Tensor s = make_tensor(acc_s.data(), acc_as_rows_cols(acc_s.layout()));
  Tensor t = make_tensor(acc_t.data(), acc_as_rows_cols(acc_t.layout()));
  if (fully_visible) {
    CUTE_UNROLL
    for (int i = 0; i < size<0>(s); ++i) {
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) rule.apply(s(i, j), t(i, j), scale_s2, scale_t2, rows[i], true);
    }
  } else {
    Tensor coords = accumulator_coords<kBlockM, kBlockN>(tiled_mma, threadIdx.x);
    CUTE_UNROLL
    for (int i = 0; i < size<0>(s); ++i) {
      const KeyRange keys = mask.keys_for_row(row0 + get<0>(coords(i, 0)));
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j)
        rule.apply(s(i, j), t(i, j), scale_s2, scale_t2, rows[i], keys.contains(y0 + get<1>(coords(i, j))));
    }
  }
}

// Score gradients of a transposed (keys x query rows) tile of the dK kernels, in place: the recomputed raw scores
// K Q^T in acc_s / acc_t become (dS_s^T, dS_t^T). stats: the tile's per-query-row inputs as ScoreGrads::stage laid
// them out (kBlockN rows); key0: the block's first key; y0: the tile's first query row.
template <int kBlockM, int kBlockN, typename ScoreGrads, typename TiledMma, typename Acc>
__device__ __forceinline__ void key_tile_score_grads(const ScoreGrads& rule, const float* stats, const AttentionMask& mask,
                                                     bool fully_visible, int key0, int y0, float scale_s2,
                                                     float scale_t2, TiledMma tiled_mma, Acc& acc_s, Acc& acc_t) {
  Tensor s = make_tensor(acc_s.data(), acc_as_rows_cols(acc_s.layout()));  // (keys, queries)
  Tensor t = make_tensor(acc_t.data(), acc_as_rows_cols(acc_t.layout()));
  Tensor coords = accumulator_coords<kBlockM, kBlockN>(tiled_mma, threadIdx.x);
  if (fully_visible) {
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) {
      const typename ScoreGrads::Row r = ScoreGrads::unstage(stats, get<1>(coords(0, j)), kBlockN);
      CUTE_UNROLL
      for (int i = 0; i < size<0>(s); ++i) rule.apply(s(i, j), t(i, j), scale_s2, scale_t2, r, true);
    }
  } else {
    CUTE_UNROLL
    for (int j = 0; j < size<1>(s); ++j) {
      const int c = get<1>(coords(0, j));
      const typename ScoreGrads::Row r = ScoreGrads::unstage(stats, c, kBlockN);
      const KeyRange keys = mask.keys_for_row(y0 + c);
      const bool row_in_bounds = y0 + c < mask.seqlen_q;
      CUTE_UNROLL
      for (int i = 0; i < size<0>(s); ++i)
        rule.apply(s(i, j), t(i, j), scale_s2, scale_t2, r, row_in_bounds && keys.contains(key0 + get<0>(coords(i, j))));
    }
  }
}

// The per-row gradient inputs of the thread's rows of query block row0 (rows past the sequence: none()).
template <int kBlockM, int kBlockN, int kThreadRows, typename ScoreGrads, typename TiledMma>
__device__ __forceinline__ void load_query_row_inputs(const ScoreGrads& rule, const AttentionKLParams& p,
                                                      int seqlen_q, int b, int h, int row0, TiledMma tiled_mma,
                                                      typename ScoreGrads::Row (&rows)[kThreadRows]) {
  Tensor coords = accumulator_coords<kBlockM, kBlockN>(tiled_mma, threadIdx.x);
  CUTE_UNROLL
  for (int i = 0; i < kThreadRows; ++i) {
    const int row = row0 + get<0>(coords(i, 0));
    rows[i] = row < seqlen_q ? rule.load(p, p.row_index(b, h, row)) : rule.none();
  }
}

template <typename Traits, bool kTeacherGrad>
struct GradAccumulators {
  typename Traits::TiledMma tiled_mma;
  decltype(partition_fragment_C(typename Traits::TiledMma{}, Shape<Int<Traits::kBlockM>, Int<Traits::kDimS>>{})) s;
  decltype(partition_fragment_C(typename Traits::TiledMma{},
                                Shape<Int<Traits::kBlockM>, Int<kTeacherGrad ? Traits::kDimT : 16>>{})) t;
  __device__ void clear_all() {
    clear(s);
    clear(t);
  }

  // Write the accumulated gradients (times each side's scale) to rows [row0, row0 + valid_rows) of dK
  // (keys = true) or dQ of head h, batch b; the teacher's only with kTeacherGrad. row0 counts from the
  // tensor's row 0 of batch entry b: the sequence's start row (varlen) plus the block's first row in it.
  // Split streams write the student's partial gradients to the CTA's fp32 slice of the launcher's workspace (the
  // launcher never splits with teacher gradients).
  __device__ void store(const AttentionKLParams& p, bool keys, int b, int h, int64_t row0, int valid_rows) const {
    float* split_slice = p.stream_splits > 1 ? split_grad_slice(p, keys) : nullptr;
    store_side<Traits::kDimS>(p.student, s, keys, b, h, row0, valid_rows, split_slice);
    if constexpr (kTeacherGrad) store_side<Traits::kDimT>(p.teacher, t, keys, b, h, row0, valid_rows, nullptr);
  }

  template <int kDim, typename Acc>
  __device__ void store_side(const AttentionSide& side, const Acc& acc, bool keys, int b, int h, int64_t row0,
                             int valid_rows, float* split_slice) const {
    store_grad_rows<Traits::kBlockM, kDim, typename Traits::Element>(tiled_mma, side, acc, keys, b, h, row0,
                                                                      valid_rows, split_slice);
  }
};

// What both backward policies hold: the mask, the base-2 score scales, the shared-memory plan and the
// gradient accumulators of the CTA's X rows, set up the same way by both kernels.
template <typename Traits, bool kTeacherGrad>
struct GradPolicyBase {
  AttentionMask mask;
  float scale_s2, scale_t2;
  const SmemPlan<Traits>* smem;
  GradAccumulators<Traits, kTeacherGrad> grads;

  // seq: the CTA's sequence (its lengths set the mask).
  __device__ void init(const AttentionKLParams& p, const AttentionKLParams::Sequence& seq,
                       const SmemPlan<Traits>& plan) {
    mask = AttentionMask::from_params(p, seq.seqlen_q, seq.seqlen_k);
    scale_s2 = static_cast<float>(p.student.scale) * kLog2e;
    scale_t2 = static_cast<float>(p.teacher.scale) * kLog2e;
    smem = &plan;
    grads.clear_all();
  }
};

// ---------------------------------------------------------------------------------------------------- dQ
template <typename Traits, bool kTeacherGrad, typename ScoreGrads>
struct DqPolicy : GradPolicyBase<Traits, kTeacherGrad> {
  using Base = GradPolicyBase<Traits, kTeacherGrad>;
  using Base::grads, Base::mask, Base::scale_s2, Base::scale_t2, Base::smem;
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  static constexpr int kThreadRows = 2 * (kBlockM / (16 * Traits::kNWarps));
  int row0;
  ScoreGrads score_grads;
  typename ScoreGrads::Row rows[kThreadRows];

  __device__ void stage_stats(int, float*) {}

  template <typename TiledMma, typename Acc>
  __device__ void consume(TiledMma tiled_mma, Acc& acc_s, Acc& acc_t, int y0, int stage) {
    const int row_end = min_of(row0 + kBlockM, mask.seqlen_q);
    query_tile_score_grads<kBlockM, kBlockN>(score_grads, rows, mask,
                                             mask.block_fully_visible(row0, row_end, y0, y0 + kBlockN), row0, y0,
                                             scale_s2, scale_t2, tiled_mma, acc_s, acc_t);
    accumulate_grad_products<Traits, kTeacherGrad>(tiled_mma, acc_s, acc_t, grads.s, grads.t,
                                                   smem->y_s_transposed(stage), smem->y_t_transposed(stage));
  }
};

template <typename Traits, bool kTeacherGrad, typename ScoreGrads>
__global__ void __launch_bounds__(Traits::kNThreads) attention_kl_bwd_dq_kernel(const AttentionKLParams p) {
  extern __shared__ __align__(128) char smem_raw[];
  const SmemPlan<Traits> smem(smem_raw);
  const QueryBlock blk = QueryBlock::of_this_cta<Traits>(p);
  DqPolicy<Traits, kTeacherGrad, ScoreGrads> policy;
  policy.init(p, blk.seq, smem);
  policy.row0 = blk.row0;
  policy.score_grads.init(p);
  load_query_row_inputs<Traits::kBlockM, Traits::kBlockN>(policy.score_grads, p, blk.seq.seqlen_q, blk.b, blk.h,
                                                          blk.row0, policy.grads.tiled_mma, policy.rows);
  stream_query_block<Traits>(policy, smem, p, blk);
  // The sequence is looked up again rather than kept live across the main loop (register pressure).
  const AttentionKLParams::Sequence out_seq = p.sequence(blk.b);
  policy.grads.store(p, /*keys=*/false, blk.b, blk.h, out_seq.q_start + blk.row0, out_seq.seqlen_q - blk.row0);
}

// ---------------------------------------------------------------------------------------------------- dK
template <typename Traits, bool kTeacherGrad, typename ScoreGrads>
struct DkPolicy : GradPolicyBase<Traits, kTeacherGrad> {
  static_assert(ScoreGrads::kRowStats <= Traits::kRowStats, "the traits' stats buffer must hold the rule's rows");
  using Base = GradPolicyBase<Traits, kTeacherGrad>;
  using Base::grads, Base::mask, Base::scale_s2, Base::scale_t2, Base::smem;
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  int key0;  // first key of the CTA (X rows are keys, Y rows are queries)
  ScoreGrads score_grads;
  const AttentionKLParams* params;
  int b, h;

  // Stage the gradient inputs of the tile's query rows: [ScoreGrads::kRowStats][kBlockN] floats.
  __device__ void stage_stats(int y0, float* stats) {
    for (int c = threadIdx.x; c < kBlockN; c += Traits::kNThreads) {
      const int row = y0 + c;
      ScoreGrads::stage(row < mask.seqlen_q ? score_grads.load(*params, params->row_index(b, h, row))
                                            : score_grads.none(),
                        stats, c, kBlockN);
    }
  }

  template <typename TiledMma, typename Acc>
  __device__ void consume(TiledMma tiled_mma, Acc& acc_s, Acc& acc_t, int y0, int stage) {
    // The unclipped tile end: a tile reaching past seqlen_k is never "fully visible", so its zero-filled keys
    // go through the mask and get dS = 0 (the fused dQ reads dS for every key of the tile).
    key_tile_score_grads<kBlockM, kBlockN>(score_grads, smem->stats(stage), mask,
                                           mask.block_fully_visible(y0, y0 + kBlockN, key0, key0 + kBlockM), key0, y0,
                                           scale_s2, scale_t2, tiled_mma, acc_s, acc_t);
    accumulate_grad_products<Traits, kTeacherGrad>(tiled_mma, acc_s, acc_t, grads.s, grads.t,
                                                   smem->y_s_transposed(stage), smem->y_t_transposed(stage));
    if constexpr (Traits::kFusedDq) accumulate_student_dq(tiled_mma, acc_s, y0);
  }

  // Fused dQ: dQ[y0 + r] += sum_c dS[r][c] * K[key0 + c] for the tile's query rows r (unscaled; the
  // workspace is scaled and converted afterwards). dS^T (this thread's accumulator) goes through shared
  // memory so it can be read transposed as the A operand; K is the CTA's X tile, read transposed as B.
  template <typename TiledMma, typename Acc>
  __device__ void accumulate_student_dq(TiledMma tiled_mma, const Acc& ds_t, int y0) {
    using Element = typename Traits::Element;
    using DsTile = typename Traits::DsTile;
    Tensor ds_el = convert_fragment<Element>(ds_t);
    Tensor ds_rc = make_tensor(ds_el.data(), acc_as_rows_cols(ds_el.layout()));
    Tensor coords = accumulator_coords<kBlockM, kBlockN>(tiled_mma, threadIdx.x);
    Tensor s_ds = make_tensor(make_smem_ptr(smem->ds), typename DsTile::Layout{});
    CUTE_UNROLL
    for (int i = 0; i < size<0>(ds_rc); ++i) {
      CUTE_UNROLL
      for (int j = 0; j < size<1>(ds_rc); ++j) s_ds(get<0>(coords(i, j)), get<1>(coords(i, j))) = ds_rc(i, j);
    }
    __syncthreads();
    Tensor acc_dq = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<Traits::kDimS>>{});
    clear(acc_dq);
    Tensor s_ds_transposed = make_tensor(make_smem_ptr(smem->ds), typename DsTile::LayoutTransposed{});
    Tensor s_k_transposed = make_tensor(make_smem_ptr(smem->x_s), typename Traits::XTileS::LayoutTransposed{});
    gemm_smem_smem<true, true>(tiled_mma, acc_dq, s_ds_transposed, s_k_transposed, threadIdx.x);

    // The workspace has the per-row outputs' row order with kDimS floats per row; the rows of one (sequence,
    // head) are evenly spaced in both layouts (1 apart padded, num_heads apart varlen).
    const int64_t first_row = params->row_index(b, h, 0);
    const int64_t row_step = params->row_index(b, h, 1) - first_row;
    float* dq_accum = static_cast<float*>(params->dq_accum) + first_row * Traits::kDimS;
    Tensor dq_rc = make_tensor(acc_dq.data(), acc_as_rows_cols(acc_dq.layout()));
    Tensor dq_coords = accumulator_coords<kBlockN, Traits::kDimS>(tiled_mma, threadIdx.x);
    CUTE_UNROLL
    for (int i = 0; i < size<0>(dq_rc); ++i) {
      const int row = y0 + get<0>(dq_coords(i, 0));
      if (row >= mask.seqlen_q) continue;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(dq_rc); ++j)
        atomicAdd(dq_accum + row * row_step * Traits::kDimS + get<1>(dq_coords(i, j)), dq_rc(i, j));
    }
  }
};

// A CTA owns a block of keys of one student key head and loops over the query heads that read it (one
// head without GQA), accumulating dK over the group in registers: one writer per dK row, no atomics. The
// teacher's keys are those of the teacher key head each query head reads; teacher gradients need both
// sides to group heads the same way (checked by the host wrapper), so the teacher's dK rows also have one
// writer.
template <typename Traits, bool kTeacherGrad, typename ScoreGrads>
__global__ void __launch_bounds__(Traits::kNThreads) attention_kl_bwd_dk_kernel(const AttentionKLParams p) {
  using Element = typename Traits::Element;
  extern __shared__ __align__(128) char smem_raw[];
  const SmemPlan<Traits> smem(smem_raw);
  const BlockAndSplit cta = block_and_split(p);
  const int n_block = cta.block;
  const int kv_head = blockIdx.y, b = blockIdx.z;
  const int key0 = n_block * Traits::kBlockM;
  const int group = p.num_heads / p.student.num_kv_heads;
  // The grid is sized by the longest sequence (varlen). A block past this sequence's keys has an empty row
  // range (rows_for_keys of no key), so it streams no tile and stores nothing (no early return: see QueryBlock,
  // query_block.cuh).
  const AttentionKLParams::Sequence seq = p.sequence(b);

  DkPolicy<Traits, kTeacherGrad, ScoreGrads> policy;
  policy.init(p, seq, smem);
  policy.key0 = key0;
  policy.score_grads.init(p);
  policy.params = &p;
  policy.b = b;

  // X = keys, Y = queries of each head of the group.
  const int key_end = min_of(key0 + Traits::kBlockM, seq.seqlen_k);
  const KeyRange rows = split_part<Traits::kBlockN>(p, policy.mask.rows_for_keys(key0, key_end), cta.split);
  for (int g = 0; g < group; ++g) {
    const int h = kv_head * group + g;
    policy.h = h;
    if (g > 0) __syncthreads();  // the previous head's last tile is read; X may be overwritten
    score_stream<Traits>(policy, smem, key_block_operands<Element>(p.student, p.num_heads, b, h, seq, key0),
                         teacher_block<Traits, true>(p, b, h, seq, key0), seq.seqlen_k - key0,
                         rows.begin, rows.end, seq.seqlen_q);
  }
  const AttentionKLParams::Sequence out_seq = p.sequence(b);  // as in the dQ kernel
  policy.grads.store(p, /*keys=*/true, b, kv_head, out_seq.k_start + key0, out_seq.seqlen_k - key0);
}

}  // namespace cuda
}  // namespace streamkl

// The main loop shared by every Ampere-path attention-KL kernel.
//
// A CTA owns a block of kBlockM rows of X for both sides (student, teacher), loaded once into shared
// memory, and streams tiles of kBlockN rows of Y through a two-stage cp.async pipeline. For each Y tile it
// computes the two score tiles X_s Y_s^T and X_t Y_t^T into register accumulators and hands them to the
// kernel's policy (the online KL reduction, or a gradient product). Policies see:
//     policy.stage_stats(y0, float* smem_stats)    optional per-Y-row data for the tile at y0
//     policy.consume(mma, acc_s, acc_t, y0, stage) one pair of score tiles
//
// Layouts: a CTA works inside one sequence b, whose start rows and lengths come from p.sequence(b) (padded:
// start 0 and the struct's lengths, batch strides locate b; varlen: cu_seqlens, batch strides 0). Row and key
// indices (row0, y0, the mask's) count from the sequence's start, so the loop is the same for both layouts;
// the start rows enter once, in the operand pointers (HeadRows) and in the gradient stores.
#pragma once

#include <cute/tensor.hpp>

#include "../kernels/attention_params.h"
#include "cute_helpers.cuh"

namespace streamkl {
namespace cuda {

using namespace cute;

// Shared-memory carve-up of one CTA, in the order of KernelTraits::kSmemBytes. Stage buffers are found by
// arithmetic on the stage index (never by indexing a pointer array with it, which would put the array in
// local memory).
template <typename Traits>
struct SmemPlan {
  using Element = typename Traits::Element;
  static constexpr int kStageElements =
      Traits::YTileS::kElements + Traits::YTileT::kElements + Traits::kXTileTPerStage;
  Element* x_s;
  Element* x_t;  // the teacher's X block when it is resident (not Traits::kAggregatedTeacher)
  Element* y_base;
  float* stats_base;
  Element* ds;  // dS^T tile of the fused backward (Traits::kFusedDq)

  __device__ explicit SmemPlan(char* raw) {
    x_s = reinterpret_cast<Element*>(raw);
    x_t = x_s + Traits::XTileS::kElements;
    y_base = x_t + Traits::kXTileTResident;
    stats_base = reinterpret_cast<float*>(y_base + Traits::kStages * kStageElements);
    ds = reinterpret_cast<Element*>(stats_base + Traits::kStages * Traits::kBlockN * Traits::kRowStats);
  }

  __device__ Element* y_s(int stage) const { return y_base + stage * kStageElements; }
  __device__ Element* y_t(int stage) const { return y_s(stage) + Traits::YTileS::kElements; }
  // The teacher head's X block streamed with the stage's Y tile (Traits::kAggregatedTeacher only).
  __device__ Element* x_t_staged(int stage) const { return y_t(stage) + Traits::YTileT::kElements; }
  __device__ float* stats(int stage) const { return stats_base + stage * Traits::kBlockN * Traits::kRowStats; }

  __device__ auto y_s_tile(int stage) const { return make_tensor(make_smem_ptr(y_s(stage)), typename Traits::YTileS::Layout{}); }
  __device__ auto y_t_tile(int stage) const { return make_tensor(make_smem_ptr(y_t(stage)), typename Traits::YTileT::Layout{}); }
  __device__ auto y_s_transposed(int stage) const {
    return make_tensor(make_smem_ptr(y_s(stage)), typename Traits::YTileS::LayoutTransposed{});
  }
  __device__ auto y_t_transposed(int stage) const {
    return make_tensor(make_smem_ptr(y_t(stage)), typename Traits::YTileT::LayoutTransposed{});
  }
};

// Where the X block and the Y rows of one side live in global memory.
template <typename Element>
struct StreamOperands {
  const Element* x;   // first row of this CTA's X block
  int64_t x_stride;
  const Element* y;   // row 0 of Y
  int64_t y_stride;
};

// Row 0 of the queries of head h and of the keys that head reads, on one side of sequence b (GQA/MQA:
// contiguous groups of query heads share a key head). The sequence's start rows are 0 in the padded layout
// (its batch strides locate the sequence) and cu_seqlens[b] in the varlen one (batch strides 0), so one
// formula serves both.
template <typename Element>
struct HeadRows {
  const Element* q;
  const Element* k;
  __device__ __forceinline__ HeadRows(const AttentionSide& side, int num_heads, int b, int h,
                                      const AttentionKLParams::Sequence& seq) {
    const int kv_head = h / (num_heads / side.num_kv_heads);
    q = static_cast<const Element*>(side.q) + b * side.q_batch_stride + seq.q_start * side.q_row_stride +
        h * side.q_head_stride;
    k = static_cast<const Element*>(side.k) + b * side.k_batch_stride + seq.k_start * side.k_row_stride +
        kv_head * side.k_head_stride;
  }
};

// One side's operands for a CTA that owns query rows [row0, row0 + kBlockM) of (sequence b, head h) and
// streams the sequence's keys.
template <typename Element>
__device__ __forceinline__ StreamOperands<Element> query_block_operands(const AttentionSide& side, int num_heads,
                                                                       int b, int h,
                                                                       const AttentionKLParams::Sequence& seq,
                                                                       int row0) {
  const HeadRows<Element> rows(side, num_heads, b, h, seq);
  return StreamOperands<Element>{rows.q + row0 * side.q_row_stride, side.q_row_stride, rows.k, side.k_row_stride};
}

// One side's operands for a CTA that owns keys [key0, key0 + kBlockM) of sequence b of the key head that query
// head h reads, and streams the sequence's query rows of head h.
template <typename Element>
__device__ __forceinline__ StreamOperands<Element> key_block_operands(const AttentionSide& side, int num_heads, int b,
                                                                     int h, const AttentionKLParams::Sequence& seq,
                                                                     int key0) {
  const HeadRows<Element> rows(side, num_heads, b, h, seq);
  return StreamOperands<Element>{rows.k + key0 * side.k_row_stride, side.k_row_stride, rows.q, side.q_row_stride};
}

template <typename Traits, typename Policy>
__device__ __forceinline__ void score_stream(Policy& policy, const SmemPlan<Traits>& smem,
                                             const StreamOperands<typename Traits::Element>& student,
                                             const StreamOperands<typename Traits::Element>& teacher, int x_valid_rows,
                                             int y_begin, int y_end, int y_rows_total) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  const int tid = threadIdx.x;
  issue_tile_load<typename Traits::XTileS>(student.x, student.x_stride, smem.x_s, x_valid_rows, tid);
  issue_tile_load<typename Traits::XTileT>(teacher.x, teacher.x_stride, smem.x_t, x_valid_rows, tid);

  const int n_tiles = KeyRange{y_begin, y_end}.tile_count(kBlockN);
  auto load_y = [&](int tile, int stage) {
    const int y0 = y_begin + tile * kBlockN;
    issue_tile_load<typename Traits::YTileS>(student.y + y0 * student.y_stride, student.y_stride, smem.y_s(stage),
                                             y_rows_total - y0, tid);
    issue_tile_load<typename Traits::YTileT>(teacher.y + y0 * teacher.y_stride, teacher.y_stride, smem.y_t(stage),
                                             y_rows_total - y0, tid);
  };
  if (n_tiles > 0) load_y(0, 0);
  cp_async_fence();

  typename Traits::TiledMma tiled_mma;
  Tensor x_s = make_tensor(make_smem_ptr(smem.x_s), typename Traits::XTileS::Layout{});
  Tensor x_t = make_tensor(make_smem_ptr(smem.x_t), typename Traits::XTileT::Layout{});
  // Used only when Traits::kXInRegisters (otherwise the compiler drops them).
  Tensor x_s_regs = operand_a_fragment(tiled_mma, x_s, tid);
  Tensor x_t_regs = operand_a_fragment(tiled_mma, x_t, tid);
  // One barrier per tile: passing it means every warp has finished the previous tile, so the load of the next
  // tile, issued after it, may overwrite the previous tile's stage (two stages).
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile % Traits::kStages;
    const int y0 = y_begin + tile * kBlockN;
    cp_async_wait<0>();
    policy.stage_stats(y0, smem.stats(stage));
    __syncthreads();
    if (tile + 1 < n_tiles) load_y(tile + 1, (tile + 1) % Traits::kStages);
    cp_async_fence();

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_t = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    clear(acc_t);
    if constexpr (Traits::kXInRegisters) {
      if (tile == 0) {  // X arrived with the first Y tile
        load_operand_a(tiled_mma, x_s_regs, x_s, tid);
        load_operand_a(tiled_mma, x_t_regs, x_t, tid);
      }
      gemm_regs_smem<false>(tiled_mma, acc_s, x_s_regs, smem.y_s_tile(stage), tid);
      gemm_regs_smem<false>(tiled_mma, acc_t, x_t_regs, smem.y_t_tile(stage), tid);
    } else {
      gemm_smem_smem(tiled_mma, acc_s, x_s, smem.y_s_tile(stage), tid);
      gemm_smem_smem(tiled_mma, acc_t, x_t, smem.y_t_tile(stage), tid);
    }
    policy.consume(tiled_mma, acc_s, acc_t, y0, stage);
  }
  cp_async_wait<0>();  // nothing may stay in flight when a CTA that streamed no tile exits
}

// Coordinates (row, col) inside a [kRows, kCols] tile of each element of this thread's accumulator,
// viewed as (rows, cols) like acc_as_rows_cols.
template <int kRows, int kCols, typename TiledMma>
__device__ __forceinline__ auto accumulator_coords(TiledMma tiled_mma, int tid) {
  Tensor c = tiled_mma.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kCols>>{}));
  return make_tensor(c.data(), acc_as_rows_cols(c.layout()));
}

// Visit an accumulator [kRows, kCols] (fp32, or converted) as (row, col, value at col, value at col + 1) for each of
// this thread's column pairs (adjacent in the MMA layout), rows at or past valid_rows skipped.
template <int kRows, int kCols, typename TiledMma, typename Acc, typename Visit>
__device__ __forceinline__ void for_each_row_pair(TiledMma tiled_mma, const Acc& acc, int valid_rows, int tid,
                                                  Visit&& visit) {
  Tensor rc = make_tensor(acc.data(), acc_as_rows_cols(acc.layout()));
  Tensor coords = accumulator_coords<kRows, kCols>(tiled_mma, tid);
  CUTE_UNROLL
  for (int i = 0; i < size<0>(rc); ++i) {
    const int row = get<0>(coords(i, 0));
    if (row >= valid_rows) continue;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(rc); j += 2) visit(row, get<1>(coords(i, j)), rc(i, j), rc(i, j + 1));
  }
}

// Write an fp32 accumulator [kRows, kCols] (times `scale`) as Element rows to global memory; rows at or
// past valid_rows are skipped. Column pairs are stored as one word.
template <int kRows, int kCols, typename Element, typename TiledMma, typename Acc>
__device__ __forceinline__ void store_rows(TiledMma tiled_mma, const Acc& acc, float scale, Element* out,
                                           int64_t row_stride, int valid_rows, int tid) {
  for_each_row_pair<kRows, kCols>(tiled_mma, acc, valid_rows, tid, [&](int row, int col, float v0, float v1) {
    Element pair[2] = {static_cast<Element>(v0 * scale), static_cast<Element>(v1 * scale)};
    *reinterpret_cast<uint32_t*>(out + row * row_stride + col) = *reinterpret_cast<const uint32_t*>(pair);
  });
}

// The same as fp32 rows (a split stream's partial gradients, stream_splits.cuh); column pairs as one float2.
template <int kRows, int kCols, typename TiledMma, typename Acc>
__device__ __forceinline__ void store_rows_f32(TiledMma tiled_mma, const Acc& acc, float scale, float* out,
                                               int64_t row_stride, int valid_rows, int tid) {
  for_each_row_pair<kRows, kCols>(tiled_mma, acc, valid_rows, tid, [&](int row, int col, float v0, float v1) {
    *reinterpret_cast<float2*>(out + row * row_stride + col) = make_float2(v0 * scale, v1 * scale);
  });
}

}  // namespace cuda
}  // namespace streamkl

// Head-aggregated teachers on the Hopper path (sm_90a): the warp-specialized stream of (Y tile, teacher head) items.
// The math and the Ampere path's stream are in aggregated_teacher.cuh; the kernels are the Hopper forward, JSD-sums,
// dQ and dK kernels, which pick this stream when their traits say kAggregatedTeacher.
//
// Each stage holds one item: its teacher head's X block and Y tile and, with the tile's last head, the student's Y
// tile, all moved by TMA (one thread). The MMA warpgroups run the teacher head's product, add its probabilities to a
// register tile, and at the tile's last head run the student's product with it (same batch) and then the policy
// (forward) or the score gradients and the gradient product (dQ, dK).
//
// The head's LSEs: in the query-block kernels each MMA thread needs two (its rows of the X block), loaded from global
// memory (L2) while the products run. In the dK kernel they belong to the Y tile's 64 query rows (16 per thread), so
// warp 1 of the producer warpgroup stages them in the stage, with the tile's per-row gradient inputs at its last head
// as in the plain dK kernel, and every MMA thread frees the stage itself: one lane per warp after a __syncwarp is
// enough by the PTX memory model, but compute-sanitizer's racecheck reported the staged LSEs' plain loads as racing
// with the next write (release_stream_tile). Torch-free.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "aggregated_teacher.cuh"
#include "tma_stream_sm90.cuh"

namespace streamkl {
namespace cuda {

using namespace cute;

// Where a CTA's aggregated stream sits in the TMA coordinate space besides its heads (the teacher's): the student X
// block's head, the descriptors' batch, the first X row and the first Y row.
struct AggregatedStreamCoords {
  int x_head_s, batch, x_row, y_row;
};

// Producer thread: the student's X block once, then per item its teacher head's X block (queries, or keys) and Y
// tile, and with the tile's last head the student's Y tile; each item completes on its stage's full barrier.
// `teacher`: the AggregatedTeacher of the stream's first student head (an item's group adds to it).
template <typename Traits, typename Teacher>
__device__ __forceinline__ void produce_aggregated_items(const AttentionKLParams& p, const StreamTmaLoads<Traits>& tma,
                                                         const StreamSmemSm90<Traits>& smem, const Teacher& teacher,
                                                         const AggregatedStreamCoords& c, const AggregatedItems& items) {
  using Smem = StreamSmemSm90<Traits>;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kDimS = Traits::kDimS, kDimT = Traits::kDimT;
  constexpr int kStudentYBytes = Traits::kStageBytes - Traits::kTeacherStageBytes;
  constexpr bool kKeysAsX = Teacher::keys_as_x;
  Barrier::arrive_and_expect_tx(smem.x_full, Traits::kXBytes);
  tma_load_tile<kBlockM, kDimS>(tma.x_s, tma.x_s_shape, c.x_head_s, c.batch, c.x_row, 0,
                                Smem::template tile<typename Traits::XTileS>(smem.x_s), *smem.x_full);
  const int student_group = p.num_heads / p.student.num_kv_heads;
  for (int i = 0; i < items.count(); ++i) {
    const AggregatedItems::Item it = items[i];
    const int stage = i % Traits::kStages;
    const Teacher t = teacher.for_group(it.group);
    const int t_query = t.query_head(it.head), t_key = t.key_head(it.head);
    wait_for_free_stage(smem, i);
    Barrier::arrive_and_expect_tx(&smem.full[stage], Traits::kTeacherStageBytes + (it.last_head ? kStudentYBytes : 0));
    tma_load_tile<kBlockM, kDimT>(tma.x_t, tma.x_t_shape, kKeysAsX ? t_key : t_query, c.batch, c.x_row, 0,
                                  Smem::template tile<typename Traits::XTileT>(smem.x_t_at(stage)), smem.full[stage]);
    tma_load_tile<kBlockN, kDimT>(tma.y_t, tma.y_t_shape, kKeysAsX ? t_query : t_key, c.batch, c.y_row, it.tile,
                                  Smem::template tile<typename Traits::YTileT>(smem.y_t(stage)), smem.full[stage]);
    if (it.last_head)
      tma_load_tile<kBlockN, kDimS>(tma.y_s, tma.y_s_shape, kKeysAsX ? t.h : t.h / student_group, c.batch, c.y_row,
                                    it.tile, Smem::template tile<typename Traits::YTileS>(smem.y_s(stage)),
                                    smem.full[stage]);
  }
}

// The dK kernel's statistics warp (warp 1 of the producer warpgroup): per item, the base-2 LSEs of its teacher head for
// the Y tile's query rows from y_begin (AggregatedTeacher::lse2), and with the tile's last head
// stage_rule(stats, student head, tile), the tile's per-row gradient inputs; one arrival per lane on the stage's full
// barrier. `teacher` as in produce_aggregated_items.
template <typename Traits, typename Teacher, typename StageRule>
__device__ __forceinline__ void produce_aggregated_tile_inputs(const StreamSmemSm90<Traits>& smem,
                                                               const Teacher& teacher, const AggregatedItems& items,
                                                               int y_begin, int lane, StageRule&& stage_rule) {
  constexpr int kBlockN = Traits::kBlockN;
  for (int i = 0; i < items.count(); ++i) {
    const AggregatedItems::Item it = items[i];
    const int stage = i % Traits::kStages;
    const Teacher t = teacher.for_group(it.group);
    wait_for_free_stage(smem, i);
    float* lse = smem.teacher_lse(stage);
    for (int c = lane; c < kBlockN; c += 32) lse[c] = t.lse2(it.head, y_begin + it.tile * kBlockN + c);
    if (it.last_head) stage_rule(smem.stats(stage), t.h, it.tile);
    arrive_after_warp_accesses(&smem.full[stage], /*one_per_warp=*/false);
  }
}

// MMA warpgroups, item i (its Y tile from y0): wait for its stage, run its teacher head's product (and the student's
// at the tile's last head) in one batch, read the head's LSEs while it runs, then add the head's probabilities to
// sum_p. The stage stays held; the caller releases it (per thread in the dK kernel, which read staged LSEs).
template <typename Traits, typename Teacher, typename Acc>
__device__ __forceinline__ void aggregate_item(const Teacher& teacher, const StreamSmemSm90<Traits>& smem, int i,
                                               const AggregatedItems::Item& it, int y0, Acc& acc_s, Acc& acc_t,
                                               Acc& sum_p) {
  using Smem = StreamSmemSm90<Traits>;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  typename Traits::TiledMma score_mma;
  const int stage = i % Traits::kStages;
  wait_for_stream_tile(smem, i);
  warpgroup_products_begin(acc_s, acc_t);
  warpgroup_gemm_ss(score_mma, acc_t, Smem::template tile<typename Traits::XTileT>(smem.x_t_at(stage)),
                    Smem::template tile<typename Traits::YTileT>(smem.y_t(stage)), threadIdx.x);
  if (it.last_head)
    warpgroup_gemm_ss(score_mma, acc_s, Smem::template tile<typename Traits::XTileS>(smem.x_s),
                      Smem::template tile<typename Traits::YTileS>(smem.y_s(stage)), threadIdx.x);
  warpgroup_commit_batch();
  constexpr int kLse = Teacher::template lse_count<kBlockM, kBlockN, typename Traits::TiledMma>();
  float lse[kLse];
  if constexpr (Teacher::keys_as_x) {
    Tensor coords = accumulator_coords<kBlockM, kBlockN>(score_mma, threadIdx.x);
    const float* staged = smem.teacher_lse(stage);
    CUTE_UNROLL
    for (int k = 0; k < kLse; ++k) lse[k] = staged[get<1>(coords(0, k))];
  } else {
    teacher.template load_lse<kBlockM, kBlockN>(score_mma, it.head, y0, lse);  // kept before the wait (its clobber)
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_s);
  warpgroup_fence_operand(acc_t);
  teacher.add_probabilities(acc_t, sum_p, it.head, lse);
}

// The three register tiles of an aggregated stream (student scores, one teacher head's scores, the heads' summed
// probabilities), defined before any product is in flight (C7515).
template <typename Traits>
struct AggregatedTiles {
  using Acc = decltype(partition_fragment_C(typename Traits::TiledMma{},
                                            Shape<Int<Traits::kBlockM>, Int<Traits::kBlockN>>{}));
  Acc acc_s, acc_t, sum_p;
  __device__ AggregatedTiles() {
    clear(acc_s);
    clear(acc_t);
    clear(sum_p);
  }
};

// The producer warpgroup's role in a query-block kernel (forward, JSD sums, dQ) with an aggregated teacher: one thread
// issues the copies of the block's items (query rows from row0 of sequence b of student head h, its n_tiles key tiles
// from key_begin).
template <typename Traits>
__device__ __forceinline__ void run_aggregated_query_producer(const AttentionKLParams& p,
                                                              const StreamTmaLoads<Traits>& tma,
                                                              const StreamSmemSm90<Traits>& smem, int b, int h,
                                                              const AttentionKLParams::Sequence& seq, int row0,
                                                              int key_begin, int n_tiles) {
  if (n_tiles == 0 || threadIdx.x != Traits::kNMmaThreads) return;
  const int batch = p.cu_seqlens_q != nullptr ? 0 : b;  // varlen: one packed sequence in the descriptors
  produce_aggregated_items(p, tma, smem, teacher_block<Traits, /*kKeysAsX=*/false>(p, b, h, seq, row0),
                           AggregatedStreamCoords{h, batch, static_cast<int>(seq.q_start) + row0,
                                                  static_cast<int>(seq.k_start) + key_begin},
                           AggregatedItems{n_tiles, p.teacher_head_group, 1});
}

}  // namespace cuda
}  // namespace streamkl

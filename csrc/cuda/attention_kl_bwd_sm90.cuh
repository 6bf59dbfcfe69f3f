// Warp-specialized Hopper (sm_90a) dQ and dK kernels of the attention-KL backward (student gradients only): the producer
// warpgroup moves the query block once and the key tiles through the stages with TMA (tma_stream_sm90.cuh, the
// forward's producer); each MMA warpgroup recomputes its 64 rows' score tiles on wgmma, turns them into score
// gradients with the divergence's rule (query_tile_score_grads, shared with the Ampere-path dQ kernel) and adds
// dQ_s += dS_s K_s with dS_s from registers and K_s from the same stage, read transposed (MN-major B). The dK
// kernel is the same loop with the roles of queries and keys swapped (X = a block of keys, Y = query tiles of every
// head of the GQA group) and dK_s += dS_s^T Q_s; its producer warpgroup also stages each query tile's per-row
// inputs (LSEs, divergence, incoming gradient) in shared memory.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "attention_kl_bwd.cuh"
#include "fused_dq_sm90.cuh"
#include "kernel_traits_sm90.cuh"
#include "query_block_sm90.cuh"
#include "stream_splits.cuh"
#include "tma_stream_sm90.cuh"
#include "warpgroup_mma.cuh"

namespace streamkl {
namespace cuda {

using namespace cute;

template <typename Traits, typename ScoreGrads>
struct DqStateSm90 {
  static constexpr int kThreadRows = 2 * (Traits::kBlockM / (16 * Traits::kNWarps));
  KeyRange full_keys;  // keys every row of the block sees (a tile inside needs no mask arithmetic)
  float scale_s2, scale_t2;
  ScoreGrads score_grads;
  typename ScoreGrads::Row rows[kThreadRows];
};

// acc_grad += dS_s Y_s: the student's score gradients (acc_s, converted, from registers) times the stage's Y_s tile
// read transposed, waited for (the stage's last reader).
template <typename Traits, typename Acc, typename AccGrad>
__device__ __forceinline__ void accumulate_score_grad_product(const StreamSmemSm90<Traits>& smem, int stage,
                                                              const Acc& acc_s, AccGrad& acc_grad) {
  Tensor ds = convert_fragment<typename Traits::Element>(acc_s);
  Tensor ds_a = make_tensor(ds.data(), wgmma_acc_as_operand_a(ds.layout()));
  issue_score_grad_product(smem, stage, ds_a, acc_grad);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_grad);
}

// The MMA warpgroups' loop of both gradient kernels over n_tiles streamed Y tiles (flat index: the dK kernel streams
// the query tiles of several heads one after the other): per tile, the two score products, the score gradients
// (score_grads(acc_s, acc_t, tile, stage) turns the scores into dS in place), then acc_grad += dS_s Y_s with dS_s
// from registers and Y_s read transposed from the same stage; the stage is freed once that product (its last
// reader) has completed. The fused dK kernel (Traits::kFusedDq) also computes the tile's dQ share
// (fused_dq_sm90.cuh) and, after freeing the stage, stages it for the dQ-writer warp.
template <typename Traits, typename AccGrad, typename ScoreGradsFn>
__device__ __forceinline__ void consume_grad_tiles(const StreamSmemSm90<Traits>& smem, AccGrad& acc_grad, int n_tiles,
                                                   ScoreGradsFn&& score_grads) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kStages = Traits::kStages;
  typename Traits::TiledMma score_mma;
  Tensor acc_s = partition_fragment_C(score_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_t = partition_fragment_C(score_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  clear(acc_s);  // defined before any product is in flight (C7515)
  clear(acc_t);

  wait_for_barrier(smem.x_full, 0);
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile % kStages;
    wait_for_stream_tile(smem, tile);
    issue_score_products(score_mma, smem, stage, acc_s, acc_t);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_t);

    score_grads(score_mma, acc_s, acc_t, tile, stage);
    if constexpr (Traits::kFusedDq) {
      auto acc_dq = make_dq_tile_accumulator<Traits>();
      fused_grad_products<Traits>(smem, stage, acc_s, acc_grad, acc_dq);
      release_stream_tile(smem, tile);
      stage_dq_tile<Traits>(smem, acc_dq);
    } else {
      accumulate_score_grad_product<Traits>(smem, stage, acc_s, acc_grad);
      release_stream_tile(smem, tile);
    }
  }
}

// The same loop over an aggregated teacher's items (aggregated_teacher_sm90.cuh): the score gradients and the
// gradient product run at each tile's last head, against the teacher "scores" whose scaled value is log2 pbar; the
// flat tile index handed to score_grads counts the tiles of the items' groups one after the other.
template <typename Traits, typename Teacher, typename AccGrad, typename ScoreGradsFn>
__device__ __forceinline__ void consume_aggregated_grad_items(const StreamSmemSm90<Traits>& smem,
                                                              const Teacher& teacher, const AggregatedItems& items,
                                                              int y_begin, AccGrad& acc_grad,
                                                              ScoreGradsFn&& score_grads) {
  typename Traits::TiledMma score_mma;
  AggregatedTiles<Traits> tiles;
  wait_for_barrier(smem.x_full, 0);
  for (int i = 0; i < items.count(); ++i) {
    const AggregatedItems::Item it = items[i];
    aggregate_item<Traits>(teacher.for_group(it.group), smem, i, it, y_begin + it.tile * Traits::kBlockN, tiles.acc_s,
                           tiles.acc_t, tiles.sum_p);
    if (it.last_head) {
      teacher.to_scores(tiles.sum_p);
      const int stage = i % Traits::kStages;
      score_grads(score_mma, tiles.acc_s, tiles.sum_p, it.group * items.n_tiles + it.tile, stage);
      accumulate_score_grad_product<Traits>(smem, stage, tiles.acc_s, acc_grad);
    }
    release_stream_tile(smem, i, /*per_thread=*/Teacher::keys_as_x);
  }
}

// The per-row gradient inputs of query rows [y0, y0 + kBlockN) of head h into a stage's stats buffer (none() past
// the sequence), lanes of one warp.
template <typename Traits, typename ScoreGrads>
__device__ __forceinline__ void stage_tile_row_inputs(const ScoreGrads& rule, const AttentionKLParams& p, float* stats,
                                                      int b, int h, int y0, int seqlen_q, int lane) {
  for (int c = lane; c < Traits::kBlockN; c += 32) {
    const int row = y0 + c;
    ScoreGrads::stage(row < seqlen_q ? rule.load(p, p.row_index(b, h, row)) : rule.none(), stats, c,
                      Traits::kBlockN);
  }
}

// The dK kernel's statistics warp (warp 1 of the producer warpgroup): the per-query-row gradient inputs of each
// streamed query tile into the stage's stats buffer, one arrival per lane on the stage's full barrier.
template <typename Traits, typename ScoreGrads>
__device__ __forceinline__ void produce_row_stats(const ScoreGrads& rule, const AttentionKLParams& p,
                                                  const StreamSmemSm90<Traits>& smem, int b, int head0, int n_groups,
                                                  int y_begin, int seqlen_q, int n_tiles, int lane) {
  for (int g = 0, i = 0; g < n_groups; ++g) {
    for (int tile = 0; tile < n_tiles; ++tile, ++i) {
      wait_for_free_stage(smem, i);
      stage_tile_row_inputs<Traits>(rule, p, smem.stats(i % Traits::kStages), b, head0 + g,
                                    y_begin + tile * Traits::kBlockN, seqlen_q, lane);
      arrive_after_warp_accesses(&smem.full[i % Traits::kStages], /*one_per_warp=*/false);
    }
  }
}

// The CTA's slice of the split gradient partials (split streams), or null.
__device__ __forceinline__ float* split_slice_or_null(const AttentionKLParams& p, bool keys) {
  return p.stream_splits > 1 ? split_grad_slice(p, keys) : nullptr;
}

template <typename Traits, typename ScoreGrads>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    attention_kl_bwd_dq_sm90_kernel(const AttentionKLParams p, const __grid_constant__ StreamTmaLoads<Traits> tma) {
  extern __shared__ __align__(1024) char smem_sm90[];
  const StreamSmemSm90<Traits> smem(smem_sm90);
  run_query_block_sm90<Traits>(p, tma, smem, [&](const QueryBlock& blk) {
    DqStateSm90<Traits, ScoreGrads> st;
    st.full_keys = blk.mask.keys_visible_to_all(blk.row0, blk.row_end);
    st.scale_s2 = static_cast<float>(p.student.scale) * kLog2e;
    st.scale_t2 = static_cast<float>(p.teacher.scale) * kLog2e;
    st.score_grads.init(p);
    load_query_row_inputs<Traits::kBlockM, Traits::kBlockN>(st.score_grads, p, blk.seq.seqlen_q, blk.b, blk.h,
                                                            blk.row0, typename Traits::TiledMma{}, st.rows);
    typename Traits::GradMmaS grad_mma;
    Tensor acc_dq = partition_fragment_C(grad_mma, Shape<Int<Traits::kBlockM>, Int<Traits::kDimS>>{});
    clear(acc_dq);
    auto score_grads = [&](auto score_mma, auto& acc_s, auto& acc_t, int tile, int) {
      const int y0 = blk.keys.begin + tile * Traits::kBlockN;
      query_tile_score_grads<Traits::kBlockM, Traits::kBlockN>(
          st.score_grads, st.rows, blk.mask, st.full_keys.covers(y0, y0 + Traits::kBlockN),
          blk.row0, y0, st.scale_s2, st.scale_t2, score_mma, acc_s, acc_t);
    };
    if (blk.n_tiles > 0) {
      if constexpr (Traits::kAggregatedTeacher)
        consume_aggregated_grad_items<Traits>(smem, teacher_block<Traits, false>(p, blk.b, blk.h, blk.seq, blk.row0),
                                              blk.items(p), blk.keys.begin, acc_dq, score_grads);
      else
        consume_grad_tiles<Traits>(smem, acc_dq, blk.n_tiles, score_grads);
    }
    store_grad_rows<Traits::kBlockM, Traits::kDimS, typename Traits::Element>(
        grad_mma, p.student, acc_dq, /*keys=*/false, blk.b, blk.h, blk.seq.q_start + blk.row0,
        blk.seq.seqlen_q - blk.row0, split_slice_or_null(p, /*keys=*/false));
  });
}

// A CTA owns kBlockM keys of one student key head (its split's part of their query rows) and streams the query tiles
// of every query head that reads it, accumulating dK_s over the group (one writer per dK row). Teacher key heads must
// group the query heads the same way (the launcher checks), so the teacher's X block is the same for the whole group;
// an aggregated teacher's X block travels with each item instead (aggregated_teacher_sm90.cuh). With
// FusedGradTraitsSm90 the kernel also adds each tile's dQ share into p.dq_accum (fused_dq_sm90.cuh), warp 2 of the
// producer warpgroup issuing the reductions.
template <typename Traits, typename ScoreGrads>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    attention_kl_bwd_dk_sm90_kernel(const AttentionKLParams p, const __grid_constant__ StreamTmaLoads<Traits> tma) {
  static_assert(ScoreGrads::kRowStats <= Traits::kRowStats, "the traits' stats buffer must hold the rule's rows");
  extern __shared__ __align__(1024) char smem_sm90[];
  const StreamSmemSm90<Traits> smem(smem_sm90);
  const BlockAndSplit cta = block_and_split(p);
  const int kv_head = blockIdx.y, b = blockIdx.z;
  const int key0 = cta.block * Traits::kBlockM;
  const int group = p.num_heads / p.student.num_kv_heads;
  const AttentionKLParams::Sequence seq = p.sequence(b);
  const int key_end = min_of(key0 + Traits::kBlockM, seq.seqlen_k);
  const AttentionMask mask = AttentionMask::from_params(p, seq.seqlen_q, seq.seqlen_k);
  const KeyRange rows = split_part<Traits::kBlockN>(p, mask.rows_for_keys(key0, key_end), cta.split);
  const int n_tiles = rows.tile_count(Traits::kBlockN);
  const int batch = p.cu_seqlens_q != nullptr ? 0 : b;

  ScoreGrads rule;
  rule.init(p);
  // The teacher side of the CTA's first student query head (kv_head * group; an aggregated item's group adds to it).
  [[maybe_unused]] const auto teacher = teacher_block<Traits, /*kKeysAsX=*/true>(p, b, kv_head * group, seq, key0);
  [[maybe_unused]] const AggregatedItems items{n_tiles, p.teacher_head_group, group};
  // Fused backward: flat tile i's dQ share goes to rows [y0, y0 + kBlockN) of its head's fp32 dQ sums (p.dq_accum,
  // laid out like dQ).
  [[maybe_unused]] auto dq_tile_rows = [&](int flat_tile) {
    const int h = kv_head * group + flat_tile / n_tiles;
    const int y0 = rows.begin + (flat_tile % n_tiles) * Traits::kBlockN;
    const AttentionSide& side = p.student;
    return DqTileRows{static_cast<float*>(p.dq_accum) + b * side.dq_batch_stride + h * side.dq_head_stride +
                          (seq.q_start + y0) * side.dq_row_stride,
                      side.dq_row_stride, seq.seqlen_q - y0};
  };
  run_warp_specialized<Traits>(
      smem, /*extra_full_arrivals=*/32, /*per_thread_release=*/Traits::kAggregatedTeacher,
      [&] {
        const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
        if (n_tiles == 0) return;
        if constexpr (Traits::kAggregatedTeacher) {
          if (threadIdx.x == Traits::kNMmaThreads)
            produce_aggregated_items(p, tma, smem, teacher,
                                     AggregatedStreamCoords{kv_head, batch, static_cast<int>(seq.k_start) + key0,
                                                            static_cast<int>(seq.q_start) + rows.begin},
                                     items);
          else if (warp == 1)
            produce_aggregated_tile_inputs(smem, teacher, items, rows.begin, lane,
                                           [&](float* stats, int h, int tile) {
                                             stage_tile_row_inputs<Traits>(rule, p, stats, b, h,
                                                                           rows.begin + tile * Traits::kBlockN,
                                                                           seq.seqlen_q, lane);
                                           });
        } else {
          if (threadIdx.x == Traits::kNMmaThreads) {
            const StreamTileCoords coords{kv_head,
                                          kv_head,
                                          kv_head * group,
                                          kv_head * group,
                                          1,
                                          batch,
                                          static_cast<int>(seq.k_start) + key0,
                                          static_cast<int>(seq.q_start) + rows.begin};
            produce_stream_tiles(tma, smem, coords, n_tiles, group);
          } else if (warp == 1) {
            produce_row_stats<Traits>(rule, p, smem, b, kv_head * group, group, rows.begin, seq.seqlen_q, n_tiles,
                                      lane);
          } else if (warp == 2) {
            if constexpr (Traits::kFusedDq) write_dq_tiles<Traits>(smem, n_tiles * group, dq_tile_rows, lane);
          }
        }
      },
      [&] {
        const float scale_s2 = static_cast<float>(p.student.scale) * kLog2e;
        const float scale_t2 = static_cast<float>(p.teacher.scale) * kLog2e;
        typename Traits::GradMmaS grad_mma;
        Tensor acc_dk = partition_fragment_C(grad_mma, Shape<Int<Traits::kBlockM>, Int<Traits::kDimS>>{});
        clear(acc_dk);
        auto score_grads = [&](auto score_mma, auto& acc_s, auto& acc_t, int flat_tile, int stage) {
          const int y0 = rows.begin + (flat_tile % n_tiles) * Traits::kBlockN;
          // Fully visible only if every one of the block's kBlockM keys is in the sequence: the fused kernel's dQ
          // product reads all of them, and past the sequence's end they are another sequence's keys (varlen) or
          // the zero fill, which must get dS = 0.
          key_tile_score_grads<Traits::kBlockM, Traits::kBlockN>(
              rule, smem.stats(stage), mask,
              mask.block_fully_visible(y0, y0 + Traits::kBlockN, key0, key0 + Traits::kBlockM), key0,
              y0, scale_s2, scale_t2, score_mma, acc_s, acc_t);
        };
        if (n_tiles > 0) {
          if constexpr (Traits::kAggregatedTeacher)
            consume_aggregated_grad_items<Traits>(smem, teacher, items, rows.begin, acc_dk, score_grads);
          else
            consume_grad_tiles<Traits>(smem, acc_dk, n_tiles * group, score_grads);
        }
        store_grad_rows<Traits::kBlockM, Traits::kDimS, typename Traits::Element>(
            grad_mma, p.student, acc_dk, /*keys=*/true, b, kv_head, seq.k_start + key0, seq.seqlen_k - key0,
            split_slice_or_null(p, /*keys=*/true));
      });
}

}  // namespace cuda
}  // namespace streamkl

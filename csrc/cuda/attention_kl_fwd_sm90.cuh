// Warp-specialized Hopper (sm_90a) attention-KL forward: a producer warpgroup moves the tiles with TMA, two MMA
// warpgroups run the score products on wgmma and the online two-softmax reduction (ForwardPolicy, the same code
// as every other forward) on the accumulators.
//
// Why warp-specialized: when every thread issues cp.async loads for each key tile and the whole CTA meets at a
// barrier per tile (the previous, single-role kernel), both warpgroups run in lockstep and pay for the loads' address
// arithmetic: 1.645 ms against 1.25 ms at N=8192, D=128 (bench/RESULTS.md, session 5). Here the copies complete on
// mbarriers (tma_stream_sm90.cuh), so each warpgroup runs at its own pace and the producer keeps up to kStages - 2
// tiles ahead.
//
// Mainloop: each warpgroup issues the products of key tile j + 1 before it consumes tile j, so the exponentials of
// j overlap the tensor-core work of j + 1 (each warpgroup holds the accumulators of two tiles); tiles go in groups of
// kGroup with no product in flight across a group boundary (ptxas serializes every wgmma of a loop whose batches
// cross its back-edge, C7514). Products past the last tile are issued anyway and never consumed, so the batch
// count at each wait is the same on every path.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "attention_jsd_fwd.cuh"
#include "attention_kl_fwd.cuh"
#include "kernel_traits_sm90.cuh"
#include "query_block_sm90.cuh"
#include "tma_stream_sm90.cuh"
#include "warpgroup_mma.cuh"

namespace streamkl {
namespace cuda {

using namespace cute;

// The MMA warpgroups' key loop over tiles [0, n_tiles) of keys from y_begin.
template <typename Traits, typename Policy>
__device__ __forceinline__ void consume_forward_tiles(Policy& policy, const StreamSmemSm90<Traits>& smem, int y_begin,
                                                      int n_tiles) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kStages = Traits::kStages;
  typename Traits::TiledMma tiled_mma;
  auto wait_for_tile = [&](int tile) { wait_for_stream_tile(smem, tile); };
  auto issue_products = [&](auto& acc_s, auto& acc_t, int tile) {
    issue_score_products(tiled_mma, smem, tile % kStages, acc_s, acc_t);
  };

  constexpr int kGroup = Traits::kGroup;
  // The second pair holds the next tile's scores; with kGroup == 1 (one tile per group, the three-warpgroup forward at
  // head dim 64) no product runs ahead, and the pair is never touched.
  Tensor acc_s0 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_t0 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_s1 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_t1 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  // wgmma reads its accumulators (the first k-step scales them by zero), so they must be defined before any product
  // is in flight: ptxas serializes every wgmma when ordinary instructions write accumulator registers while a
  // product is pending (C7515), which undefined values would cause.
  clear(acc_s0);
  clear(acc_t0);
  if constexpr (kGroup > 1) {
    clear(acc_s1);
    clear(acc_t1);
    warpgroup_fence_operand(acc_s1);
    warpgroup_fence_operand(acc_t1);
  }

  // Products past the last tile are issued anyway (they read a stage the producer no longer writes and are never
  // consumed), so the batch count at each wait is the same on every path.
  auto step = [&](auto& cur_s, auto& cur_t, auto& next_s, auto& next_t, int tile, auto last_in_group) {
    if constexpr (!decltype(last_in_group)::value) {
      if (tile + 1 < n_tiles) wait_for_tile(tile + 1);
      issue_products(next_s, next_t, tile + 1);
      warpgroup_wait<1>();  // tile j's batch has landed; j + 1's keeps the tensor cores busy
    } else {
      warpgroup_wait<0>();
    }
    if (tile < n_tiles) release_stream_tile(smem, tile);
    warpgroup_fence_operand(cur_s);
    warpgroup_fence_operand(cur_t);
    if (tile < n_tiles) policy.consume(tiled_mma, cur_s, cur_t, y_begin + tile * kBlockN, tile % kStages);
  };

  wait_for_barrier(smem.x_full, 0);
  for (int base = 0; base < n_tiles; base += kGroup) {
    wait_for_tile(base);
    issue_products(acc_s0, acc_t0, base);
    for_each(make_int_sequence<kGroup>{}, [&](auto i) {
      constexpr bool kLast = decltype(i)::value + 1 == kGroup;
      if constexpr (decltype(i)::value % 2 == 0)
        step(acc_s0, acc_t0, acc_s1, acc_t1, base + int(i), cute::bool_constant<kLast>{});
      else
        step(acc_s1, acc_t1, acc_s0, acc_t0, base + int(i), cute::bool_constant<kLast>{});
    });
  }
}

// The MMA warpgroups' loop over an aggregated teacher's items (aggregated_teacher_sm90.cuh): at each tile's last
// head the policy gets the student's scores and the teacher "scores" whose scaled value is log2 pbar. The items'
// products are not overlapped with the exponentials inside a warpgroup; the two MMA warpgroups run at their own pace.
template <typename Traits, typename Policy, typename Teacher>
__device__ __forceinline__ void consume_aggregated_forward_items(Policy& policy, const StreamSmemSm90<Traits>& smem,
                                                                 const Teacher& teacher, const AggregatedItems& items,
                                                                 int y_begin) {
  typename Traits::TiledMma score_mma;
  AggregatedTiles<Traits> tiles;
  wait_for_barrier(smem.x_full, 0);
  for (int i = 0; i < items.count(); ++i) {
    const AggregatedItems::Item it = items[i];
    const int y0 = y_begin + it.tile * Traits::kBlockN;
    aggregate_item<Traits>(teacher, smem, i, it, y0, tiles.acc_s, tiles.acc_t, tiles.sum_p);
    release_stream_tile(smem, i);
    if (!it.last_head) continue;
    teacher.to_scores(tiles.sum_p);
    policy.consume(score_mma, tiles.acc_s, tiles.sum_p, y0, i % Traits::kStages);
  }
}

// A query block's stream into the policy: the key tiles, or an aggregated teacher's items.
template <typename Traits, typename Policy>
__device__ __forceinline__ void consume_query_block(Policy& policy, const AttentionKLParams& p,
                                                    const StreamSmemSm90<Traits>& smem, const QueryBlock& blk) {
  if (blk.n_tiles == 0) return;
  if constexpr (Traits::kAggregatedTeacher)
    consume_aggregated_forward_items<Traits>(policy, smem, teacher_block<Traits, false>(p, blk.b, blk.h, blk.seq,
                                                                                        blk.row0),
                                             blk.items(p), blk.keys.begin);
  else
    consume_forward_tiles<Traits>(policy, smem, blk.keys.begin, blk.n_tiles);
}

template <typename Traits, bool kTeacherWeights>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    attention_kl_fwd_sm90_kernel(const AttentionKLParams p, const __grid_constant__ StreamTmaLoads<Traits> tma) {
  // Tiles start at multiples of 1024 bytes (the 128-byte swizzle's period) from here.
  extern __shared__ __align__(1024) char smem_sm90[];
  const StreamSmemSm90<Traits> smem(smem_sm90);
  run_query_block_sm90<Traits>(p, tma, smem, [&](const QueryBlock& blk) {
    auto policy = make_forward_policy<Traits, kTeacherWeights>(p, blk.seq, blk.row0, blk.row_end);
    consume_query_block<Traits>(policy, p, smem, blk);
    write_forward_rows(policy, p, blk.b, blk.h, blk.row0, blk.seq.seqlen_q, blk.split);
  });
}

// Pass 2 of the generalized JSD on the Hopper path: the mixture's row sums (JsdSumsPolicy and its row writer,
// attention_jsd_fwd.cuh) over the same warp-specialized stream and MMA loop; pass 1 is the KL forward kernel above,
// run for both LSEs.
template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    attention_jsd_sums_sm90_kernel(const AttentionKLParams p, const __grid_constant__ StreamTmaLoads<Traits> tma) {
  extern __shared__ __align__(1024) char smem_sm90[];
  const StreamSmemSm90<Traits> smem(smem_sm90);
  run_query_block_sm90<Traits>(p, tma, smem, [&](const QueryBlock& blk) {
    auto policy = make_jsd_sums_policy<Traits>(p, blk.seq, blk.b, blk.h, blk.row0);
    consume_query_block<Traits>(policy, p, smem, blk);
    write_jsd_rows(policy, p, blk.b, blk.h, blk.row0, blk.seq.seqlen_q, blk.split);
  });
}

}  // namespace cuda
}  // namespace streamkl

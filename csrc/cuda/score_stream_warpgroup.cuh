// The Hopper-path main loop (sm_90a): score_stream (score_stream.cuh) with the two score products on wgmma,
// software-pipelined so that the tensor cores compute the products of key tile j + 1 while the warps run the
// policy's exponentials on tile j (without that overlap the forward pays for the products and for its two
// exponentials per score one after the other). Each warpgroup holds two accumulator pairs (tiles j and
// j + 1), which is why key tiles are 64 wide here; Y tiles go through Traits::kStages = 3 shared-memory
// stages (j consumed, j + 1 in the products, j + 2 loading with cp.async).
//
// Templated on the shared-memory plan and operand types so it can sit before their definitions in
// score_stream.cuh; same policy interface (policy.stage_stats, policy.consume).
#pragma once

#include <cute/tensor.hpp>

#include "cute_helpers.cuh"
#include "warpgroup_mma.cuh"

namespace streamkl {
namespace cuda {

using namespace cute;

template <typename Traits, typename Policy, typename Smem, typename Operands>
__device__ __forceinline__ void score_stream_warpgroup(Policy& policy, const Smem& smem, const Operands& student,
                                                       const Operands& teacher, int x_valid_rows, int y_begin,
                                                       int y_end, int y_rows_total) {
  static_assert(Traits::kStages == 3, "tile j - 1's stage is refilled with tile j + 2");
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  const int tid = threadIdx.x;
  const int n_tiles = y_end > y_begin ? (y_end - y_begin + kBlockN - 1) / kBlockN : 0;
  auto load_y = [&](int tile) {  // one cp.async group per call, empty past the last tile
    if (tile < n_tiles) {
      const int y0 = y_begin + tile * kBlockN, stage = tile % Traits::kStages;
      issue_tile_load<typename Traits::YTileS>(student.y + y0 * student.y_stride, student.y_stride, smem.y_s(stage),
                                               y_rows_total - y0, tid);
      issue_tile_load<typename Traits::YTileT>(teacher.y + y0 * teacher.y_stride, teacher.y_stride, smem.y_t(stage),
                                               y_rows_total - y0, tid);
    }
    cp_async_fence();
  };
  issue_tile_load<typename Traits::XTileS>(student.x, student.x_stride, smem.x_s, x_valid_rows, tid);
  issue_tile_load<typename Traits::XTileT>(teacher.x, teacher.x_stride, smem.x_t, x_valid_rows, tid);
  load_y(0);  // same group as X
  load_y(1);

  typename Traits::TiledMma tiled_mma;
  Tensor x_s = make_tensor(make_smem_ptr(smem.x_s), typename Traits::XTileS::Layout{});
  Tensor x_t = make_tensor(make_smem_ptr(smem.x_t), typename Traits::XTileT::Layout{});

  // Wait until `tile` is in shared memory for the whole CTA (kPending: cp.async groups committed after the
  // tile's own). cp.async wrote it through the generic proxy and wgmma reads through the async proxy, hence
  // the proxy fence before the barrier. Past the barrier every warpgroup has also finished the products of
  // tile - 2 (it waited for them before consuming), so that stage can be refilled.
  auto wait_for_tile = [&](int tile, auto pending) {
    cp_async_wait<decltype(pending)::value>();
    cutlass::arch::fence_view_async_shared();
    policy.stage_stats(y_begin + tile * kBlockN, smem.stats(tile % Traits::kStages));
    __syncthreads();
  };
  auto issue_products = [&](auto& acc_s, auto& acc_t, int tile) {
    const int stage = tile % Traits::kStages;
    warpgroup_products_begin(acc_s, acc_t);
    warpgroup_gemm_ss(tiled_mma, acc_s, x_s, smem.y_s_tile(stage), tid);
    warpgroup_gemm_ss(tiled_mma, acc_t, x_t, smem.y_t_tile(stage), tid);
    warpgroup_commit_batch();
  };

  Tensor acc_s0 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_t0 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_s1 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_t1 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  // wgmma reads its accumulators (the first k-step scales them by zero), so they must be defined before any
  // product is in flight: ptxas serializes every wgmma when ordinary instructions write accumulator
  // registers while a product is pending (C7515), which undefined values would cause.
  clear(acc_s0);
  clear(acc_t0);
  clear(acc_s1);
  clear(acc_t1);
  warpgroup_fence_operand(acc_s1);
  warpgroup_fence_operand(acc_t1);

  // Tiles go in groups of kGroup. Within a group, tile j's products are in `cur` while tile j + 1's are
  // issued into `next`, then tile j is consumed: the exponentials of j overlap the products of j + 1. No
  // product stays in flight across a group boundary (the last tile waits for all), because ptxas serializes
  // every wgmma of a loop whose batches cross its back-edge (C7514); so per group one product and one
  // consume do not overlap. Products are issued unconditionally (past the last tile they read a stale stage
  // and are never consumed), so the batch count at each wait is the same on every path.
  constexpr int kGroup = 4;
  // Make tile + 1 (this group's next, or the next group's first) readable and start loading tile + 2.
  auto stage_next_tile = [&](int tile) {
    if (tile + 1 < n_tiles) {
      wait_for_tile(tile + 1, Int<0>{});  // tile + 1's group is the newest
      load_y(tile + 2);  // into the stage of tile - 1, whose products every warpgroup has finished
    }
  };
  auto step = [&](auto& cur_s, auto& cur_t, auto& next_s, auto& next_t, int tile, auto last_in_group) {
    if constexpr (!decltype(last_in_group)::value) {
      stage_next_tile(tile);
      issue_products(next_s, next_t, tile + 1);
      warpgroup_wait<1>();  // tile j's batch has landed; j + 1's keeps the tensor cores busy
    } else {
      warpgroup_wait<0>();
      stage_next_tile(tile);
    }
    warpgroup_fence_operand(cur_s);
    warpgroup_fence_operand(cur_t);
    if (tile < n_tiles)
      policy.consume(tiled_mma, cur_s, cur_t, y_begin + tile * kBlockN, tile % Traits::kStages);
  };

  wait_for_tile(0, Int<1>{});  // tile 1's group may stay in flight
  for (int base = 0; base < n_tiles; base += kGroup) {
    issue_products(acc_s0, acc_t0, base);
    for_each(make_int_sequence<kGroup>{}, [&](auto i) {
      constexpr bool kLast = decltype(i)::value + 1 == kGroup;
      if constexpr (decltype(i)::value % 2 == 0)
        step(acc_s0, acc_t0, acc_s1, acc_t1, base + int(i), cute::bool_constant<kLast>{});
      else
        step(acc_s1, acc_t1, acc_s0, acc_t0, base + int(i), cute::bool_constant<kLast>{});
    });
  }
  cp_async_wait<0>();  // nothing may stay in flight when the CTA exits
}

}  // namespace cuda
}  // namespace streamkl

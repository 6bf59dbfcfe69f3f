// Warp-specialized Hopper (sm_90a) attention-KL forward: a producer warpgroup moves the tiles with TMA, two MMA
// warpgroups run the score products on wgmma and the online two-softmax reduction (ForwardPolicy, the same code
// as every other forward) on the accumulators.
//
// Why: in the single-role kernel (score_stream_warpgroup.cuh) every thread issues cp.async loads for each key tile
// and the whole CTA meets at a barrier per tile, so both warpgroups run in lockstep and pay for the loads' address
// arithmetic. Here the copies complete on mbarriers: a "full" barrier per stage (the producer's expected bytes) and
// an "empty" barrier per stage (one arrival per MMA warp once its products of that tile have finished), so each
// warpgroup runs at its own pace and the producer keeps up to kStages - 2 tiles ahead.
//
// Mainloop shape as in score_stream_warpgroup.cuh: each warpgroup issues the products of key tile j + 1 before
// it consumes tile j, so the exponentials of j overlap the tensor-core work of j + 1; tiles go in groups of
// kGroup with no product in flight across a group boundary (ptxas serializes wgmma batches that cross a loop
// back-edge, C7514).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "attention_kl_fwd.cuh"
#include "kernel_traits_sm90.cuh"
#include "tma_loads_sm90.cuh"
#include "warpgroup_mma.cuh"

namespace streamkl {
namespace cuda {

using namespace cute;

// Dynamic shared memory of the warp-specialized forward: X of both sides, kStages stages of Y of both sides,
// then the mbarriers (KernelTraitsSm90Tma::kSmemBytes).
template <typename Traits>
struct ForwardSmemSm90 {
  using Element = typename Traits::Element;
  static constexpr int kStageElements = Traits::YTileS::kElements + Traits::YTileT::kElements;
  Element* x_s;
  Element* x_t;
  Element* y_base;
  uint64_t* x_full;  // X of both sides has landed
  uint64_t* full;    // [kStages]: the stage's Y tiles have landed
  uint64_t* empty;   // [kStages]: every MMA warp has finished reading the stage

  __device__ explicit ForwardSmemSm90(char* raw) {
    x_s = reinterpret_cast<Element*>(raw);
    x_t = x_s + Traits::XTileS::kElements;
    y_base = x_t + Traits::XTileT::kElements;
    x_full = reinterpret_cast<uint64_t*>(raw + Traits::kBarrierOffset);
    full = x_full + 1;
    empty = full + Traits::kStages;
  }
  __device__ Element* y_s(int stage) const { return y_base + stage * kStageElements; }
  __device__ Element* y_t(int stage) const { return y_s(stage) + Traits::YTileS::kElements; }

  template <typename Tile>
  __device__ static auto tile(Element* base) {
    return make_tensor(make_smem_ptr(base), typename Tile::Layout{});
  }
};

// Where one CTA's tiles sit in the TMA coordinate space: its head and key heads, the batch index of the
// descriptors (0 for varlen), its first query row and the first row of its key range.
struct ForwardTileCoords {
  int head, kv_head_s, kv_head_t, batch;
  int x_row, y_row;
};

// Producer: one thread issues every copy of the CTA. kRows-row tile number `tile` of the operand `tma` (rows
// from `row`, head `head`) into `smem`, completing on `barrier`.
template <int kRows, int kDim, typename Tma, typename SmemTile>
__device__ __forceinline__ void tma_load_tile(const Tma& tma, const TmaGmemShape& shape, int head, int batch, int row,
                                              int tile, const SmemTile& smem, uint64_t& barrier) {
  Tensor m = tma.get_tma_tensor(shape);                                      // (rows, dim, heads, batch)
  Tensor g = local_tile(domain_offset(make_coord(row, 0), m(_, _, head, batch)), Shape<Int<kRows>, Int<kDim>>{},
                        make_coord(tile, 0));                                // (kRows, kDim)
  auto src_dst = tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(smem), group_modes<0, 2>(g));
  copy(tma.with(barrier), get<0>(src_dst), get<1>(src_dst));
}

template <typename Traits>
__device__ __forceinline__ void produce_forward_tiles(const ForwardTmaLoads<Traits>& tma,
                                                      const ForwardSmemSm90<Traits>& smem, const ForwardTileCoords& c,
                                                      int n_tiles) {
  using Smem = ForwardSmemSm90<Traits>;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kDimS = Traits::kDimS, kDimT = Traits::kDimT;
  Barrier::arrive_and_expect_tx(smem.x_full, Traits::kXBytes);
  tma_load_tile<kBlockM, kDimS>(tma.x_s, tma.x_s_shape, c.head, c.batch, c.x_row, 0,
                                Smem::template tile<typename Traits::XTileS>(smem.x_s), *smem.x_full);
  tma_load_tile<kBlockM, kDimT>(tma.x_t, tma.x_t_shape, c.head, c.batch, c.x_row, 0,
                                Smem::template tile<typename Traits::XTileT>(smem.x_t), *smem.x_full);
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile % Traits::kStages;
    // A fresh barrier counts as having completed the phase before its first, so the first round passes at once.
    Barrier::wait(&smem.empty[stage], ((tile / Traits::kStages) & 1) ^ 1);
    Barrier::arrive_and_expect_tx(&smem.full[stage], Traits::kStageBytes);
    tma_load_tile<kBlockN, kDimS>(tma.y_s, tma.y_s_shape, c.kv_head_s, c.batch, c.y_row, tile,
                                  Smem::template tile<typename Traits::YTileS>(smem.y_s(stage)), smem.full[stage]);
    tma_load_tile<kBlockN, kDimT>(tma.y_t, tma.y_t_shape, c.kv_head_t, c.batch, c.y_row, tile,
                                  Smem::template tile<typename Traits::YTileT>(smem.y_t(stage)), smem.full[stage]);
  }
}

// The MMA warpgroups' key loop over tiles [0, n_tiles) of keys from y_begin.
template <typename Traits, typename Policy>
__device__ __forceinline__ void consume_forward_tiles(Policy& policy, const ForwardSmemSm90<Traits>& smem, int y_begin,
                                                      int n_tiles) {
  using Smem = ForwardSmemSm90<Traits>;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kStages = Traits::kStages;
  const int tid = threadIdx.x;
  typename Traits::TiledMma tiled_mma;
  Tensor x_s = Smem::template tile<typename Traits::XTileS>(smem.x_s);
  Tensor x_t = Smem::template tile<typename Traits::XTileT>(smem.x_t);

  auto wait_for_tile = [&](int tile) { Barrier::wait(&smem.full[tile % kStages], (tile / kStages) & 1); };
  // One arrival per MMA warp (the empty barriers count kNMmaWarps), after the warp's products of the tile are done.
  auto release_tile = [&](int tile) {
    if (tid % 32 == 0) Barrier::arrive(&smem.empty[tile % kStages]);
  };
  auto issue_products = [&](auto& acc_s, auto& acc_t, int tile) {
    const int stage = tile % kStages;
    warpgroup_products_begin(acc_s, acc_t);
    warpgroup_gemm_ss(tiled_mma, acc_s, x_s, Smem::template tile<typename Traits::YTileS>(smem.y_s(stage)), tid);
    warpgroup_gemm_ss(tiled_mma, acc_t, x_t, Smem::template tile<typename Traits::YTileT>(smem.y_t(stage)), tid);
    warpgroup_commit_batch();
  };

  Tensor acc_s0 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_t0 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_s1 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_t1 = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  // Defined before any product is in flight (see score_stream_warpgroup.cuh: C7515).
  clear(acc_s0);
  clear(acc_t0);
  clear(acc_s1);
  clear(acc_t1);
  warpgroup_fence_operand(acc_s1);
  warpgroup_fence_operand(acc_t1);

  constexpr int kGroup = Traits::kGroup;
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
    if (tile < n_tiles) release_tile(tile);
    warpgroup_fence_operand(cur_s);
    warpgroup_fence_operand(cur_t);
    if (tile < n_tiles) policy.consume(tiled_mma, cur_s, cur_t, y_begin + tile * kBlockN, tile % kStages);
  };

  Barrier::wait(smem.x_full, 0);
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

template <typename Traits, bool kTeacherWeights>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    attention_kl_fwd_sm90_kernel(const AttentionKLParams p, const __grid_constant__ ForwardTmaLoads<Traits> tma) {
  // Tiles start at multiples of 1024 bytes (the 128-byte swizzle's period) from here.
  extern __shared__ __align__(1024) char smem_sm90[];
  const ForwardSmemSm90<Traits> smem(smem_sm90);
  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest causal rows first
  const int h = blockIdx.y, b = blockIdx.z;
  const int row0 = m_block * Traits::kBlockM;
  const AttentionKLParams::Sequence seq = p.sequence(b);
  const int row_end = min_of(row0 + Traits::kBlockM, seq.seqlen_q);
  const AttentionMask mask = AttentionMask::from_params(p, seq.seqlen_q, seq.seqlen_k);
  const KeyRange keys = mask.keys_for_rows(row0, row_end);
  const int n_tiles = keys.end > keys.begin ? (keys.end - keys.begin + Traits::kBlockN - 1) / Traits::kBlockN : 0;

  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(smem.x_full, 1);
    for (int s = 0; s < Traits::kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&smem.full[s], 1);
      cutlass::arch::ClusterBarrier::init(&smem.empty[s], Traits::kNMmaWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (cutlass::canonical_warp_group_idx() == Traits::kNMmaThreads / 128) {  // the producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (threadIdx.x == Traits::kNMmaThreads && n_tiles > 0) {
      const ForwardTileCoords coords{h, h / (p.num_heads / p.student.num_kv_heads),
                                     h / (p.num_heads / p.teacher.num_kv_heads), p.cu_seqlens_q != nullptr ? 0 : b,
                                     static_cast<int>(seq.q_start) + row0, static_cast<int>(seq.k_start) + keys.begin};
      produce_forward_tiles(tma, smem, coords, n_tiles);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kMmaRegisters>();
    auto policy = make_forward_policy<Traits, kTeacherWeights>(p, seq, row0, row_end);
    if (n_tiles > 0) consume_forward_tiles<Traits>(policy, smem, keys.begin, n_tiles);
    write_forward_rows(policy, p, b, h, row0, seq.seqlen_q);
  }
}

}  // namespace cuda
}  // namespace streamkl

// What the warp-specialized Hopper kernels (forward, dQ, dK) share: the shared-memory plan (X once, Y in kStages
// stages, mbarriers), the one thread that issues every TMA copy of a CTA, the MMA side's waits, releases and score
// products, and the role split. The copies complete on a "full" barrier per stage (the producer's expected bytes);
// the MMA warps free a stage with one arrival each on its "empty" barrier once their products that read it have
// finished. Torch-free.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "../kernels/attention_mask.h"

#include "kernel_traits_sm90.cuh"
#include "tma_loads_sm90.cuh"
#include "warpgroup_mma.cuh"

namespace streamkl {
namespace cuda {

using namespace cute;

// Wait for the completion of `phase` of an mbarrier, with the thread's later shared-memory accesses kept after it.
// CUTLASS's wait is an asm statement without a memory clobber, so the compiler may move ordinary loads and stores
// above it: e.g. a statistics warp's stores into a stage before the stage was freed (found while chasing a racecheck
// report in the aggregated stream; that report itself went away only with per-thread releases, release_stream_tile).
// The empty asm with a memory clobber is a compiler fence; the hardware ordering is try_wait's acquire.
__device__ __forceinline__ void wait_for_barrier(uint64_t* barrier, uint32_t phase) {
  cutlass::arch::ClusterBarrier::wait(barrier, phase);
  asm volatile("" ::: "memory");
}

// Dynamic shared memory of the warp-specialized kernels: X of both sides, kStages stages of Y of both sides,
// the dK kernel's per-row statistics, then the mbarriers (KernelTraitsSm90::kSmemBytes). An aggregated teacher's X block is
// part of each stage ([Y_s, Y_t, X_t]).
template <typename Traits>
struct StreamSmemSm90 {
  using Element = typename Traits::Element;
  static constexpr int kStageElements = Traits::kStageBytes / int(sizeof(Element));
  Element* x_s;
  Element* x_t;  // null for an aggregated teacher (x_t_at)
  Element* y_base;
  float* stats_base;  // [kStages][kStageStats]: the dK kernel's per-query-row inputs of each stage's tile
  uint64_t* x_full;  // X of both sides has landed
  uint64_t* full;    // [kStages]: the stage's Y tiles have landed
  uint64_t* empty;   // [kStages]: every MMA warp has finished reading the stage
  Element* ds;       // the fused backward's dS^T tiles (Traits::kFusedDq), else null
  float* dq_tile;    // the fused backward's staged dQ tile, else null

  __device__ explicit StreamSmemSm90(char* raw) {
    x_s = reinterpret_cast<Element*>(raw);
    x_t = Traits::kAggregatedTeacher ? nullptr : x_s + Traits::XTileS::kElements;
    y_base = reinterpret_cast<Element*>(raw + Traits::kXBytes);
    stats_base = reinterpret_cast<float*>(raw + Traits::kStatsOffset);
    x_full = reinterpret_cast<uint64_t*>(raw + Traits::kBarrierOffset);
    full = x_full + 1;
    empty = full + Traits::kStages;
    ds = Traits::kFusedDq ? reinterpret_cast<Element*>(raw + Traits::kDsOffset) : nullptr;
    dq_tile = Traits::kFusedDq ? reinterpret_cast<float*>(raw + Traits::kDqOffset) : nullptr;
  }
  __device__ Element* y_s(int stage) const { return y_base + stage * kStageElements; }
  __device__ Element* y_t(int stage) const { return y_s(stage) + Traits::YTileS::kElements; }
  // The teacher's X block that the products of `stage` read.
  __device__ Element* x_t_at(int stage) const {
    return Traits::kAggregatedTeacher ? y_t(stage) + Traits::YTileT::kElements : x_t;
  }
  __device__ float* stats(int stage) const { return stats_base + stage * Traits::kStageStats; }
  // Aggregated teacher, dK kernel: the base-2 LSEs of the stage's teacher head, by row of its Y tile.
  __device__ float* teacher_lse(int stage) const { return stats(stage) + Traits::kBlockN * Traits::kRowStats; }

  template <typename Tile>
  __device__ static auto tile(Element* base) {
    return make_tensor(make_smem_ptr(base), typename Tile::Layout{});
  }
};

// Where one CTA's tiles sit in the TMA coordinate space: the heads of its X block and of the Y rows it streams for
// the first of n_groups heads (the dK kernel streams the query rows of every query head that reads its key head:
// y head + g * y_head_step), the batch index of the descriptors (0 for varlen), the first X row and the first Y row.
struct StreamTileCoords {
  int x_head_s, x_head_t, y_head_s, y_head_t, y_head_step, batch;
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

// Wait until the stage of flat tile i may be overwritten. A fresh barrier counts as having completed the phase
// before its first, so the first round passes at once.
template <typename Traits>
__device__ __forceinline__ void wait_for_free_stage(const StreamSmemSm90<Traits>& smem, int i) {
  wait_for_barrier(&smem.empty[i % Traits::kStages], ((i / Traits::kStages) & 1) ^ 1);
}

// X once, then n_tiles Y tiles for each of n_groups heads; flat tile i = g * n_tiles + tile.
template <typename Traits>
__device__ __forceinline__ void produce_stream_tiles(const StreamTmaLoads<Traits>& tma,
                                                      const StreamSmemSm90<Traits>& smem, const StreamTileCoords& c,
                                                      int n_tiles, int n_groups = 1) {
  using Smem = StreamSmemSm90<Traits>;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kDimS = Traits::kDimS, kDimT = Traits::kDimT;
  Barrier::arrive_and_expect_tx(smem.x_full, Traits::kXBytes);
  tma_load_tile<kBlockM, kDimS>(tma.x_s, tma.x_s_shape, c.x_head_s, c.batch, c.x_row, 0,
                                Smem::template tile<typename Traits::XTileS>(smem.x_s), *smem.x_full);
  tma_load_tile<kBlockM, kDimT>(tma.x_t, tma.x_t_shape, c.x_head_t, c.batch, c.x_row, 0,
                                Smem::template tile<typename Traits::XTileT>(smem.x_t), *smem.x_full);
  for (int g = 0, i = 0; g < n_groups; ++g) {
    for (int tile = 0; tile < n_tiles; ++tile, ++i) {
      const int stage = i % Traits::kStages;
      wait_for_free_stage(smem, i);
      Barrier::arrive_and_expect_tx(&smem.full[stage], Traits::kStageBytes);
      tma_load_tile<kBlockN, kDimS>(tma.y_s, tma.y_s_shape, c.y_head_s + g * c.y_head_step, c.batch, c.y_row, tile,
                                    Smem::template tile<typename Traits::YTileS>(smem.y_s(stage)), smem.full[stage]);
      tma_load_tile<kBlockN, kDimT>(tma.y_t, tma.y_t_shape, c.y_head_t + g * c.y_head_step, c.batch, c.y_row, tile,
                                    Smem::template tile<typename Traits::YTileT>(smem.y_t(stage)), smem.full[stage]);
    }
  }
}

// Barrier setup by one thread, before the CTA-wide barrier that precedes the roles. extra_full_arrivals: arrivals
// on each full barrier besides the copy thread's (the dK kernel's statistics warp: 32); per_thread_release: every MMA
// thread frees a stage itself (release_stream_tile), rather than one lane per warp.
template <typename Traits>
__device__ __forceinline__ void init_stream_barriers(const StreamSmemSm90<Traits>& smem, int extra_full_arrivals,
                                                     bool per_thread_release) {
  cutlass::arch::ClusterTransactionBarrier::init(smem.x_full, 1);
  for (int s = 0; s < Traits::kStages; ++s) {
    cutlass::arch::ClusterTransactionBarrier::init(&smem.full[s], 1 + extra_full_arrivals);
    cutlass::arch::ClusterBarrier::init(&smem.empty[s], per_thread_release ? Traits::kNMmaThreads : Traits::kNMmaWarps);
  }
  cutlass::arch::fence_barrier_init();
}

// Arrive on an mbarrier once this warp's shared-memory accesses before it are done: by lane 0 (one_per_warp) or by
// every lane. CUTLASS's arrive is an asm statement without a memory clobber, so the compiler may move ordinary loads
// and stores past it; the __syncwarp keeps them before it and orders the other lanes' accesses before lane 0's
// arrival (the same hazard as in wait_for_barrier).
__device__ __forceinline__ void arrive_after_warp_accesses(uint64_t* barrier, bool one_per_warp) {
  __syncwarp();
  if (!one_per_warp || threadIdx.x % 32 == 0) cutlass::arch::ClusterBarrier::arrive(barrier);
}

// Wait until key tile `tile` has landed / free its stage: one arrival per MMA warp, after the warp's last product that
// reads it has completed, or (per_thread: the MMA threads read the stage with plain loads too, see
// init_stream_barriers) one per MMA thread. One lane per warp after a __syncwarp would be enough by the PTX memory
// model, but compute-sanitizer's racecheck does not see it order the other lanes' plain loads before the arrival.
template <typename Traits>
__device__ __forceinline__ void wait_for_stream_tile(const StreamSmemSm90<Traits>& smem, int tile) {
  wait_for_barrier(&smem.full[tile % Traits::kStages], (tile / Traits::kStages) & 1);
}
template <typename Traits>
__device__ __forceinline__ void release_stream_tile(const StreamSmemSm90<Traits>& smem, int tile,
                                                    bool per_thread = false) {
  arrive_after_warp_accesses(&smem.empty[tile % Traits::kStages], /*one_per_warp=*/!per_thread);
}

// One batch with the two score products of a stage's Y tiles against X (acc_s = X_s Y_s^T, acc_t = X_t Y_t^T),
// committed; the caller waits for it.
template <typename Traits, typename TiledMma, typename Acc>
__device__ __forceinline__ void issue_score_products(TiledMma score_mma, const StreamSmemSm90<Traits>& smem, int stage,
                                                     Acc& acc_s, Acc& acc_t) {
  using Smem = StreamSmemSm90<Traits>;
  warpgroup_products_begin(acc_s, acc_t);
  warpgroup_gemm_ss(score_mma, acc_s, Smem::template tile<typename Traits::XTileS>(smem.x_s),
                    Smem::template tile<typename Traits::YTileS>(smem.y_s(stage)), threadIdx.x);
  warpgroup_gemm_ss(score_mma, acc_t, Smem::template tile<typename Traits::XTileT>(smem.x_t_at(stage)),
                    Smem::template tile<typename Traits::YTileT>(smem.y_t(stage)), threadIdx.x);
  warpgroup_commit_batch();
}

// One batch with acc_grad += dS Y_s: the score gradients ds_a (converted, as wgmma's register A operand) times the
// stage's Y_s tile read transposed (the gradient kernels' dQ_s += dS K_s, dK_s += dS^T Q_s), committed; the caller
// waits for it, then fences acc_grad (and ds_a, if it lives on).
template <typename Traits, typename DsA, typename AccGrad>
__device__ __forceinline__ void issue_score_grad_product(const StreamSmemSm90<Traits>& smem, int stage, DsA& ds_a,
                                                         AccGrad& acc_grad) {
  typename Traits::GradMmaS grad_mma;
  Tensor y_s = make_tensor(make_smem_ptr(smem.y_s(stage)), typename Traits::YTileS::LayoutTransposed{});
  warpgroup_fence_operand(ds_a);
  warpgroup_products_begin(acc_grad);
  warpgroup_gemm_rs(grad_mma, acc_grad, ds_a, y_s, threadIdx.x);
  warpgroup_commit_batch();
}

// The producer role of a CTA owning query rows [row0, row_end) of (sequence seq, head h) whose key range starts at
// key_begin: one thread of the producer warpgroup issues the copies.
template <typename Traits>
__device__ __forceinline__ void run_stream_producer(const AttentionKLParams& p, const StreamTmaLoads<Traits>& tma,
                                                    const StreamSmemSm90<Traits>& smem,
                                                    const AttentionKLParams::Sequence& seq, int b, int h, int row0,
                                                    int key_begin, int n_tiles) {
  if (threadIdx.x == Traits::kNMmaThreads && n_tiles > 0) {
    const StreamTileCoords coords{h,
                                  h,
                                  h / (p.num_heads / p.student.num_kv_heads),
                                  h / (p.num_heads / p.teacher.num_kv_heads),
                                  0,
                                  p.cu_seqlens_q != nullptr ? 0 : b,
                                  static_cast<int>(seq.q_start) + row0,
                                  static_cast<int>(seq.k_start) + key_begin};
    produce_stream_tiles(tma, smem, coords, n_tiles);
  }
}

// Set up the barriers, then run the producer warpgroup's role and the MMA warpgroups' role, each after setmaxnreg
// (which takes effect only when each role is one branch of a single if/else). extra_full_arrivals,
// per_thread_release: see init_stream_barriers.
template <typename Traits, typename ProducerRole, typename MmaRole>
__device__ __forceinline__ void run_warp_specialized(const StreamSmemSm90<Traits>& smem, int extra_full_arrivals,
                                                     bool per_thread_release,
                                                     ProducerRole&& producer, MmaRole&& mma) {
  if (threadIdx.x == 0) init_stream_barriers(smem, extra_full_arrivals, per_thread_release);
  __syncthreads();
  if (cutlass::canonical_warp_group_idx() == Traits::kNMmaThreads / 128) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    producer();
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kMmaRegisters>();
    mma();
  }
}

}  // namespace cuda
}  // namespace streamkl

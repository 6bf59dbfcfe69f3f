// The fused Hopper backward's per-tile products (FusedGradTraitsSm90): the dK kernel, which already holds the score
// gradients dS^T of its key block against each streamed query tile, also produces that tile's dQ share, so the dQ
// kernel, and with it a second recomputation of both score products and both exponentials per score, is not needed.
//
// Per tile (64 query rows against the CTA's 128 keys):
//   dK_s  += dS^T Q_s     each MMA warpgroup its 64 keys; dS^T from registers, Q_s from the stage, transposed;
//   dQ_t   = dS K_s       over all 128 keys, each warpgroup 64 of the 128 head-dim columns; dS^T goes through shared
//                         memory (both warpgroups' rows are needed, and a register operand would have to hold query
//                         rows while the registers hold key rows);
//   dq_accum[rows] += dQ_t   the fp32 tile staged in shared memory, then one bulk reduction per row
//                         (cp.reduce.async.bulk ... add.f32) into a workspace laid out like dQ, scaled and converted by
//                         an epilogue kernel. A warp of the producer warpgroup issues the reductions, so the MMA
//                         warpgroups only hand the staged tile over (a named-barrier arrival) and wait only if the
//                         previous tile is still being read. Per-thread float2 atomics instead measured 6.05 ms for the
//                         whole forward+backward at N=8192, D=128 (two-kernel backward: 4.52 ms; bench/RESULTS.md).
// Not bitwise deterministic (the order of the reductions varies): the op runs the two-kernel backward under
// torch.use_deterministic_algorithms. Torch-free.
#pragma once

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "cute_helpers.cuh"
#include "kernel_traits_sm90.cuh"
#include "score_stream.cuh"
#include "tma_stream_sm90.cuh"
#include "warpgroup_mma.cuh"

namespace streamkl {
namespace cuda {

using namespace cute;

// Named barriers (ids above CUTLASS's reserved ones): the MMA warpgroups' "both halves of the dS tile are stored", and
// between them and the dQ-writer warp, "the staging tile is free" and "a dQ tile is staged".
enum FusedDqBarrier : uint32_t { kDsTileStored = 0, kDqTileFree = 1, kDqTileStaged = 2 };

// Where a tile's dQ share goes: its first row in the fp32 workspace, rows row_stride floats apart, and how many of
// its rows exist (the last tile of a sequence may be partial).
struct DqTileRows {
  float* first;
  int64_t row_stride;
  int valid_rows;
};

// The dQ product's accumulator: this warpgroup's 64 columns of [kBlockN query rows, D_s].
template <typename Traits>
__device__ __forceinline__ auto make_dq_tile_accumulator() {
  return partition_fragment_C(typename Traits::DqMma{}, Shape<Int<Traits::kBlockN>, Int<Traits::kDimS>>{});
}

// This thread's score gradients dS^T (the score accumulator converted to the element type, [kBlockM keys, kBlockN
// query rows]) into a dS tile, a column pair (one 32-bit store) at a time.
template <typename Traits, typename Ds>
__device__ __forceinline__ void store_ds_tile(typename Traits::Element* ds_tile, const Ds& ds) {
  using Element = typename Traits::Element;
  struct alignas(4) Pair {
    Element first, second;
  };
  Tensor tile = make_tensor(make_smem_ptr(ds_tile), typename Traits::DsTile::Layout{});
  for_each_row_pair<Traits::kBlockM, Traits::kBlockN>(
      typename Traits::TiledMma{}, ds, Traits::kBlockM, threadIdx.x, [&](int row, int col, Element v0, Element v1) {
        *reinterpret_cast<Pair*>(&tile(row, col)) = Pair{v0, v1};
      });
}

// A tile's two gradient products (see the top of the file), both waited for. acc_s: dS^T (fp32); the
// stage's Q_s is free once this returns (the dK product was its last reader).
template <typename Traits, typename Acc, typename AccDk, typename AccDq>
__device__ __forceinline__ void fused_grad_products(const StreamSmemSm90<Traits>& smem, int stage,
                                                    const Acc& acc_s, AccDk& acc_dk, AccDq& acc_dq) {
  using Element = typename Traits::Element;
  // The dS tile is free: its readers, the previous tile's dQ products, completed before the previous tile's
  // kDqTileFree barrier (stage_dq_tile), which every MMA thread reaches only after waiting for its own.
  Element* ds_tile = smem.ds;
  Tensor ds = convert_fragment<Element>(acc_s);  // once, for the tile and for the dK product's register operand
  store_ds_tile<Traits>(ds_tile, ds);
  cutlass::arch::fence_view_async_shared();  // the plain stores, before the wgmma (async proxy) reads them

  Tensor ds_a = make_tensor(ds.data(), wgmma_acc_as_operand_a(ds.layout()));
  issue_score_grad_product(smem, stage, ds_a, acc_dk);  // dK_s += dS^T Q_s

  cutlass::arch::NamedBarrier::sync(Traits::kNMmaThreads, kDsTileStored);  // both warpgroups' dS rows are stored
  Tensor ds_rows = make_tensor(make_smem_ptr(ds_tile), typename Traits::DsTile::LayoutTransposed{});  // [query, key]
  Tensor k_s = make_tensor(make_smem_ptr(smem.x_s), typename Traits::XTileS::LayoutTransposed{});    // [D_s, key]
  clear(acc_dq);  // defined before the product (C7515); its first k-step overwrites it
  warpgroup_products_begin(acc_dq);
  warpgroup_gemm_ss(typename Traits::DqMma{}, acc_dq, ds_rows, k_s, threadIdx.x);
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(ds_a);
  warpgroup_fence_operand(acc_dk);
  warpgroup_fence_operand(acc_dq);
}

// The MMA threads' side of a tile's dQ reduction: once the dQ-writer warp has read the previous tile, the
// accumulator into the staging tile, handed over without waiting.
template <typename Traits, typename AccDq>
__device__ __forceinline__ void stage_dq_tile(const StreamSmemSm90<Traits>& smem, const AccDq& acc_dq) {
  constexpr int kPitch = Traits::kDqPitch, kThreads = Traits::kNMmaThreads + 32;
  cutlass::arch::NamedBarrier::sync(kThreads, kDqTileFree);
  for_each_row_pair<Traits::kBlockN, Traits::kDimS>(
      typename Traits::DqMma{}, acc_dq, Traits::kBlockN, threadIdx.x, [&](int row, int col, float v0, float v1) {
        *reinterpret_cast<float2*>(smem.dq_tile + row * kPitch + col) = make_float2(v0, v1);
      });
  cutlass::arch::fence_view_async_shared();  // the plain stores, before the bulk reductions (async proxy) read them
  cutlass::arch::NamedBarrier::arrive(kThreads, kDqTileStaged);
}

// The dQ-writer warp (a warp of the producer warpgroup): for each of the n_tiles tiles, free the staging tile, wait
// for the MMA threads to stage the tile's dQ, then add each valid row into the rows dq_tile_rows(tile) names with one
// bulk reduction per row (two rows per lane), and wait until they have read the staging tile.
template <typename Traits, typename DqTileRowsFn>
__device__ __forceinline__ void write_dq_tiles(const StreamSmemSm90<Traits>& smem, int n_tiles,
                                               DqTileRowsFn&& dq_tile_rows, int lane) {
  constexpr int kPitch = Traits::kDqPitch, kThreads = Traits::kNMmaThreads + 32;
  for (int tile = 0; tile < n_tiles; ++tile) {
    cutlass::arch::NamedBarrier::arrive(kThreads, kDqTileFree);
    const DqTileRows dst = dq_tile_rows(tile);
    cutlass::arch::NamedBarrier::sync(kThreads, kDqTileStaged);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    for (int row = lane; row < Traits::kBlockN && row < dst.valid_rows; row += 32)
      asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(
                       dst.first + row * dst.row_stride),
                   "r"(cute::cast_smem_ptr_to_uint(smem.dq_tile + row * kPitch)),
                   "r"(Traits::kDimS * int(sizeof(float)))
                   : "memory");
#endif
    tma_store_arrive();  // commits this lane's bulk group
    tma_store_wait<0>();  // ... and waits until it has read the staging tile
  }
}

}  // namespace cuda
}  // namespace streamkl

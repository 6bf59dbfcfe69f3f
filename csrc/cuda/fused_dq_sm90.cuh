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
//                         an epilogue kernel. Per-thread float2 atomics instead measured 6.05 ms for the whole
//                         forward+backward at N=8192, D=128 (two-kernel backward: 4.52 ms; bench/RESULTS.md).
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

// Named barriers of the MMA warpgroups (ids above CUTLASS's reserved ones).
enum FusedDqBarrier : uint32_t { kDsTileStored = 0, kDqTileStaged = 1 };

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

// The MMA threads that issue the bulk reductions: one per row of the staged dQ tile.
template <typename Traits>
__device__ __forceinline__ bool issues_dq_row() {
  return threadIdx.x < Traits::kBlockN;
}

// This thread's score gradients dS^T (the fp32 score accumulator, [kBlockM keys, kBlockN query rows]) into a dS
// tile, converted, a column pair (one 32-bit store) at a time.
template <typename Traits, typename Acc>
__device__ __forceinline__ void store_ds_tile(typename Traits::Element* ds_tile, const Acc& acc_s) {
  using Element = typename Traits::Element;
  struct alignas(4) Pair {
    Element first, second;
  };
  Tensor tile = make_tensor(make_smem_ptr(ds_tile), typename Traits::DsTile::Layout{});
  for_each_row_pair<Traits::kBlockM, Traits::kBlockN>(
      typename Traits::TiledMma{}, acc_s, Traits::kBlockM, threadIdx.x, [&](int row, int col, float v0, float v1) {
        *reinterpret_cast<Pair*>(&tile(row, col)) = Pair{static_cast<Element>(v0), static_cast<Element>(v1)};
      });
}

// A tile's two gradient products (see the top of the file), both waited for. acc_s: dS^T (fp32); the
// stage's Q_s is free once this returns (the dK product was its last reader).
template <typename Traits, typename Acc, typename AccDk, typename AccDq>
__device__ __forceinline__ void fused_grad_products(const StreamSmemSm90<Traits>& smem, int stage,
                                                    const Acc& acc_s, AccDk& acc_dk, AccDq& acc_dq) {
  using Element = typename Traits::Element;
  // The dS tile is free: the previous tile's dQ products, its readers, completed before the barrier in
  // reduce_dq_tile.
  Element* ds_tile = smem.ds;
  store_ds_tile<Traits>(ds_tile, acc_s);
  cutlass::arch::fence_view_async_shared();  // the plain stores, before the wgmma (async proxy) reads them

  typename Traits::GradMmaS dk_mma;
  Tensor ds = convert_fragment<Element>(acc_s);
  Tensor ds_a = make_tensor(ds.data(), wgmma_acc_as_operand_a(ds.layout()));
  Tensor q_s = make_tensor(make_smem_ptr(smem.y_s(stage)), typename Traits::YTileS::LayoutTransposed{});
  warpgroup_fence_operand(ds_a);
  warpgroup_products_begin(acc_dk);
  warpgroup_gemm_rs(dk_mma, acc_dk, ds_a, q_s, threadIdx.x);
  warpgroup_commit_batch();

  // After this barrier both warpgroups' dS rows are stored, and the previous tile's staged dQ has been read by its
  // bulk reductions (their issuers wait here), so it may be overwritten after the product below.
  if (issues_dq_row<Traits>()) tma_store_wait<0>();
  cutlass::arch::NamedBarrier::sync(Traits::kNMmaThreads, kDsTileStored);
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

// dst.first[r][c] += acc_dq[r][c] for the tile's valid rows: the accumulator into the staging tile, then one bulk
// reduction per row, issued without waiting (the issuers wait before the staging tile is written again, in
// fused_grad_products, and before the CTA exits, finish_dq_reductions).
template <typename Traits, typename AccDq>
__device__ __forceinline__ void reduce_dq_tile(const StreamSmemSm90<Traits>& smem, const AccDq& acc_dq,
                                               const DqTileRows& dst) {
  constexpr int kPitch = Traits::kDqPitch;
  for_each_row_pair<Traits::kBlockN, Traits::kDimS>(
      typename Traits::DqMma{}, acc_dq, Traits::kBlockN, threadIdx.x, [&](int row, int col, float v0, float v1) {
        *reinterpret_cast<float2*>(smem.dq_tile + row * kPitch + col) = make_float2(v0, v1);
      });
  cutlass::arch::fence_view_async_shared();  // the plain stores, before the bulk reductions (async proxy) read them
  cutlass::arch::NamedBarrier::sync(Traits::kNMmaThreads, kDqTileStaged);
  const int row = threadIdx.x;
  if (issues_dq_row<Traits>()) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (row < dst.valid_rows)
      asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(
                       dst.first + row * dst.row_stride),
                   "r"(cute::cast_smem_ptr_to_uint(smem.dq_tile + row * kPitch)),
                   "r"(Traits::kDimS * int(sizeof(float)))
                   : "memory");
#endif
    tma_store_arrive();  // commits this thread's bulk group, empty past the valid rows: one group per tile
  }
}

// Before the CTA exits (its shared memory with it): the issuers' last bulk reductions have read the staging tile.
template <typename Traits>
__device__ __forceinline__ void finish_dq_reductions() {
  if (issues_dq_row<Traits>()) tma_store_wait<0>();
}

}  // namespace cuda
}  // namespace streamkl

// acc = A * B^T on Hopper tensor cores (wgmma), both operands read from shared memory through GMMA
// descriptors. Each warpgroup of the TiledMma computes its 64-row slab. The caller opens a batch with
// warpgroup_products_begin, issues one or more products, commits the batch (warpgroup_commit_batch) and later
// waits for it (warpgroup_wait<N>, then warpgroup_fence_operand on the accumulators it reads).
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>

namespace streamkl {
namespace cuda {

using namespace cute;

template <typename TiledMma, typename Acc, typename SA, typename SB>
__device__ __forceinline__ void warpgroup_gemm_ss(TiledMma tiled_mma, Acc& acc, const SA& sA, const SB& sB, int tid) {
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor rA = thr_mma.partition_fragment_A(sA);  // descriptors, not data
  Tensor rB = thr_mma.partition_fragment_B(sB);
  tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;  // the first k-step overwrites the accumulator
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    cute::gemm(tiled_mma, rA(_, _, k), rB(_, _, k), acc);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
}

// acc += A * B^T with A from registers (a converted accumulator, see wgmma_acc_as_operand_a) and B read from shared
// memory through descriptors.
template <typename TiledMma, typename Acc, typename RA, typename SB>
__device__ __forceinline__ void warpgroup_gemm_rs(TiledMma tiled_mma, Acc& acc, const RA& rA, const SB& sB, int tid) {
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor rB = thr_mma.partition_fragment_B(sB);
  tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) cute::gemm(tiled_mma, rA(_, _, k), rB(_, _, k), acc);
}

// A wgmma accumulator ((2, 2, N/8), M, 1) seen as the register A operand of a following k16 wgmma,
// ((2, 2, 2), M, N/16): the C fragment's column pairs, row halves and neighbouring 8-column groups are the A
// fragment's k pairs, row halves and k halves.
template <typename Layout>
__device__ __forceinline__ auto wgmma_acc_as_operand_a(Layout acc) {
  auto v = logical_divide(get<0>(acc), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
  return make_layout(make_layout(get<0>(v), get<1>(v), get<2, 0>(v)), get<1>(acc), get<2, 1>(v));
}

// Make the accumulators' registers visible to the asynchronous MMAs and open a batch.
template <typename... Accs>
__device__ __forceinline__ void warpgroup_products_begin(Accs&... accs) {
  (warpgroup_fence_operand(accs), ...);
  warpgroup_arrive();
}

}  // namespace cuda
}  // namespace streamkl

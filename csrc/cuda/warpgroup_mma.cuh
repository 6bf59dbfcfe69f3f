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

// Make the accumulators' registers visible to the asynchronous MMAs and open a batch.
template <typename... Accs>
__device__ __forceinline__ void warpgroup_products_begin(Accs&... accs) {
  (warpgroup_fence_operand(accs), ...);
  warpgroup_arrive();
}

}  // namespace cuda
}  // namespace streamkl

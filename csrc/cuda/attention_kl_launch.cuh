// Host-side launchers of the Ampere-path attention-KL kernels: tile configuration per head-dim pair, grid
// shape, dynamic shared memory. Instantiated once per (dtype, D_s, D_t) by csrc/cuda/instantiations/.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "attention_kl_bwd.cuh"
#include "attention_kl_fwd.cuh"
#include "kernel_traits.cuh"

namespace streamkl {
namespace cuda {

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("streamkl: ") + what + " failed: " + cudaGetErrorString(err));
}

template <typename Kernel>
inline void launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                             const AttentionKLParams& p, const char* what) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("streamkl: ") + what + ": cannot reserve " + std::to_string(smem_bytes) +
                               " bytes of shared memory: " + cudaGetErrorString(err));
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(p);
  check_launch(what);
}

// Forward: 128 query rows per CTA, 16 per warp (8 warps); key tiles of 64 (32 above head dim 128).
template <typename Element, int kDimS, int kDimT>
using ForwardTraits = KernelTraits<Element, kDimS, kDimT, 128, (kDimS > 128 || kDimT > 128) ? 32 : 64, 8>;

// Backward: 64 rows per CTA (16 per warp), Y tiles of 32: the gradient accumulators take the registers
// the forward spends on wider score tiles (about 170 registers at D=128 without teacher grads).
template <typename Element, int kDimS, int kDimT>
using BackwardTraits = KernelTraits<Element, kDimS, kDimT, 64, 32, 4>;

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <typename Element, int kDimS, int kDimT>
void run_attention_kl_fwd(const AttentionKLParams& p, cudaStream_t stream) {
  using Traits = ForwardTraits<Element, kDimS, kDimT>;
  const dim3 grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.num_heads, p.batch);
  launch_with_smem(attention_kl_fwd_kernel<Traits>, grid, Traits::kNThreads, Traits::kSmemBytes, stream, p,
                   "attention_kl forward kernel");
}

template <typename Element, int kDimS, int kDimT, bool kTeacherGrad>
void run_attention_kl_bwd_impl(const AttentionKLParams& p, cudaStream_t stream) {
  using Traits = BackwardTraits<Element, kDimS, kDimT>;
  const dim3 dq_grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.num_heads, p.batch);
  launch_with_smem(attention_kl_bwd_dq_kernel<Traits, kTeacherGrad>, dq_grid, Traits::kNThreads, Traits::kSmemBytes,
                   stream, p, "attention_kl backward dQ kernel");
  const dim3 dk_grid(ceil_div(p.seqlen_k, Traits::kBlockM), p.num_heads, p.batch);
  launch_with_smem(attention_kl_bwd_dk_kernel<Traits, kTeacherGrad>, dk_grid, Traits::kNThreads, Traits::kSmemBytes,
                   stream, p, "attention_kl backward dK kernel");
}

template <typename Element, int kDimS, int kDimT>
void run_attention_kl_bwd(const AttentionKLParams& p, cudaStream_t stream) {
  if (p.teacher_grad)
    run_attention_kl_bwd_impl<Element, kDimS, kDimT, true>(p, stream);
  else
    run_attention_kl_bwd_impl<Element, kDimS, kDimT, false>(p, stream);
}

}  // namespace cuda
}  // namespace streamkl

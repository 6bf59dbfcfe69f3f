// Registry of the compiled CUDA kernel instantiations. Each instantiation file registers its launcher at
// load time, so families disabled at build time (STREAMKL_DISABLE_<TOKEN>) simply are not found and the
// op reports a clear error instead of failing to link. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include "../kernels/attention_params.h"

namespace streamkl {
namespace cuda {

// kForwardSm90 / kBackwardSm90: the Hopper-path forward and backward (wgmma, TMA, sm_90a), chosen over kForward /
// kBackward on compute capability 9.x for the configurations they take. kForwardAggregated / kBackwardAggregated:
// head-aggregated teachers (teacher_head_reduce="mean") on the Ampere-path kernels; kForwardAggregatedSm90 /
// kBackwardAggregatedSm90: the same on the Hopper-path kernels, chosen over those on 9.x.
enum class KernelFamily : int {
  kForward = 0,
  kBackward = 1,
  kForwardSm90 = 2,
  kBackwardSm90 = 3,
  kForwardAggregated = 4,
  kBackwardAggregated = 5,
  kForwardAggregatedSm90 = 6,
  kBackwardAggregatedSm90 = 7
};
enum class ElementType : int { kFloat16 = 0, kBFloat16 = 1 };

struct KernelKey {
  KernelFamily family;
  ElementType dtype;
  int dim_s;
  int dim_t;
};

using LaunchFn = void (*)(const AttentionKLParams&, cudaStream_t);

// The fused student-only backward (one kernel, dQ through an fp32 workspace) exists for head dims up to
// 128; larger ones use the two-kernel backward. Shared by the launchers and the op, which allocates the
// workspace only when it will be used.
constexpr bool fused_backward_supports(int dim_s, int dim_t) { return dim_s <= 128 && dim_t <= 128; }
// The Hopper path's fused backward (fused_dq_sm90.cuh) splits the student head dim over two warpgroups of 64 columns:
// head dim 128 only.
constexpr bool fused_backward_sm90_supports(int dim_s) { return dim_s == 128; }

// Returns true so it can initialize a namespace-scope constant in instantiation files.
bool register_kernel(const KernelKey& key, LaunchFn fn);
LaunchFn find_kernel(const KernelKey& key);
// Human-readable list of the registered (dtype, dim_s, dim_t) for one family, for error messages.
const char* describe_kernels(KernelFamily family);

}  // namespace cuda
}  // namespace streamkl

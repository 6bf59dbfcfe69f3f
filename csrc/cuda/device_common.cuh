// Small device-side helpers shared by the attention-KL kernels (forward, JSD pass 2, backward).
#pragma once

namespace streamkl {
namespace cuda {

// Kernels feed scores pre-multiplied by log2(e) to the online core (Base2 in online_kl.h): ex2 directly.
constexpr float kLog2e = 1.4426950408889634f;

// Compile-time choice between two references (the weighting side is a template parameter, so the
// per-element loop has no select between student and teacher).
template <bool kFirst, typename T>
__device__ __forceinline__ T& pick(T& first, T& second) {
  if constexpr (kFirst) return first; else return second;
}

}  // namespace cuda
}  // namespace streamkl

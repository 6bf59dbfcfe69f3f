// Portability macros shared by the host (CPU) and device (CUDA) kernel code.
// Kept torch-free so kernel headers compile with a bare C++ compiler or nvcc.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SKL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SKL_HOST_DEVICE inline
#endif

#include <cmath>
#include <limits>

namespace streamkl {

template <typename T>
SKL_HOST_DEVICE T neg_infinity() {
  // -HUGE_VAL works on host and device alike; numeric_limits is host-only in older nvcc.
  return static_cast<T>(-HUGE_VAL);
}

template <typename T>
SKL_HOST_DEVICE T max_of(T a, T b) { return a > b ? a : b; }

#if defined(__CUDA_ARCH__)
// One FMNMX instead of a compare and a select (the online state's rescale runs per row per key tile). Differs
// from the template only when an operand is NaN (fmaxf returns the other one); a NaN score still reaches the
// row's sums through its exponential, so results stay NaN.
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
#endif

template <typename T>
SKL_HOST_DEVICE T min_of(T a, T b) { return a < b ? a : b; }

// a * b + c with one rounding (one FFMA on the GPU, where a separate multiply and add are two dependent
// instructions).
template <typename T>
SKL_HOST_DEVICE T fused_multiply_add(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

}  // namespace streamkl

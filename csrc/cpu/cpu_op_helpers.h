// Small torch-side helpers of the CPU op implementations: the parallel-for handed to the torch-free kernels
// and the upcast of inputs to the compute dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../ops/attention_inputs.h"

namespace streamkl {
namespace cpu {

// The ParallelFor of the CPU kernels: body(lo, hi) on sub-ranges of [begin, end), one task at a time.
struct AtenParallelFor {
  template <typename F>
  void operator()(int64_t begin, int64_t end, F&& body) const {
    at::parallel_for(begin, end, /*grain_size=*/1, body);
  }
};

// float64 stays float64; float32 / float16 / bfloat16 are computed in float32.
inline at::ScalarType compute_dtype(at::ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// The input in the compute dtype with a contiguous last dim (other strides kept).
inline at::Tensor to_compute(const at::Tensor& t) {
  return with_contiguous_last_dim(t.to(compute_dtype(t.scalar_type())));
}

}  // namespace cpu
}  // namespace streamkl

// Launchers of linear_kl's CUDA epilogue kernels (linear_kl_epilogue.cuh), one instantiation per input
// element type. Torch-free: compiles with bare nvcc.
#include <algorithm>

#include "linear_kl_epilogue.cuh"
#include "linear_kl_epilogue.h"

namespace streamkl {
namespace cuda {
namespace {

using linear_epilogue::kThreads;

// Calls f(Elem{}) with the C++ type of the element.
template <typename F>
cudaError_t with_element_type(LinearElement element, F&& f) {
  switch (element) {
    case LinearElement::kFloat16:
      return f(__half{});
    case LinearElement::kBFloat16:
      return f(__nv_bfloat16{});
    case LinearElement::kFloat32:
      return f(float{});
  }
  return cudaErrorInvalidValue;
}

// One block per token row (the op checks that T fits a grid dimension).
dim3 row_grid(const LinearKLParams& p) { return dim3(static_cast<unsigned>(p.num_rows)); }

JsdWeights<float> jsd_weights(const LinearKLParams& p) {
  return JsdWeights<float>::mixture_weighted(static_cast<float>(p.beta));
}

}  // namespace

cudaError_t launch_linear_forward_chunk(const LinearKLParams& p, const LinearLogitChunk& chunk, LinearPass pass,
                                        const LinearRowState& state, LinearElement element, cudaStream_t stream) {
  const bool teacher_weights = linear_online_teacher_weights(p);
  return with_element_type(element, [&](auto tag) {
    using Elem = decltype(tag);
    if (pass == LinearPass::kOnline)
      linear_epilogue::online_chunk_kernel<Elem><<<row_grid(p), kThreads, 0, stream>>>(p, chunk, state,
                                                                                       teacher_weights);
    else
      linear_epilogue::jsd_mixture_chunk_kernel<Elem><<<row_grid(p), kThreads, 0, stream>>>(
          p, chunk, state, teacher_weights, jsd_weights(p));
    return cudaGetLastError();
  });
}

cudaError_t launch_linear_forward_finish(const LinearKLParams& p, const LinearRowState& state, cudaStream_t stream) {
  constexpr int kRowsPerBlock = 256;
  const int64_t blocks = std::min<int64_t>((p.num_rows + kRowsPerBlock - 1) / kRowsPerBlock, 4096);
  linear_epilogue::finish_rows_kernel<<<static_cast<unsigned>(blocks), kRowsPerBlock, 0, stream>>>(
      p, state, linear_online_teacher_weights(p), jsd_weights(p));
  return cudaGetLastError();
}

cudaError_t launch_linear_grad_chunk(const LinearKLParams& p, const LinearLogitChunk& chunk, LinearElement element,
                                     cudaStream_t stream) {
  return with_element_type(element, [&](auto tag) {
    using Elem = decltype(tag);
    linear_epilogue::grad_chunk_kernel<Elem><<<row_grid(p), kThreads, 0, stream>>>(p, chunk, jsd_weights(p));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace streamkl

// TMA (bulk tensor copy) descriptors for the warp-specialized Hopper kernels (a CTA owns a block of X rows and
// streams tiles of Y rows: queries and keys, or keys and queries in the dK kernel): one per operand tile of each
// side, built on the host from AttentionKLParams and passed to the kernel as a __grid_constant__ parameter.
// Torch-free.
//
// Each operand is described to the copy engine as a 4-d tensor (rows, head dim, heads, batch) with the params'
// strides; the varlen layout is one batch of total rows, and a CTA offsets its row coordinate by the sequence's
// first row (cu_seqlens). Rows past the tensor's extent arrive as zeros; rows past a varlen sequence's end belong
// to the next sequence and are masked by the kernel like any key outside the row's range.
#pragma once

#include <stdexcept>
#include <string>

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>

#include "../kernels/attention_params.h"

namespace streamkl {
namespace cuda {

using namespace cute;

using TmaGmemShape = Shape<int, int, int, int>;             // (rows, dim, heads, batch)
using TmaGmemStride = Stride<int64_t, _1, int64_t, int64_t>;  // elements

template <typename Element, typename SmemLayout>
using TmaLoad = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                       make_tensor(make_gmem_ptr(static_cast<const Element*>(nullptr)),
                                                   TmaGmemShape{}, TmaGmemStride{}),
                                       SmemLayout{}));

// One operand of one side as the copy engine sees it.
struct TmaOperand {
  const void* base;
  TmaGmemShape shape;
  TmaGmemStride stride;
};

// The copy engine takes no stride for a dimension of extent 1 on trust (it must still be a multiple of 16 bytes
// and below 2^40), so such a dimension gets the row stride, which is both.
inline int64_t stride_or_row_stride(int extent, int64_t stride, int64_t row_stride) {
  return extent == 1 ? row_stride : stride;
}

inline TmaOperand tma_operand(const void* base, int64_t rows, int dim, int heads, int batch, int64_t row_stride,
                              int64_t head_stride, int64_t batch_stride) {
  return TmaOperand{base, make_shape(static_cast<int>(rows), dim, heads, batch),
                    make_stride(row_stride, _1{}, stride_or_row_stride(heads, head_stride, row_stride),
                                stride_or_row_stride(batch, batch_stride, row_stride))};
}

// The four descriptors and the gmem shapes the kernel rebuilds its coordinate tensors from.
template <typename Traits>
struct StreamTmaLoads {
  using Element = typename Traits::Element;
  TmaLoad<Element, typename Traits::XTileS::Layout> x_s;
  TmaLoad<Element, typename Traits::XTileT::Layout> x_t;
  TmaLoad<Element, typename Traits::YTileS::Layout> y_s;
  TmaLoad<Element, typename Traits::YTileT::Layout> y_t;
  TmaGmemShape x_s_shape, x_t_shape, y_s_shape, y_t_shape;
};

template <typename Element, typename SmemLayout>
TmaLoad<Element, SmemLayout> make_tma_load(const TmaOperand& op) {
  Tensor g = make_tensor(make_gmem_ptr(static_cast<const Element*>(op.base)), op.shape, op.stride);
  return make_tma_copy(SM90_TMA_LOAD{}, g, SmemLayout{});
}

// Host side. The params' tensors start on 16-byte boundaries with every row, head and batch stride a multiple of
// 16 bytes (the op's kernel_ready), which is what the copy engine requires. keys_as_x: X is a block of keys and Y
// the streamed query rows (the dK kernel); otherwise X is a block of queries and Y the keys.
// CUTLASS encodes a descriptor through the driver entry point it looks up with cudaGetDriverEntryPointByVersion,
// which fails on a thread with no current CUDA context. The backward runs on autograd's device thread, where torch
// may not have made one current yet (it sets the device without a runtime call when the device is already the
// current one): a first backward on the Hopper path crashed there in a fresh process. cudaFree(nullptr) makes the
// device's primary context current on this thread, once per thread.
inline void make_context_current_on_this_thread() {
  thread_local bool done = false;
  if (done) return;
  const cudaError_t err = cudaFree(nullptr);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("streamkl: cannot make a CUDA context current: ") + cudaGetErrorString(err));
  done = true;
}

template <typename Traits>
StreamTmaLoads<Traits> make_stream_tma_loads(const AttentionKLParams& p, bool keys_as_x = false) {
  using Element = typename Traits::Element;
  make_context_current_on_this_thread();
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int batch = varlen ? 1 : p.batch;
  // An aggregated teacher has r query heads per student head (AttentionKLParams::num_teacher_heads).
  auto queries = [&](const AttentionSide& s, int heads) {
    return tma_operand(s.q, s.q_rows, s.head_dim, heads, batch, s.q_row_stride, s.q_head_stride, s.q_batch_stride);
  };
  auto keys = [&](const AttentionSide& s) {
    return tma_operand(s.k, s.k_rows, s.head_dim, s.num_kv_heads, batch, s.k_row_stride, s.k_head_stride,
                       s.k_batch_stride);
  };
  const TmaOperand qs = queries(p.student, p.num_heads), qt = queries(p.teacher, p.num_teacher_heads());
  const TmaOperand ks = keys(p.student), kt = keys(p.teacher);
  const TmaOperand& xs = keys_as_x ? ks : qs;
  const TmaOperand& xt = keys_as_x ? kt : qt;
  const TmaOperand& ys = keys_as_x ? qs : ks;
  const TmaOperand& yt = keys_as_x ? qt : kt;
  return StreamTmaLoads<Traits>{make_tma_load<Element, typename Traits::XTileS::Layout>(xs),
                                 make_tma_load<Element, typename Traits::XTileT::Layout>(xt),
                                 make_tma_load<Element, typename Traits::YTileS::Layout>(ys),
                                 make_tma_load<Element, typename Traits::YTileT::Layout>(yt),
                                 xs.shape, xt.shape, ys.shape, yt.shape};
}

}  // namespace cuda
}  // namespace streamkl

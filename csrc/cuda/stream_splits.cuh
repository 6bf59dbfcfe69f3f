// Split streams (AttentionKLParams::stream_splits), device side: which X block and which run of its Y tiles a CTA
// takes, and where a split forward CTA leaves its partial row states. Torch-free.
//
// Why: an Ampere-path CTA owns one X block (64 or 128 query rows, or keys in the dK kernel) of one head and streams
// every Y tile that block sees. With one student head, as in DSA's indexer (teacher heads aggregated onto it), a
// 4096-row problem is 64 CTAs on a 132-SM GPU, each streaming its tiles through 64 teacher heads: half the SMs idle,
// one CTA per busy SM (bench/RESULTS.md, sessions 6-7). Splitting each block's tiles over several CTAs fills the GPU;
// the partial results are merged after, in a fixed order (the forward's online states; the gradients, written by each
// split to its own fp32 slice): no atomics, so results are deterministic.
#pragma once

#include "../kernels/attention_mask.h"
#include "../kernels/attention_params.h"

namespace streamkl {
namespace cuda {

// Floats per partial row state of a split forward: the OnlineKLState fields (max_w, sum_w, max_o, sum_o, acc).
constexpr int kSplitStateFloats = 5;
// Rows per CTA of the forward's combine kernels (one thread per row).
constexpr int kCombineRows = 128;

// Rows of each split's slice of p.split_states: B * H * N_q bounds every row_index in both layouts (varlen:
// total_q * H <= B * max_seqlen_q * H).
__host__ __device__ inline int64_t split_state_rows(const AttentionKLParams& p) {
  return static_cast<int64_t>(p.batch) * p.num_heads * p.seqlen_q;
}

// The CTA's X block (counted over the unsplit grid) and its split: blockIdx.x runs over blocks x splits, the
// splits of a block adjacent.
struct BlockAndSplit {
  int block, split;
};
__device__ __forceinline__ BlockAndSplit block_and_split(const AttentionKLParams& p) {
  return BlockAndSplit{static_cast<int>(blockIdx.x) / p.stream_splits, static_cast<int>(blockIdx.x) % p.stream_splits};
}
__device__ __forceinline__ int unsplit_blocks(const AttentionKLParams& p) {
  return static_cast<int>(gridDim.x) / p.stream_splits;
}

// The part of a CTA's Y range that its split streams: tiles [split * split_tiles, (split + 1) * split_tiles) of
// the block's own tile sequence from y.begin. The tiles stay where the unsplit stream puts them, so no tile straddles
// two splits (a tile past a split's end would see keys the next split also counts); only the last tile of the whole
// range reaches past y.end, as without a split, and the kernels' masks cut it. Empty past the block's last tile.
template <int kBlockN>
__device__ __forceinline__ KeyRange split_part(const AttentionKLParams& p, const KeyRange& y, int split) {
  if (p.stream_splits == 1) return y;
  const int begin = y.begin + split * p.split_tiles * kBlockN;
  return KeyRange{begin, min_of(y.end, begin + p.split_tiles * kBlockN)};
}

// Elements of the student's dQ (keys = false) or dK, contiguous in both layouts (varlen: batch 1 over total rows).
__host__ __device__ inline int64_t student_grad_elements(const AttentionKLParams& p, bool keys) {
  const int64_t batch = p.cu_seqlens_q != nullptr ? 1 : p.batch;
  return keys ? batch * p.student.k_rows * p.student.num_kv_heads * p.student.head_dim
              : batch * p.student.q_rows * p.num_heads * p.student.head_dim;
}

// This CTA's slice of the split dQ / dK partials (AttentionKLParams::split_dq_partials), indexed like dq / dk.
__device__ __forceinline__ float* split_grad_slice(const AttentionKLParams& p, bool keys) {
  float* base = static_cast<float*>(keys ? p.split_dk_partials : p.split_dq_partials);
  return base + block_and_split(p).split * student_grad_elements(p, keys);
}

// out = scale * the sum of the `splits` partial slices of n elements each, in split order, converted. Also the fused
// backward's dQ epilogue (one slice, the side's scale).
template <typename Element>
__global__ void sum_split_partials_kernel(const float* __restrict__ partials, Element* __restrict__ out, int64_t n,
                                          int splits, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float sum = partials[i];
    for (int s = 1; s < splits; ++s) sum += partials[s * n + i];
    out[i] = static_cast<Element>(sum * scale);
  }
}

// The kSplitStateFloats floats of split `split`'s partial state of per-row output idx (the KL forward's online state;
// the JSD sums pass uses the first two).
__device__ __forceinline__ float* split_state(const AttentionKLParams& p, int split, int64_t idx) {
  return static_cast<float*>(p.split_states) + (split * split_state_rows(p) + idx) * kSplitStateFloats;
}

// A split forward CTA's partial state of per-row output idx (merged across its quad), and the combine kernel's read.
template <typename State>
__device__ __forceinline__ void store_split_state(const AttentionKLParams& p, int split, int64_t idx, const State& st) {
  float* out = split_state(p, split, idx);
  out[0] = st.max_w;
  out[1] = st.sum_w;
  out[2] = st.max_o;
  out[3] = st.sum_o;
  out[4] = st.acc;
}
template <typename State>
__device__ __forceinline__ State load_split_state(const AttentionKLParams& p, int split, int64_t idx) {
  const float* in = split_state(p, split, idx);
  State st;
  st.max_w = in[0];
  st.sum_w = in[1];
  st.max_o = in[2];
  st.sum_o = in[3];
  st.acc = in[4];
  return st;
}

}  // namespace cuda
}  // namespace streamkl

// Forward attention-KL kernel (Ampere path): one pass over the key tiles of a block of query rows, the
// online two-softmax reduction (csrc/kernels/online_kl.h) run on the score tiles in registers. Writes the
// per-row divergence and both log-sum-exps, nothing else.
//
// Each thread keeps a partial OnlineKLState for each of its rows over the columns it holds in the MMA
// layout; the four threads sharing a row merge their partial states once, at the end, so the per-tile work
// needs no shuffles.
#pragma once

#include "../kernels/attention_mask.h"
#include "../kernels/attention_params.h"
#include "../kernels/online_kl.h"
#include "score_stream.cuh"

namespace streamkl {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;

template <typename Traits>
struct ForwardPolicy {
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  using State = OnlineKLState<float, Base2<float>>;
  // Rows of this thread in the (rows, cols) accumulator view: 2 per 16-row MMA slab.
  static constexpr int kThreadRows = 2 * (kBlockM / (16 * Traits::kNWarps));

  AttentionMask mask;
  int row0;                       // first query row of the CTA
  float scale_s2, scale_t2;       // softmax scales times log2(e): scores in base-2 units
  bool teacher_weights;
  State state[kThreadRows];

  __device__ void stage_stats(int, float*) {}

  template <typename TiledMma, typename Acc>
  __device__ void consume(TiledMma tiled_mma, Acc& acc_s, Acc& acc_t, int y0, int) {
    Tensor s = make_tensor(acc_s.data(), acc_as_rows_cols(acc_s.layout()));
    Tensor t = make_tensor(acc_t.data(), acc_as_rows_cols(acc_t.layout()));
    Tensor coords = accumulator_coords<kBlockM, kBlockN>(tiled_mma, threadIdx.x);
    const int row_end = min_of(row0 + kBlockM, mask.seqlen_q);
    const bool full = mask.block_fully_visible(row0, row_end, y0, y0 + kBlockN);
    CUTE_UNROLL
    for (int i = 0; i < size<0>(s); ++i) {
      const KeyRange keys = mask.keys_for_row(row0 + get<0>(coords(i, 0)));
      float max_w = neg_infinity<float>(), max_o = neg_infinity<float>();
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        float sv = s(i, j) * scale_s2, tv = t(i, j) * scale_t2;
        if (!full && !keys.contains(y0 + get<1>(coords(i, j)))) sv = tv = neg_infinity<float>();
        s(i, j) = sv;
        t(i, j) = tv;
        max_w = max_of(max_w, teacher_weights ? tv : sv);
        max_o = max_of(max_o, teacher_weights ? sv : tv);
      }
      state[i].rescale(max_w, max_o);
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        const float w = teacher_weights ? t(i, j) : s(i, j);
        const float o = teacher_weights ? s(i, j) : t(i, j);
        if (full)
          state[i].add(w, o);
        else
          state[i].add_maybe_masked(w, o);
      }
    }
  }
};

// Merge the partial states of the 4 threads of an MMA quad (lanes 4g .. 4g+3 hold the same rows).
template <typename State>
__device__ __forceinline__ void merge_quad(State& st) {
  CUTE_UNROLL
  for (int offset = 1; offset < 4; offset *= 2) {
    State other;
    other.max_w = __shfl_xor_sync(0xffffffffu, st.max_w, offset);
    other.sum_w = __shfl_xor_sync(0xffffffffu, st.sum_w, offset);
    other.max_o = __shfl_xor_sync(0xffffffffu, st.max_o, offset);
    other.sum_o = __shfl_xor_sync(0xffffffffu, st.sum_o, offset);
    other.acc = __shfl_xor_sync(0xffffffffu, st.acc, offset);
    st.merge(other);
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads) attention_kl_fwd_kernel(const AttentionKLParams p) {
  using Element = typename Traits::Element;
  extern __shared__ __align__(128) char smem_raw[];
  const SmemPlan<Traits> smem(smem_raw);
  // Longest causal rows first: the last row blocks see the most keys.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int row0 = m_block * Traits::kBlockM;

  ForwardPolicy<Traits> policy;
  policy.mask = AttentionMask::from_params(p, p.seqlen_q, p.seqlen_k);
  policy.row0 = row0;
  policy.scale_s2 = static_cast<float>(p.student.scale) * kLog2e;
  policy.scale_t2 = static_cast<float>(p.teacher.scale) * kLog2e;
  policy.teacher_weights = teacher_is_weighting_side(p.divergence);
  for (auto& st : policy.state) st.init();

  auto operands = [&](const AttentionSide& side) {
    const int kv_head = h / (p.num_heads / side.num_kv_heads);
    const Element* q = static_cast<const Element*>(side.q) + b * side.q_batch_stride + h * side.q_head_stride;
    const Element* k = static_cast<const Element*>(side.k) + b * side.k_batch_stride + kv_head * side.k_head_stride;
    return StreamOperands<Element>{q + row0 * side.q_row_stride, side.q_row_stride, k, side.k_row_stride};
  };
  const int row_end = min_of(row0 + Traits::kBlockM, p.seqlen_q);
  const KeyRange keys = policy.mask.keys_for_rows(row0, row_end);
  score_stream<Traits>(policy, smem, operands(p.student), operands(p.teacher), p.seqlen_q - row0, keys.begin,
                       keys.end, p.seqlen_k);

  typename Traits::TiledMma tiled_mma;
  Tensor coords = accumulator_coords<Traits::kBlockM, Traits::kBlockN>(tiled_mma, threadIdx.x);
  float* kl = static_cast<float*>(p.kl);
  float* lse_s = static_cast<float*>(p.lse_student);
  float* lse_t = static_cast<float*>(p.lse_teacher);
  CUTE_UNROLL
  for (int i = 0; i < ForwardPolicy<Traits>::kThreadRows; ++i) {
    auto& st = policy.state[i];
    merge_quad(st);
    const int row = row0 + get<0>(coords(i, 0));
    if (threadIdx.x % 4 == 0 && row < p.seqlen_q) {
      const int64_t idx = p.row_index(b, h, row);
      kl[idx] = st.divergence();
      lse_s[idx] = policy.teacher_weights ? st.lse_o() : st.lse_w();
      lse_t[idx] = policy.teacher_weights ? st.lse_w() : st.lse_o();
    }
  }
}

}  // namespace cuda
}  // namespace streamkl

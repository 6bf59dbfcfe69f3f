// Pass 2 of the generalized JSD forward (Ampere path; the Hopper path's kernel, attention_kl_fwd_sm90.cuh, shares
// the policy and the row writer). Pass 1 is the KL forward kernel (attention_kl_fwd.cuh),
// run for its log-sum-exps lse_s / lse_t; with both normalizers known, this kernel streams the same score tiles
// (score_stream.cuh) and accumulates, per row, the two KL terms against the mixture (JsdRowSums, jsd_add_key in
// online_kl.h, mixture in log-sum-exp form). It writes jsd_stats (JsdRowStats) and overwrites kl with the row's
// JSD. 0 < beta < 1 here: the ops run beta = 0 / 1 as the KL they equal (kernel_attention_params).
//
// Unlike the KL's online state, these are plain sums (no running maxima): each thread sums its columns of a row,
// and the four threads of an MMA quad add theirs at the end.
#pragma once

#include "../kernels/attention_mask.h"
#include "../kernels/attention_params.h"
#include "../kernels/online_kl.h"
#include "device_common.cuh"
#include "aggregated_teacher.cuh"
#include "query_block.cuh"
#include "score_stream.cuh"
#include "stream_splits.cuh"

namespace streamkl {
namespace cuda {

template <typename Traits>
struct JsdSumsPolicy {
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  static constexpr int kThreadRows = 2 * (kBlockM / (16 * Traits::kNWarps));

  AttentionMask mask;
  int row0;                  // first query row of the CTA
  float scale_s2, scale_t2;  // softmax scales times log2(e)
  JsdWeights<float> weights;
  // Base-2 LSEs of this thread's rows from pass 1 (0 for rows past the end, which are never stored).
  float lse_s2[kThreadRows], lse_t2[kThreadRows];
  JsdRowSums<float> sums[kThreadRows];

  __device__ void stage_stats(int, float*) {}

  template <typename TiledMma, typename Acc>
  __device__ void consume(TiledMma tiled_mma, Acc& acc_s, Acc& acc_t, int y0, int) {
    Tensor s = make_tensor(acc_s.data(), acc_as_rows_cols(acc_s.layout()));  // raw <q, k>, unscaled
    Tensor t = make_tensor(acc_t.data(), acc_as_rows_cols(acc_t.layout()));
    Tensor coords = accumulator_coords<kBlockM, kBlockN>(tiled_mma, threadIdx.x);
    const int row_end = min_of(row0 + kBlockM, mask.seqlen_q);
    const bool full = mask.block_fully_visible(row0, row_end, y0, y0 + kBlockN);
    CUTE_UNROLL
    for (int i = 0; i < size<0>(s); ++i) {
      const KeyRange keys = mask.keys_for_row(row0 + get<0>(coords(i, 0)));
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        // Masked keys (and keys past the end) contribute nothing; a row with no allowed key has -inf LSEs and
        // never gets here.
        if (!full && !keys.contains(y0 + get<1>(coords(i, j)))) continue;
        jsd_add_key<float, Base2<float>>(sums[i], t(i, j) * scale_t2 - lse_t2[i], s(i, j) * scale_s2 - lse_s2[i],
                                         weights);
      }
    }
  }
};

// Sums over disjoint columns add: the 4 threads of an MMA quad (lanes 4g .. 4g+3 hold the same rows).
__device__ __forceinline__ void add_quad_sums(JsdRowSums<float>& sums) {
  CUTE_UNROLL
  for (int offset = 1; offset < 4; offset *= 2) {
    JsdRowSums<float> other;
    other.kl_t = __shfl_xor_sync(0xffffffffu, sums.kl_t, offset);
    other.kl_s = __shfl_xor_sync(0xffffffffu, sums.kl_s, offset);
    sums.merge(other);
  }
}

// The policy of the CTA owning query rows from row0 of (sequence seq, head h, batch entry b): pass 1's LSEs of its
// rows loaded, sums zero. Used by the MMA threads of both paths' pass-2 kernels.
template <typename Traits>
__device__ __forceinline__ JsdSumsPolicy<Traits> make_jsd_sums_policy(const AttentionKLParams& p,
                                                                      const AttentionKLParams::Sequence& seq, int b,
                                                                      int h, int row0) {
  using Policy = JsdSumsPolicy<Traits>;
  Policy policy;
  policy.mask = AttentionMask::from_params(p, seq.seqlen_q, seq.seqlen_k);
  policy.row0 = row0;
  policy.scale_s2 = static_cast<float>(p.student.scale) * kLog2e;
  policy.scale_t2 = static_cast<float>(p.teacher.scale) * kLog2e;
  policy.weights = JsdWeights<float>::mixture_weighted(static_cast<float>(p.beta));
  typename Traits::TiledMma tiled_mma;
  Tensor coords = accumulator_coords<Traits::kBlockM, Traits::kBlockN>(tiled_mma, threadIdx.x);
  const float* lse_s = static_cast<const float*>(p.lse_student);
  CUTE_UNROLL
  for (int i = 0; i < Policy::kThreadRows; ++i) {
    const int row = row0 + get<0>(coords(i, 0));
    const bool valid = row < seq.seqlen_q;
    const int64_t idx = valid ? p.row_index(b, h, row) : 0;
    policy.lse_s2[i] = valid ? lse_s[idx] * kLog2e : 0.f;
    policy.lse_t2[i] = valid ? p.row_teacher_lse<float>(idx) * kLog2e : 0.f;
    policy.sums[i].init();
  }
  return policy;
}

// Row idx's statistics and JSD from its whole sums. A row with no allowed key has zero sums: statistics 0, JSD 0.
__device__ __forceinline__ void store_jsd_row(const AttentionKLParams& p, int64_t idx, const JsdRowSums<float>& sums,
                                              const JsdWeights<float>& weights) {
  const JsdRowStats<float> row_stats = JsdRowStats<float>::finalize<Base2<float>>(sums);
  row_stats.store(static_cast<float*>(p.jsd_stats) + idx * JsdRowStats<float>::kCount);
  static_cast<float*>(p.kl)[idx] = row_stats.divergence(weights);
}

// Add each row's sums across its MMA quad and write its statistics and JSD, or (split streams) the CTA's partial
// sums of the row into the first two floats of its split state (stream_splits.cuh).
template <typename Traits>
__device__ __forceinline__ void write_jsd_rows(JsdSumsPolicy<Traits>& policy, const AttentionKLParams& p, int b, int h,
                                               int row0, int seqlen_q, int split = 0) {
  typename Traits::TiledMma tiled_mma;
  Tensor coords = accumulator_coords<Traits::kBlockM, Traits::kBlockN>(tiled_mma, threadIdx.x);
  CUTE_UNROLL
  for (int i = 0; i < JsdSumsPolicy<Traits>::kThreadRows; ++i) {
    add_quad_sums(policy.sums[i]);
    const int row = row0 + get<0>(coords(i, 0));
    if (threadIdx.x % 4 == 0 && row < seqlen_q) {
      const int64_t idx = p.row_index(b, h, row);
      if (p.stream_splits > 1) {
        float* partial = split_state(p, split, idx);
        partial[0] = policy.sums[i].kl_t;
        partial[1] = policy.sums[i].kl_s;
      } else {
        store_jsd_row(p, idx, policy.sums[i], policy.weights);
      }
    }
  }
}

// Split streams: add the p.stream_splits partial sums of each row (disjoint key runs, in split order) and write its
// statistics and JSD. Grid (row blocks of kCombineRows, heads, batch), as combine_split_rows_kernel.
template <int kRows>
__global__ void __launch_bounds__(kRows) combine_jsd_split_rows_kernel(const AttentionKLParams p) {
  const int row = blockIdx.x * kRows + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
  if (row >= p.sequence(b).seqlen_q) return;
  const int64_t idx = p.row_index(b, h, row);
  JsdRowSums<float> sums;
  sums.init();
  for (int s = 0; s < p.stream_splits; ++s) {
    const float* partial = split_state(p, s, idx);
    sums.merge(JsdRowSums<float>{partial[0], partial[1]});
  }
  store_jsd_row(p, idx, sums, JsdWeights<float>::mixture_weighted(static_cast<float>(p.beta)));
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads) attention_jsd_sums_kernel(const AttentionKLParams p) {
  extern __shared__ __align__(128) char smem_raw[];
  const SmemPlan<Traits> smem(smem_raw);
  const QueryBlock blk = QueryBlock::of_this_cta<Traits>(p);
  auto policy = make_jsd_sums_policy<Traits>(p, blk.seq, blk.b, blk.h, blk.row0);
  stream_query_block<Traits>(policy, smem, p, blk);
  write_jsd_rows(policy, p, blk.b, blk.h, blk.row0, blk.seq.seqlen_q, blk.split);
}

}  // namespace cuda
}  // namespace streamkl

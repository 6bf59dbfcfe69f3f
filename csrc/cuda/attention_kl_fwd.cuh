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
#include "device_common.cuh"
#include "aggregated_teacher.cuh"
#include "query_block.cuh"
#include "score_stream.cuh"
#include "stream_splits.cuh"

namespace streamkl {
namespace cuda {

template <typename Traits, bool kTeacherWeights>
struct ForwardPolicy {
  static constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  using State = OnlineKLState<float, Base2<float>>;
  // Rows of this thread in the (rows, cols) accumulator view: 2 per 16-row MMA slab.
  static constexpr int kThreadRows = 2 * (kBlockM / (16 * Traits::kNWarps));
  static constexpr int kChains = 2;  // independent partial sums per row and quantity (see consume)

  AttentionMask mask;
  int row0;                  // first query row of the CTA
  KeyRange full_keys;        // keys that every row of the CTA sees (mask.keys_visible_to_all), computed once
  float scale_w2, scale_o2;  // softmax scales of the weighting / other side times log2(e)
  State state[kThreadRows];

  __device__ void stage_stats(int, float*) {}

  template <typename TiledMma, typename Acc>
  __device__ void consume(TiledMma tiled_mma, Acc& acc_s, Acc& acc_t, int y0, int) {
    Acc& acc_w = pick<kTeacherWeights>(acc_t, acc_s);
    Acc& acc_o = pick<kTeacherWeights>(acc_s, acc_t);
    Tensor w = make_tensor(acc_w.data(), acc_as_rows_cols(acc_w.layout()));  // raw <q, k>, unscaled
    Tensor o = make_tensor(acc_o.data(), acc_as_rows_cols(acc_o.layout()));
    // Two compiled bodies: the tiles inside every row's key range (nearly all of them) carry no per-key test.
    // One body with a runtime flag kept a compare and a predicate per key in the hot loop (ptxas predicates
    // rather than branches), ~4 instructions per key pair out of ~19.
    if (full_keys.covers(y0, y0 + kBlockN)) {
      reduce_tile<false>(w, o);
      return;
    }
    // Tiles on a mask edge or past the last key: masked scores become -inf on both sides.
    Tensor coords = accumulator_coords<kBlockM, kBlockN>(tiled_mma, threadIdx.x);
    CUTE_UNROLL
    for (int i = 0; i < size<0>(w); ++i) {
      const KeyRange keys = mask.keys_for_row(row0 + get<0>(coords(i, 0)));
      CUTE_UNROLL
      for (int j = 0; j < size<1>(w); ++j) {
        if (!keys.contains(y0 + get<1>(coords(i, j)))) w(i, j) = o(i, j) = neg_infinity<float>();
      }
    }
    reduce_tile<true>(w, o);
  }

  // Fold one tile of raw scores (rows, cols) into the row states.
  //
  // A row that has seen keys keeps its maxima: its tile terms are taken relative to the running maxima whatever
  // the tile's own maxima are (exact in fp32, whose relative precision does not depend on the offset), unless a
  // partial sum passes kSumLimit (a score 2^60 above the running maximum, or a NaN), when the tile is folded again
  // after raising the maxima. That drops the two maxima (a max per score and side) and the rescale from the
  // common tile, and lets the exponentials start as soon as the products land.
  template <bool kMasked, typename Rows>
  __device__ __forceinline__ void reduce_tile(const Rows& w, const Rows& o) {
    CUTE_UNROLL
    for (int i = 0; i < size<0>(w); ++i) {
      if (!kMasked && state[i].has_maxima() && add_row_terms<false, true>(i, w, o))
        continue;
      // kChains independent partial maxima and sums per row: one running value per quantity would make every
      // column wait for the previous one (the kernel is latency-bound at 8 warps per SM: ncu's top stall is
      // "wait", fixed-latency dependencies).
      float max_w[kChains], max_o[kChains];
      CUTE_UNROLL
      for (int c = 0; c < kChains; ++c) max_w[c] = max_o[c] = neg_infinity<float>();
      CUTE_UNROLL
      for (int j = 0; j < size<1>(w); ++j) {
        max_w[j % kChains] = fmaxf(max_w[j % kChains], w(i, j));
        max_o[j % kChains] = fmaxf(max_o[j % kChains], o(i, j));
      }
      CUTE_UNROLL
      for (int c = 1; c < kChains; ++c) {
        max_w[0] = fmaxf(max_w[0], max_w[c]);
        max_o[0] = fmaxf(max_o[0], max_o[c]);
      }
      // Scales are positive, so the maximum of the raw scores scales to the maximum of the scores.
      state[i].rescale(max_w[0] * scale_w2, max_o[0] * scale_o2);
      add_row_terms<kMasked, false>(i, w, o);
    }
  }

  static constexpr float kSumLimit = 1.152921504606846976e18f;  // 2^60

  // Row i's terms relative to its current maxima, added to its state; with kLimited only if every partial sum stays
  // below kSumLimit (returns whether they were added).
  template <bool kMasked, bool kLimited, typename Rows>
  __device__ __forceinline__ bool add_row_terms(int i, const Rows& w, const Rows& o) {
    // Each partial sum starts from its first key's terms, not from 0 (0 + x is not folded: it is an add).
    float sum_w[kChains], weighted[kChains], sum_o[kChains];
    CUTE_UNROLL
    for (int j = 0; j < size<1>(w); ++j) {
      const int c = j % kChains;
      // A masked key (w = o = -inf) contributes nothing, also while the row has seen no key (max = -inf).
      if (kMasked && w(i, j) == neg_infinity<float>()) {
        if (j < kChains) sum_w[c] = weighted[c] = sum_o[c] = 0.f;
        continue;
      }
      const typename State::KeyTerms k = state[i].relative_key_terms(w(i, j), o(i, j), scale_w2, scale_o2);
      sum_w[c] = j < kChains ? k.p_w : sum_w[c] + k.p_w;
      weighted[c] = j < kChains ? k.weighted : weighted[c] + k.weighted;
      sum_o[c] = j < kChains ? k.p_o : sum_o[c] + k.p_o;
    }
    CUTE_UNROLL
    for (int c = 1; c < kChains; ++c) {
      sum_w[0] += sum_w[c];
      weighted[0] += weighted[c];
      sum_o[0] += sum_o[c];
    }
    // Written so that a NaN fails it.
    if (kLimited && !(sum_w[0] < kSumLimit && sum_o[0] < kSumLimit)) return false;
    state[i].add_relative_sums(sum_w[0], sum_o[0], weighted[0]);
    return true;
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

// The policy of the CTA owning query rows [row0, row_end) of sequence `seq`, before its first key tile.
template <typename Traits, bool kTeacherWeights>
__device__ __forceinline__ ForwardPolicy<Traits, kTeacherWeights> make_forward_policy(
    const AttentionKLParams& p, const AttentionKLParams::Sequence& seq, int row0, int row_end) {
  ForwardPolicy<Traits, kTeacherWeights> policy;
  policy.mask = AttentionMask::from_params(p, seq.seqlen_q, seq.seqlen_k);
  policy.row0 = row0;
  policy.full_keys = policy.mask.keys_visible_to_all(row0, row_end);
  const float scale_s2 = static_cast<float>(p.student.scale) * kLog2e;
  const float scale_t2 = static_cast<float>(p.teacher.scale) * kLog2e;
  policy.scale_w2 = kTeacherWeights ? scale_t2 : scale_s2;
  policy.scale_o2 = kTeacherWeights ? scale_s2 : scale_t2;
  for (auto& st : policy.state) st.init();
  return policy;
}

// Per-row output idx from a row's whole state: the divergence and both log-sum-exps.
template <bool kTeacherWeights, typename State>
__device__ __forceinline__ void store_forward_row(const AttentionKLParams& p, int64_t idx, const State& st) {
  static_cast<float*>(p.kl)[idx] = st.divergence();
  static_cast<float*>(p.lse_student)[idx] = kTeacherWeights ? st.lse_o() : st.lse_w();
  // An aggregated teacher's lse_teacher holds its heads' LSEs (inputs of this pass), not this row's.
  if (p.teacher_head_group == 1) static_cast<float*>(p.lse_teacher)[idx] = kTeacherWeights ? st.lse_w() : st.lse_o();
}

// Merge each row's partial states across its MMA quad and write the row's divergence and both log-sum-exps, or
// (split streams) the CTA's partial state of the row. Called by the MMA threads (thread indices
// 0 .. kNWarps * 32 - 1) of both forward kernels.
template <typename Traits, bool kTeacherWeights>
__device__ __forceinline__ void write_forward_rows(ForwardPolicy<Traits, kTeacherWeights>& policy,
                                                   const AttentionKLParams& p, int b, int h, int row0, int seqlen_q,
                                                   int split = 0) {
  typename Traits::TiledMma tiled_mma;
  Tensor coords = accumulator_coords<Traits::kBlockM, Traits::kBlockN>(tiled_mma, threadIdx.x);
  CUTE_UNROLL
  for (int i = 0; i < ForwardPolicy<Traits, kTeacherWeights>::kThreadRows; ++i) {
    auto& st = policy.state[i];
    merge_quad(st);
    const int row = row0 + get<0>(coords(i, 0));
    if (threadIdx.x % 4 == 0 && row < seqlen_q) {
      const int64_t idx = p.row_index(b, h, row);
      if (p.stream_splits > 1)
        store_split_state(p, split, idx, st);
      else
        store_forward_row<kTeacherWeights>(p, idx, st);
    }
  }
}

// Split streams: merge the p.stream_splits partial states of each row (disjoint key runs) and write its outputs.
// Grid (row blocks of kCombineRows, heads, batch).
template <bool kTeacherWeights>
__global__ void __launch_bounds__(kCombineRows) combine_split_rows_kernel(const AttentionKLParams p) {
  using State = OnlineKLState<float, Base2<float>>;
  const int row = blockIdx.x * kCombineRows + threadIdx.x, h = blockIdx.y, b = blockIdx.z;
  if (row >= p.sequence(b).seqlen_q) return;
  const int64_t idx = p.row_index(b, h, row);
  State st = load_split_state<State>(p, 0, idx);
  for (int s = 1; s < p.stream_splits; ++s) st.merge(load_split_state<State>(p, s, idx));
  store_forward_row<kTeacherWeights>(p, idx, st);
}

template <typename Traits, bool kTeacherWeights>
__global__ void __launch_bounds__(Traits::kNThreads) attention_kl_fwd_kernel(const AttentionKLParams p) {
  extern __shared__ __align__(128) char smem_raw[];
  const SmemPlan<Traits> smem(smem_raw);
  const QueryBlock blk = QueryBlock::of_this_cta<Traits>(p);
  auto policy = make_forward_policy<Traits, kTeacherWeights>(p, blk.seq, blk.row0, blk.row_end);
  stream_query_block<Traits>(policy, smem, p, blk);
  write_forward_rows(policy, p, blk.b, blk.h, blk.row0, blk.seq.seqlen_q, blk.split);
}

}  // namespace cuda
}  // namespace streamkl

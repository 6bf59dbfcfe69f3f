// The CTA of a query-block kernel (forward, JSD sums, dQ; both GPU paths): which query rows of which head and
// sequence it owns and which key tiles it streams (its split's part of the rows' key range, stream_splits.cuh).
// Torch-free.
#pragma once

#include "../kernels/attention_mask.h"
#include "../kernels/attention_params.h"

#include "aggregated_teacher.cuh"
#include "score_stream.cuh"
#include "stream_splits.cuh"

namespace streamkl {
namespace cuda {

// Query rows [row0, row_end) of (sequence seq, head h, batch entry b) and the n_tiles key tiles of its key range (its
// split's part of it). Longest causal rows first: the last row blocks see the most keys. A block past its sequence's
// rows (varlen: the grid is sized by the longest sequence) has an empty key range, so it streams no tile and writes
// nothing; the kernels run on to the end rather than return early (an early return made ptxas allocate more
// registers in the Ampere-path forward: 96 -> 111 at D = 256).
struct QueryBlock {
  int h, b, row0, row_end, n_tiles, split;
  AttentionKLParams::Sequence seq;
  AttentionMask mask;
  KeyRange keys;

  template <typename Traits>
  __device__ static QueryBlock of_this_cta(const AttentionKLParams& p) {
    const BlockAndSplit cta = block_and_split(p);
    QueryBlock q;
    q.h = blockIdx.y;
    q.b = blockIdx.z;
    q.split = cta.split;
    q.row0 = (unsplit_blocks(p) - 1 - cta.block) * Traits::kBlockM;
    q.seq = p.sequence(q.b);
    q.row_end = min_of(q.row0 + Traits::kBlockM, q.seq.seqlen_q);
    q.mask = AttentionMask::from_params(p, q.seq.seqlen_q, q.seq.seqlen_k);
    q.keys = split_part<Traits::kBlockN>(p, q.mask.keys_for_rows(q.row0, q.row_end), cta.split);
    q.n_tiles = q.keys.tile_count(Traits::kBlockN);
    return q;
  }

  // An aggregated teacher's items: each key tile of the block, each teacher head of student head h.
  __device__ AggregatedItems items(const AttentionKLParams& p) const {
    return AggregatedItems{n_tiles, p.teacher_head_group, 1};
  }
};

// The Ampere path's stream of a query block into the policy: the block's student and teacher operands through
// score_stream (cp.async stages).
template <typename Traits, typename Policy>
__device__ __forceinline__ void stream_query_block(Policy& policy, const SmemPlan<Traits>& smem,
                                                   const AttentionKLParams& p, const QueryBlock& blk) {
  score_stream<Traits>(policy, smem,
                       query_block_operands<typename Traits::Element>(p.student, p.num_heads, blk.b, blk.h, blk.seq,
                                                                      blk.row0),
                       teacher_block<Traits, false>(p, blk.b, blk.h, blk.seq, blk.row0), blk.seq.seqlen_q - blk.row0,
                       blk.keys.begin, blk.keys.end, blk.seq.seqlen_k);
}

}  // namespace cuda
}  // namespace streamkl

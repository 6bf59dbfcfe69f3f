// The CTA of the Hopper path's query-block kernels (forward, JSD sums, dQ): which query rows and key tiles it owns
// (with split streams, stream_splits.cuh) and its warp-specialized roles over the plain stream of key tiles or an
// aggregated teacher's stream of (key tile, teacher head) items. Torch-free.
#pragma once

#include "../kernels/attention_mask.h"
#include "../kernels/attention_params.h"

#include "aggregated_teacher_sm90.cuh"
#include "stream_splits.cuh"
#include "tma_stream_sm90.cuh"

namespace streamkl {
namespace cuda {

// Query rows [row0, row_end) of (sequence seq, head h, batch entry b) and the n_tiles key tiles of its key range (its
// split's part of it). Longest causal rows first: the last row blocks see the most keys.
struct QueryBlockSm90 {
  int h, b, row0, row_end, n_tiles, split;
  AttentionKLParams::Sequence seq;
  AttentionMask mask;
  KeyRange keys;

  template <typename Traits>
  __device__ static QueryBlockSm90 of_this_cta(const AttentionKLParams& p) {
    const BlockAndSplit cta = block_and_split(p);
    QueryBlockSm90 q;
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

// The warp-specialized CTA of a query-block kernel: the producer warpgroup streams the block's key tiles (or an
// aggregated teacher's items), the MMA warpgroups run mma(blk).
template <typename Traits, typename MmaRole>
__device__ __forceinline__ void run_query_block_sm90(const AttentionKLParams& p, const StreamTmaLoads<Traits>& tma,
                                                     const StreamSmemSm90<Traits>& smem, MmaRole&& mma) {
  const QueryBlockSm90 blk = QueryBlockSm90::of_this_cta<Traits>(p);
  run_warp_specialized<Traits>(
      smem, /*extra_full_arrivals=*/0, /*per_thread_release=*/false,
      [&] {
        if constexpr (Traits::kAggregatedTeacher)
          run_aggregated_query_producer(p, tma, smem, blk.b, blk.h, blk.seq, blk.row0, blk.keys.begin, blk.n_tiles);
        else
          run_stream_producer(p, tma, smem, blk.seq, blk.b, blk.h, blk.row0, blk.keys.begin, blk.n_tiles);
      },
      [&] { mma(blk); });
}

}  // namespace cuda
}  // namespace streamkl

// The CTA of the Hopper path's query-block kernels (forward, JSD sums, dQ; which rows and tiles: query_block.cuh) and
// its warp-specialized roles over the plain stream of key tiles or an aggregated teacher's stream of (key tile,
// teacher head) items. Torch-free.
#pragma once

#include "../kernels/attention_mask.h"
#include "../kernels/attention_params.h"

#include "aggregated_teacher_sm90.cuh"
#include "query_block.cuh"
#include "tma_stream_sm90.cuh"

namespace streamkl {
namespace cuda {

// The warp-specialized CTA of a query-block kernel: the producer warpgroup streams the block's key tiles (or an
// aggregated teacher's items), the MMA warpgroups run mma(blk).
template <typename Traits, typename MmaRole>
__device__ __forceinline__ void run_query_block_sm90(const AttentionKLParams& p, const StreamTmaLoads<Traits>& tma,
                                                     const StreamSmemSm90<Traits>& smem, MmaRole&& mma) {
  const QueryBlock blk = QueryBlock::of_this_cta<Traits>(p);
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

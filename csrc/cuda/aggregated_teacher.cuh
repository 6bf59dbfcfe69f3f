// Head-aggregated teachers (teacher_head_reduce="mean") on the Ampere path. The teacher side of student head h is
// the mean  pbar = (1/r) sum_j P_j  of the attention probabilities of teacher heads h*r .. h*r+r-1, whose LSEs pass 1
// wrote to p.lse_teacher ([B, H * r, N_q], AttentionKLParams::teacher_row_index).
//
// The kernels (forward, JSD sums, dQ, dK) and their policies are the plain ones; only the stream differs. For each Y
// tile the r teacher heads' score tiles come through the pipeline one after another, each with its own X block
// (queries, or keys in the dK kernel) and Y tile, and are summed as probabilities,
//     sum_p += exp2(score * scale_t2 - lse2_j),
// in a register tile. The tile the policy then receives as the teacher's scores is  log2(sum_p / r) / scale_t2,  so
// that the policy's usual  t * scale_t2 - lse_t2  is log2 pbar once the row's teacher LSE is 0
// (AttentionKLParams::row_teacher_lse): pbar is already normalized. The student's Y tile travels with the last head
// of its tile, which is when the student's product and the policy run.
//
// Summing probabilities in float32 floors pbar at 2^-126 (FLT_MIN): where every teacher head gives a key less than
// ~1e-38, log pbar reads -87 instead of lower. Forward KL and the JSD weight such keys by pbar or bound them by the
// student's own mass, so they do not move; the reverse KL's term p_s * (log p_s - log pbar) is then underestimated
// (it is huge either way). The CPU kernels fold the heads in log space and have no floor.
#pragma once

#include <cfloat>

#include "../kernels/attention_params.h"
#include "score_stream.cuh"

namespace streamkl {
namespace cuda {

// A CTA's stream of aggregated items: for each of `groups` student heads (the Hopper dK kernel's GQA group; 1
// elsewhere), each of its n_tiles Y tiles, each of the r teacher heads: flat item i. The one place that order is
// written (the loads, the statistics and the products all decode it here).
struct AggregatedItems {
  int n_tiles, heads, groups;
  struct Item {
    int group, tile, head;
    bool last_head;  // the tile's last teacher head: the student's tile travels with it, then the policy runs
  };
  __device__ int count() const { return groups * n_tiles * heads; }
  __device__ Item operator[](int i) const {
    const int tile_of_group = i / heads, head = i - tile_of_group * heads;
    const int group = tile_of_group / n_tiles;
    return Item{group, tile_of_group - group * n_tiles, head, head == heads - 1};
  }
};

// The r teacher heads behind student head h for a CTA whose X block starts at row x0 of sequence b: query rows
// (forward, dQ) or keys (kKeysAsX: dK, where the heads' LSEs belong to the tile's columns).
template <typename Element, bool kKeysAsX>
struct AggregatedTeacher {
  static constexpr bool keys_as_x = kKeysAsX;
  const AttentionKLParams* p;
  AttentionKLParams::Sequence seq;
  int b, h, x0;
  float scale2;  // the teacher's softmax scale times log2(e)

  __device__ int heads() const { return p->teacher_head_group; }

  // The same teacher for student head h + g (the Hopper dK kernel streams the query heads of a GQA group).
  __device__ AggregatedTeacher for_group(int g) const {
    AggregatedTeacher t = *this;
    t.h += g;
    return t;
  }

  // Teacher head j of student head h: its query head and the key head that query head reads.
  __device__ int query_head(int j) const { return h * p->teacher_head_group + j; }
  __device__ int key_head(int j) const { return query_head(j) / (p->num_teacher_heads() / p->teacher.num_kv_heads); }

  // Head j's X block (from x0) and Y rows.
  __device__ StreamOperands<Element> operands(int j) const {
    const int head = query_head(j);
    if constexpr (kKeysAsX)
      return key_block_operands<Element>(p->teacher, p->num_teacher_heads(), b, head, seq, x0);
    else
      return query_block_operands<Element>(p->teacher, p->num_teacher_heads(), b, head, seq, x0);
  }

  // Base-2 LSE of query row `row` (from the sequence's start) of head j; 0 past the sequence (never used there).
  __device__ float lse2(int j, int row) const {
    if (row >= seq.seqlen_q) return 0.f;
    const float* lse = static_cast<const float*>(p->lse_teacher);
    return lse[p->teacher_row_index(b, query_head(j), row)] * kLog2e;
  }

  // How many LSEs a thread needs per item of a (kRows x kCols) tile: one per row it holds (X rows are queries), or
  // one per column (kKeysAsX: the tile's columns are the queries).
  template <int kRows, int kCols, typename TiledMma>
  static constexpr int lse_count() {
    using RowsCols = decltype(acc_as_rows_cols(
        partition_fragment_C(TiledMma{}, Shape<Int<kRows>, Int<kCols>>{}).layout()));
    return kKeysAsX ? int(size<1>(RowsCols{})) : int(size<0>(RowsCols{}));
  }

  // The base-2 LSEs of head j that this thread's part of the item (head j, Y tile from y0) needs. The stream loads
  // them one item ahead, so that their global-memory latency hides behind the item before.
  template <int kRows, int kCols, int kCount, typename TiledMma>
  __device__ __forceinline__ void load_lse(TiledMma tiled_mma, int j, int y0, float (&lse)[kCount]) const {
    Tensor coords = accumulator_coords<kRows, kCols>(tiled_mma, threadIdx.x);
    CUTE_UNROLL
    for (int k = 0; k < kCount; ++k)
      lse[k] = kKeysAsX ? lse2(j, y0 + get<1>(coords(0, k))) : lse2(j, x0 + get<0>(coords(k, 0)));
  }

  // sum_p = (j == 0 ? 0 : sum_p) + exp2(scores * scale2 - lse) over the tile, lse from load_lse.
  template <int kCount, typename Acc>
  __device__ __forceinline__ void add_probabilities(const Acc& scores, Acc& sum_p, int j,
                                                    const float (&lse)[kCount]) const {
    Tensor s = make_tensor(scores.data(), acc_as_rows_cols(scores.layout()));
    Tensor sp = make_tensor(sum_p.data(), acc_as_rows_cols(sum_p.layout()));
    CUTE_UNROLL
    for (int i = 0; i < size<0>(s); ++i) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        const float prob = exp2f(fmaf(s(i, c), scale2, -lse[kKeysAsX ? c : i]));
        sp(i, c) = j == 0 ? prob : sp(i, c) + prob;
      }
    }
  }

  // In place: the r heads' summed probabilities -> the teacher "scores" whose scaled value is log2 pbar.
  template <typename Acc>
  __device__ __forceinline__ void to_scores(Acc& sum_p) const {
    const float inv_heads = 1.f / static_cast<float>(heads()), inv_scale2 = 1.f / scale2;
    CUTE_UNROLL
    for (int i = 0; i < size(sum_p); ++i) sum_p(i) = log2f(fmaxf(sum_p(i) * inv_heads, FLT_MIN)) * inv_scale2;
  }
};

// The teacher's operands of a CTA owning X rows from x0 of (sequence b, student head h): query rows streaming keys,
// or keys streaming query rows (kKeysAsX: the dK kernel). The head's own X block and Y rows, or its aggregated heads
// (Traits::kAggregatedTeacher).
template <typename Traits, bool kKeysAsX>
__device__ __forceinline__ auto teacher_block(const AttentionKLParams& p, int b, int h,
                                              const AttentionKLParams::Sequence& seq, int x0) {
  using Element = typename Traits::Element;
  if constexpr (Traits::kAggregatedTeacher)
    return AggregatedTeacher<Element, kKeysAsX>{&p, seq, b, h, x0, static_cast<float>(p.teacher.scale) * kLog2e};
  else if constexpr (kKeysAsX)
    return key_block_operands<Element>(p.teacher, p.num_heads, b, h, seq, x0);
  else
    return query_block_operands<Element>(p.teacher, p.num_heads, b, h, seq, x0);
}

// score_stream for an aggregated teacher: the stream runs over (Y tile, teacher head) items through Traits::kStages
// stages of [Y_s tile, Y_t tile, X_t block], kStages - 1 items in flight (one cp.async group per item); the student's
// Y tile is loaded with the tile's last head. Same contract with the policy as score_stream (stage_stats once per Y
// tile, consume with the tile's stage).
template <typename Traits, typename Policy, bool kKeysAsX>
__device__ __forceinline__ void score_stream(Policy& policy, const SmemPlan<Traits>& smem,
                                             const StreamOperands<typename Traits::Element>& student,
                                             const AggregatedTeacher<typename Traits::Element, kKeysAsX>& teacher,
                                             int x_valid_rows, int y_begin, int y_end, int y_rows_total) {
  static_assert(Traits::kAggregatedTeacher, "an aggregated teacher needs the traits' per-stage X blocks");
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  const int tid = threadIdx.x;
  const int heads = teacher.heads();
  issue_tile_load<typename Traits::XTileS>(student.x, student.x_stride, smem.x_s, x_valid_rows, tid);

  const AggregatedItems items{KeyRange{y_begin, y_end}.tile_count(kBlockN), heads, 1};
  const int n_items = items.count();
  auto load_item = [&](int item, int stage) {
    const AggregatedItems::Item it = items[item];
    const int y0 = y_begin + it.tile * kBlockN;
    const StreamOperands<typename Traits::Element> t = teacher.operands(it.head);
    issue_tile_load<typename Traits::XTileT>(t.x, t.x_stride, smem.x_t_staged(stage), x_valid_rows, tid);
    issue_tile_load<typename Traits::YTileT>(t.y + y0 * t.y_stride, t.y_stride, smem.y_t(stage), y_rows_total - y0,
                                             tid);
    if (it.last_head)
      issue_tile_load<typename Traits::YTileS>(student.y + y0 * student.y_stride, student.y_stride, smem.y_s(stage),
                                               y_rows_total - y0, tid);
  };
  // Prologue: items 0 .. kStages - 2, one commit group each (empty groups past the end keep the count uniform); the
  // student's X block joins item 0's group.
  CUTE_UNROLL
  for (int s = 0; s < Traits::kStages - 1; ++s) {
    if (s < n_items) load_item(s, s);
    cp_async_fence();
  }

  typename Traits::TiledMma tiled_mma;
  using Teacher = AggregatedTeacher<typename Traits::Element, kKeysAsX>;
  constexpr int kLse = Teacher::template lse_count<kBlockM, kBlockN, typename Traits::TiledMma>();
  float lse_next[kLse];
  if (n_items > 0) teacher.template load_lse<kBlockM, kBlockN>(tiled_mma, 0, y_begin, lse_next);
  Tensor x_s = make_tensor(make_smem_ptr(smem.x_s), typename Traits::XTileS::Layout{});
  Tensor sum_p = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  // One barrier per item, as in score_stream: passing it means every warp is done with the previous item's stage,
  // which the load issued after it (item + kStages - 1) reuses.
  for (int item = 0; item < n_items; ++item) {
    const int stage = item % Traits::kStages;
    const AggregatedItems::Item it = items[item];
    const int y0 = y_begin + it.tile * kBlockN;
    float lse[kLse];
    CUTE_UNROLL
    for (int k = 0; k < kLse; ++k) lse[k] = lse_next[k];
    if (item + 1 < n_items) {
      const AggregatedItems::Item next = items[item + 1];
      teacher.template load_lse<kBlockM, kBlockN>(tiled_mma, next.head, y_begin + next.tile * kBlockN, lse_next);
    }
    cp_async_wait<Traits::kStages - 2>();  // groups 0 .. item have landed
    if (it.last_head) policy.stage_stats(y0, smem.stats(stage));
    __syncthreads();
    const int next = item + Traits::kStages - 1;
    if (next < n_items) load_item(next, next % Traits::kStages);
    cp_async_fence();

    Tensor acc_t = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_t);
    Tensor x_t = make_tensor(make_smem_ptr(smem.x_t_staged(stage)), typename Traits::XTileT::Layout{});
    gemm_smem_smem(tiled_mma, acc_t, x_t, smem.y_t_tile(stage), tid);
    teacher.add_probabilities(acc_t, sum_p, it.head, lse);
    if (!it.last_head) continue;
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_smem_smem(tiled_mma, acc_s, x_s, smem.y_s_tile(stage), tid);
    teacher.to_scores(sum_p);
    policy.consume(tiled_mma, acc_s, sum_p, y0, stage);
  }
  cp_async_wait<0>();  // nothing may stay in flight when a CTA that streamed no tile exits
}

}  // namespace cuda
}  // namespace streamkl

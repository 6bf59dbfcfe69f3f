// Host-side launchers of the Ampere-path attention-KL kernels: tile configuration per head-dim pair, grid
// shape, dynamic shared memory. Instantiated once per (dtype, D_s, D_t) by csrc/cuda/instantiations/.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

#include "attention_jsd_fwd.cuh"
#include "attention_kl_bwd.cuh"
#include "attention_kl_bwd_sm90.cuh"
#include "attention_kl_fwd.cuh"
#include "attention_kl_fwd_sm90.cuh"
#include "kernel_registry.h"
#include "kernel_traits.cuh"
#include "kernel_traits_sm90.cuh"

namespace streamkl {
namespace cuda {

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("streamkl: ") + what + " failed: " + cudaGetErrorString(err));
}

// What a launcher needs the runtime to have done or said once per (kernel, device, shared memory): the dynamic shared
// memory above 48 KB reserved (cudaFuncSetAttribute), the SM count and the kernel's resident CTAs per SM (the split
// decision). Cached: asked again on every launch they were host time at small N (session 7's review).
struct KernelResidency {
  int sms = 0, ctas_per_sm = 0;
};
inline KernelResidency prepare_kernel(const void* kernel, int threads, int smem_bytes, const char* what) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int>, KernelResidency> prepared;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) check_launch(what);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, smem_bytes);
  const auto found = prepared.find(key);
  if (found != prepared.end()) return found->second;
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("streamkl: ") + what + ": cannot reserve " + std::to_string(smem_bytes) +
                               " bytes of shared memory: " + cudaGetErrorString(err));
  }
  KernelResidency r;
  if (cudaDeviceGetAttribute(&r.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r.ctas_per_sm, kernel, threads, smem_bytes) != cudaSuccess)
    check_launch(what);  // reports the error
  prepared.emplace(key, r);
  return r;
}

template <typename Kernel, typename... Args>
inline void launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                             const char* what, const Args&... args) {
  prepare_kernel(reinterpret_cast<const void*>(kernel), threads, smem_bytes, what);
  kernel<<<grid, threads, smem_bytes, stream>>>(args...);
  check_launch(what);
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Split streams (stream_splits.cuh): how many CTAs share each X block's Y tiles. `blocks`: CTAs of the unsplit grid;
// `max_tiles`: Y tiles of the longest stream; `bytes_per_split`: the workspace one split needs (partial row states or
// gradient slices). Splits when the unsplit grid cannot fill every SM's resident CTA slots (the kernel's occupancy),
// into about kSplitCtasPerSlot CTAs per slot: causal masks leave about half of the split CTAs empty and the rest
// uneven, so finer splits balance better (DSA shape on H100, aggregated dK kernel: 9 splits 3.2 ms, 16 2.8 ms,
// 32 2.1 ms; bench/RESULTS.md, session 7). At least kMinSplitTiles tiles per split, and at most
// kMaxSplitWorkspaceBytes of workspace. p.requested_splits overrides the choice (tests); without a workspace
// allocator nothing splits.
constexpr int kMinSplitTiles = 4;
constexpr int kSplitCtasPerSlot = 8;
constexpr int64_t kMaxSplitWorkspaceBytes = int64_t(64) << 20;
template <typename Kernel>
AttentionKLParams with_stream_split(const AttentionKLParams& p, Kernel kernel, int threads, int smem_bytes,
                                    int64_t blocks, int max_tiles, int64_t bytes_per_split, const char* what) {
  AttentionKLParams q = p;
  q.stream_splits = 1;
  int splits = p.requested_splits;
  if (!p.workspace || splits == 1 || max_tiles < 2) return q;
  if (splits == 0) {
    const KernelResidency r = prepare_kernel(reinterpret_cast<const void*>(kernel), threads, smem_bytes, what);
    const int64_t slots = static_cast<int64_t>(r.sms) * std::max(r.ctas_per_sm, 1);
    if (blocks >= slots) return q;
    const int64_t by_slots = (kSplitCtasPerSlot * slots + blocks - 1) / blocks;
    const int64_t by_memory = kMaxSplitWorkspaceBytes / std::max<int64_t>(bytes_per_split, 1);
    splits = static_cast<int>(std::min({by_slots, by_memory, static_cast<int64_t>(max_tiles / kMinSplitTiles)}));
  }
  splits = std::min(splits, max_tiles);
  if (splits < 2) return q;
  q.split_tiles = ceil_div(max_tiles, splits);
  q.stream_splits = ceil_div(max_tiles, q.split_tiles);  // no split left without a tile
  return q;
}

// The student's dQ (keys = false) or dK = scale * the sum of `splits` fp32 slices laid out like it, converted.
template <typename Element>
void sum_grad_partials(const AttentionKLParams& p, bool keys, const float* partials, int splits, float scale,
                       cudaStream_t stream, const char* what) {
  const int64_t n = student_grad_elements(p, keys);
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 65535));
  sum_split_partials_kernel<Element><<<blocks, 256, 0, stream>>>(
      partials, static_cast<Element*>(keys ? p.student.dk : p.student.dq), n, splits, scale);
  check_launch(what);
}

// The student gradient whose split partials (scaled) a dQ / dK kernel wrote, summed into the output.
template <typename Element>
void sum_split_grad(const AttentionKLParams& p, bool keys, const float* partials, cudaStream_t stream) {
  sum_grad_partials<Element>(p, keys, partials, p.stream_splits, 1.f, stream,
                             "attention_kl split-stream gradient epilogue");
}

// The fused backwards' dQ: student scale * the fp32 sums the kernel added into p.dq_accum (laid out like dQ).
template <typename Element>
void finish_fused_dq(const AttentionKLParams& p, cudaStream_t stream) {
  sum_grad_partials<Element>(p, /*keys=*/false, static_cast<const float*>(p.dq_accum), 1,
                             static_cast<float>(p.student.scale), stream, "attention_kl fused backward dQ epilogue");
}

// Which per-row results a forward kernel leaves, and so which kernel merges them when it splits: the KL forward's
// (also the JSD's pass 1: its LSEs), or the JSD's pass-2 sums.
enum class ForwardPass { kDivergence, kJsdSums };

// A forward kernel over blocks of block_m query rows (grid: blocks x splits, heads, batch; launch arguments: the
// params, then `extra`), either path. Long streams of few blocks split (stream_splits.cuh): the partial row states
// (or the JSD's partial sums) are merged after, in split order, by a combine kernel on the same stream, so the JSD's
// pass 2 reads pass 1's merged LSEs.
template <typename Kernel, typename... Extra>
void launch_forward_kernel(const AttentionKLParams& p, ForwardPass pass, Kernel kernel, int threads, int smem_bytes,
                           int block_m, int block_n, const char* what, cudaStream_t stream, const Extra&... extra) {
  const int blocks = ceil_div(p.seqlen_q, block_m);
  const int64_t states_per_split = split_state_rows(p) * kSplitStateFloats * int64_t(sizeof(float));
  AttentionKLParams q = with_stream_split(p, kernel, threads, smem_bytes,
                                          static_cast<int64_t>(blocks) * p.num_heads * p.batch,
                                          ceil_div(p.seqlen_k, block_n), states_per_split, what);
  if (q.stream_splits > 1) q.split_states = q.workspace(q.stream_splits * states_per_split);
  launch_with_smem(kernel, dim3(blocks * q.stream_splits, p.num_heads, p.batch), threads, smem_bytes, stream, what, q,
                   extra...);
  if (q.stream_splits == 1) return;
  const auto combine = pass == ForwardPass::kJsdSums             ? combine_jsd_split_rows_kernel<kCombineRows>
                       : teacher_is_weighting_side(p.divergence) ? combine_split_rows_kernel<true>
                                                                 : combine_split_rows_kernel<false>;
  combine<<<dim3(ceil_div(p.seqlen_q, kCombineRows), p.num_heads, p.batch), kCombineRows, 0, stream>>>(q);
  check_launch("attention_kl split-stream combine kernel");
}

// One gradient kernel of the two-kernel backward, either path: dQ (keys = false; X = blocks of block_m query rows, Y =
// key tiles) or dK (X = key blocks of each of `heads` key heads, Y = query tiles). With `splittable` (student
// gradients only) long streams of few blocks split: each split writes an fp32 slice of a workspace, summed into dq /
// dk after.
template <typename Element, typename Kernel, typename... Extra>
void launch_grad_kernel(const AttentionKLParams& p, bool keys, bool splittable, Kernel kernel, int threads,
                        int smem_bytes, int block_m, int block_n, int heads, const char* what, cudaStream_t stream,
                        const Extra&... extra) {
  const int blocks = ceil_div(keys ? p.seqlen_k : p.seqlen_q, block_m);
  const int64_t slice_bytes = student_grad_elements(p, keys) * int64_t(sizeof(float));
  AttentionKLParams q = p;
  if (splittable)
    q = with_stream_split(p, kernel, threads, smem_bytes, static_cast<int64_t>(blocks) * heads * p.batch,
                          ceil_div(keys ? p.seqlen_q : p.seqlen_k, block_n), slice_bytes, what);
  float* partials = nullptr;
  if (q.stream_splits > 1) {
    // Every split writes every row of its blocks (zeros where its part of the stream is empty); the workspace comes
    // zeroed all the same, so an element no CTA wrote could only add 0.
    partials = static_cast<float*>(q.workspace(q.stream_splits * slice_bytes));
    (keys ? q.split_dk_partials : q.split_dq_partials) = partials;
  }
  launch_with_smem(kernel, dim3(blocks * q.stream_splits, heads, p.batch), threads, smem_bytes, stream, what, q,
                   extra...);
  if (partials != nullptr) sum_split_grad<Element>(q, keys, partials, stream);
}

// Forward: 128 query rows per CTA, 32 per warp (each key fragment feeds two MMA row slabs), key tiles of
// 32; query fragments kept in registers when a side has head dim 128 (at 64/64 re-reading them from shared
// memory measured faster). Head dims above 128: 64 rows per CTA so shared memory fits an A100.
// Chosen on H100 (bench/RESULTS.md).
template <typename Element, int kDimS, int kDimT>
using ForwardTraits = KernelTraits<Element, kDimS, kDimT, (kDimS > 128 || kDimT > 128) ? 64 : 128, 32, 4,
                                   (kDimS + kDimT > 128 && kDimS + kDimT <= 256)>;

// Backward, student-only gradients: 128 X rows per CTA, 32 per warp in two MMA row slabs so that every Y
// fragment read from shared memory feeds two MMAs (at 16 rows per warp the products are bound by
// shared-memory bandwidth on H100: ncu, bench/RESULTS.md), Y tiles of 32. With teacher gradients (two more
// accumulators) or head dims above 128: 64 rows per CTA (16 per warp), Y tiles of 32, so nothing spills.
// kRowStats: floats per query row staged by the dK kernel (the score-gradient rule's, score_grad_rules.cuh).
template <typename Element, int kDimS, int kDimT, bool kTeacherGrad, int kRowStats = 4>
using BackwardTraits = std::conditional_t<(kTeacherGrad || kDimS > 128 || kDimT > 128),
                                          KernelTraits<Element, kDimS, kDimT, 64, 32, 4, false, false, kRowStats>,
                                          KernelTraits<Element, kDimS, kDimT, 128, 32, 4, false, false, kRowStats>>;

// Head-aggregated teacher (aggregated_teacher.cuh; forward and student backward, every divergence): the plain
// kernels over the aggregated stream, on every GPU. 64 X rows per CTA (16 per warp), Y tiles of 32: each stage also
// holds a teacher head's X block, and the running sum of the heads' probabilities is a third register tile.
template <typename Element, int kDimS, int kDimT, int kRowStats = 4>
using AggregatedTraits = KernelTraits<Element, kDimS, kDimT, 64, 32, 4, false, false, kRowStats, true>;

// Grids are (blocks of p.seqlen_q or p.seqlen_k, heads, batch). In the varlen layout those lengths are the
// longest sequence's; the kernels return at once from blocks past their own sequence's end.

// The KL forward kernel; for Divergence::kJsd it is pass 1 (its kl output, the reverse KL, is overwritten by pass 2).
template <typename Traits>
void run_attention_kl_fwd_with(const AttentionKLParams& p, cudaStream_t stream) {
  const auto kernel = teacher_is_weighting_side(p.divergence) ? attention_kl_fwd_kernel<Traits, true>
                                                              : attention_kl_fwd_kernel<Traits, false>;
  launch_forward_kernel(p, ForwardPass::kDivergence, kernel, Traits::kNThreads, Traits::kSmemBytes, Traits::kBlockM,
                        Traits::kBlockN, "attention_kl forward kernel", stream);
}

// Pass 2 of the JSD: the mixture's row sums over the same score tiles, given pass 1's LSEs (attention_jsd_fwd.cuh).
template <typename Traits>
void run_attention_jsd_sums(const AttentionKLParams& p, cudaStream_t stream) {
  launch_forward_kernel(p, ForwardPass::kJsdSums, attention_jsd_sums_kernel<Traits>, Traits::kNThreads,
                        Traits::kSmemBytes, Traits::kBlockM, Traits::kBlockN, "attention_jsd sums kernel", stream);
}

// Every divergence with one set of traits: the JSD is a runtime branch here, not an instantiation family of its own
// (its kernels are compiled into the same files). Both passes use the same traits.
template <typename Traits>
void run_attention_kl_fwd_passes(const AttentionKLParams& p, cudaStream_t stream) {
  run_attention_kl_fwd_with<Traits>(p, stream);
  if (p.divergence == Divergence::kJsd) run_attention_jsd_sums<Traits>(p, stream);
}

template <typename Element, int kDimS, int kDimT>
void run_attention_kl_fwd(const AttentionKLParams& p, cudaStream_t stream) {
  run_attention_kl_fwd_passes<ForwardTraits<Element, kDimS, kDimT>>(p, stream);
}

// The divergence pass of an aggregated teacher; p.lse_teacher holds the teacher heads' LSEs (the op's pass 1).
template <typename Element, int kDimS, int kDimT>
void run_attention_kl_fwd_aggregated(const AttentionKLParams& p, cudaStream_t stream) {
  if (p.teacher_head_group < 2) throw std::runtime_error("streamkl: the aggregated-teacher forward needs r >= 2");
  run_attention_kl_fwd_passes<AggregatedTraits<Element, kDimS, kDimT>>(p, stream);
}

// Hopper path (sm_90a, head dims 64 and 128): the warp-specialized forward (attention_kl_fwd_sm90.cuh), 128 query
// rows in two MMA warpgroups (ForwardTraitsSm90: 192 in three at head dim 64) against key tiles of 64 that a producer
// warpgroup moves with TMA; for the JSD that is
// pass 1 (the LSEs), and pass 2 the JSD-sums kernel over the same stream and tensor maps. Traits: the plain stream or
// an aggregated teacher's. At least one key (a tensor map has no zero extent): the op runs key-less problems on the
// Ampere-path launcher.
template <typename Traits>
void run_attention_kl_fwd_sm90_with(const AttentionKLParams& p, cudaStream_t stream) {
  if (p.student.k_rows == 0 || p.teacher.k_rows == 0)
    throw std::runtime_error("streamkl: the Hopper-path forward needs at least one key");
  const StreamTmaLoads<Traits> tma = make_stream_tma_loads<Traits>(p);
  const auto kernel = teacher_is_weighting_side(p.divergence) ? attention_kl_fwd_sm90_kernel<Traits, true>
                                                              : attention_kl_fwd_sm90_kernel<Traits, false>;
  launch_forward_kernel(p, ForwardPass::kDivergence, kernel, Traits::kNThreads, Traits::kSmemBytes, Traits::kBlockM,
                        Traits::kBlockN, "attention_kl Hopper forward kernel", stream, tma);
  if (p.divergence == Divergence::kJsd)
    launch_forward_kernel(p, ForwardPass::kJsdSums, attention_jsd_sums_sm90_kernel<Traits>, Traits::kNThreads,
                          Traits::kSmemBytes, Traits::kBlockM, Traits::kBlockN, "attention_jsd Hopper sums kernel",
                          stream, tma);
}

// Plain-teacher forward traits. Head dim 64 on both sides: three MMA warpgroups (192 query rows per CTA), each
// running one key tile at a time (kGroup 1). The exponentials outweigh the short products there, and more warps hide
// their latency better than overlapping a warpgroup's own tiles, which needs two accumulator sets and spills within
// the 128 registers a 512-thread CTA leaves (H100 A/B, N=8192, H=16: 0.999 -> 0.954 ms; with tile pairs 0.949 but
// spilling, with groups of 4 0.987).
template <typename Element, int kDimS, int kDimT>
using ForwardTraitsSm90 =
    std::conditional_t<kDimS == 64 && kDimT == 64,
                       KernelTraitsSm90<Element, kDimS, kDimT, 64, 4, /*kGroup=*/1, 24, 4, false, /*kMmaWarpgroups=*/3>,
                       KernelTraitsSm90<Element, kDimS, kDimT>>;

template <typename Element, int kDimS, int kDimT>
void run_attention_kl_fwd_sm90(const AttentionKLParams& p, cudaStream_t stream) {
  run_attention_kl_fwd_sm90_with<ForwardTraitsSm90<Element, kDimS, kDimT>>(p, stream);
}

// Head-aggregated teacher on the Hopper path (aggregated_teacher_sm90.cuh): key tiles of 64 against 128 query rows
// (or keys) as in the plain kernels, as many stages as shared memory holds with a teacher X block in each.
// kRowStats: the per-row inputs the dK kernel's statistics warp stages (the rule's); 0 for the query-block kernels
// (forward, JSD sums, dQ), which have no statistics warp, so their producer keeps 24 registers instead of 40 and
// their stages no staged-statistics area.
template <typename Element, int kDimS, int kDimT, int kRowStats>
using AggregatedTraitsSm90 = KernelTraitsSm90<Element, kDimS, kDimT, 64,
                                              aggregated_stages_sm90<Element, kDimS, kDimT, kRowStats>(), 4,
                                              /*kProducerRegisters=*/(kRowStats > 0 ? 40 : 24), kRowStats,
                                              /*kAggregatedTeacher=*/true>;

template <typename Element, int kDimS, int kDimT>
void run_attention_kl_fwd_aggregated_sm90(const AttentionKLParams& p, cudaStream_t stream) {
  if (p.teacher_head_group < 2) throw std::runtime_error("streamkl: the aggregated-teacher forward needs r >= 2");
  run_attention_kl_fwd_sm90_with<AggregatedTraitsSm90<Element, kDimS, kDimT, 0>>(p, stream);
}

// One gradient kernel of the Ampere path's two-kernel backward (launch_grad_kernel); teacher gradients never split.
template <typename Traits, bool kTeacherGrad, typename ScoreGrads>
void run_attention_kl_grad_kernel(const AttentionKLParams& p, bool keys, cudaStream_t stream) {
  const auto kernel = keys ? attention_kl_bwd_dk_kernel<Traits, kTeacherGrad, ScoreGrads>
                           : attention_kl_bwd_dq_kernel<Traits, kTeacherGrad, ScoreGrads>;
  launch_grad_kernel<typename Traits::Element>(
      p, keys, /*splittable=*/!kTeacherGrad, kernel, Traits::kNThreads, Traits::kSmemBytes, Traits::kBlockM,
      Traits::kBlockN, keys ? p.student.num_kv_heads : p.num_heads,
      keys ? "attention_kl backward dK kernel" : "attention_kl backward dQ kernel", stream);
}

template <typename Traits, bool kTeacherGrad, typename ScoreGrads>
void run_attention_kl_bwd_dk(const AttentionKLParams& p, cudaStream_t stream) {
  run_attention_kl_grad_kernel<Traits, kTeacherGrad, ScoreGrads>(p, /*keys=*/true, stream);
}

template <typename Traits, bool kTeacherGrad, typename ScoreGrads>
void run_attention_kl_bwd_kernels(const AttentionKLParams& p, cudaStream_t stream) {
  run_attention_kl_grad_kernel<Traits, kTeacherGrad, ScoreGrads>(p, /*keys=*/false, stream);
  run_attention_kl_grad_kernel<Traits, kTeacherGrad, ScoreGrads>(p, /*keys=*/true, stream);
}

// A Hopper-path gradient kernel over the stream of Traits (plain or aggregated teacher): dQ (X = query blocks) or dK
// (kKeys: X = key blocks of each student key head), splittable (student gradients only).
template <typename Traits, typename Rule, bool kKeys>
void run_grad_kernel_sm90(const AttentionKLParams& p, cudaStream_t stream) {
  const StreamTmaLoads<Traits> tma = make_stream_tma_loads<Traits>(p, /*keys_as_x=*/kKeys);
  const auto kernel = [] {
    if constexpr (kKeys) return attention_kl_bwd_dk_sm90_kernel<Traits, Rule>;
    else return attention_kl_bwd_dq_sm90_kernel<Traits, Rule>;
  }();
  launch_grad_kernel<typename Traits::Element>(
      p, kKeys, /*splittable=*/true, kernel, Traits::kNThreads, Traits::kSmemBytes, Traits::kBlockM, Traits::kBlockN,
      kKeys ? p.student.num_kv_heads : p.num_heads,
      kKeys ? "attention_kl Hopper backward dK kernel" : "attention_kl Hopper backward dQ kernel", stream, tma);
}

// The Hopper dK kernel's traits: the producer warpgroup's statistics warp stages the rule's per-query-row inputs.
// kStages: 4, the fused kernel's 3 (its dS and dQ tiles take the shared memory of the fourth).
template <typename Element, int kDimS, int kDimT, typename Rule, int kStages = 4>
using DkTraitsSm90 =
    KernelTraitsSm90<Element, kDimS, kDimT, 64, kStages, 4, /*kProducerRegisters=*/40, Rule::kRowStats>;
template <typename Element, int kDimS, int kDimT, typename Rule>
using FusedBackwardTraitsSm90 = FusedGradTraitsSm90<DkTraitsSm90<Element, kDimS, kDimT, Rule, /*kStages=*/3>>;

// Hopper-path backward (sm_90a, head dims 64 and 128; every divergence, student gradients only) with the divergence's
// score-gradient rule: with p.dq_accum (the op's choice, see attention_kl_cuda.cpp) the fused backward, one dK kernel
// that also adds each tile's dQ share into that fp32 workspace (fused_dq_sm90.cuh), then the dQ epilogue; otherwise
// the warp-specialized dQ and dK kernels (attention_kl_bwd_sm90.cuh), one writer per gradient row. The op asks for
// this family only for the configurations it takes; the others (teacher gradients, no keys) run run_attention_kl_bwd.
template <typename Element, int kDimS, int kDimT, typename Rule>
void run_attention_kl_bwd_sm90_kernels(const AttentionKLParams& p, cudaStream_t stream) {
  if constexpr (fused_backward_sm90_supports(kDimS)) {
    if (p.dq_accum != nullptr) {
      // One teacher key block per CTA, as in the two-kernel dK kernel below.
      if (p.teacher.num_kv_heads != p.student.num_kv_heads)
        throw std::runtime_error("streamkl: the fused Hopper backward needs both sides to group query heads alike");
      run_grad_kernel_sm90<FusedBackwardTraitsSm90<Element, kDimS, kDimT, Rule>, Rule, /*kKeys=*/true>(p, stream);
      finish_fused_dq<Element>(p, stream);
      return;
    }
  }
  if (p.dq_accum != nullptr) throw std::runtime_error("streamkl: no fused Hopper backward at this student head dim");
  run_grad_kernel_sm90<KernelTraitsSm90<Element, kDimS, kDimT>, Rule, /*kKeys=*/false>(p, stream);
  // The Hopper dK kernel keeps one teacher key block per CTA, so it needs the teacher to group its query heads
  // like the student; otherwise the Ampere-path dK kernel (which reloads the teacher's block per query head).
  if (p.teacher.num_kv_heads != p.student.num_kv_heads) {
    run_attention_kl_bwd_dk<BackwardTraits<Element, kDimS, kDimT, false, Rule::kRowStats>, false, Rule>(p, stream);
    return;
  }
  run_grad_kernel_sm90<DkTraitsSm90<Element, kDimS, kDimT, Rule>, Rule, /*kKeys=*/true>(p, stream);
}

// Student gradients for an aggregated teacher on the Hopper path: both kernels over the aggregated stream.
template <typename Element, int kDimS, int kDimT, typename Rule>
void run_attention_kl_bwd_aggregated_sm90_kernels(const AttentionKLParams& p, cudaStream_t stream) {
  run_grad_kernel_sm90<AggregatedTraitsSm90<Element, kDimS, kDimT, 0>, Rule, /*kKeys=*/false>(p, stream);
  run_grad_kernel_sm90<AggregatedTraitsSm90<Element, kDimS, kDimT, Rule::kRowStats>, Rule, /*kKeys=*/true>(p, stream);
}

// fn(RuleTag<Rule>{}) with the divergence's score-gradient rule (score_grad_rules.cuh).
template <typename Rule>
struct RuleTag {
  using type = Rule;
};
template <typename Fn>
void with_score_grad_rule(Divergence divergence, Fn&& fn) {
  switch (divergence) {
    case Divergence::kForward:
      fn(RuleTag<KlScoreGrads<true>>{});
      break;
    case Divergence::kReverse:
      fn(RuleTag<KlScoreGrads<false>>{});
      break;
    case Divergence::kJsd:
      fn(RuleTag<JsdScoreGrads>{});
      break;
  }
}

template <typename Element, int kDimS, int kDimT>
void run_attention_kl_bwd_sm90(const AttentionKLParams& p, cudaStream_t stream) {
  if (p.teacher_grad || p.student.k_rows == 0 || p.teacher.k_rows == 0)
    throw std::runtime_error("streamkl: the Hopper-path backward takes student gradients only, over at least one key");
  with_score_grad_rule(p.divergence, [&](auto rule) {
    run_attention_kl_bwd_sm90_kernels<Element, kDimS, kDimT, typename decltype(rule)::type>(p, stream);
  });
}

template <typename Element, int kDimS, int kDimT>
void run_attention_kl_bwd_aggregated_sm90(const AttentionKLParams& p, cudaStream_t stream) {
  if (p.teacher_grad || p.dq_accum != nullptr || p.teacher_head_group < 2 || p.student.k_rows == 0 ||
      p.teacher.k_rows == 0)
    throw std::runtime_error(
        "streamkl: the Hopper-path aggregated-teacher backward takes student gradients only, r >= 2, at least one key");
  with_score_grad_rule(p.divergence, [&](auto rule) {
    run_attention_kl_bwd_aggregated_sm90_kernels<Element, kDimS, kDimT, typename decltype(rule)::type>(p, stream);
  });
}

// The divergence picks the score-gradient rule (score_grad_rules.cuh). The JSD's rows carry 5 statistics, so its
// traits stage 5 floats per query row in the dK kernel; the KL kernels keep their traits (4).
template <typename KlTraits, typename JsdTraits, bool kTeacherGrad>
void run_attention_kl_bwd_rules(const AttentionKLParams& p, cudaStream_t stream) {
  with_score_grad_rule(p.divergence, [&](auto rule) {
    using Rule = typename decltype(rule)::type;
    using Traits = std::conditional_t<std::is_same_v<Rule, JsdScoreGrads>, JsdTraits, KlTraits>;
    run_attention_kl_bwd_kernels<Traits, kTeacherGrad, Rule>(p, stream);
  });
}

template <typename Element, int kDimS, int kDimT, bool kTeacherGrad>
void run_attention_kl_bwd_impl(const AttentionKLParams& p, cudaStream_t stream) {
  run_attention_kl_bwd_rules<BackwardTraits<Element, kDimS, kDimT, kTeacherGrad>,
                             BackwardTraits<Element, kDimS, kDimT, kTeacherGrad, JsdScoreGrads::kRowStats>,
                             kTeacherGrad>(p, stream);
}

// Student gradients for an aggregated teacher (teacher gradients through the head mean are not supported: the op
// refuses them); p.lse_teacher holds the teacher heads' LSEs.
template <typename Element, int kDimS, int kDimT>
void run_attention_kl_bwd_aggregated(const AttentionKLParams& p, cudaStream_t stream) {
  if (p.teacher_grad || p.dq_accum != nullptr || p.teacher_head_group < 2)
    throw std::runtime_error("streamkl: the aggregated-teacher backward takes student gradients only, r >= 2");
  run_attention_kl_bwd_rules<AggregatedTraits<Element, kDimS, kDimT>,
                             AggregatedTraits<Element, kDimS, kDimT, JsdScoreGrads::kRowStats>, false>(p, stream);
}

// Fused student-only backward (opt-in, STREAMKL_FUSED_BACKWARD=1): one kernel per key block computes the
// score tiles once and produces dK directly and dQ through the fp32 workspace p.dq_accum. Measured slower
// than the two-kernel backward on H100 (bench/RESULTS.md): the atomics and the dS^T round trip through
// shared memory cost more than the recomputed score tiles they save at 64-key blocks.
template <typename Element, int kDimS, int kDimT>
using FusedBackwardTraits = KernelTraits<Element, kDimS, kDimT, 64, 64, 4, false, true>;

// Padded layout only: the epilogue converts the workspace as one flat array of batch * heads * seqlen_q rows,
// a count the host knows only without varlen packing (the op never selects it for varlen inputs).
template <typename Element, int kDimS, int kDimT>
void run_attention_kl_bwd_fused(const AttentionKLParams& p, cudaStream_t stream) {
  using Traits = FusedBackwardTraits<Element, kDimS, kDimT>;
  const dim3 grid(ceil_div(p.seqlen_k, Traits::kBlockM), p.student.num_kv_heads, p.batch);
  const auto kernel = teacher_is_weighting_side(p.divergence)
                          ? attention_kl_bwd_dk_kernel<Traits, false, KlScoreGrads<true>>
                          : attention_kl_bwd_dk_kernel<Traits, false, KlScoreGrads<false>>;
  launch_with_smem(kernel, grid, Traits::kNThreads, Traits::kSmemBytes, stream, "attention_kl fused backward kernel",
                   p);
  finish_fused_dq<Element>(p, stream);
}

// p.dq_accum non-null selects the fused student-only backward (it requires a contiguous student dq; KL only, the
// op never allocates the workspace for the JSD); otherwise a dQ kernel and a dK kernel, each with a single writer
// per output row (deterministic).
template <typename Element, int kDimS, int kDimT>
void run_attention_kl_bwd(const AttentionKLParams& p, cudaStream_t stream) {
  if (p.teacher_grad) {
    run_attention_kl_bwd_impl<Element, kDimS, kDimT, true>(p, stream);
    return;
  }
  if constexpr (fused_backward_supports(kDimS, kDimT)) {
    if (p.dq_accum != nullptr && p.divergence != Divergence::kJsd) {
      run_attention_kl_bwd_fused<Element, kDimS, kDimT>(p, stream);
      return;
    }
  }
  run_attention_kl_bwd_impl<Element, kDimS, kDimT, false>(p, stream);
}

}  // namespace cuda
}  // namespace streamkl

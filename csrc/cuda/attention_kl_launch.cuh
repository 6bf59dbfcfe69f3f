// Host-side launchers of the Ampere-path attention-KL kernels: tile configuration per head-dim pair, grid
// shape, dynamic shared memory. Instantiated once per (dtype, D_s, D_t) by csrc/cuda/instantiations/.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
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

template <typename Kernel>
inline void reserve_smem(Kernel kernel, int smem_bytes, const char* what) {
  if (smem_bytes <= 48 * 1024) return;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("streamkl: ") + what + ": cannot reserve " + std::to_string(smem_bytes) +
                             " bytes of shared memory: " + cudaGetErrorString(err));
}

template <typename Kernel, typename... Args>
inline void launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                             const char* what, const Args&... args) {
  reserve_smem(kernel, smem_bytes, what);
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
    int device = 0, sms = 0, per_sm = 0;
    reserve_smem(kernel, smem_bytes, what);
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes) != cudaSuccess)
      check_launch(what);  // reports the error
    const int64_t slots = static_cast<int64_t>(sms) * std::max(per_sm, 1);
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

// The student gradient whose split partials (scaled) a dQ / dK kernel wrote, summed into the output.
template <typename Element>
void sum_split_grad(const AttentionKLParams& p, bool keys, const float* partials, cudaStream_t stream) {
  const int64_t n = student_grad_elements(p, keys);
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 65535));
  sum_split_partials_kernel<Element><<<blocks, 256, 0, stream>>>(
      partials, static_cast<Element*>(keys ? p.student.dk : p.student.dq), n, p.stream_splits);
  check_launch("attention_kl split-stream gradient epilogue");
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
// The KL divergences split long streams of few blocks (stream_splits.cuh) and merge the rows' partial states after;
// the JSD's pass 1 does not (pass 2 needs its LSEs, and its backward its statistics, unsplit).
template <typename Traits>
void run_attention_kl_fwd_with(const AttentionKLParams& p, cudaStream_t stream) {
  const bool teacher_weights = teacher_is_weighting_side(p.divergence);
  const auto kernel = teacher_weights ? attention_kl_fwd_kernel<Traits, true> : attention_kl_fwd_kernel<Traits, false>;
  const char* what = "attention_kl forward kernel";
  const int blocks = ceil_div(p.seqlen_q, Traits::kBlockM);
  AttentionKLParams q = p;
  if (p.divergence != Divergence::kJsd)
    q = with_stream_split(p, kernel, Traits::kNThreads, Traits::kSmemBytes,
                          static_cast<int64_t>(blocks) * p.num_heads * p.batch, ceil_div(p.seqlen_k, Traits::kBlockN),
                          split_state_rows(p) * kSplitStateFloats * int64_t(sizeof(float)), what);
  if (q.stream_splits > 1)
    q.split_states = q.workspace(q.stream_splits * split_state_rows(q) * kSplitStateFloats * int64_t(sizeof(float)));
  launch_with_smem(kernel, dim3(blocks * q.stream_splits, p.num_heads, p.batch), Traits::kNThreads,
                   Traits::kSmemBytes, stream, what, q);
  if (q.stream_splits == 1) return;
  const auto combine = teacher_weights ? combine_split_rows_kernel<true> : combine_split_rows_kernel<false>;
  combine<<<dim3(ceil_div(p.seqlen_q, kCombineRows), p.num_heads, p.batch), kCombineRows, 0, stream>>>(q);
  check_launch("attention_kl split-stream combine kernel");
}

// Pass 2 of the JSD: the mixture's row sums over the same score tiles, given pass 1's LSEs (attention_jsd_fwd.cuh).
template <typename Traits>
void run_attention_jsd_sums(const AttentionKLParams& p, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.num_heads, p.batch);
  launch_with_smem(attention_jsd_sums_kernel<Traits>, grid, Traits::kNThreads, Traits::kSmemBytes, stream,
                   "attention_jsd sums kernel", p);
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
// rows in two MMA warpgroups against key tiles of 64 that a producer warpgroup moves with TMA; for the JSD that is
// pass 1 (the LSEs), and pass 2 the JSD-sums kernel over the same stream and tensor maps. At least one key (a tensor
// map has no zero extent): the op runs key-less problems on the Ampere-path launcher.
template <typename Element, int kDimS, int kDimT>
void run_attention_kl_fwd_sm90(const AttentionKLParams& p, cudaStream_t stream) {
  if (p.student.k_rows == 0 || p.teacher.k_rows == 0)
    throw std::runtime_error("streamkl: the Hopper-path forward needs at least one key");
  using Traits = KernelTraitsSm90<Element, kDimS, kDimT>;
  const StreamTmaLoads<Traits> tma = make_stream_tma_loads<Traits>(p);
  const dim3 grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.num_heads, p.batch);
  const auto kernel = teacher_is_weighting_side(p.divergence) ? attention_kl_fwd_sm90_kernel<Traits, true>
                                                              : attention_kl_fwd_sm90_kernel<Traits, false>;
  launch_with_smem(kernel, grid, Traits::kNThreads, Traits::kSmemBytes, stream, "attention_kl Hopper forward kernel",
                   p, tma);
  if (p.divergence == Divergence::kJsd)
    launch_with_smem(attention_jsd_sums_sm90_kernel<Traits>, grid, Traits::kNThreads, Traits::kSmemBytes, stream,
                     "attention_jsd Hopper sums kernel", p, tma);
}

// One gradient kernel of the two-kernel backward: dQ (keys = false; X = query blocks, Y = key tiles) or dK (X = key
// blocks of each key head, Y = query tiles). Student gradients split long streams of few blocks (stream_splits.cuh):
// each split writes an fp32 slice of a workspace, summed into dq / dk after.
template <typename Traits, bool kTeacherGrad, typename ScoreGrads>
void run_attention_kl_grad_kernel(const AttentionKLParams& p, bool keys, cudaStream_t stream) {
  const auto kernel = keys ? attention_kl_bwd_dk_kernel<Traits, kTeacherGrad, ScoreGrads>
                           : attention_kl_bwd_dq_kernel<Traits, kTeacherGrad, ScoreGrads>;
  const char* what = keys ? "attention_kl backward dK kernel" : "attention_kl backward dQ kernel";
  const int blocks = ceil_div(keys ? p.seqlen_k : p.seqlen_q, Traits::kBlockM);
  const int heads = keys ? p.student.num_kv_heads : p.num_heads;
  AttentionKLParams q = p;
  if (!kTeacherGrad)
    q = with_stream_split(p, kernel, Traits::kNThreads, Traits::kSmemBytes,
                          static_cast<int64_t>(blocks) * heads * p.batch,
                          ceil_div(keys ? p.seqlen_q : p.seqlen_k, Traits::kBlockN),
                          student_grad_elements(p, keys) * int64_t(sizeof(float)), what);
  float* partials = nullptr;
  if (q.stream_splits > 1) {
    // Every split writes every row of its blocks (zeros where its part of the stream is empty); the workspace comes
    // zeroed all the same, so an element no CTA wrote could only add 0.
    partials = static_cast<float*>(
        q.workspace(q.stream_splits * student_grad_elements(q, keys) * int64_t(sizeof(float))));
    (keys ? q.split_dk_partials : q.split_dq_partials) = partials;
  }
  launch_with_smem(kernel, dim3(blocks * q.stream_splits, heads, p.batch), Traits::kNThreads, Traits::kSmemBytes,
                   stream, what, q);
  if (partials != nullptr) sum_split_grad<typename Traits::Element>(q, keys, partials, stream);
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

// Hopper-path backward (sm_90a, head dims 64 and 128; every divergence, student gradients only): the warp-specialized
// dQ and dK kernels (attention_kl_bwd_sm90.cuh) with the divergence's score-gradient rule. The op asks for this family
// only for the configurations it takes; the others (teacher gradients, the fused backward, no keys) run
// run_attention_kl_bwd.
template <typename Element, int kDimS, int kDimT, typename Rule>
void run_attention_kl_bwd_sm90_kernels(const AttentionKLParams& p, cudaStream_t stream) {
  using Traits = KernelTraitsSm90<Element, kDimS, kDimT>;
  const StreamTmaLoads<Traits> tma = make_stream_tma_loads<Traits>(p);
  const dim3 grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.num_heads, p.batch);
  launch_with_smem(attention_kl_bwd_dq_sm90_kernel<Traits, Rule>, grid, Traits::kNThreads, Traits::kSmemBytes, stream,
                   "attention_kl Hopper backward dQ kernel", p, tma);
  // The Hopper dK kernel keeps one teacher key block per CTA, so it needs the teacher to group its query heads
  // like the student; otherwise the Ampere-path dK kernel (which reloads the teacher's block per query head).
  if (p.teacher.num_kv_heads != p.student.num_kv_heads) {
    run_attention_kl_bwd_dk<BackwardTraits<Element, kDimS, kDimT, false, Rule::kRowStats>, false, Rule>(p, stream);
    return;
  }
  using DkTraits = KernelTraitsSm90<Element, kDimS, kDimT, 64, 4, 4, /*kProducerRegisters=*/40, Rule::kRowStats>;
  const StreamTmaLoads<DkTraits> dk_tma = make_stream_tma_loads<DkTraits>(p, /*keys_as_x=*/true);
  const dim3 dk_grid(ceil_div(p.seqlen_k, DkTraits::kBlockM), p.student.num_kv_heads, p.batch);
  launch_with_smem(attention_kl_bwd_dk_sm90_kernel<DkTraits, Rule>, dk_grid, DkTraits::kNThreads,
                   DkTraits::kSmemBytes, stream, "attention_kl Hopper backward dK kernel", p, dk_tma);
}

template <typename Element, int kDimS, int kDimT>
void run_attention_kl_bwd_sm90(const AttentionKLParams& p, cudaStream_t stream) {
  if (p.teacher_grad || p.dq_accum != nullptr || p.student.k_rows == 0 || p.teacher.k_rows == 0)
    throw std::runtime_error("streamkl: the Hopper-path backward takes student gradients only, over at least one key");
  switch (p.divergence) {
    case Divergence::kForward:
      run_attention_kl_bwd_sm90_kernels<Element, kDimS, kDimT, KlScoreGrads<true>>(p, stream);
      break;
    case Divergence::kReverse:
      run_attention_kl_bwd_sm90_kernels<Element, kDimS, kDimT, KlScoreGrads<false>>(p, stream);
      break;
    case Divergence::kJsd:
      run_attention_kl_bwd_sm90_kernels<Element, kDimS, kDimT, JsdScoreGrads>(p, stream);
      break;
  }
}

// The divergence picks the score-gradient rule (score_grad_rules.cuh). The JSD's rows carry 5 statistics, so its
// traits stage 5 floats per query row in the dK kernel; the KL kernels keep their traits (4).
template <typename KlTraits, typename JsdTraits, bool kTeacherGrad>
void run_attention_kl_bwd_rules(const AttentionKLParams& p, cudaStream_t stream) {
  switch (p.divergence) {
    case Divergence::kForward:
      run_attention_kl_bwd_kernels<KlTraits, kTeacherGrad, KlScoreGrads<true>>(p, stream);
      break;
    case Divergence::kReverse:
      run_attention_kl_bwd_kernels<KlTraits, kTeacherGrad, KlScoreGrads<false>>(p, stream);
      break;
    case Divergence::kJsd:
      run_attention_kl_bwd_kernels<JsdTraits, kTeacherGrad, JsdScoreGrads>(p, stream);
      break;
  }
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
  const int64_t n = static_cast<int64_t>(p.batch) * p.num_heads * p.seqlen_q * kDimS;
  const int blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 65535));
  scale_convert_kernel<Element><<<blocks, 256, 0, stream>>>(static_cast<const float*>(p.dq_accum),
                                                            static_cast<Element*>(p.student.dq), n,
                                                            static_cast<float>(p.student.scale));
  check_launch("attention_kl dQ epilogue");
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

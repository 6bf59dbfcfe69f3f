// Plain parameter struct for the attention-KL kernels (CPU and CUDA), in the spirit of FlashAttention's
// Flash_fwd_params: raw pointers, strides in elements, sizes and flags. Torch-free.
//
// Padded layout: q is [B, H, N_q, D], k is [B, H_kv, N_k, D] per side, last dim contiguous, any other
// strides; per-row outputs (kl, lse_student, lse_teacher, grad_kl) are contiguous [B, H, N_q].
// Varlen layout (cu_seqlens_q/k set): q is [total_q, H, D], k is [total_k, H_kv, D] (batch strides 0,
// sequence b starts at row cu_seqlens[b]); per-row outputs are contiguous [total_q, H]. Kernels index
// through sequence() and row_index(), so one kernel serves both layouts.
// Fields for features that later kernels add (GQA, sliding windows, varlen) are here already so that
// adding them does not change the struct's shape; kernels that do not support them check and refuse.
#pragma once

#include <cstdint>

#include "online_kl.h"

namespace streamkl {

// One model's side of the comparison (student or teacher).
struct AttentionSide {
  const void* q = nullptr;
  const void* k = nullptr;
  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int head_dim = 0;
  // Extent of q / k along their row dim: N_q / N_k padded, total_q / total_k varlen. Kernels that walk rows
  // through the sequence bounds do not need it; the Hopper path's TMA descriptors do (the copy engine bounds-checks
  // against the tensor's extent).
  int64_t q_rows = 0, k_rows = 0;
  int num_kv_heads = 0;  // == num_heads without GQA; query head h reads key head h / (num_heads / num_kv_heads)
  double scale = 1.0;    // softmax scale applied to <q, k> (kernels convert to their compute type)

  // Backward outputs, same layouts as q / k, contiguous (strides given for clarity).
  void* dq = nullptr;
  void* dk = nullptr;
  int64_t dq_batch_stride = 0, dq_head_stride = 0, dq_row_stride = 0;
  int64_t dk_batch_stride = 0, dk_head_stride = 0, dk_row_stride = 0;
};

struct AttentionKLParams {
  AttentionSide student, teacher;

  int batch = 0;
  int num_heads = 0;
  int seqlen_q = 0;
  int seqlen_k = 0;

  // Masking. Query row i may see key j iff  i + offset - window_left <= j <= i + offset + window_right,
  // with offset = seqlen_k - seqlen_q (bottom-right alignment); a negative window side means unbounded.
  // causal == (window_right = 0).
  bool causal = false;
  int window_left = -1;
  int window_right = -1;

  // Varlen packing (FlashAttention conventions: int32, length batch + 1, cu_seqlens[0] = 0, non-decreasing);
  // null for the padded [B, H, N, D] layout. With varlen, seqlen_q / seqlen_k hold the maxima over the
  // batch (they size the task grid; a task past its sequence's end does nothing).
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;

  Divergence divergence = Divergence::kForward;
  // Generalized JSD only (Divergence::kJsd): beta of JsdWeights::mixture_weighted (online_kl.h), 0 < beta < 1
  // (the ops run beta = 0 / 1 as forward / reverse KL, see kernel_attention_params in ops/attention_inputs.h), and
  // the per-row JsdRowStats ([rows, JsdRowStats::kCount], same row order as kl) written by the forward's second
  // pass and read by the backward.
  double beta = 0.5;
  void* jsd_stats = nullptr;

  // Head-aggregated teacher (teacher_head_reduce="mean"): the teacher has num_heads * teacher_head_group query
  // heads, and student head h is compared with the mean of the attention probabilities of teacher heads
  // h * r .. h * r + r - 1 (r = teacher_head_group; 1 = one teacher head per student head, no aggregation).
  // Kernels then need the teacher's per-head LSEs first: lse_teacher is [B, H * r, N_q] (teacher_row_index),
  // an input of the divergence pass, computed by a pass of its own unless teacher_lse_ready (the caller filled
  // it, e.g. from a FlashAttention forward with the same scale).
  int teacher_head_group = 1;
  bool teacher_lse_ready = false;

  // Per-row outputs of the forward (inputs of the backward); contiguous [B, H, N_q].
  // Element type is float, or double for float64 inputs on the CPU.
  void* kl = nullptr;
  void* lse_student = nullptr;
  void* lse_teacher = nullptr;

  // Backward only.
  const void* grad_kl = nullptr;
  // Element step between rows of grad_kl: 1 (contiguous, like kl), or 0 when one value is broadcast to every row (the
  // gradient of kl.sum() or kl.mean(), an expanded scalar), read in place instead of copied out first.
  int64_t grad_kl_stride = 1;
  bool teacher_grad = false;  // also produce teacher.dq / teacher.dk
  // fp32 workspace [B, H, N_q, D_s], zeroed, for CUDA backward kernels that accumulate the student's dQ
  // with atomics (see cuda/attention_kl_bwd.cuh); null where unused.
  void* dq_accum = nullptr;

  // Split streams (Ampere-path CUDA kernels of the KL divergences). The launchers set these on their own copy of
  // the parameters, never the ops: the CTAs of one X block (query rows, or keys in the dK kernel) divide its Y tiles
  // into runs of split_tiles tiles, stream_splits CTAs per block, so that problems with few blocks (one student
  // head, a short batch) still fill the GPU (cuda/stream_splits.cuh). The forward then writes partial row states
  // (split_states: fp32 [stream_splits, B * H * N_q, kSplitStateFloats], rows by row_index) that a combine kernel
  // merges; the dQ / dK kernels write their partial gradients to fp32 slices with the offsets of dq / dk
  // (split_dq_partials / split_dk_partials: [stream_splits, elements of dq / dk]) that an epilogue sums in split
  // order, so that results stay deterministic. 1 = each block's stream in one CTA.
  int stream_splits = 1;
  int split_tiles = 0;
  void* split_states = nullptr;
  void* split_dq_partials = nullptr;
  void* split_dk_partials = nullptr;
  // What the caller asks of the split: 0 = the launcher decides (from the grid and the GPU), n >= 1 = at most n
  // CTAs per block (1 = none; tests force both ways).
  int requested_splits = 0;
  // Zeroed device memory for a launcher's workspace (the split streams'), which the caller owns until it has
  // queued the kernels on its stream; no allocator = no split.
  struct Workspace {
    void* (*zeros)(void* context, int64_t bytes) = nullptr;
    void* context = nullptr;
    void* operator()(int64_t bytes) const { return zeros(context, bytes); }
    explicit operator bool() const { return zeros != nullptr; }
  } workspace;

  // Where sequence b lives: its first query / key row (0 in the padded layout, whose batch strides do the
  // work) and its lengths.
  struct Sequence {
    int64_t q_start, k_start;
    int seqlen_q, seqlen_k;
  };
  SKL_HOST_DEVICE Sequence sequence(int b) const {
    if (cu_seqlens_q == nullptr) return Sequence{0, 0, seqlen_q, seqlen_k};
    return Sequence{cu_seqlens_q[b], cu_seqlens_k[b], cu_seqlens_q[b + 1] - cu_seqlens_q[b],
                    cu_seqlens_k[b + 1] - cu_seqlens_k[b]};
  }

  // Index of row i of head h of sequence b in the per-row outputs: [B, H, N_q] padded, [total_q, H] varlen.
  SKL_HOST_DEVICE int64_t row_index(int b, int h, int i) const { return row_index_for_heads(b, h, i, num_heads); }
  SKL_HOST_DEVICE int num_teacher_heads() const { return num_heads * teacher_head_group; }
  // The teacher LSE of per-row output idx as the divergence and gradient formulas take it: lse_teacher[idx], or 0
  // for an aggregated teacher, whose tiles are already the normalized log pbar (lse_teacher then holds the heads').
  template <typename T>
  SKL_HOST_DEVICE T row_teacher_lse(int64_t idx) const {
    return teacher_head_group > 1 ? T(0) : static_cast<const T*>(lse_teacher)[idx];
  }
  // Row i of teacher head h_t of sequence b in lse_teacher (== row_index when the teacher is not aggregated).
  SKL_HOST_DEVICE int64_t teacher_row_index(int b, int h_t, int i) const {
    return row_index_for_heads(b, h_t, i, num_teacher_heads());
  }
  // Same for per-row tensors with `heads` heads ([B, heads, N_q] / [total_q, heads]).
  SKL_HOST_DEVICE int64_t row_index_for_heads(int b, int h, int i, int heads) const {
    if (cu_seqlens_q != nullptr) return (static_cast<int64_t>(cu_seqlens_q[b]) + i) * heads + h;
    return (static_cast<int64_t>(b) * heads + h) * seqlen_q + i;
  }
};

}  // namespace streamkl

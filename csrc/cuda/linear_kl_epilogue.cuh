// Device code of linear_kl's CUDA epilogue (host API: linear_kl_epilogue.h). Torch-free.
//
// Part of the interim "hybrid" CUDA design: cuBLAS has written one vocabulary chunk of both sides' raw fp32
// logits z = x w^T ([T, ld] row-major each); these kernels read it once and do everything else with the shared
// online two-softmax core (kernels/online_kl.h), so no softmax or KL math is written here:
//   forward, pass kOnline:      (z + b) / tau  ->  per-row OnlineKLState, merged across chunks; the label logit
//   forward, pass kJsdMixture:  JSD only, with both LSEs known  ->  per-row JsdRowSums, summed across chunks
//   forward finish:             per-row loss / ce / stats through LinearRowOutputs (shared with the CPU)
//   backward:                   dL/dz of each side, written in the input dtype for the cuBLAS gradient GEMMs
// One thread block per token row; its threads stride over the chunk's columns (coalesced loads), each keeps a
// partial state, and the block merges them (the core's merge()) before thread 0 folds the result into the
// row's state from the previous chunks. Every row has a single writer: no atomics, deterministic results.
// A fused CuTe/wgmma GEMM + epilogue kernel is to replace this design (no fp32 logit round trip through memory).
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../kernels/linear_params.h"
#include "../kernels/linear_row_outputs.h"
#include "../kernels/online_kl.h"
#include "linear_kl_epilogue.h"

namespace streamkl {
namespace cuda {
namespace linear_epilogue {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
using Base = Base2<float>;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Elem>
__device__ __forceinline__ Elem from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One token row of one chunk: both sides' tempered logits in base-2 units, (z + b) * (1 / tau) * log2(e).
template <typename Elem>
struct RowLogits {
  const float* z_s;
  const float* z_t;
  const Elem* b_s;  // null without bias
  const Elem* b_t;
  float scale;

  __device__ RowLogits(const LinearKLParams& p, const LinearLogitChunk& c, int64_t row)
      : z_s(c.z_student + row * c.ld),
        z_t(c.z_teacher + row * c.ld),
        b_s(p.student.bias ? static_cast<const Elem*>(p.student.bias) + c.v0 : nullptr),
        b_t(p.teacher.bias ? static_cast<const Elem*>(p.teacher.bias) + c.v0 : nullptr),
        scale(static_cast<float>(p.inv_temperature) * kLog2e) {}

  __device__ float student(int col) const { return (z_s[col] + (b_s ? to_float(b_s[col]) : 0.f)) * scale; }
  __device__ float teacher(int col) const { return (z_t[col] + (b_t ? to_float(b_t[col]) : 0.f)) * scale; }
};

// Merges the partial State of every thread of the block (a struct of floats with merge(), e.g. OnlineKLState
// or JsdRowSums) and returns the result in thread 0 (other threads get partial merges). All threads must call.
template <typename State>
__device__ State block_merge(State state) {
  static_assert(sizeof(State) % sizeof(float) == 0, "block_merge moves a State as floats");
  constexpr int kFields = sizeof(State) / sizeof(float);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    float fields[kFields];
    std::memcpy(fields, &state, sizeof(State));
#pragma unroll
    for (int k = 0; k < kFields; ++k) fields[k] = __shfl_xor_sync(0xffffffffu, fields[k], offset);
    State other;
    std::memcpy(&other, fields, sizeof(State));
    state.merge(other);
  }
  __shared__ State warp_states[kWarps];
  if (threadIdx.x % 32 == 0) warp_states[threadIdx.x / 32] = state;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < kWarps; ++w) state.merge(warp_states[w]);
  return state;
}

// Pass kOnline over one chunk. teacher_weights: which side's probabilities weight the log-ratio (see
// linear_online_teacher_weights).
template <typename Elem>
__global__ void __launch_bounds__(kThreads)
    online_chunk_kernel(const LinearKLParams p, const LinearLogitChunk c, const LinearRowState rs,
                        const bool teacher_weights) {
  const int64_t row = blockIdx.x;
  if (p.row_ignored(row)) return;
  const RowLogits<Elem> logits(p, c, row);
  LinearOnlineState state;
  state.init();
  for (int col = threadIdx.x; col < c.cols; col += kThreads) {
    const float s = logits.student(col), t = logits.teacher(col);
    const float w = teacher_weights ? t : s, o = teacher_weights ? s : t;
    // A maximum rises rarely after a thread's first columns: rescale (two more exponentials) only then.
    if (w > state.max_w || o > state.max_o) state.rescale(w, o);
    state.add(w, o);
  }
  state = block_merge(state);
  if (threadIdx.x != 0) return;
  if (!c.first) state.merge(rs.online[row]);
  rs.online[row] = state;
  if (p.with_ce) {
    const int64_t label_col = p.labels[row] - c.v0;
    if (label_col >= 0 && label_col < c.cols)
      rs.label_logit[row] = logits.student(static_cast<int>(label_col)) * Base::to_natural();
    else if (c.first)
      rs.label_logit[row] = 0.f;
  }
}

// Pass kJsdMixture over one chunk: needs the whole kOnline pass done (its LSEs).
template <typename Elem>
__global__ void __launch_bounds__(kThreads)
    jsd_mixture_chunk_kernel(const LinearKLParams p, const LinearLogitChunk c, const LinearRowState rs,
                             const bool teacher_weights, const JsdWeights<float> weights) {
  const int64_t row = blockIdx.x;
  if (p.row_ignored(row)) return;
  const RowLogits<Elem> logits(p, c, row);
  float lse_s, lse_t;
  student_teacher_lse(rs.online[row], teacher_weights, lse_s, lse_t);
  lse_s *= kLog2e;  // to the base-2 units of the scores
  lse_t *= kLog2e;
  JsdRowSums<float> sums;
  sums.init();
  for (int col = threadIdx.x; col < c.cols; col += kThreads)
    jsd_add_key<float, Base>(sums, logits.teacher(col) - lse_t, logits.student(col) - lse_s, weights);
  sums = block_merge(sums);
  if (threadIdx.x != 0) return;
  if (!c.first) sums.merge(rs.jsd[row]);
  rs.jsd[row] = sums;
}

// After the last pass: every row's loss, ce and stats (one thread per row).
__global__ void finish_rows_kernel(const LinearKLParams p, const LinearRowState rs, const bool teacher_weights,
                                   const JsdWeights<float> weights) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < p.num_rows; row += stride) {
    if (p.row_ignored(row)) {
      LinearRowOutputs<float>::zeros().store(p, row);
      continue;
    }
    const JsdRowStats<float> jsd_terms =
        p.loss == LinearLoss::kJSD ? JsdRowStats<float>::finalize<Base>(rs.jsd[row]) : JsdRowStats<float>{};
    const float label_logit = p.with_ce ? rs.label_logit[row] : 0.f;
    LinearRowOutputs<float>::finish(p, rs.online[row], teacher_weights, jsd_terms, weights, label_logit).store(p, row);
  }
}

// Backward of one chunk: dL/dz_s = g / tau * dD/ds + g_ce * (softmax(s) - onehot(label)) (CE at tau = 1) and
// dL/dz_t = g / tau * dD/dt, from the saved statistics; ignored rows get zeros (the GEMMs read every row).
template <typename Elem>
__global__ void __launch_bounds__(kThreads)
    grad_chunk_kernel(const LinearKLParams p, const LinearLogitChunk c, const JsdWeights<float> weights) {
  const int64_t row = blockIdx.x;
  Elem* grad_s = c.grad_student ? static_cast<Elem*>(c.grad_student) + row * c.ld : nullptr;
  Elem* grad_t = c.grad_teacher ? static_cast<Elem*>(c.grad_teacher) + row * c.ld : nullptr;
  if (p.row_ignored(row)) {
    for (int col = threadIdx.x; col < c.cols; col += kThreads) {
      if (grad_s) grad_s[col] = from_float<Elem>(0.f);
      if (grad_t) grad_t[col] = from_float<Elem>(0.f);
    }
    return;
  }
  const RowLogits<Elem> logits(p, c, row);
  const float* stats = static_cast<const float*>(p.stats);
  const auto stat = [&](int which) { return stats[which * p.num_rows + row]; };
  const float lse_s = stat(kStatLseStudent) * kLog2e, lse_t = stat(kStatLseTeacher) * kLog2e;
  const float g = static_cast<const float*>(p.grad_loss)[row] * static_cast<float>(p.inv_temperature);
  const float g_ce = p.with_ce ? static_cast<const float*>(p.grad_ce)[row] : 0.f;
  const int64_t label_col = p.with_ce ? p.labels[row] - c.v0 : -1;
  const float div = static_cast<const float*>(p.loss_rows)[row];
  const bool jsd = p.loss == LinearLoss::kJSD;
  const bool teacher_weights = teacher_is_weighting_side(kl_divergence_of(p.loss));
  const JsdRowStats<float> jsd_stats{stat(kStatKlTeacherMix), stat(kStatKlStudentMix)};
  for (int col = threadIdx.x; col < c.cols; col += kThreads) {
    const float s = logits.student(col), t = logits.teacher(col);
    float d_s, d_t;
    if (jsd)
      jsd_score_grads<float, Base>(t - lse_t, s - lse_s, jsd_stats, weights, g, d_t, d_s);
    else if (teacher_weights)
      divergence_score_grads<float, Base>(t, s, lse_t, lse_s, div, g, d_t, d_s);
    else
      divergence_score_grads<float, Base>(s, t, lse_s, lse_t, div, g, d_s, d_t);
    if (g_ce != 0.f) d_s += g_ce * (Base::exp(s - lse_s) - (col == label_col ? 1.f : 0.f));
    if (grad_s) grad_s[col] = from_float<Elem>(d_s);
    if (grad_t) grad_t[col] = from_float<Elem>(d_t);
  }
}

}  // namespace linear_epilogue
}  // namespace cuda
}  // namespace streamkl

// How the backward kernels turn one recomputed (student, teacher) score pair into its score gradients, per
// divergence. The dQ / dK policies (attention_kl_bwd.cuh) are templated on one of these rules, so each kernel
// instantiation carries exactly one divergence's arithmetic and the per-element loop has no branch on it.
//
// A rule provides:
//   Row                          the per-query-row inputs (registers in the dQ kernel, shared memory in the dK one)
//   kRowStats                    floats per Row when staged in shared memory (sizes the traits' stats buffer)
//   init(p)                      per-call constants (JSD: the mixture weights)
//   load(p, idx) / none()        a row's inputs from the forward's outputs / for rows past the end (dS = 0)
//   stage(r, stats, c, n)        Row -> stats[k * n + c], k < kRowStats; unstage is the inverse
//   apply(s, t, scale_s2, scale_t2, r, allowed)   raw <x, y> in, score gradients out (0 where !allowed)
// The math itself lives in csrc/kernels/online_kl.h (divergence_score_grads, jsd_score_grads); the rules only
// bring it the per-row inputs in base-2 units.
#pragma once

#include "../kernels/attention_params.h"
#include "../kernels/online_kl.h"
#include "device_common.cuh"

namespace streamkl {
namespace cuda {

// ------------------------------------------------------------------------------------- forward / reverse KL
// Per-query-row inputs of the backward, in the units the gradient formula takes (base-2 LSEs).
struct RowGradInputs {
  float lse_w2, lse_o2, kl, grad;

  __device__ static RowGradInputs load(const AttentionKLParams& p, int64_t idx, bool teacher_weights) {
    const float lse_s = static_cast<const float*>(p.lse_student)[idx];
    const float lse_t = p.row_teacher_lse<float>(idx);
    RowGradInputs r;
    r.lse_w2 = (teacher_weights ? lse_t : lse_s) * kLog2e;
    r.lse_o2 = (teacher_weights ? lse_s : lse_t) * kLog2e;
    r.kl = static_cast<const float*>(p.kl)[idx];
    r.grad = static_cast<const float*>(p.grad_kl)[idx * p.grad_kl_stride];
    return r;
  }
  // Rows past the end (or rows with no allowed key) must produce dS = 0; grad = 0 and finite LSEs do that
  // together with the element mask.
  __device__ static RowGradInputs none() { return RowGradInputs{0.f, 0.f, 0.f, 0.f}; }
};

// dS for one score pair (base-2 scores), written back as (student, teacher) gradients. The weighting side
// is a template parameter so that, without teacher gradients, the compiler drops the teacher's half.
template <bool kTeacherWeights>
__device__ __forceinline__ void score_pair_grads(float& s, float& t, const RowGradInputs& r, bool allowed) {
  float& w = pick<kTeacherWeights>(t, s);
  float& o = pick<kTeacherWeights>(s, t);
  float grad_w, grad_o;
  divergence_score_grads<float, Base2<float>>(w, o, r.lse_w2, r.lse_o2, r.kl, r.grad, grad_w, grad_o);
  w = allowed ? grad_w : 0.f;
  o = allowed ? grad_o : 0.f;
}

// KL(P_w || P_o) with the teacher as the weighting side (forward KL) or the student (reverse KL).
template <bool kTeacherWeights>
struct KlScoreGrads {
  using Row = RowGradInputs;
  static constexpr int kRowStats = 4;

  __device__ void init(const AttentionKLParams&) {}
  __device__ Row load(const AttentionKLParams& p, int64_t idx) const { return Row::load(p, idx, kTeacherWeights); }
  __device__ Row none() const { return Row::none(); }
  __device__ static void stage(const Row& r, float* stats, int c, int n) {
    stats[0 * n + c] = r.lse_w2;
    stats[1 * n + c] = r.lse_o2;
    stats[2 * n + c] = r.kl;
    stats[3 * n + c] = r.grad;
  }
  __device__ static Row unstage(const float* stats, int c, int n) {
    return Row{stats[c], stats[n + c], stats[2 * n + c], stats[3 * n + c]};
  }
  __device__ void apply(float& s, float& t, float scale_s2, float scale_t2, const Row& r, bool allowed) const {
    float sv = s * scale_s2, tv = t * scale_t2;
    score_pair_grads<kTeacherWeights>(sv, tv, r, allowed);
    s = sv;
    t = tv;
  }
};

// ------------------------------------------------------------------------------------------ generalized JSD
// 0 < beta < 1 (the ops run beta = 0 / 1 with the KL rules). Each row needs both LSEs, the forward's two KL
// terms (JsdRowStats, from p.jsd_stats) and its incoming gradient: 5 floats.
struct JsdScoreGrads {
  struct Row {
    float lse_t2, lse_s2;
    JsdRowStats<float> stats;
    float grad;
  };
  static constexpr int kRowStats = 5;
  JsdWeights<float> weights;

  __device__ void init(const AttentionKLParams& p) {
    weights = JsdWeights<float>::mixture_weighted(static_cast<float>(p.beta));
  }
  __device__ Row load(const AttentionKLParams& p, int64_t idx) const {
    Row r;
    r.lse_t2 = p.row_teacher_lse<float>(idx) * kLog2e;
    r.lse_s2 = static_cast<const float*>(p.lse_student)[idx] * kLog2e;
    r.stats = JsdRowStats<float>::load(static_cast<const float*>(p.jsd_stats) + idx * JsdRowStats<float>::kCount);
    r.grad = static_cast<const float*>(p.grad_kl)[idx * p.grad_kl_stride];
    return r;
  }
  // As for the KL: finite inputs and grad = 0 give dS = 0.
  __device__ Row none() const { return Row{0.f, 0.f, JsdRowStats<float>{0.f, 0.f}, 0.f}; }
  __device__ static void stage(const Row& r, float* stats, int c, int n) {
    stats[0 * n + c] = r.lse_t2;
    stats[1 * n + c] = r.lse_s2;
    stats[2 * n + c] = r.stats.kl_t;
    stats[3 * n + c] = r.stats.kl_s;
    stats[4 * n + c] = r.grad;
  }
  __device__ static Row unstage(const float* stats, int c, int n) {
    return Row{stats[c], stats[n + c], JsdRowStats<float>{stats[2 * n + c], stats[3 * n + c]}, stats[4 * n + c]};
  }
  __device__ void apply(float& s, float& t, float scale_s2, float scale_t2, const Row& r, bool allowed) const {
    const float log_p_t = t * scale_t2 - r.lse_t2, log_p_s = s * scale_s2 - r.lse_s2;
    float grad_t, grad_s;
    jsd_score_grads<float, Base2<float>>(log_p_t, log_p_s, r.stats, weights, r.grad, grad_t, grad_s);
    s = allowed ? grad_s : 0.f;
    t = allowed ? grad_t : 0.f;
  }
};

}  // namespace cuda
}  // namespace streamkl

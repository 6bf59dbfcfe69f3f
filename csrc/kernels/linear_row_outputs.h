// The forward's per-row results of linear_kl (loss, cross-entropy, statistics) from a row's finished
// streaming passes, computed and stored in one place for every backend (the CPU kernel and the CUDA
// epilogue), so the backends cannot drift apart on what they save for the backward. Torch-free.
#pragma once

#include <cstdint>

#include "linear_params.h"
#include "online_kl.h"

namespace streamkl {

// Both sides' log-sum-exps (natural units) from the online state of a KL pass whose weighting side is the
// teacher when teacher_weights, else the student.
template <typename T, typename Base>
SKL_HOST_DEVICE void student_teacher_lse(const OnlineKLState<T, Base>& state, bool teacher_weights, T& lse_s,
                                         T& lse_t) {
  lse_s = teacher_weights ? state.lse_o() : state.lse_w();
  lse_t = teacher_weights ? state.lse_w() : state.lse_o();
}

template <typename T>
struct LinearRowOutputs {
  T loss, ce, lse_s, lse_t, kl_s_m, kl_t_m;  // kl_*_m: JSD's KL(P_* || M), 0 for the KL losses

  // What an ignored row gets: zeros everywhere (and zero gradients, from the backward).
  static SKL_HOST_DEVICE LinearRowOutputs zeros() { return LinearRowOutputs{T(0), T(0), T(0), T(0), T(0), T(0)}; }

  // A counted row. `state` is the KL pass's online state (for JSD its first pass: only the log-sum-exps are
  // read), `jsd` the row's finalized JSD terms (read for JSD only), `weights` linear_kl's JSD weights
  // (JsdWeights::mixture_weighted(beta)), `label_logit` the student's logit at the label in natural units
  // (read with with_ce only).
  template <typename Base>
  static SKL_HOST_DEVICE LinearRowOutputs finish(const LinearKLParams& p, const OnlineKLState<T, Base>& state,
                                                 bool teacher_weights, const JsdRowStats<T>& jsd,
                                                 const JsdWeights<T>& weights, T label_logit) {
    LinearRowOutputs out;
    student_teacher_lse(state, teacher_weights, out.lse_s, out.lse_t);
    const bool is_jsd = p.loss == LinearLoss::kJSD;
    out.kl_t_m = is_jsd ? jsd.kl_t : T(0);
    out.kl_s_m = is_jsd ? jsd.kl_s : T(0);
    out.loss = is_jsd ? jsd.divergence(weights) : state.divergence();
    out.ce = p.with_ce ? out.lse_s - label_logit : T(0);
    return out;
  }

  // loss_rows[row], ce_rows[row] and stats[:, row] (layout: LinearStat), element type T.
  SKL_HOST_DEVICE void store(const LinearKLParams& p, int64_t row) const {
    static_cast<T*>(p.loss_rows)[row] = loss;
    static_cast<T*>(p.ce_rows)[row] = ce;
    T* stats = static_cast<T*>(p.stats);
    stats[kStatLseStudent * p.num_rows + row] = lse_s;
    stats[kStatLseTeacher * p.num_rows + row] = lse_t;
    stats[kStatKlStudentMix * p.num_rows + row] = kl_s_m;
    stats[kStatKlTeacherMix * p.num_rows + row] = kl_t_m;
  }
};

}  // namespace streamkl

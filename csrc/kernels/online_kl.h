// The one online two-softmax core of StreamKL, shared by every CPU and CUDA kernel.
//
// A row compares two distributions over the same keys: P_w = softmax(w) (the "weighting" side, whose
// probabilities weight the log-ratio) and P_o = softmax(o) (the "other" side):
//     D(P_w || P_o) = sum_j p_w,j (w_j - o_j) - lse_w + lse_o.
// Forward KL(P_t || P_s) has w = teacher scores, o = student scores; reverse KL(P_s || P_t) swaps them.
// Keeping the state in (w, o) terms means one piece of code serves both divergences.
//
// The state is O(1) per row and is updated tile by tile (rescale to the new maxima, then add elements),
// and two partial states over disjoint key sets can be merged (used for thread-level partial rows on
// the GPU and for split key ranges).
//
// Scores may be fed in natural units (Base = NaturalBase) or pre-multiplied by log2(e) (Base = Base2,
// which lets CUDA kernels use the ex2 instruction directly); results are always returned in natural units.
#pragma once

#include "platform.h"

namespace streamkl {

enum class Divergence : int {
  kForward = 0,  // KL(P_teacher || P_student): weighting side = teacher
  kReverse = 1,  // KL(P_student || P_teacher): weighting side = student
  kJsd = 2,      // generalized Jensen-Shannon, see JsdWeights below (two passes: LSEs first)
};

SKL_HOST_DEVICE bool teacher_is_weighting_side(Divergence d) { return d == Divergence::kForward; }

// Exponential base used for the scores handed to the state.
template <typename T>
struct NaturalBase {
  static SKL_HOST_DEVICE T exp(T x) { return std::exp(x); }
  static SKL_HOST_DEVICE T log(T x) { return std::log(x); }
  // Multiply a quantity expressed in this base's log units by this to get natural log units.
  static SKL_HOST_DEVICE T to_natural() { return T(1); }
};

template <typename T>
struct Base2 {
  static SKL_HOST_DEVICE T exp(T x) { return exp2(x); }
  static SKL_HOST_DEVICE T log(T x) { return log2(x); }
  static SKL_HOST_DEVICE T to_natural() { return T(0.69314718055994530942); }
};

#if defined(__CUDACC__)
template <>
struct Base2<float> {
  static __device__ __host__ __forceinline__ float exp(float x) { return exp2f(x); }
  static __device__ __host__ __forceinline__ float log(float x) { return log2f(x); }
  static __device__ __host__ __forceinline__ float to_natural() { return 0.69314718055994530942f; }
};
#endif

template <typename T, typename Base = NaturalBase<T>>
struct OnlineKLState {
  T max_w, sum_w;  // running max and rescaled sum of exp for the weighting side
  T max_o, sum_o;  // same for the other side
  T acc;           // sum_j exp(w_j - max_w) * (w_j - o_j)

  SKL_HOST_DEVICE void init() {
    max_w = max_o = neg_infinity<T>();
    sum_w = sum_o = acc = T(0);
  }

  // Raise the running maxima to cover a new tile whose maxima are tile_max_w / tile_max_o, rescaling
  // the sums. A row with nothing seen yet (max = -inf) keeps factor 1, never exp(-inf - -inf) = NaN.
  SKL_HOST_DEVICE void rescale(T tile_max_w, T tile_max_o) {
    const T new_w = max_of(max_w, tile_max_w);
    const T new_o = max_of(max_o, tile_max_o);
    const T alpha_w = (max_w == new_w) ? T(1) : Base::exp(max_w - new_w);
    const T alpha_o = (max_o == new_o) ? T(1) : Base::exp(max_o - new_o);
    sum_w *= alpha_w;
    acc *= alpha_w;
    sum_o *= alpha_o;
    max_w = new_w;
    max_o = new_o;
  }

  // Add one allowed key (finite scores); the maxima must already cover it (call rescale first).
  SKL_HOST_DEVICE void add(T w, T o) {
    const T p_w = Base::exp(w - max_w);
    sum_w += p_w;
    acc += p_w * (w - o);
    sum_o += Base::exp(o - max_o);
  }

  // Same as add() but a masked key may arrive as w = o = -inf (both sides share the mask): it contributes
  // exactly nothing, even while the row has seen no allowed key yet (max = -inf).
  SKL_HOST_DEVICE void add_maybe_masked(T w, T o) {
    if (w == neg_infinity<T>()) return;
    add(w, o);
  }

  // Add sums over a batch of allowed keys computed elsewhere (e.g. by a vectorized CPU loop) relative to
  // the current maxima: sum_j e^{w_j - max_w}, sum_j e^{o_j - max_o}, sum_j e^{w_j - max_w} (w_j - o_j).
  SKL_HOST_DEVICE void add_sums(T batch_sum_w, T batch_sum_o, T batch_acc) {
    sum_w += batch_sum_w;
    sum_o += batch_sum_o;
    acc += batch_acc;
  }

  // Fold in a partial state that covered a disjoint set of keys.
  SKL_HOST_DEVICE void merge(const OnlineKLState& other) {
    const T other_sum_w = other.sum_w, other_acc = other.acc, other_sum_o = other.sum_o;
    const T other_max_w = other.max_w, other_max_o = other.max_o;
    const T new_w = max_of(max_w, other_max_w);
    const T new_o = max_of(max_o, other_max_o);
    const T a_self_w = (max_w == new_w) ? T(1) : Base::exp(max_w - new_w);
    const T a_other_w = (other_max_w == new_w) ? T(1) : Base::exp(other_max_w - new_w);
    const T a_self_o = (max_o == new_o) ? T(1) : Base::exp(max_o - new_o);
    const T a_other_o = (other_max_o == new_o) ? T(1) : Base::exp(other_max_o - new_o);
    sum_w = sum_w * a_self_w + other_sum_w * a_other_w;
    acc = acc * a_self_w + other_acc * a_other_w;
    sum_o = sum_o * a_self_o + other_sum_o * a_other_o;
    max_w = new_w;
    max_o = new_o;
  }

  SKL_HOST_DEVICE bool empty() const { return sum_w == T(0); }

  // log-sum-exp of each side in natural units; -inf for a row with no allowed key.
  SKL_HOST_DEVICE T lse_w() const {
    return empty() ? neg_infinity<T>() : (max_w + Base::log(sum_w)) * Base::to_natural();
  }
  SKL_HOST_DEVICE T lse_o() const {
    return empty() ? neg_infinity<T>() : (max_o + Base::log(sum_o)) * Base::to_natural();
  }

  // D(P_w || P_o) in natural units; 0 for a row with no allowed key. A slightly negative result (the
  // exact value is >= 0, rounding is not) is clamped to 0; NaN (from NaN inputs) is passed through, never
  // hidden as 0.
  SKL_HOST_DEVICE T divergence() const {
    if (sum_w == T(0)) return T(0);
    const T d = (acc / sum_w - (max_w + Base::log(sum_w)) + (max_o + Base::log(sum_o))) * Base::to_natural();
    return d < T(0) ? T(0) : d;
  }
};

// Gradient of one row's divergence D(P_w || P_o) with respect to one pair of scores (w_j, o_j), times the
// incoming gradient g of that row. Scores and LSEs in Base units (LSEs as returned by lse_w()/lse_o()
// divided by Base::to_natural()); `div` is the row's divergence in natural units.
//     dD/dw_j = p_w,j * (log p_w,j - log p_o,j - D),   dD/do_j = p_o,j - p_w,j.
// The gradient with respect to raw scores x (natural units) is the same: the base only changes how
// the exponentials are evaluated.
template <typename T, typename Base = NaturalBase<T>>
SKL_HOST_DEVICE void divergence_score_grads(T w, T o, T lse_w, T lse_o, T div, T g, T& grad_w, T& grad_o) {
  const T log_p_w = w - lse_w;
  const T log_p_o = o - lse_o;
  const T p_w = Base::exp(log_p_w);
  const T p_o = Base::exp(log_p_o);
  grad_w = g * p_w * ((log_p_w - log_p_o) * Base::to_natural() - div);
  grad_o = g * (p_o - p_w);
}

// Online log-sum-exp of one side alone (pass 1 of the two-pass divergences: JSD, head-aggregated
// teachers). Same rescale-then-add protocol as OnlineKLState.
template <typename T, typename Base = NaturalBase<T>>
struct OnlineLSE {
  T max, sum;

  SKL_HOST_DEVICE void init() {
    max = neg_infinity<T>();
    sum = T(0);
  }
  SKL_HOST_DEVICE void rescale(T tile_max) {
    const T new_max = max_of(max, tile_max);
    if (max != new_max) sum *= Base::exp(max - new_max);  // also covers max = -inf (sum is 0 then)
    max = new_max;
  }
  // Sum of exp(x_j - max) over a batch of allowed keys, relative to the current max.
  SKL_HOST_DEVICE void add_sum(T batch_sum) { sum += batch_sum; }
  SKL_HOST_DEVICE void merge(const OnlineLSE& other) {
    const T other_max = other.max, other_sum = other.sum;
    rescale(other_max);
    if (other_sum != T(0)) sum += other_sum * Base::exp(other_max - max);
  }
  // Natural units; -inf for a row with no allowed key.
  SKL_HOST_DEVICE T lse() const {
    return sum == T(0) ? neg_infinity<T>() : (max + Base::log(sum)) * Base::to_natural();
  }
};

// log(e^x + e^y) in Base units, exact for -inf arguments (log_add_exp(-inf, y) = y) and never NaN for finite
// or -inf inputs: the log-sum-exp form of a mixture that the peer libraries' log(p + q) lacks.
template <typename T, typename Base = NaturalBase<T>>
SKL_HOST_DEVICE T log_add_exp(T x, T y) {
  const T hi = max_of(x, y), lo = min_of(x, y);
  if (lo == neg_infinity<T>()) return hi;
  return hi + Base::log(T(1) + Base::exp(lo - hi));
}

// Generalized Jensen-Shannon divergence with parameter beta in [0, 1]:
//     JSD_beta = (1 - beta) KL(P_t || M) + beta KL(P_s || M),   M = beta P_t + (1 - beta) P_s.
// beta = 0 gives M = P_s and JSD = KL(P_t || P_s) (forward KL); beta = 1 gives M = P_t and KL(P_s || P_t)
// (reverse KL); beta = 1/2 the symmetric JSD. (The form beta KL(P_t||M) + (1-beta) KL(P_s||M) with this M,
// used by TRL / Liger between their special-cased end points, tends to 0 at both ends instead.)
// The kernels only see the weights below, so a convention lives in one named constructor: from_beta (the
// attention ops) or mixture_weighted (linear_kl, TRL / Liger's form, term weights = mixture weights).
template <typename T>
struct JsdWeights {
  T weight_t, weight_s;          // weights of KL(P_t || M) and KL(P_s || M)
  T mix_t, mix_s;                // mixture weights: M = mix_t P_t + mix_s P_s
  T log_mix_t, log_mix_s;        // their natural logs (-inf for a zero weight), computed once per call

  static SKL_HOST_DEVICE JsdWeights make(T weight_t, T weight_s, T mix_t, T mix_s) {
    return JsdWeights{weight_t, weight_s, mix_t, mix_s, NaturalBase<T>::log(mix_t), NaturalBase<T>::log(mix_s)};
  }
  static SKL_HOST_DEVICE JsdWeights from_beta(T beta) { return make(T(1) - beta, beta, beta, T(1) - beta); }
  // beta KL(P_t || M) + (1 - beta) KL(P_s || M), M = beta P_t + (1 - beta) P_s (0 at beta = 0 and 1).
  static SKL_HOST_DEVICE JsdWeights mixture_weighted(T beta) { return make(beta, T(1) - beta, beta, T(1) - beta); }
};

// Row sums of pass 2 of the JSD, from both log-probabilities of each allowed key (Base units):
//     kl_t = KL(P_t || M), kl_s = KL(P_s || M)                           (the two terms of the divergence)
//     u_t = sum_j r_t,j q_j,  u_s = sum_j r_s,j q_j                       (for the backward)
// with r_t,j = mix_t p_t,j / m_j, r_s,j = mix_s p_s,j / m_j (both in [0, 1]) and q_j = weight_t p_t,j +
// weight_s p_s,j. When the term weights equal the mixture weights q = m, u_t = mix_t, u_s = mix_s and the
// backward reduces to the familiar w p (log(p / m) - KL); the end points of the convention above need the
// general form. Plain sums (the LSEs are known by then): merging is addition.
template <typename T>
struct JsdRowSums {
  T kl_t, kl_s, u_t, u_s;  // kl_* in Base log units until divergence()/stats are read out

  SKL_HOST_DEVICE void init() { kl_t = kl_s = u_t = u_s = T(0); }
  SKL_HOST_DEVICE void merge(const JsdRowSums& o) {
    kl_t += o.kl_t;
    kl_s += o.kl_s;
    u_t += o.u_t;
    u_s += o.u_s;
  }
};

// What the JSD needs of one key: mixture log-probability, both probabilities and the responsibilities.
template <typename T, typename Base = NaturalBase<T>>
struct JsdKeyTerms {
  T log_m, p_t, p_s, r_t, r_s, q;
  static SKL_HOST_DEVICE JsdKeyTerms make(T log_p_t, T log_p_s, const JsdWeights<T>& w) {
    const T log_mix_t = w.log_mix_t / Base::to_natural(), log_mix_s = w.log_mix_s / Base::to_natural();
    JsdKeyTerms k;
    k.log_m = log_add_exp<T, Base>(log_mix_t + log_p_t, log_mix_s + log_p_s);
    k.p_t = Base::exp(log_p_t);
    k.p_s = Base::exp(log_p_s);
    k.r_t = Base::exp(log_mix_t + log_p_t - k.log_m);
    k.r_s = Base::exp(log_mix_s + log_p_s - k.log_m);
    k.q = w.weight_t * k.p_t + w.weight_s * k.p_s;
    return k;
  }
};

// Adds one allowed key to the row sums.
template <typename T, typename Base = NaturalBase<T>>
SKL_HOST_DEVICE void jsd_add_key(JsdRowSums<T>& sums, T log_p_t, T log_p_s, const JsdWeights<T>& w) {
  const JsdKeyTerms<T, Base> k = JsdKeyTerms<T, Base>::make(log_p_t, log_p_s, w);
  sums.kl_t += k.p_t * (log_p_t - k.log_m);
  sums.kl_s += k.p_s * (log_p_s - k.log_m);
  sums.u_t += k.r_t * k.q;
  sums.u_s += k.r_s * k.q;
}

// Per-row statistics saved by the forward for the backward (natural units; the KLs clamped at 0, as they are
// >= 0 exactly and only rounding makes them negative). Layout of the saved tensor: [..., 4] in this order.
template <typename T>
struct JsdRowStats {
  T kl_t, kl_s, u_t, u_s;
  static constexpr int kCount = 4;
  template <typename Base>
  static SKL_HOST_DEVICE JsdRowStats finalize(const JsdRowSums<T>& s) {
    const T kl_t = s.kl_t * Base::to_natural(), kl_s = s.kl_s * Base::to_natural();
    return JsdRowStats{kl_t < T(0) ? T(0) : kl_t, kl_s < T(0) ? T(0) : kl_s, s.u_t, s.u_s};
  }
  SKL_HOST_DEVICE T divergence(const JsdWeights<T>& w) const { return w.weight_t * kl_t + w.weight_s * kl_s; }
  SKL_HOST_DEVICE void store(T* out) const {
    out[0] = kl_t;
    out[1] = kl_s;
    out[2] = u_t;
    out[3] = u_s;
  }
  static SKL_HOST_DEVICE JsdRowStats load(const T* in) { return JsdRowStats{in[0], in[1], in[2], in[3]}; }
  // Under JsdWeights::mixture_weighted (term weights = mixture weights) u_t = mix_t and u_s = mix_s exactly
  // (JsdRowSums), so a row's two KL terms are all the backward needs to have saved.
  static SKL_HOST_DEVICE JsdRowStats mixture_weighted(T kl_t, T kl_s, const JsdWeights<T>& w) {
    return JsdRowStats{kl_t, kl_s, w.mix_t, w.mix_s};
  }
};

// Gradient of one row's JSD with respect to the teacher and student scores of one key (log-probabilities in
// Base units), times the row's incoming gradient g:
//     dJ/dt_j = weight_t p_t,j (log(p_t,j / m_j) - KL_t) - r_t,j q_j + p_t,j u_t
//     dJ/ds_j = weight_s p_s,j (log(p_s,j / m_j) - KL_s) - r_s,j q_j + p_s,j u_s
// (softmax Jacobian applied to dJ/dp, whose mixture part -mix (q_j / m_j) is what r q and p u carry).
template <typename T, typename Base = NaturalBase<T>>
SKL_HOST_DEVICE void jsd_score_grads(T log_p_t, T log_p_s, const JsdRowStats<T>& st, const JsdWeights<T>& w, T g,
                                     T& grad_t, T& grad_s) {
  const JsdKeyTerms<T, Base> k = JsdKeyTerms<T, Base>::make(log_p_t, log_p_s, w);
  const T log_ratio_t = (log_p_t - k.log_m) * Base::to_natural();
  const T log_ratio_s = (log_p_s - k.log_m) * Base::to_natural();
  grad_t = g * (w.weight_t * k.p_t * (log_ratio_t - st.kl_t) - k.r_t * k.q + k.p_t * st.u_t);
  grad_s = g * (w.weight_s * k.p_s * (log_ratio_s - st.kl_s) - k.r_s * k.q + k.p_s * st.u_s);
}

// Head-aggregated teacher: log pbar_j = log((1/r) sum_g p^g_j), accumulated one teacher head at a time in
// log-sum-exp form (start from -inf, fold each head's log-probability in with log_add_exp), then this once.
template <typename T, typename Base = NaturalBase<T>>
SKL_HOST_DEVICE T log_mean_from_log_sum(T log_sum, int r) {
  return log_sum - Base::log(static_cast<T>(r));
}

}  // namespace streamkl

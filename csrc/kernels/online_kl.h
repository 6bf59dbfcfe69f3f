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
  kJsd = 2,      // generalized Jensen-Shannon, see jsd_divergence_for_beta below (two passes: LSEs first)
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

  // True once the row has seen an allowed key: both running maxima are finite.
  SKL_HOST_DEVICE bool has_maxima() const { return max_w != neg_infinity<T>() && max_o != neg_infinity<T>(); }

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

  // One allowed key's contributions to (sum_w, acc, sum_o) relative to the current maxima. Kernels that keep
  // several partial sums per row (for instruction-level parallelism) add these up and fold them in with
  // add_sums; add() folds one key in directly.
  struct KeyTerms {
    T p_w, weighted, p_o;
  };
  SKL_HOST_DEVICE KeyTerms key_terms(T w, T o) const {
    const T p_w = Base::exp(w - max_w);
    return KeyTerms{p_w, p_w * (w - o), Base::exp(o - max_o)};
  }
  // The kernels' form, for raw scores and their scales (w = w_raw * scale_w, o = o_raw * scale_o): each exponent's
  // argument is one fused multiply-add, and the weighted term is taken over the two arguments,
  // (w - max_w) - (o - max_o), which the exponentials need anyway (one instruction per key fewer than w - o);
  // add_relative_sums adds back the (max_w - max_o) * p_w it leaves out.
  SKL_HOST_DEVICE KeyTerms relative_key_terms(T w_raw, T o_raw, T scale_w, T scale_o) const {
    const T arg_w = fused_multiply_add(w_raw, scale_w, -max_w);
    const T arg_o = fused_multiply_add(o_raw, scale_o, -max_o);
    const T p_w = Base::exp(arg_w);
    return KeyTerms{p_w, p_w * (arg_w - arg_o), Base::exp(arg_o)};
  }

  // Add one allowed key (finite scores); the maxima must already cover it (call rescale first).
  SKL_HOST_DEVICE void add(T w, T o) {
    const KeyTerms k = key_terms(w, o);
    sum_w += k.p_w;
    acc += k.weighted;
    sum_o += k.p_o;
  }

  // Add sums over a batch of allowed keys computed elsewhere (e.g. by a vectorized CPU loop) relative to
  // the current maxima: sum_j e^{w_j - max_w}, sum_j e^{o_j - max_o}, sum_j e^{w_j - max_w} (w_j - o_j).
  SKL_HOST_DEVICE void add_sums(T batch_sum_w, T batch_sum_o, T batch_acc) {
    sum_w += batch_sum_w;
    sum_o += batch_sum_o;
    acc += batch_acc;
  }

  // add_sums for sums of relative_key_terms. A row that has seen no key (max = -inf) has only zero terms.
  SKL_HOST_DEVICE void add_relative_sums(T batch_sum_w, T batch_sum_o, T batch_weighted) {
    if (has_maxima())
      batch_weighted = fused_multiply_add(max_w - max_o, batch_sum_w, batch_weighted);
    add_sums(batch_sum_w, batch_sum_o, batch_weighted);
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

// Generalized Jensen-Shannon divergence with parameter beta (TRL / Liger convention):
//     JSD_beta = beta KL(P_t || M) + (1 - beta) KL(P_s || M),   M = beta P_t + (1 - beta) P_s,
// beta = 1/2 being the symmetric JSD. The formula is 0 at both ends (M equals the distribution with weight 1);
// there the divergence is defined as its limit divided by the vanishing weight: forward KL(P_t || P_s) at
// beta = 0 and reverse KL(P_s || P_t) at beta = 1. The ops map those ends to the KL kernels
// (jsd_divergence_for_beta), so the JSD kernels only ever see 0 < beta < 1.
// Every term is formed from log-probabilities in log-sum-exp form (never log(p + q)): no NaN, and each KL
// term is >= 0 up to rounding (clamped at the end).
SKL_HOST_DEVICE Divergence jsd_divergence_for_beta(double beta) {
  if (beta == 0.0) return Divergence::kForward;
  if (beta == 1.0) return Divergence::kReverse;
  return Divergence::kJsd;
}

// The mixture weights of one call: M = mix_t P_t + mix_s P_s, which are also the weights of the two KL terms.
template <typename T>
struct JsdWeights {
  T mix_t, mix_s;          // beta, 1 - beta
  T log_mix_t, log_mix_s;  // their natural logs, computed once per call

  static SKL_HOST_DEVICE JsdWeights mixture_weighted(T beta) {
    return JsdWeights{beta, T(1) - beta, NaturalBase<T>::log(beta), NaturalBase<T>::log(T(1) - beta)};
  }
};

// Row sums of pass 2 of the JSD (the LSEs are known by then, so these are plain sums and merging is addition):
//     kl_t = KL(P_t || M) = sum_j p_t,j (log p_t,j - log m_j),   kl_s = KL(P_s || M)   (Base log units).
template <typename T>
struct JsdRowSums {
  T kl_t, kl_s;

  SKL_HOST_DEVICE void init() { kl_t = kl_s = T(0); }
  SKL_HOST_DEVICE void merge(const JsdRowSums& o) {
    kl_t += o.kl_t;
    kl_s += o.kl_s;
  }
};

// log m_j = log(mix_t p_t,j + mix_s p_s,j) from both log-probabilities (Base units), in log-sum-exp form.
template <typename T, typename Base = NaturalBase<T>>
SKL_HOST_DEVICE T jsd_log_mixture(T log_p_t, T log_p_s, const JsdWeights<T>& w) {
  return log_add_exp<T, Base>(log_p_t + w.log_mix_t / Base::to_natural(), log_p_s + w.log_mix_s / Base::to_natural());
}

// Adds one allowed key to the row sums.
template <typename T, typename Base = NaturalBase<T>>
SKL_HOST_DEVICE void jsd_add_key(JsdRowSums<T>& sums, T log_p_t, T log_p_s, const JsdWeights<T>& w) {
  const T log_m = jsd_log_mixture<T, Base>(log_p_t, log_p_s, w);
  sums.kl_t += Base::exp(log_p_t) * (log_p_t - log_m);
  sums.kl_s += Base::exp(log_p_s) * (log_p_s - log_m);
}

// Per-row statistics saved by the forward for the backward: the two KL terms in natural units, clamped at 0 (they
// are >= 0 exactly; only rounding makes them negative). Saved as [..., kCount] in this order.
template <typename T>
struct JsdRowStats {
  T kl_t, kl_s;
  static constexpr int kCount = 2;
  template <typename Base>
  static SKL_HOST_DEVICE JsdRowStats finalize(const JsdRowSums<T>& s) {
    const T kl_t = s.kl_t * Base::to_natural(), kl_s = s.kl_s * Base::to_natural();
    return JsdRowStats{kl_t < T(0) ? T(0) : kl_t, kl_s < T(0) ? T(0) : kl_s};
  }
  SKL_HOST_DEVICE T divergence(const JsdWeights<T>& w) const { return w.mix_t * kl_t + w.mix_s * kl_s; }
  SKL_HOST_DEVICE void store(T* out) const {
    out[0] = kl_t;
    out[1] = kl_s;
  }
  static SKL_HOST_DEVICE JsdRowStats load(const T* in) { return JsdRowStats{in[0], in[1]}; }
};

// Gradient of one row's JSD with respect to the teacher and student scores of one key (log-probabilities in
// Base units), times the row's incoming gradient g:
//     dJ/dt_j = beta p_t,j (log(p_t,j / m_j) - KL(P_t || M))
//     dJ/ds_j = (1 - beta) p_s,j (log(p_s,j / m_j) - KL(P_s || M))
// (the softmax Jacobian applied to dJ/dp_t,j = beta log(p_t,j / m_j): because the terms are weighted by the
// mixture weights, the derivative through M, -beta m_j / m_j, cancels the +beta of d(p log p)/dp).
template <typename T, typename Base = NaturalBase<T>>
SKL_HOST_DEVICE void jsd_score_grads(T log_p_t, T log_p_s, const JsdRowStats<T>& st, const JsdWeights<T>& w, T g,
                                     T& grad_t, T& grad_s) {
  const T log_m = jsd_log_mixture<T, Base>(log_p_t, log_p_s, w);
  const T log_ratio_t = (log_p_t - log_m) * Base::to_natural();
  const T log_ratio_s = (log_p_s - log_m) * Base::to_natural();
  grad_t = g * w.mix_t * Base::exp(log_p_t) * (log_ratio_t - st.kl_t);
  grad_s = g * w.mix_s * Base::exp(log_p_s) * (log_ratio_s - st.kl_s);
}

// Head-aggregated teacher: log pbar_j = log((1/r) sum_g p^g_j), accumulated one teacher head at a time in
// log-sum-exp form (start from -inf, fold each head's log-probability in with log_add_exp), then this once.
template <typename T, typename Base = NaturalBase<T>>
SKL_HOST_DEVICE T log_mean_from_log_sum(T log_sum, int r) {
  return log_sum - Base::log(static_cast<T>(r));
}

}  // namespace streamkl

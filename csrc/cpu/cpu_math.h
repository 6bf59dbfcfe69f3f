// Vectorizable building blocks of the CPU kernels: a small register-blocked GEMM, a branch-free exp, and
// the two per-tile loops of the online KL (exponential sums, score gradients). Torch-free.
//
// float versions are compiled once per instruction set (cpu_math.cpp, GCC target_clones: x86-64-v3 =
// AVX2+FMA, and the baseline, picked when the library loads); double versions (the float64 path, used for
// exactness in tests) are the same templates with the exact std::exp. The build passes
// -fno-trapping-math (and -fopenmp-simd) so the conditional selects and reductions below vectorize.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../kernels/online_kl.h"

namespace streamkl {
namespace cpu {

// exp(x) for float without branches or calls, so loops over it vectorize: Cody-Waite range reduction to
// r in [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes expf coefficients); max relative error 8e-8 on
// [-80, 80]. Underflows to 0 below -87.3 (so exp(-inf) = 0), saturates above 88.7.
inline float exp_approx(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  float c = x < -87.3f ? -87.3f : x;  // ternaries, not fminf/fmaxf: those are library calls here
  c = c > 88.7f ? 88.7f : c;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the mantissa
  const float t = c * kLog2e + magic;
  const float k = t - magic;
  int32_t t_bits, magic_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  std::memcpy(&magic_bits, &magic, sizeof(magic_bits));
  const int32_t ki = t_bits - magic_bits;
  const float r = (c - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t scale_bits = (ki + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return x < -87.3f ? 0.0f : y * scale;
}

// Exponential base of the CPU kernels: the vectorizable approximation in float, the exact one in double.
template <typename T>
struct CpuBase : NaturalBase<T> {};

template <>
struct CpuBase<float> : NaturalBase<float> {
  static inline float exp(float x) { return exp_approx(x); }
};

// C[i][j] += sum_k A[i][k] * B[k][j] for i < M, j < N (row-major, leading dimensions in elements).
void gemm_accumulate(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                     int64_t ldc);
void gemm_accumulate(int M, int N, int K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                     int64_t ldc);

// Sums of one row over n allowed keys, relative to the maxima (see OnlineKLState::add_sums).
template <typename T>
struct ExpSums {
  T sum_w, sum_o, acc;
};
ExpSums<float> exp_sums(const float* w, const float* o, int n, float max_w, float max_o);
ExpSums<double> exp_sums(const double* w, const double* o, int n, double max_w, double max_o);

// sum_j exp(x_j - max) over n allowed keys of one side (OnlineLSE::add_sum).
float exp_sum(const float* x, int n, float max);
double exp_sum(const double* x, int n, double max);

// In place: (s_j, t_j) -> g * (dD/ds_j, dD/dt_j) for n allowed keys of one row (divergence_score_grads).
void score_grads_row(float* s, float* t, int n, bool teacher_weights, float lse_w, float lse_o, float div, float g);
void score_grads_row(double* s, double* t, int n, bool teacher_weights, double lse_w, double lse_o, double div,
                     double g);

// Pass 2 of the generalized JSD (JsdWeights::mixture_weighted, online_kl.h) over n allowed keys of one row, from
// scores and their row's log-sum-exps (already log-probabilities: pass lse = 0): the row's JsdRowSums restricted
// to these keys (natural units). Shared by attention_kl and linear_kl.
JsdRowSums<float> jsd_sums(const float* s, const float* t, int n, float lse_s, float lse_t, float beta);
JsdRowSums<double> jsd_sums(const double* s, const double* t, int n, double lse_s, double lse_t, double beta);

// In place: (s_j, t_j) -> g * (dJ/ds_j, dJ/dt_j) of the JSD for n allowed keys of one row (jsd_score_grads), with
// the row's log-sum-exps and the statistics its forward saved.
void jsd_score_grads_row(float* s, float* t, int n, float lse_s, float lse_t, float beta,
                         const JsdRowStats<float>& stats, float g);
void jsd_score_grads_row(double* s, double* t, int n, double lse_s, double lse_t, double beta,
                         const JsdRowStats<double>& stats, double g);

}  // namespace cpu
}  // namespace streamkl

#include "cpu_math.h"

namespace streamkl {
namespace cpu {
namespace {

// Register block of the GEMM: 4 rows x 16 columns of C stay in registers while k runs.
constexpr int kMr = 4;
constexpr int kNr = 16;

template <typename T>
inline void gemm_generic(int M, int N, int K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  int i = 0;
  for (; i + kMr <= M; i += kMr) {
    int j = 0;
    for (; j + kNr <= N; j += kNr) {
      T acc[kMr][kNr];
      for (int r = 0; r < kMr; ++r)
        for (int c = 0; c < kNr; ++c) acc[r][c] = C[(i + r) * ldc + j + c];
      for (int k = 0; k < K; ++k) {
        const T* b = B + k * ldb + j;
        for (int r = 0; r < kMr; ++r) {
          const T a = A[(i + r) * lda + k];
          for (int c = 0; c < kNr; ++c) acc[r][c] += a * b[c];
        }
      }
      for (int r = 0; r < kMr; ++r)
        for (int c = 0; c < kNr; ++c) C[(i + r) * ldc + j + c] = acc[r][c];
    }
    for (int r = 0; r < kMr; ++r) {  // leftover columns
      for (int k = 0; k < K; ++k) {
        const T a = A[(i + r) * lda + k];
        for (int c = j; c < N; ++c) C[(i + r) * ldc + c] += a * B[k * ldb + c];
      }
    }
  }
  for (; i < M; ++i) {  // leftover rows
    for (int k = 0; k < K; ++k) {
      const T a = A[i * lda + k];
      for (int c = 0; c < N; ++c) C[i * ldc + c] += a * B[k * ldb + c];
    }
  }
}

template <typename T>
inline ExpSums<T> exp_sums_generic(const T* w, const T* o, int n, T max_w, T max_o) {
  T sum_w = 0, sum_o = 0, acc = 0;
#pragma omp simd reduction(+ : sum_w, sum_o, acc)
  for (int j = 0; j < n; ++j) {
    const T p_w = CpuBase<T>::exp(w[j] - max_w);
    sum_w += p_w;
    acc += p_w * (w[j] - o[j]);
    sum_o += CpuBase<T>::exp(o[j] - max_o);
  }
  return ExpSums<T>{sum_w, sum_o, acc};
}

template <typename T>
inline T exp_sum_generic(const T* x, int n, T max) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) sum += CpuBase<T>::exp(x[j] - max);
  return sum;
}

template <typename T>
inline void score_grads_row_generic(T* s, T* t, int n, bool teacher_weights, T lse_w, T lse_o, T div, T g) {
  T* w = teacher_weights ? t : s;
  T* o = teacher_weights ? s : t;
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    T grad_w, grad_o;
    divergence_score_grads<T, CpuBase<T>>(w[j], o[j], lse_w, lse_o, div, g, grad_w, grad_o);
    w[j] = grad_w;
    o[j] = grad_o;
  }
}

// linear_kl's JSD (JsdWeights::mixture_weighted) through the shared core in online_kl.h.
template <typename T>
inline JsdRowSums<T> jsd_sums_generic(const T* s, const T* t, int n, T lse_s, T lse_t, T beta) {
  const JsdWeights<T> weights = JsdWeights<T>::mixture_weighted(beta);
  JsdRowSums<T> sums;
  sums.init();
  for (int j = 0; j < n; ++j) jsd_add_key<T, CpuBase<T>>(sums, t[j] - lse_t, s[j] - lse_s, weights);
  return sums;
}

template <typename T>
inline void jsd_score_grads_row_generic(T* s, T* t, int n, T lse_s, T lse_t, T beta, T kl_t_m, T kl_s_m, T g) {
  const JsdWeights<T> weights = JsdWeights<T>::mixture_weighted(beta);
  const JsdRowStats<T> stats = JsdRowStats<T>::mixture_weighted(kl_t_m, kl_s_m, weights);
  for (int j = 0; j < n; ++j) {
    T grad_t, grad_s;
    jsd_score_grads<T, CpuBase<T>>(t[j] - lse_t, s[j] - lse_s, stats, weights, g, grad_t, grad_s);
    s[j] = grad_s;
    t[j] = grad_t;
  }
}

}  // namespace

// float: one clone per instruction set, chosen when the library loads (GCC on x86-64).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define STREAMKL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define STREAMKL_CPU_CLONES
#endif

STREAMKL_CPU_CLONES
void gemm_accumulate(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                     int64_t ldc) {
  gemm_generic(M, N, K, A, lda, B, ldb, C, ldc);
}

STREAMKL_CPU_CLONES
ExpSums<float> exp_sums(const float* w, const float* o, int n, float max_w, float max_o) {
  return exp_sums_generic(w, o, n, max_w, max_o);
}

STREAMKL_CPU_CLONES
float exp_sum(const float* x, int n, float max) { return exp_sum_generic(x, n, max); }

STREAMKL_CPU_CLONES
void score_grads_row(float* s, float* t, int n, bool teacher_weights, float lse_w, float lse_o, float div, float g) {
  score_grads_row_generic(s, t, n, teacher_weights, lse_w, lse_o, div, g);
}

void gemm_accumulate(int M, int N, int K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                     int64_t ldc) {
  gemm_generic(M, N, K, A, lda, B, ldb, C, ldc);
}

ExpSums<double> exp_sums(const double* w, const double* o, int n, double max_w, double max_o) {
  return exp_sums_generic(w, o, n, max_w, max_o);
}

double exp_sum(const double* x, int n, double max) { return exp_sum_generic(x, n, max); }

void score_grads_row(double* s, double* t, int n, bool teacher_weights, double lse_w, double lse_o, double div,
                     double g) {
  score_grads_row_generic(s, t, n, teacher_weights, lse_w, lse_o, div, g);
}

STREAMKL_CPU_CLONES
JsdRowSums<float> jsd_sums(const float* s, const float* t, int n, float lse_s, float lse_t, float beta) {
  return jsd_sums_generic(s, t, n, lse_s, lse_t, beta);
}

STREAMKL_CPU_CLONES
void jsd_score_grads_row(float* s, float* t, int n, float lse_s, float lse_t, float beta, float kl_t_m,
                         float kl_s_m, float g) {
  jsd_score_grads_row_generic(s, t, n, lse_s, lse_t, beta, kl_t_m, kl_s_m, g);
}

JsdRowSums<double> jsd_sums(const double* s, const double* t, int n, double lse_s, double lse_t, double beta) {
  return jsd_sums_generic(s, t, n, lse_s, lse_t, beta);
}

void jsd_score_grads_row(double* s, double* t, int n, double lse_s, double lse_t, double beta, double kl_t_m,
                         double kl_s_m, double g) {
  jsd_score_grads_row_generic(s, t, n, lse_s, lse_t, beta, kl_t_m, kl_s_m, g);
}

}  // namespace cpu
}  // namespace streamkl

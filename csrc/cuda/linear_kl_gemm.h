// The cuBLAS half of linear_kl's interim "hybrid" CUDA design: every matrix product of the forward and the
// backward, one vocabulary chunk [v0, v0 + cols) at a time. Torch-free (the op passes the handle, already bound
// to its stream).
//
// Precision: inputs bf16 / fp16 / fp32, always CUBLAS_COMPUTE_32F. Logits come out in fp32 and are never rounded
// to the input dtype (the trap of peer libraries); fp32 inputs get true fp32 products (no TF32, whatever torch's
// allow_tf32 says); half-precision outputs (dW, db) are rounded once, with reductions kept in fp32.
//
// Layouts are row-major as torch stores them; cuBLAS is column-major, so each product is issued transposed
// (a row-major [m, n] matrix is a column-major [n, m] one).
#pragma once

#include <cstdint>

#include <cublas_v2.h>

#include "../kernels/linear_params.h"

namespace streamkl {
namespace cuda {

// The input dtype as cuBLAS names it: CUDA_R_32F, CUDA_R_16F or CUDA_R_16BF.
struct LinearGemm {
  cublasHandle_t handle;
  cudaDataType_t input_type;
  int64_t rows;  // T

  // z[r * ldz + c] = <x[r], w[v0 + c]> for r < T, c < cols (fp32; no bias, no 1/tau).
  cublasStatus_t logit_chunk(const LinearSide& side, int64_t v0, int cols, float* z, int64_t ldz) const;

  // dx[r] (fp32, [T, dim] contiguous) (+)= sum_c grad[r * ldg + c] * w[v0 + c]; `accumulate` false on the first
  // chunk overwrites dx instead (so it needs no zeroing).
  cublasStatus_t dx_chunk(const LinearSide& side, int64_t v0, int cols, const void* grad, int64_t ldg, float* dx,
                          bool accumulate) const;

  // dw[v0 + c] = sum_r grad[r * ldg + c] * x[r] (dw: [V, dim] contiguous, input dtype): one product over all T
  // rows, so each vocabulary row is written once.
  cublasStatus_t dw_chunk(const LinearSide& side, int64_t v0, int cols, const void* grad, int64_t ldg,
                          void* dw) const;

  // db[v0 + c] = sum_r grad[r * ldg + c] (db: [V], input dtype), as a product with `ones` ([T], input dtype).
  cublasStatus_t db_chunk(int64_t v0, int cols, const void* grad, int64_t ldg, const void* ones, void* db) const;
};

// Sets the handle's math mode for the products above and restores the previous one on scope exit: no TF32 for
// fp32 inputs, no reduced-precision reductions for half-precision outputs. (torch sets the mode again each time
// it fetches the handle, so restoring is for good manners towards other users of the handle in between.)
class LinearGemmMathMode {
 public:
  explicit LinearGemmMathMode(cublasHandle_t handle);
  ~LinearGemmMathMode();
  LinearGemmMathMode(const LinearGemmMathMode&) = delete;
  LinearGemmMathMode& operator=(const LinearGemmMathMode&) = delete;
  cublasStatus_t status() const { return status_; }

 private:
  cublasHandle_t handle_;
  cublasMath_t previous_ = CUBLAS_DEFAULT_MATH;
  cublasStatus_t status_;
};

}  // namespace cuda
}  // namespace streamkl

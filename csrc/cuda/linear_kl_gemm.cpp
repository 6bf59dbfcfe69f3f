#include "linear_kl_gemm.h"

#include <algorithm>

namespace streamkl {
namespace cuda {
namespace {

constexpr float kOne = 1.f;
constexpr float kZero = 0.f;

int64_t element_bytes(cudaDataType_t type) { return type == CUDA_R_32F ? 4 : 2; }

// Pointer to element `index` of an array of the input dtype.
const void* offset(const void* base, int64_t index, cudaDataType_t type) {
  return static_cast<const char*>(base) + index * element_bytes(type);
}
void* offset(void* base, int64_t index, cudaDataType_t type) {
  return static_cast<char*>(base) + index * element_bytes(type);
}

// cuBLAS wants leading dimensions >= 1 even for empty (dim = 0) operands.
int lead(int64_t ld) { return static_cast<int>(std::max<int64_t>(ld, 1)); }

// C (column-major, ldc) = alpha op(A) op(B) + beta C with fp32 compute; the op checks that sizes fit in int.
cublasStatus_t gemm(cublasHandle_t handle, cublasOperation_t op_a, cublasOperation_t op_b, int64_t m, int64_t n,
                    int64_t k, const void* a, cudaDataType_t a_type, int64_t lda, const void* b,
                    cudaDataType_t b_type, int64_t ldb, const float* beta, void* c, cudaDataType_t c_type,
                    int64_t ldc) {
  return cublasGemmEx(handle, op_a, op_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &kOne, a,
                      a_type, lead(lda), b, b_type, lead(ldb), beta, c, c_type, lead(ldc), CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT);
}

}  // namespace

// Column-major: z^T [cols, T] = (w chunk as [dim, cols])^T (x as [dim, T]).
cublasStatus_t LinearGemm::logit_chunk(const LinearSide& side, int64_t v0, int cols, float* z, int64_t ldz) const {
  return gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, cols, rows, side.dim,
              offset(side.w, v0 * side.w_row_stride, input_type), input_type, side.w_row_stride, side.x, input_type,
              side.x_row_stride, &kZero, z, CUDA_R_32F, ldz);
}

// Column-major: dx^T [dim, T] (+)= (w chunk as [dim, cols]) (grad as [cols, T]).
cublasStatus_t LinearGemm::dx_chunk(const LinearSide& side, int64_t v0, int cols, const void* grad, int64_t ldg,
                                    float* dx, bool accumulate) const {
  return gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, side.dim, rows, cols,
              offset(side.w, v0 * side.w_row_stride, input_type), input_type, side.w_row_stride, grad, input_type,
              ldg, accumulate ? &kOne : &kZero, dx, CUDA_R_32F, side.dim);
}

// Column-major: dw chunk^T [dim, cols] = (x as [dim, T]) (grad as [cols, T])^T.
cublasStatus_t LinearGemm::dw_chunk(const LinearSide& side, int64_t v0, int cols, const void* grad, int64_t ldg,
                                    void* dw) const {
  return gemm(handle, CUBLAS_OP_N, CUBLAS_OP_T, side.dim, cols, rows, side.x, input_type, side.x_row_stride, grad,
              input_type, ldg, &kZero, offset(dw, v0 * side.dim, input_type), input_type, side.dim);
}

// Column-major: db chunk [cols, 1] = (grad as [cols, T]) ones [T, 1].
cublasStatus_t LinearGemm::db_chunk(int64_t v0, int cols, const void* grad, int64_t ldg, const void* ones,
                                    void* db) const {
  return gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, cols, 1, rows, grad, input_type, ldg, ones, input_type, rows, &kZero,
              offset(db, v0, input_type), input_type, cols);
}

LinearGemmMathMode::LinearGemmMathMode(cublasHandle_t handle) : handle_(handle) {
  status_ = cublasGetMathMode(handle_, &previous_);
  if (status_ == CUBLAS_STATUS_SUCCESS)
    status_ = cublasSetMathMode(
        handle_, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
}

LinearGemmMathMode::~LinearGemmMathMode() {
  if (status_ == CUBLAS_STATUS_SUCCESS) cublasSetMathMode(handle_, previous_);
}

}  // namespace cuda
}  // namespace streamkl

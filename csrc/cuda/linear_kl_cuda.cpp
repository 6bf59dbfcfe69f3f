// CUDA implementations of streamkl::linear_kl_fwd / linear_kl_bwd.
//
// An interim "hybrid" design, until a fused CuTe/wgmma GEMM + epilogue kernel replaces it: the vocabulary is
// streamed in chunks of Vc columns (linear_vocab_chunks.h; Vc = V when the workspaces fit the budget). For each
// chunk cuBLAS computes both sides' logit chunks [T, Vc] in fp32 (linear_kl_gemm.h), and StreamKL's epilogue
// kernels (linear_kl_epilogue.h) apply bias and 1/tau and
//   forward:  fold the chunk into per-row online state with the shared core (JSD: a second sweep over the
//             chunks once both log-sum-exps are known, as on the CPU), then write loss, ce and stats;
//   backward: write the logit gradients dS (and dT when the teacher's gradients are wanted) in the input dtype,
//             which cuBLAS turns into dx (fp32 accumulator across chunks, cast at the end), dW (one product per
//             chunk over all T rows, written in W's dtype) and db (column sums, fp32 accumulation).
// Extra memory: O(T) row state plus the bounded chunk workspaces; never a [T, V] tensor. The cost of the design
// is the fp32 logit round trip through global memory that a fused kernel would keep on chip.
//
// Validation is shared with the CPU backend (csrc/ops/linear_inputs.h). Error messages raised here format no
// numbers: on the project's GPU machine any c10::Error whose message formats an int or a double crashes the
// process (an environment bug, tools/repro_c10_str.py); the Python API validates first anyway.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops/linear_inputs.h"
#include "env_budget.h"
#include "linear_kl_epilogue.h"
#include "linear_kl_gemm.h"
#include "linear_vocab_chunks.h"

namespace streamkl {
namespace {

using c10::optional;
using cuda::LinearElement;

LinearElement element_of(at::ScalarType dt) {
  if (dt == at::kFloat) return LinearElement::kFloat32;
  if (dt == at::kHalf) return LinearElement::kFloat16;
  TORCH_CHECK_VALUE(dt == at::kBFloat16, "streamkl: linear_kl on CUDA takes float32, bfloat16 or float16 inputs; "
                    "float64 runs on the CPU only");
  return LinearElement::kBFloat16;
}

cudaDataType_t cublas_type(LinearElement e) {
  return e == LinearElement::kFloat32 ? CUDA_R_32F : e == LinearElement::kFloat16 ? CUDA_R_16F : CUDA_R_16BF;
}

// cuBLAS reads x and w through a row stride: the last dim must be contiguous and rows must not overlap.
at::Tensor gemm_ready(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

bool fits_int(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

// Budget of the per-chunk workspaces, from STREAMKL_LINEAR_WORKSPACE_MB.
int64_t workspace_budget_bytes() {
  return workspace_budget_bytes_from_env("STREAMKL_LINEAR_WORKSPACE_MB", cuda::kDefaultLinearWorkspaceMiB);
}

// The inputs checked (shared validation) and laid out for cuBLAS and the epilogue kernels.
struct CudaLinearInputs {
  LinearOptions options;
  LinearElement element;
  at::Tensor x_s, w_s, x_t, w_t;
  optional<at::Tensor> b_s, b_t, labels;

  CudaLinearInputs(const at::Tensor& x_s_in, const at::Tensor& w_s_in, const optional<at::Tensor>& b_s_in,
                   const at::Tensor& x_t_in, const at::Tensor& w_t_in, const optional<at::Tensor>& b_t_in,
                   const optional<at::Tensor>& labels_in, double inv_temperature, c10::string_view divergence,
                   double beta, int64_t ignore_index, bool with_ce)
      : options(check_linear_arguments(x_s_in, w_s_in, b_s_in, x_t_in, w_t_in, b_t_in, labels_in, inv_temperature,
                                       std::string(divergence), beta, ignore_index, with_ce)),
        element(element_of(x_s_in.scalar_type())),
        x_s(gemm_ready(x_s_in)),
        w_s(gemm_ready(w_s_in)),
        x_t(gemm_ready(x_t_in)),
        w_t(gemm_ready(w_t_in)) {
    if (labels_in.has_value()) {
      check_label_values(*labels_in, w_s_in.size(0), ignore_index);
      labels = labels_in->contiguous();
    }
    if (b_s_in.has_value()) b_s = b_s_in->contiguous();
    if (b_t_in.has_value()) b_t = b_t_in->contiguous();
    TORCH_CHECK_VALUE(fits_int(x_s.size(0)) && fits_int(w_s.size(0)) && fits_int(x_s.size(1)) &&
                          fits_int(x_t.size(1)) && fits_int(x_s.stride(0)) && fits_int(w_s.stride(0)) &&
                          fits_int(x_t.stride(0)) && fits_int(w_t.stride(0)),
                      "streamkl: linear_kl on CUDA needs T, V, the hidden sizes and the row strides below 2^31 "
                      "(cuBLAS takes 32-bit sizes)");
  }

  LinearKLParams params() const { return make_linear_params(x_s, w_s, b_s, x_t, w_t, b_t, labels, options); }
};

// Streams the vocabulary in chunks: for each, both sides' fp32 logits by cuBLAS into one reused workspace, then
// the caller's body. Construct it under the inputs' device guard (it fetches the device's cuBLAS handle).
class LogitChunks {
 public:
  // extra_bytes_per_cell: what the caller allocates per (row, column) of a chunk besides the two fp32 logits.
  LogitChunks(const CudaLinearInputs& in, const LinearKLParams& p, int64_t extra_bytes_per_cell)
      : p_(p),
        gemm_{at::cuda::getCurrentCUDABlasHandle(), cublas_type(in.element), p.num_rows},
        math_mode_(gemm_.handle),
        columns_(cuda::vocab_chunk_columns(p.vocab, p.num_rows, 2 * int64_t(sizeof(float)) + extra_bytes_per_cell,
                                           workspace_budget_bytes())),
        logits_(at::empty({2, p.num_rows, columns_}, in.x_s.options().dtype(at::kFloat))) {
    TORCH_CUDABLAS_CHECK(math_mode_.status());
  }

  int64_t columns() const { return columns_; }
  const cuda::LinearGemm& gemm() const { return gemm_; }

  template <typename Body>
  void for_each(Body&& body) const {
    float* z_s = logits_.data_ptr<float>();
    float* z_t = z_s + p_.num_rows * columns_;
    for (int64_t v0 = 0; v0 < p_.vocab; v0 += columns_) {
      LinearLogitChunk c;
      c.z_student = z_s;
      c.z_teacher = z_t;
      c.ld = columns_;
      c.v0 = v0;
      c.cols = static_cast<int>(std::min(columns_, p_.vocab - v0));
      c.first = v0 == 0;
      TORCH_CUDABLAS_CHECK(gemm_.logit_chunk(p_.student, v0, c.cols, z_s, columns_));
      TORCH_CUDABLAS_CHECK(gemm_.logit_chunk(p_.teacher, v0, c.cols, z_t, columns_));
      body(c);
    }
  }

 private:
  const LinearKLParams& p_;
  cuda::LinearGemm gemm_;
  cuda::LinearGemmMathMode math_mode_;
  int64_t columns_;
  at::Tensor logits_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_kl_fwd_cuda(
    const at::Tensor& x_s, const at::Tensor& w_s, const optional<at::Tensor>& b_s, const at::Tensor& x_t,
    const at::Tensor& w_t, const optional<at::Tensor>& b_t, const optional<at::Tensor>& labels, double inv_temperature,
    c10::string_view divergence, double beta, int64_t ignore_index, bool with_ce) {
  const CudaLinearInputs in(x_s, w_s, b_s, x_t, w_t, b_t, labels, inv_temperature, divergence, beta, ignore_index,
                            with_ce);
  const c10::cuda::CUDAGuard guard(x_s.device());
  const int64_t rows = in.x_s.size(0);
  const auto f32 = in.x_s.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, f32), ce = at::empty({rows}, f32);
  at::Tensor stats = at::empty({kLinearNumStats, rows}, f32);
  if (rows == 0) return {loss, ce, stats};
  LinearKLParams p = in.params();
  p.loss_rows = loss.data_ptr();
  p.ce_rows = ce.data_ptr();
  p.stats = stats.data_ptr();
  at::Tensor row_workspace = at::empty({rows, cuda::kLinearRowStateFloats}, f32);
  const cuda::LinearRowState state = cuda::linear_row_state(row_workspace.data_ptr<float>(), rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LogitChunks chunks(in, p, /*extra_bytes_per_cell=*/0);
  const auto sweep = [&](cuda::LinearPass pass) {
    chunks.for_each([&](const LinearLogitChunk& c) {
      C10_CUDA_CHECK(cuda::launch_linear_forward_chunk(p, c, pass, state, in.element, stream));
    });
  };
  sweep(cuda::LinearPass::kOnline);
  if (p.loss == LinearLoss::kJSD) sweep(cuda::LinearPass::kJsdMixture);
  C10_CUDA_CHECK(cuda::launch_linear_forward_finish(p, state, stream));
  return {loss, ce, stats};
}

// One side's requested gradients: dx accumulates in fp32 across chunks; dW and db are written chunk by chunk in
// the input dtype (each vocabulary row by exactly one product).
struct SideGradients {
  bool want_dx, want_dw, want_db;
  at::Tensor dx, dw, db;

  SideGradients(bool dx_wanted, bool dw_wanted, bool db_wanted, const at::Tensor& x, const at::Tensor& w,
                bool no_rows)
      : want_dx(dx_wanted), want_dw(dw_wanted), want_db(db_wanted) {
    const auto none = x.options();
    // With no rows nothing is streamed: dW and db are empty sums, zeros.
    const auto alloc = [&](at::IntArrayRef sizes, at::TensorOptions o) {
      return no_rows ? at::zeros(sizes, o) : at::empty(sizes, o);
    };
    dx = want_dx ? alloc(x.sizes(), x.options().dtype(at::kFloat)) : at::empty({0}, none);
    dw = want_dw ? alloc(w.sizes(), w.options()) : at::empty({0}, none);
    db = want_db ? alloc({w.size(0)}, w.options()) : at::empty({0}, none);
  }

  bool any() const { return want_dx || want_dw || want_db; }

  void add_chunk(const cuda::LinearGemm& gemm, const LinearSide& side, const LinearLogitChunk& c, const void* grad,
                 const at::Tensor& ones) {
    if (want_dx)
      TORCH_CUDABLAS_CHECK(gemm.dx_chunk(side, c.v0, c.cols, grad, c.ld, dx.data_ptr<float>(), !c.first));
    if (want_dw) TORCH_CUDABLAS_CHECK(gemm.dw_chunk(side, c.v0, c.cols, grad, c.ld, dw.data_ptr()));
    if (want_db) TORCH_CUDABLAS_CHECK(gemm.db_chunk(c.v0, c.cols, grad, c.ld, ones.data_ptr(), db.data_ptr()));
  }

  // The gradients in the input dtype (dx cast once, at the end).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs(at::ScalarType dtype) const {
    return {dx.to(dtype), dw, db};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_kl_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& grad_ce, const at::Tensor& x_s, const at::Tensor& w_s,
    const optional<at::Tensor>& b_s, const at::Tensor& x_t, const at::Tensor& w_t, const optional<at::Tensor>& b_t,
    const optional<at::Tensor>& labels, const at::Tensor& loss, const at::Tensor& stats, double inv_temperature,
    c10::string_view divergence, double beta, int64_t ignore_index, bool with_ce, std::array<bool, 6> output_mask) {
  const CudaLinearInputs in(x_s, w_s, b_s, x_t, w_t, b_t, labels, inv_temperature, divergence, beta, ignore_index,
                            with_ce);
  const c10::cuda::CUDAGuard guard(x_s.device());
  check_grad_mask(output_mask, b_s, b_t);
  const int64_t rows = in.x_s.size(0);
  const LinearBackwardRows saved = prepare_linear_backward_rows(rows, grad_loss, grad_ce, loss, stats, at::kFloat);
  SideGradients student(output_mask[0], output_mask[1], output_mask[2], in.x_s, in.w_s, rows == 0);
  SideGradients teacher(output_mask[3], output_mask[4], output_mask[5], in.x_t, in.w_t, rows == 0);
  const auto results = [&] {
    const at::ScalarType dt = in.x_s.scalar_type();
    return std::tuple_cat(student.outputs(dt), teacher.outputs(dt));
  };
  if (rows == 0 || !(student.any() || teacher.any())) return results();

  LinearKLParams p = in.params();
  p.loss_rows = saved.loss.data_ptr();
  p.stats = saved.stats.data_ptr();
  p.grad_loss = saved.grad_loss.data_ptr();
  p.grad_ce = saved.grad_ce.data_ptr();
  const int64_t grad_bytes = in.x_s.element_size() * (int64_t(student.any()) + int64_t(teacher.any()));
  const LogitChunks chunks(in, p, grad_bytes);
  const auto grad_chunk = [&](bool wanted) {
    return wanted ? at::empty({rows, chunks.columns()}, in.x_s.options()) : at::Tensor();
  };
  const at::Tensor grad_s = grad_chunk(student.any()), grad_t = grad_chunk(teacher.any());
  const at::Tensor ones = student.want_db || teacher.want_db ? at::ones({rows}, in.x_s.options()) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  chunks.for_each([&](LinearLogitChunk c) {
    c.grad_student = student.any() ? grad_s.data_ptr() : nullptr;
    c.grad_teacher = teacher.any() ? grad_t.data_ptr() : nullptr;
    C10_CUDA_CHECK(cuda::launch_linear_grad_chunk(p, c, in.element, stream));
    if (student.any()) student.add_chunk(chunks.gemm(), p.student, c, c.grad_student, ones);
    if (teacher.any()) teacher.add_chunk(chunks.gemm(), p.teacher, c, c.grad_teacher, ones);
  });
  return results();
}

}  // namespace

TORCH_LIBRARY_IMPL(streamkl, CUDA, m) {
  m.impl("linear_kl_fwd", &linear_kl_fwd_cuda);
  m.impl("linear_kl_bwd", &linear_kl_bwd_cuda);
}

}  // namespace streamkl

// Host API of linear_kl's CUDA epilogue kernels (linear_kl_epilogue.cu): the StreamKL half of the interim
// "hybrid" CUDA design, in which cuBLAS computes each vocabulary chunk of fp32 logits and these kernels apply
// bias and 1/tau, run the shared online two-softmax core (kernels/online_kl.h) and write logit gradients.
// Torch-free: plain structs in, launches on the given stream, the launch status out.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../kernels/linear_params.h"
#include "../kernels/online_kl.h"

namespace streamkl {
namespace cuda {

// Element type of the inputs (biases) and of the gradient chunks; logits and statistics are always fp32.
enum class LinearElement : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The GPU kernels feed the online core base-2 scores (exp2 is the hardware's exponential), as the attention
// kernels do; LSEs and divergences come out in natural units.
using LinearOnlineState = OnlineKLState<float, Base2<float>>;

// Per-row state that survives from one vocabulary chunk to the next, in device memory ([T] each). Ignored rows'
// entries are never read or written.
struct LinearRowState {
  LinearOnlineState* online = nullptr;  // the KL pass (for JSD its first pass: the two log-sum-exps)
  JsdRowSums<float>* jsd = nullptr;     // JSD's second pass, base-2 log units
  float* label_logit = nullptr;         // the student's logit at the row's label, natural units (with_ce)
};

// Floats of row state per row, for the op to allocate one fp32 workspace of [T, kLinearRowStateFloats].
constexpr int kLinearRowStateFloats =
    static_cast<int>((sizeof(LinearOnlineState) + sizeof(JsdRowSums<float>)) / sizeof(float)) + 1;

// Splits a workspace of num_rows * kLinearRowStateFloats floats into the row state's arrays.
inline LinearRowState linear_row_state(float* workspace, int64_t num_rows) {
  LinearRowState state;
  state.online = reinterpret_cast<LinearOnlineState*>(workspace);
  state.jsd = reinterpret_cast<JsdRowSums<float>*>(state.online + num_rows);
  state.label_logit = reinterpret_cast<float*>(state.jsd + num_rows);
  return state;
}

// Which streaming pass a forward chunk belongs to.
enum class LinearPass : int {
  kOnline = 0,      // log-sum-exps, the KL of the loss's weighting side, the label logit
  kJsdMixture = 1,  // JSD only, after a whole kOnline pass: KL(P_t || M) and KL(P_s || M)
};

// Whether the online pass weights by the teacher: forward KL, and JSD's first pass (which only needs the two
// log-sum-exps, so any side would do; the CPU kernel makes the same choice).
inline bool linear_online_teacher_weights(const LinearKLParams& p) {
  return p.loss == LinearLoss::kJSD || teacher_is_weighting_side(kl_divergence_of(p.loss));
}

// Folds one chunk of both sides' logits into the per-row state.
cudaError_t launch_linear_forward_chunk(const LinearKLParams& p, const LinearLogitChunk& chunk, LinearPass pass,
                                        const LinearRowState& state, LinearElement element, cudaStream_t stream);

// After the last chunk of the last pass: loss_rows, ce_rows and stats of every row (fp32).
cudaError_t launch_linear_forward_finish(const LinearKLParams& p, const LinearRowState& state, cudaStream_t stream);

// One chunk of the backward: chunk.grad_student / grad_teacher (where not null) from the recomputed logits, the
// saved statistics (p.stats, p.loss_rows) and the incoming gradients (p.grad_loss, p.grad_ce), all fp32.
cudaError_t launch_linear_grad_chunk(const LinearKLParams& p, const LinearLogitChunk& chunk, LinearElement element,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace streamkl

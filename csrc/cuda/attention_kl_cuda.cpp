// CUDA implementations of streamkl::attention_kl_fwd / attention_kl_bwd and attention_jsd_fwd / attention_jsd_bwd
// (padded layout) and attention_kl_varlen_fwd / attention_kl_varlen_bwd (packed layout, any divergence):
// validation shared with the CPU path (csrc/ops), then one forward and one backward path for both layouts and all
// divergences that runs the tensor-core kernels from the registry (the launchers branch on the divergence). No
// fallback: an unsupported configuration raises an error naming what is supported.
#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "../ops/attention_entry_points.h"
#include "env_budget.h"
#include "kernel_registry.h"
#include "launch_workspace.h"

namespace streamkl {
namespace {

cuda::ElementType element_type(const at::Tensor& t) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kHalf || dt == at::kBFloat16,
                    "streamkl: the CUDA attention-KL kernels take float16 or bfloat16 inputs (statistics are kept in "
                    "float32); got ", dt, ". Cast q/k to torch.bfloat16, or run float32/float64 on the CPU.");
  return dt == at::kHalf ? cuda::ElementType::kFloat16 : cuda::ElementType::kBFloat16;
}

// cp.async moves 16 bytes per thread: rows must start on 16-byte boundaries (every stride but the last dim's,
// which is 1, is a multiple of 16 bytes), in either layout. The Hopper path's TMA descriptors also refuse a zero
// stride on a dimension of more than one element (an expanded tensor), so such inputs are copied too.
at::Tensor kernel_ready(const at::Tensor& t) {
  at::Tensor out = with_contiguous_last_dim(t);
  const int64_t elem = out.element_size();
  bool aligned = reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < out.dim(); ++d)
    aligned = aligned && (out.stride(d) * elem) % 16 == 0 && (out.stride(d) != 0 || out.size(d) == 1);
  return aligned ? out : out.contiguous();
}

// The four inputs as the kernels read them.
struct KernelInputs {
  at::Tensor q_s, k_s, q_t, k_t;
  KernelInputs(const at::Tensor& q_s_in, const at::Tensor& k_s_in, const at::Tensor& q_t_in, const at::Tensor& k_t_in)
      : q_s(kernel_ready(q_s_in)), k_s(kernel_ready(k_s_in)), q_t(kernel_ready(q_t_in)), k_t(kernel_ready(k_t_in)) {}
};

// The dK kernel accumulates over the query heads that share a student key head; the teacher's dK rows
// have a single writer only when the teacher groups its heads the same way. (Key heads are dim 1 in both
// layouts.)
void check_teacher_grad_grouping(bool teacher_grad, const at::Tensor& k_s, const at::Tensor& k_t) {
  TORCH_CHECK_NOT_IMPLEMENTED(!teacher_grad || k_s.size(1) == k_t.size(1),
                              "streamkl: teacher gradients on CUDA need the same number of key heads on both sides "
                              "(student ", k_s.size(1), ", teacher ", k_t.size(1),
                              "); detach the teacher, or run this configuration on the CPU");
}

// Which student-only backward runs: the fused one (one kernel per key block that also adds each query tile's dQ share
// into an fp32 workspace, the reductions in no fixed order: not bitwise deterministic) or the two-kernel one (a dQ and
// a dK kernel, one writer per gradient row: deterministic). STREAMKL_FUSED_BACKWARD=1 / 0 picks one wherever the fused
// kernel exists; unset, by_default decides: the Hopper path runs the fused backward in both layouts (it recomputes the
// scores once rather than twice: measured faster on H100, bench/RESULTS.md sessions 10 and 11), the Ampere path the
// two-kernel one (its fused kernel measured slower). Under
// torch.use_deterministic_algorithms(True) the two-kernel backward always runs. Read at every call (tests switch it).
bool use_fused_backward(bool by_default) {
  if (at::globalContext().deterministicAlgorithms()) return false;
  const char* v = std::getenv("STREAMKL_FUSED_BACKWARD");
  const std::string choice = v == nullptr ? "" : v;
  TORCH_CHECK_VALUE(choice.empty() || choice == "0" || choice == "1",
                    "streamkl: STREAMKL_FUSED_BACKWARD must be 0 or 1 (or unset), got '", choice, "'");
  return choice.empty() ? by_default : choice == "1";
}

// Which kernels run on compute capability 9.x: the Hopper path (wgmma, sm_90a) by default, for every divergence at
// the head dims it is instantiated for (64, 128); elsewhere the Ampere path.
// STREAMKL_CUDA_PATH=ampere forces the Ampere path (read at every call, so tests and benchmarks run both paths on
// one GPU). On H100 the two measured within 3% at N=8192, D=128 non-causal, the Hopper path 8% faster causal and 3%
// at D=64 (bench/RESULTS.md, session 4).
bool hopper_path_enabled(const at::Tensor& t) {
  const char* path = std::getenv("STREAMKL_CUDA_PATH");
  const std::string choice = path == nullptr ? "" : path;
  TORCH_CHECK_VALUE(choice.empty() || choice == "ampere" || choice == "hopper",
                    "streamkl: STREAMKL_CUDA_PATH must be 'ampere' or 'hopper' (or unset), got '", choice, "'");
  if (choice == "ampere") return false;
  return at::cuda::getDeviceProperties(t.device().index())->major == 9;
}

// The registered kernel of `family` for the dtype and head dims (the last dim in both layouts) of q / q_t, or null.
cuda::LaunchFn lookup_launcher(cuda::KernelFamily family, const at::Tensor& q, const at::Tensor& q_t) {
  return cuda::find_kernel(
      cuda::KernelKey{family, element_type(q), static_cast<int>(q.size(-1)), static_cast<int>(q_t.size(-1))});
}
cuda::LaunchFn lookup_launcher(cuda::KernelFamily family, const KernelInputs& in) {
  return lookup_launcher(family, in.q_s, in.q_t);
}

const char* family_name(cuda::KernelFamily family) {
  switch (family) {
    case cuda::KernelFamily::kForward: return "forward";
    case cuda::KernelFamily::kBackward: return "backward";
    case cuda::KernelFamily::kForwardSm90: return "Hopper-path forward";
    case cuda::KernelFamily::kBackwardSm90: return "Hopper-path backward";
    case cuda::KernelFamily::kForwardAggregated: return "aggregated-teacher forward";
    case cuda::KernelFamily::kBackwardAggregated: return "aggregated-teacher backward";
    case cuda::KernelFamily::kForwardAggregatedSm90: return "Hopper-path aggregated-teacher forward";
    case cuda::KernelFamily::kBackwardAggregatedSm90: return "Hopper-path aggregated-teacher backward";
  }
  return "unknown";
}

// The same, required: a clear error naming what this build has when it is missing.
cuda::LaunchFn find_launcher(cuda::KernelFamily family, const at::Tensor& q, const at::Tensor& q_t) {
  cuda::LaunchFn fn = lookup_launcher(family, q, q_t);
  TORCH_CHECK_VALUE(fn != nullptr, "streamkl: no CUDA ", family_name(family), " kernel for ", q.scalar_type(),
                    " with head dims D_s=", q.size(-1), ", D_t=", q_t.size(-1), " in this build. Compiled: ",
                    cuda::describe_kernels(family));
  return fn;
}
cuda::LaunchFn find_launcher(cuda::KernelFamily family, const KernelInputs& in) {
  return find_launcher(family, in.q_s, in.q_t);
}

// The launcher of `hopper` where the Hopper path takes the inputs (at least one key on both sides, compute capability
// 9.x, a head-dim pair it is instantiated for), else the required one of `ampere`.
cuda::LaunchFn path_launcher(cuda::KernelFamily hopper, cuda::KernelFamily ampere, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& q_t, const at::Tensor& k_t) {
  cuda::LaunchFn launch = nullptr;
  if (k.numel() > 0 && k_t.numel() > 0 && hopper_path_enabled(q)) launch = lookup_launcher(hopper, q, q_t);
  return launch != nullptr ? launch : find_launcher(ampere, q, q_t);
}

// The forward for the given inputs, every divergence.
cuda::LaunchFn forward_launcher(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_t,
                                const at::Tensor& k_t) {
  return path_launcher(cuda::KernelFamily::kForwardSm90, cuda::KernelFamily::kForward, q, k, q_t, k_t);
}

// Pass 1 of an aggregated teacher: every teacher head's LSE into lse_t ([B, H * r, N_q]), by the KL forward run with
// the teacher on both sides (its student LSE is the head's LSE). That computes each score tile twice; a one-sided
// LSE kernel would halve this pass.
void run_teacher_head_lse(const AttentionKLParams& p, const KernelInputs& in, at::Tensor& lse_t) {
  AttentionKLParams t = p;
  t.student = p.teacher;
  t.num_heads = p.num_teacher_heads();
  t.teacher_head_group = 1;
  t.divergence = Divergence::kForward;
  at::Tensor unused = at::empty({2, lse_t.numel()}, lse_t.options());  // its divergence and second LSE
  t.kl = unused[0].data_ptr();
  t.lse_student = lse_t.data_ptr();
  t.lse_teacher = unused[1].data_ptr();
  t.jsd_stats = nullptr;
  forward_launcher(in.q_t, in.k_t, in.q_t, in.k_t)(t, c10::cuda::getCurrentCUDAStream());
}

struct ForwardOutputs {
  at::Tensor kl, lse_s, lse_t;
  at::Tensor jsd_stats;  // [rows..., JsdRowStats::kCount] for the JSD (zeros at beta = 0 / 1), [0] otherwise
};

// Both layouts' forward, every divergence: kl (the JSD for kJsd), lse_s shaped like q_s without its head dim
// ([B, H, N_q] or [total_q, H]), lse_t like q_t's (an aggregated teacher's per-head LSEs) and jsd_stats, then the
// kernels unless there is no row. p: the layout's parameters without the output pointers. The kernels get
// kernel_attention_params(p), which runs a JSD at beta = 0 / 1 as the KL it equals (its statistics, unused then,
// stay zero), as on the CPU. teacher_lse: an aggregated teacher's per-head LSEs given by the caller (skips pass 1),
// or undefined.
ForwardOutputs run_forward(AttentionKLParams& p, const KernelInputs& in, const at::Tensor& teacher_lse = at::Tensor()) {
  const auto opts = in.q_s.options().dtype(at::kFloat);
  const at::IntArrayRef rows = in.q_s.sizes().slice(0, in.q_s.dim() - 1);
  const bool jsd = p.divergence == Divergence::kJsd;
  std::vector<int64_t> stats_shape = {0};
  if (jsd) {
    stats_shape.assign(rows.begin(), rows.end());
    stats_shape.push_back(JsdRowStats<float>::kCount);
  }
  ForwardOutputs out{at::empty(rows, opts), at::empty(rows, opts),
                     at::empty(in.q_t.sizes().slice(0, in.q_t.dim() - 1), opts), at::zeros(stats_shape, opts)};
  LaunchWorkspace workspace(in.q_s);
  const AttentionKLParams kernel_params = with_launch_workspace(kernel_attention_params(p), workspace);
  const bool aggregated = p.teacher_head_group > 1;
  // The Hopper path takes every divergence and aggregated teachers over at least one key; key-less problems run on the
  // Ampere-path kernels.
  const cuda::LaunchFn launch =
      aggregated ? path_launcher(cuda::KernelFamily::kForwardAggregatedSm90, cuda::KernelFamily::kForwardAggregated,
                                 in.q_s, in.k_s, in.q_t, in.k_t)
                 : forward_launcher(in.q_s, in.k_s, in.q_t, in.k_t);
  if (teacher_lse.defined()) out.lse_t.copy_(teacher_lse);  // a copy: an op output must not alias an input
  if (out.kl.numel() == 0) return out;
  if (aggregated && !teacher_lse.defined()) run_teacher_head_lse(kernel_params, in, out.lse_t);
  AttentionKLParams k = kernel_params;
  k.kl = out.kl.data_ptr();
  k.lse_student = out.lse_s.data_ptr();
  k.lse_teacher = out.lse_t.data_ptr();
  k.jsd_stats = jsd ? out.jsd_stats.data_ptr() : nullptr;
  launch(k, c10::cuda::getCurrentCUDAStream());
  return out;
}

// Queues the backward kernels of p (its gradient outputs set) on the current stream. fused: the fused backward, which
// adds the student's dQ into a zeroed fp32 workspace shaped and laid out like q_s (and dq_s, allocated alike).
void launch_backward(const AttentionKLParams& p, const at::Tensor& q_s, cuda::LaunchFn launch, bool fused) {
  LaunchWorkspace workspace(q_s);
  AttentionKLParams k = with_launch_workspace(kernel_attention_params(p), workspace);
  at::Tensor dq_accum;
  if (fused) {
    dq_accum = at::zeros(q_s.sizes(), q_s.options().dtype(at::kFloat));
    k.dq_accum = dq_accum.data_ptr();
  }
  launch(k, c10::cuda::getCurrentCUDAStream());
}

// The fused backward's fp32 dQ workspace is as large as q_s in fp32 (8 GiB at a million tokens, 16 heads, D_s = 128:
// as much as dQ and dK together), so it is capped at STREAMKL_DQ_WORKSPACE_MB MiB (default 1024; env_budget.h): a
// larger problem runs over ranges of key heads (and the query heads that read them), each with a workspace of its own.
// Returns the key heads per run (all of them when the whole workspace fits; at least one, whatever the cap).
int64_t fused_backward_kv_heads_per_run(const KernelInputs& in) {
  const int64_t budget = workspace_budget_bytes_from_env("STREAMKL_DQ_WORKSPACE_MB", 1024.0);
  const int64_t kv_heads = in.k_s.size(1);  // key heads are dim 1 in both layouts
  const int64_t bytes_per_kv_head = in.q_s.numel() / kv_heads * int64_t(sizeof(float));
  const int64_t fit = budget / std::max<int64_t>(bytes_per_kv_head, 1);
  return std::min(kv_heads, std::max<int64_t>(fit, 1));
}

// The fused backward of p (gradient outputs set to dq_s / dk_s) as runs over kv_per_run key heads at a time, each a
// problem of its own through the same kernels: views of the inputs and of dK (every key row is written), compact
// copies of the per-row inputs (the kernels index them by the run's head count), and dQ into a compact buffer copied
// into dq_s after the run (the fp32 workspace is laid out like the dQ the kernels write). Heads are dim 1 of the
// inputs and of the per-row tensors in both layouts; the fused backward has as many key heads on both sides.
void run_fused_backward_by_heads(const AttentionKLParams& p, const KernelInputs& in, const BackwardRowInputs& rows,
                                 const at::Tensor& jsd_stats, at::Tensor& dq_s, at::Tensor& dk_s, int64_t kv_per_run,
                                 cuda::LaunchFn launch, const TensorLayout& layout) {
  const int64_t kv_heads = in.k_s.size(1), group = in.q_s.size(1) / kv_heads;
  for (int64_t kv0 = 0; kv0 < kv_heads; kv0 += kv_per_run) {
    const int64_t n_kv = std::min(kv_per_run, kv_heads - kv0), h0 = kv0 * group, n_h = n_kv * group;
    auto query_heads = [&](const at::Tensor& t) { return t.narrow(1, h0, n_h); };
    auto key_heads = [&](const at::Tensor& t) { return t.narrow(1, kv0, n_kv); };
    const KernelInputs run_in(query_heads(in.q_s), key_heads(in.k_s), query_heads(in.q_t), key_heads(in.k_t));
    const BackwardRowInputs run_rows{
        rows.grad_kl_broadcast ? query_heads(rows.grad_kl) : query_heads(rows.grad_kl).contiguous(),
        query_heads(rows.kl).contiguous(), query_heads(rows.lse_s).contiguous(),
        query_heads(rows.lse_t).contiguous(), rows.grad_kl_broadcast};
    const at::Tensor run_stats = jsd_stats.defined() ? query_heads(jsd_stats).contiguous() : at::Tensor();
    at::Tensor run_dq = at::empty(run_in.q_s.sizes(), dq_s.options());
    at::Tensor run_dk = key_heads(dk_s);
    at::Tensor no_teacher_grad = at::empty({0}, dq_s.options());
    AttentionKLParams run = p;
    point_params_at_inputs(run, run_in.q_s, run_in.k_s, run_in.q_t, run_in.k_t, layout);
    set_backward_params(run, run_rows, run_dq, run_dk, no_teacher_grad, no_teacher_grad, /*teacher_grad=*/false,
                        layout);
    if (run_stats.defined()) run.jsd_stats = const_cast<void*>(run_stats.data_ptr());
    launch_backward(run, run_in.q_s, launch, /*fused=*/true);
    query_heads(dq_s).copy_(run_dq);
  }
}

// Both layouts' backward, every divergence. p: the layout's parameters without the backward fields; jsd_stats: the
// forward's JSD statistics (read only for Divergence::kJsd).
Gradients run_backward(AttentionKLParams& p, const KernelInputs& in, const BackwardRowInputs& rows,
                       const at::Tensor& jsd_stats, bool teacher_grad, const TensorLayout& layout) {
  // The Hopper-path backward takes student gradients only, every divergence; aggregated teachers have their own on
  // both paths (student gradients only, every divergence, two kernels). The fused backward (use_fused_backward) runs
  // on the Hopper path at student head dim 128 when both sides group query heads alike (one teacher key block per CTA;
  // key heads are dim 1 in both layouts; by default in both layouts), on the Ampere path in the padded layout for the
  // KL at head dims up to 128 (run_attention_kl_bwd_fused; on request only: slower than its two kernels).
  const bool aggregated = p.teacher_head_group > 1;
  const bool padded = layout.batch_dim >= 0;
  cuda::LaunchFn launch = nullptr;
  bool fused = false;
  if (aggregated) {
    launch = path_launcher(cuda::KernelFamily::kBackwardAggregatedSm90, cuda::KernelFamily::kBackwardAggregated,
                           in.q_s, in.k_s, in.q_t, in.k_t);
  } else if (!teacher_grad && hopper_path_enabled(in.q_s)) {
    launch = lookup_launcher(cuda::KernelFamily::kBackwardSm90, in);
    fused = launch != nullptr && in.k_s.size(1) == in.k_t.size(1) &&
            cuda::fused_backward_sm90_supports(static_cast<int>(in.q_s.size(-1))) &&
            use_fused_backward(/*by_default=*/true);
  }
  if (launch == nullptr) {
    launch = find_launcher(cuda::KernelFamily::kBackward, in);
    fused = padded && !teacher_grad && !aggregated && p.divergence != Divergence::kJsd &&
            cuda::fused_backward_supports(static_cast<int>(in.q_s.size(-1)), static_cast<int>(in.q_t.size(-1))) &&
            use_fused_backward(/*by_default=*/false);
  }
  // The dQ kernel writes every query row and the dK kernel every key row (zeros where nothing is seen; in
  // the varlen layout each row belongs to exactly one sequence), so the outputs need no memset; only empty
  // problems return early with zeros.
  const bool empty_problem = rows.kl.numel() == 0 || in.k_s.size(layout.seq_dim) == 0;
  auto alloc = [&](const at::Tensor& like) { return empty_problem ? at::zeros(like.sizes(), like.options())
                                                                   : at::empty(like.sizes(), like.options()); };
  at::Tensor dq_s = alloc(in.q_s), dk_s = alloc(in.k_s);
  at::Tensor dq_t = teacher_grad ? alloc(in.q_t) : at::empty({0}, in.q_t.options());
  at::Tensor dk_t = teacher_grad ? alloc(in.k_t) : at::empty({0}, in.k_t.options());
  const bool jsd = p.divergence == Divergence::kJsd;
  const at::Tensor stats = jsd ? prepare_jsd_stats(in.q_s, jsd_stats, at::kFloat) : at::Tensor();
  if (empty_problem) return {dq_s, dk_s, dq_t, dk_t};
  set_backward_params(p, rows, dq_s, dk_s, dq_t, dk_t, teacher_grad, layout);
  if (jsd) p.jsd_stats = const_cast<void*>(stats.data_ptr());
  const int64_t kv_heads_per_run = fused ? fused_backward_kv_heads_per_run(in) : in.k_s.size(layout.head_dim);
  if (kv_heads_per_run < in.k_s.size(layout.head_dim)) {
    run_fused_backward_by_heads(p, in, rows, stats, dq_s, dk_s, kv_heads_per_run, launch, layout);
  } else {
    launch_backward(p, in.q_s, launch, fused);
  }
  return {dq_s, dk_s, dq_t, dk_t};
}

// The backend of the shared entry points (csrc/ops/attention_entry_points.h).
struct CudaBackend {
  using Inputs = KernelInputs;
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  };
  static at::ScalarType stats(const Inputs&) { return at::kFloat; }
  static void check_teacher_grad(bool teacher_grad, const at::Tensor& k_s, const at::Tensor& k_t) {
    check_teacher_grad_grouping(teacher_grad, k_s, k_t);
  }
  static ForwardOutputs forward(AttentionKLParams& p, const Inputs& in, const at::Tensor& teacher_lse) {
    return run_forward(p, in, teacher_lse);
  }
  static Gradients backward(AttentionKLParams& p, const Inputs& in, const BackwardRowInputs& rows,
                            const at::Tensor& jsd_stats, bool teacher_grad, const TensorLayout& layout) {
    return run_backward(p, in, rows, jsd_stats, teacher_grad, layout);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(streamkl, CUDA, m) { register_attention_ops<CudaBackend>(m); }

}  // namespace streamkl

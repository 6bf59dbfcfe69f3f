// Host side of the launchers' workspaces (AttentionKLParams::Workspace) and of the split-stream request: zeroed
// CUDA memory from PyTorch's caching allocator (so that memory statistics count it), held until the kernels using it
// are queued. Released then, the blocks go back to the allocator, which hands them out again only in the order of
// the stream the kernels run on.
#pragma once

#include <cstdlib>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "../kernels/attention_params.h"

namespace streamkl {

class LaunchWorkspace {
 public:
  explicit LaunchWorkspace(const at::Tensor& like) : options_(like.options().dtype(at::kByte)) {}
  LaunchWorkspace(const LaunchWorkspace&) = delete;
  LaunchWorkspace& operator=(const LaunchWorkspace&) = delete;

  // The allocator for p.workspace; valid while this object lives.
  AttentionKLParams::Workspace allocator() {
    AttentionKLParams::Workspace w;
    w.zeros = &LaunchWorkspace::zeros;
    w.context = this;
    return w;
  }

 private:
  static void* zeros(void* self, int64_t bytes) {
    auto* ws = static_cast<LaunchWorkspace*>(self);
    ws->tensors_.push_back(at::zeros({bytes}, ws->options_));
    return ws->tensors_.back().data_ptr();
  }
  at::TensorOptions options_;
  std::vector<at::Tensor> tensors_;
};

// STREAMKL_STREAM_SPLITS: unset or "auto" = the launchers decide (AttentionKLParams::requested_splits 0); a positive
// integer caps the CTAs per X block (1 = never split). Read at every call, so tests and benchmarks run both ways.
inline int requested_stream_splits() {
  const char* v = std::getenv("STREAMKL_STREAM_SPLITS");
  const std::string s = v == nullptr ? "" : v;
  if (s.empty() || s == "auto") return 0;
  char* end = nullptr;
  const long n = std::strtol(s.c_str(), &end, 10);
  // (No number in the message: a c10::Error whose message has digits crashes some torch builds' printers.)
  TORCH_CHECK_VALUE(end != s.c_str() && *end == '\0' && n >= 1 && n <= 4096,
                    "streamkl: STREAMKL_STREAM_SPLITS must be 'auto' or a positive integer of at most four digits, "
                    "got '", s, "'");
  return static_cast<int>(n);
}

// p with the workspace allocator of `ws` and the caller's split request.
inline AttentionKLParams with_launch_workspace(AttentionKLParams p, LaunchWorkspace& ws) {
  p.workspace = ws.allocator();
  p.requested_splits = requested_stream_splits();
  return p;
}

}  // namespace streamkl

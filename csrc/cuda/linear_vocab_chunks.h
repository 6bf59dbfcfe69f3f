// How wide a vocabulary chunk the CUDA linear_kl streams over: the per-chunk workspaces ([T, Vc] fp32 logits of
// both sides, plus the backward's [T, Vc] gradient chunks) stay within a byte budget, so extra memory is bounded
// whatever T * V is. Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>

namespace streamkl {
namespace cuda {

// Chunks are a multiple of this many columns (whole GEMM tiles), except a single chunk covering all of V.
constexpr int64_t kVocabChunkAlign = 128;

// Default workspace budget (MiB), overridden by the environment variable STREAMKL_LINEAR_WORKSPACE_MB.
constexpr double kDefaultLinearWorkspaceMiB = 512.0;

// Columns per chunk for `rows` token rows when each (row, column) cell of the chunk costs `bytes_per_cell` bytes
// of workspace: all of `vocab` when it fits in `budget_bytes`, else the largest multiple of kVocabChunkAlign
// that fits, and never less than kVocabChunkAlign (a budget too small for even that is exceeded, not refused).
inline int64_t vocab_chunk_columns(int64_t vocab, int64_t rows, int64_t bytes_per_cell, int64_t budget_bytes) {
  const int64_t bytes_per_column = std::max<int64_t>(1, rows * bytes_per_cell);
  const int64_t fitting = budget_bytes / bytes_per_column;
  if (fitting >= vocab) return vocab;
  return std::min(vocab, std::max(kVocabChunkAlign, fitting / kVocabChunkAlign * kVocabChunkAlign));
}

}  // namespace cuda
}  // namespace streamkl

// Which keys a query row may attend to. Every mask StreamKL supports (none, causal, sliding window)
// allows one contiguous key range per row, and the range only moves right as the row index grows, so
// kernels can skip whole tiles and mask only the tiles on a range edge.
#pragma once

#include "attention_params.h"
#include "platform.h"

namespace streamkl {

struct KeyRange {
  int begin;  // first allowed key
  int end;    // one past the last allowed key; begin >= end means a fully masked row
  SKL_HOST_DEVICE bool empty() const { return begin >= end; }
  SKL_HOST_DEVICE bool contains(int j) const { return j >= begin && j < end; }
  // Tiles of `tile` keys that cover the range (0 when empty).
  SKL_HOST_DEVICE int tile_count(int tile) const { return empty() ? 0 : (end - begin + tile - 1) / tile; }
  // Every key of [first, last_end) is in the range.
  SKL_HOST_DEVICE bool covers(int first, int last_end) const { return first >= begin && last_end <= end; }
};

// Bottom-right aligned mask: row i of N_q sees keys up to i + (N_k - N_q) when causal, as in
// FlashAttention >= 2.1 and SDPA with a bottom-right causal bias.
struct AttentionMask {
  int seqlen_q, seqlen_k;
  int left, right;  // window extents; < 0 means unbounded

  SKL_HOST_DEVICE static AttentionMask from_params(const AttentionKLParams& p, int seqlen_q, int seqlen_k) {
    AttentionMask m;
    m.seqlen_q = seqlen_q;
    m.seqlen_k = seqlen_k;
    m.left = p.window_left;
    m.right = p.causal ? 0 : p.window_right;
    return m;
  }

  SKL_HOST_DEVICE KeyRange keys_for_row(int i) const {
    const long long diag = static_cast<long long>(i) + seqlen_k - seqlen_q;
    long long begin = 0, end = seqlen_k;
    if (left >= 0) begin = max_of<long long>(begin, diag - left);
    if (right >= 0) end = min_of<long long>(end, diag + right + 1);
    if (end < begin) end = begin;
    return KeyRange{static_cast<int>(begin), static_cast<int>(end)};
  }

  // Union of the key ranges of rows [row_begin, row_end): ranges are monotone in the row index. Empty when
  // there is no row (a CUDA block past its sequence's end: varlen grids are sized by the longest sequence).
  SKL_HOST_DEVICE KeyRange keys_for_rows(int row_begin, int row_end) const {
    if (row_end <= row_begin) return KeyRange{0, 0};
    KeyRange first = keys_for_row(row_begin), last = keys_for_row(row_end - 1);
    return KeyRange{first.begin, last.end};
  }

  // Query rows (within [0, seqlen_q)) whose key range meets keys [key_begin, key_end): the transpose of
  // keys_for_rows, used by kernels that own a block of keys and stream over query rows. Empty when there is
  // no key.
  SKL_HOST_DEVICE KeyRange rows_for_keys(int key_begin, int key_end) const {
    if (key_end <= key_begin) return KeyRange{0, 0};
    const long long offset = static_cast<long long>(seqlen_k) - seqlen_q;
    long long begin = 0, end = seqlen_q;
    if (right >= 0) begin = max_of<long long>(begin, key_begin - offset - right);
    if (left >= 0) end = min_of<long long>(end, static_cast<long long>(key_end) - 1 - offset + left + 1);
    if (end < begin) end = begin;
    return KeyRange{static_cast<int>(begin), static_cast<int>(end)};
  }

  // True when every row of [row_begin, row_end) may see every key of [key_begin, key_end), all of them in
  // bounds: such a tile needs no per-element masking.
  SKL_HOST_DEVICE bool block_fully_visible(int row_begin, int row_end, int key_begin, int key_end) const {
    return keys_visible_to_all(row_begin, row_end).covers(key_begin, key_end);
  }

  // The keys every row of [row_begin, row_end) may see (all in bounds): a key tile inside it is fully visible.
  // Kernels that test many tiles against one row block compute it once. Empty when a row is out of bounds.
  SKL_HOST_DEVICE KeyRange keys_visible_to_all(int row_begin, int row_end) const {
    if (row_end > seqlen_q || row_end <= row_begin) return KeyRange{0, 0};
    return KeyRange{keys_for_row(row_end - 1).begin, min_of(keys_for_row(row_begin).end, seqlen_k)};
  }
};

}  // namespace streamkl

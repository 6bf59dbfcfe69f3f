// Warp-specialized Hopper (sm_90a) dQ kernel of the attention-KL backward (student gradients only): the producer
// warpgroup moves the query block once and the key tiles through the stages with TMA (tma_stream_sm90.cuh, the
// forward's producer); each MMA warpgroup recomputes its 64 rows' score tiles on wgmma, turns them into score
// gradients with the divergence's rule (query_tile_score_grads, shared with the Ampere-path dQ kernel) and adds
// dQ_s += dS_s K_s with dS_s from registers and K_s from the same stage, read transposed (MN-major B). The dK
// kernel stays on the Ampere path.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "attention_kl_bwd.cuh"
#include "kernel_traits_sm90.cuh"
#include "tma_stream_sm90.cuh"
#include "warpgroup_mma.cuh"

namespace streamkl {
namespace cuda {

using namespace cute;

template <typename Traits, typename ScoreGrads>
struct DqStateSm90 {
  static constexpr int kThreadRows = 2 * (Traits::kBlockM / (16 * Traits::kNWarps));
  AttentionMask mask;
  KeyRange full_keys;  // keys every row of the block sees (a tile inside needs no mask arithmetic)
  float scale_s2, scale_t2;
  int row0;
  ScoreGrads score_grads;
  typename ScoreGrads::Row rows[kThreadRows];
};

// The MMA warpgroups' key loop: per tile, the two score products, the score gradients, the dQ product; the stage is
// freed once the dQ product (the last reader of K_s) has completed.
template <typename Traits, typename State, typename AccDq>
__device__ __forceinline__ void consume_dq_tiles(State& st, const StreamSmemSm90<Traits>& smem, AccDq& acc_dq,
                                                 int y_begin, int n_tiles) {
  using Smem = StreamSmemSm90<Traits>;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kStages = Traits::kStages;
  const int tid = threadIdx.x;
  typename Traits::TiledMma score_mma;
  typename Traits::GradMmaS grad_mma;
  Tensor x_s = Smem::template tile<typename Traits::XTileS>(smem.x_s);
  Tensor x_t = Smem::template tile<typename Traits::XTileT>(smem.x_t);
  Tensor acc_s = partition_fragment_C(score_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor acc_t = partition_fragment_C(score_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  clear(acc_s);  // defined before any product is in flight (C7515)
  clear(acc_t);

  cutlass::arch::ClusterBarrier::wait(smem.x_full, 0);
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile % kStages, y0 = y_begin + tile * kBlockN;
    wait_for_stream_tile(smem, tile);
    warpgroup_products_begin(acc_s, acc_t);
    warpgroup_gemm_ss(score_mma, acc_s, x_s, Smem::template tile<typename Traits::YTileS>(smem.y_s(stage)), tid);
    warpgroup_gemm_ss(score_mma, acc_t, x_t, Smem::template tile<typename Traits::YTileT>(smem.y_t(stage)), tid);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_t);

    query_tile_score_grads<kBlockM, kBlockN>(st.score_grads, st.rows, st.mask,
                                             y0 >= st.full_keys.begin && y0 + kBlockN <= st.full_keys.end, st.row0,
                                             y0, st.scale_s2, st.scale_t2, score_mma, acc_s, acc_t);
    Tensor ds = convert_fragment<Element>(acc_s);
    Tensor ds_a = make_tensor(ds.data(), wgmma_acc_as_operand_a(ds.layout()));
    Tensor k_s = make_tensor(make_smem_ptr(smem.y_s(stage)), typename Traits::YTileS::LayoutTransposed{});
    warpgroup_fence_operand(ds_a);
    warpgroup_products_begin(acc_dq);
    warpgroup_gemm_rs(grad_mma, acc_dq, ds_a, k_s, tid);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dq);
    release_stream_tile(smem, tile);
  }
}

template <typename Traits, typename ScoreGrads>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    attention_kl_bwd_dq_sm90_kernel(const AttentionKLParams p, const __grid_constant__ StreamTmaLoads<Traits> tma) {
  extern __shared__ __align__(1024) char smem_sm90[];
  const StreamSmemSm90<Traits> smem(smem_sm90);
  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest causal rows first
  const int h = blockIdx.y, b = blockIdx.z;
  const int row0 = m_block * Traits::kBlockM;
  const AttentionKLParams::Sequence seq = p.sequence(b);
  const int row_end = min_of(row0 + Traits::kBlockM, seq.seqlen_q);
  const AttentionMask mask = AttentionMask::from_params(p, seq.seqlen_q, seq.seqlen_k);
  const KeyRange keys = mask.keys_for_rows(row0, row_end);
  const int n_tiles = keys.end > keys.begin ? (keys.end - keys.begin + Traits::kBlockN - 1) / Traits::kBlockN : 0;

  if (threadIdx.x == 0) init_stream_barriers(smem);
  __syncthreads();

  if (cutlass::canonical_warp_group_idx() == Traits::kNMmaThreads / 128) {  // the producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    run_stream_producer(p, tma, smem, seq, b, h, row0, keys.begin, n_tiles);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kMmaRegisters>();
    DqStateSm90<Traits, ScoreGrads> st;
    st.mask = mask;
    st.full_keys = mask.keys_visible_to_all(row0, row_end);
    st.scale_s2 = static_cast<float>(p.student.scale) * kLog2e;
    st.scale_t2 = static_cast<float>(p.teacher.scale) * kLog2e;
    st.row0 = row0;
    st.score_grads.init(p);
    load_query_row_inputs<Traits::kBlockM, Traits::kBlockN>(st.score_grads, p, seq.seqlen_q, b, h, row0,
                                                            typename Traits::TiledMma{}, st.rows);
    typename Traits::GradMmaS grad_mma;
    Tensor acc_dq = partition_fragment_C(grad_mma, Shape<Int<Traits::kBlockM>, Int<Traits::kDimS>>{});
    clear(acc_dq);
    if (n_tiles > 0) consume_dq_tiles<Traits>(st, smem, acc_dq, keys.begin, n_tiles);
    store_grad_rows<Traits::kBlockM, Traits::kDimS, typename Traits::Element>(
        grad_mma, p.student, acc_dq, /*keys=*/false, b, h, seq.q_start + row0, seq.seqlen_q - row0);
  }
}

}  // namespace cuda
}  // namespace streamkl

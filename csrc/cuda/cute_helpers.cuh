// Small CuTe building blocks shared by every StreamKL CUDA kernel: predicated tile loads, the two
// tensor-core product shapes (smem x smem, registers x smem), and views of MMA accumulators by row/column.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>

namespace streamkl {
namespace cuda {

using namespace cute;

// cp.async a [rows, dim] tile from global to shared memory; rows at or past `valid_rows` are zero-filled
// so tails never feed garbage (or NaN) into the tensor cores.
template <typename GmemCopy, typename GTensor, typename STensor, typename CTensor>
__device__ __forceinline__ void load_tile(GmemCopy gmem_copy, const GTensor& src, STensor& dst, const CTensor& coords,
                                          int valid_rows) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(dst); ++m) {
    if (get<0>(coords(0, m, 0)) < valid_rows) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(dst); ++k) cute::copy(gmem_copy, src(_, m, k), dst(_, m, k));
    } else {
      cute::clear(dst(_, m, _));
    }
  }
}

// Issue the cp.async loads of one [rows, dim] tile starting at `base` (row stride `row_stride`).
template <typename Tile, typename Element>
__device__ __forceinline__ void issue_tile_load(const Element* base, int64_t row_stride, Element* smem, int valid_rows,
                                                int tid) {
  constexpr int kRows = size<0>(typename Tile::Layout{});
  constexpr int kDim = size<1>(typename Tile::Layout{});
  Tensor g = make_tensor(make_gmem_ptr(base), Shape<Int<kRows>, Int<kDim>>{}, make_stride(row_stride, _1{}));
  Tensor s = make_tensor(make_smem_ptr(smem), typename Tile::Layout{});
  typename Tile::GmemCopy gmem_copy;
  auto thr = gmem_copy.get_thread_slice(tid);
  Tensor src = thr.partition_S(g);
  Tensor dst = thr.partition_D(s);
  // Whole tiles (all but a stream's last) skip the per-row tests and zero-fill stores: in the forward's key
  // loop the predicated form was ~110 instructions per tile, an eighth of the loop.
  if (valid_rows >= kRows) {
    cute::copy(gmem_copy, src, dst);
    return;
  }
  Tensor coords = thr.partition_S(make_identity_tensor(Shape<Int<kRows>, Int<kDim>>{}));
  load_tile(gmem_copy, src, dst, coords, valid_rows);
}

// ldmatrix atom for an operand view: plain when the view's k dimension is contiguous in shared memory,
// .trans when the view is the transpose of a tile stored the other way round.
template <bool kTransposed, typename Element>
using LdsmAtom = std::conditional_t<kTransposed, Copy_Atom<SM75_U16x8_LDSM_T, Element>,
                                    Copy_Atom<SM75_U32x4_LDSM_N, Element>>;

// acc += A * B^T with both operands in shared memory, streamed through registers k-slice by k-slice
// (the next slice's ldmatrix overlaps the current slice's MMAs).
template <bool kTransposedA = false, bool kTransposedB = false, typename TiledMma, typename Acc, typename SA,
          typename SB>
__device__ __forceinline__ void gemm_smem_smem(TiledMma tiled_mma, Acc& acc, const SA& sA, const SB& sB, int tid) {
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor rA = thr_mma.partition_fragment_A(sA);
  Tensor rB = thr_mma.partition_fragment_B(sB);
  auto copy_A = make_tiled_copy_A(LdsmAtom<kTransposedA, typename SA::value_type>{}, tiled_mma);
  auto copy_B = make_tiled_copy_B(LdsmAtom<kTransposedB, typename SB::value_type>{}, tiled_mma);
  auto thr_A = copy_A.get_thread_slice(tid);
  auto thr_B = copy_B.get_thread_slice(tid);
  Tensor sA_part = thr_A.partition_S(sA);
  Tensor sB_part = thr_B.partition_S(sB);
  Tensor rA_view = thr_A.retile_D(rA);
  Tensor rB_view = thr_B.retile_D(rB);
  cute::copy(copy_A, sA_part(_, _, _0{}), rA_view(_, _, _0{}));
  cute::copy(copy_B, sB_part(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      cute::copy(copy_A, sA_part(_, _, k + 1), rA_view(_, _, k + 1));
      cute::copy(copy_B, sB_part(_, _, k + 1), rB_view(_, _, k + 1));
    }
    cute::gemm(tiled_mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A * B^T with A already in registers (MMA A layout) and B in shared memory: read with plain ldmatrix
// when kTransposedB is false (B stored [n, k], e.g. a key tile), with ldmatrix.trans when true (B is the
// transposed view of a tile stored [k, n], e.g. the Y tile in the gradient products).
template <bool kTransposedB, typename TiledMma, typename Acc, typename RA, typename SB>
__device__ __forceinline__ void gemm_regs_smem(TiledMma tiled_mma, Acc& acc, const RA& rA, const SB& sB, int tid) {
  using Atom = LdsmAtom<kTransposedB, typename SB::value_type>;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor rB = thr_mma.partition_fragment_B(sB);
  auto copy_B = make_tiled_copy_B(Atom{}, tiled_mma);
  auto thr_B = copy_B.get_thread_slice(tid);
  Tensor sB_part = thr_B.partition_S(sB);
  Tensor rB_view = thr_B.retile_D(rB);
  cute::copy(copy_B, sB_part(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) cute::copy(copy_B, sB_part(_, _, k + 1), rB_view(_, _, k + 1));
    cute::gemm(tiled_mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// Register fragment of an A operand held in shared memory, for kernels that keep it in registers.
template <typename TiledMma, typename SA>
__device__ __forceinline__ auto operand_a_fragment(TiledMma tiled_mma, const SA& sA, int tid) {
  return tiled_mma.get_thread_slice(tid).partition_fragment_A(sA);
}

template <typename TiledMma, typename RA, typename SA>
__device__ __forceinline__ void load_operand_a(TiledMma tiled_mma, RA& rA, const SA& sA, int tid) {
  auto copy_A = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, typename SA::value_type>{}, tiled_mma);
  auto thr_A = copy_A.get_thread_slice(tid);
  Tensor rA_view = thr_A.retile_D(rA);
  cute::copy(copy_A, thr_A.partition_S(sA), rA_view);
}

// MMA accumulator layouts viewed as (rows, cols), so a thread can loop over "its rows" and "its columns":
//   SM80 16x8:          ((2 cols, 2 rows), MMA_M, MMA_N)          -> ((2, MMA_M), (2, MMA_N))
//   SM90 64xN (wgmma):  ((2 cols, 2 rows, N/8), MMA_M, MMA_N)     -> ((2, MMA_M), (2, N/8, MMA_N))
// In both, the 4 threads of a quad hold the same rows.
template <typename Layout>
__device__ __forceinline__ auto acc_as_rows_cols(Layout acc) {
  if constexpr (decltype(rank<0>(acc))::value == 3)
    return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                       make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
  else
    return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<2>(acc)));
}

// The same accumulator, converted to the element type, viewed as the A operand of a following MMA:
// ((2, 2), MMA_M, MMA_N) -> ((2, 2, 2), MMA_M, MMA_N / 2) for m16n8k16.
template <typename Layout>
__device__ __forceinline__ auto acc_as_operand_a(Layout acc) {
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

template <typename To, typename Fragment>
__device__ __forceinline__ auto convert_fragment(const Fragment& f) {
  Tensor out = make_tensor<To>(f.layout());
  CUTE_UNROLL
  for (int i = 0; i < size(f); ++i) out(i) = static_cast<To>(f(i));
  return out;
}

}  // namespace cuda
}  // namespace streamkl

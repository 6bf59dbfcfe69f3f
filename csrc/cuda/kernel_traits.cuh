// Compile-time shape of the Ampere-path (SM80 mma.sync, runs on SM80+) attention-KL kernels: tile sizes,
// the tensor-core MMA, shared-memory layouts and copy atoms. Torch-free.
//
// Every kernel is a "score-tile stream": a CTA owns kBlockM rows of X (queries, or keys in the dK kernel)
// for the student and the teacher, and streams over tiles of kBlockN rows of Y (keys, or queries),
// computing X_s Y_s^T and X_t Y_t^T on tensor cores. Warps split the kBlockM rows.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace streamkl {
namespace cuda {

using namespace cute;

// The gmem -> smem copy of a row-major tile: 16-byte cp.async per thread (8 elements), kThreadsPerRow threads
// across a row's swizzle atom.
template <typename Element, int kNThreads, int kThreadsPerRow>
using RowTileCopy = decltype(make_tiled_copy(
    Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
    cute::Layout<Shape<Int<kNThreads / kThreadsPerRow>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>{},
    cute::Layout<Shape<_1, _8>>{}));

// Shared-memory tile [kRows, kDim] of Element, swizzled so that ldmatrix reads are bank-conflict free,
// with the gmem->smem copy (16-byte cp.async per thread) that fills it.
template <typename Element, int kRows, int kDim, int kNThreads>
struct SmemTile {
  static_assert(kDim % 32 == 0, "head dims must be multiples of 32");
  static constexpr int kBlockK = kDim % 64 == 0 ? 64 : 32;  // columns of one swizzle atom
  static constexpr int kSwizzleBits = kBlockK == 32 ? 2 : 3;
  using LayoutAtom = decltype(composition(Swizzle<kSwizzleBits, 3, 3>{},
                                          Layout<Shape<_8, Int<kBlockK>>, Stride<Int<kBlockK>, _1>>{}));
  using Layout = decltype(tile_to_shape(LayoutAtom{}, Shape<Int<kRows>, Int<kDim>>{}));
  // The same memory seen as [kDim, kRows]: the B operand of (scores x Y) products, read with ldmatrix.trans.
  using LayoutTransposed =
      decltype(composition(Layout{}, make_layout(Shape<Int<kDim>, Int<kRows>>{}, GenRowMajor{})));
  static constexpr int kElements = kRows * kDim;

  static constexpr int kThreadsPerRow = kBlockK / 8;  // 8 elements (16 bytes) per thread per copy
  static_assert(kNThreads % kThreadsPerRow == 0, "");
  using GmemCopy = RowTileCopy<Element, kNThreads, kThreadsPerRow>;
};

template <typename Element_, int kDimS_, int kDimT_, int kBlockM_, int kBlockN_, int kNWarps_, bool kXInRegisters_ = false,
          bool kFusedDq_ = false, int kRowStats_ = 4, bool kAggregatedTeacher_ = false>
struct KernelTraits {
  using Element = Element_;  // cutlass::bfloat16_t or cutlass::half_t
  static constexpr int kDimS = kDimS_, kDimT = kDimT_;
  static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_, kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  // Keep the X fragments in registers for the whole stream (loaded from shared memory once) instead of
  // re-reading them with ldmatrix for every Y tile: halves the shared-memory traffic of the score products.
  static constexpr bool kXInRegisters = kXInRegisters_;
  // Backward dK kernel that also produces dQ (student only): the dS^T tile goes through shared memory and
  // dQ += dS K is added into an fp32 workspace with atomics, so the score tiles are computed once.
  static constexpr bool kFusedDq = kFusedDq_;
  // Head-aggregated teacher (aggregated_teacher.cuh): each Y tile meets r teacher heads, each with its own X block,
  // so the teacher's X block is streamed with its Y tile (one per stage) instead of loaded once.
  static constexpr bool kAggregatedTeacher = kAggregatedTeacher_;
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole 16-row MMA slabs");
  static_assert(!(kAggregatedTeacher && (kXInRegisters || kFusedDq)), "the aggregated stream reads X from shared memory");

  using MmaAtom = MMA_Atom<std::conditional_t<std::is_same<Element, cutlass::half_t>::value,
                                              SM80_16x8x16_F32F16F16F32_TN, SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>, Tile<Int<16 * kNWarps>, _16, _16>>;

  // X tiles (owned by the CTA) and Y tiles (streamed, two stages) for each side.
  using XTileS = SmemTile<Element, kBlockM, kDimS, kNThreads>;
  using XTileT = SmemTile<Element, kBlockM, kDimT, kNThreads>;
  using YTileS = SmemTile<Element, kBlockN, kDimS, kNThreads>;
  using YTileT = SmemTile<Element, kBlockN, kDimT, kNThreads>;
  // Two stages (one tile in flight while the other is read). The aggregated stream measured the same with four
  // (bench/RESULTS.md, session 6), and two leave room for more CTAs per SM, which split streams fill.
  static constexpr int kStages = 2;

  // Per-Y-row statistics staged in shared memory by kernels that need them (dK kernel): 4 floats per row for
  // the KL divergences, 5 for the JSD (score_grad_rules.cuh).
  static constexpr int kRowStats = kRowStats_;

  // dS^T tile [kBlockM keys, kBlockN queries] of the fused backward.
  using DsTile = SmemTile<Element, kBlockM, kBlockN, kNThreads>;
  static constexpr int kDsElements = kFusedDq ? DsTile::kElements : 0;

  // The teacher's X block: once per CTA, or one per stage when aggregated.
  static constexpr int kXTileTResident = kAggregatedTeacher ? 0 : XTileT::kElements;
  static constexpr int kXTileTPerStage = kAggregatedTeacher ? XTileT::kElements : 0;
  static constexpr int kSmemElements = XTileS::kElements + kXTileTResident +
                                       kStages * (YTileS::kElements + YTileT::kElements + kXTileTPerStage) +
                                       kDsElements;
  static constexpr int kSmemBytes =
      kSmemElements * int(sizeof(Element)) + kStages * kBlockN * kRowStats * int(sizeof(float));
};

}  // namespace cuda
}  // namespace streamkl

// Compile-time shape of the Hopper-path (sm_90a) attention-KL kernels: the score products run as warpgroup
// MMAs (wgmma) reading both operands from shared memory, so neither X nor Y fragments occupy registers.
// Torch-free.
//
// The forward kernel and its policy are the Ampere path's; the traits differ (shared-memory tiles in the
// canonical GMMA layout, a warpgroup TiledMma, three Y stages) and so does the main loop, which the kernel
// picks by kWarpgroupMma (score_stream_warpgroup.cuh). See kernel_traits.cuh.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include "kernel_traits.cuh"

namespace streamkl {
namespace cuda {

using namespace cute;

// Shared-memory tile [kRows, kDim] in the K-major 128-byte-swizzle layout that wgmma reads through a
// descriptor, filled with 16-byte cp.async per thread (8 contiguous elements stay contiguous under the
// swizzle, which permutes 16-byte chunks).
template <typename Element, int kRows, int kDim, int kNThreads>
struct GmmaSmemTile {
  static_assert(kDim % 64 == 0, "the Hopper path takes head dims that are multiples of 64");
  using Layout = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kRows>, Int<kDim>>{}));
  // The same memory seen as [kDim, kRows]: the MN-major B operand of a (score gradients x Y) product.
  using LayoutTransposed =
      decltype(composition(Layout{}, make_layout(Shape<Int<kDim>, Int<kRows>>{}, GenRowMajor{})));
  static constexpr int kElements = kRows * kDim;

  using GmemCopy = RowTileCopy<Element, kNThreads, /*kThreadsPerRow=*/8>;  // 64 columns of a swizzle atom
};

// Two warpgroups of 64 query rows each (kBlockM = 128), key tiles of kBlockN = 64: each warpgroup holds the
// accumulators of two key tiles at once (score_stream_warpgroup.cuh), 2 x 2 x 32 registers per thread.
template <typename Element_, int kDimS_, int kDimT_, int kBlockN_ = 64>
struct KernelTraitsSm90 {
  using Element = Element_;
  static constexpr int kDimS = kDimS_, kDimT = kDimT_;
  static constexpr int kBlockM = 128, kBlockN = kBlockN_, kNWarps = 8;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr bool kWarpgroupMma = true;
  static constexpr bool kXInRegisters = false;
  static constexpr bool kFusedDq = false;

  // One 64 x kBlockN x 16 wgmma per warpgroup and k-step; the K extent only has to divide both head dims.
  using TiledMma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, _64>>(), Layout<Shape<_2, _1, _1>>{}));

  using XTileS = GmmaSmemTile<Element, kBlockM, kDimS, kNThreads>;
  using XTileT = GmmaSmemTile<Element, kBlockM, kDimT, kNThreads>;
  using YTileS = GmmaSmemTile<Element, kBlockN, kDimS, kNThreads>;
  using YTileT = GmmaSmemTile<Element, kBlockN, kDimT, kNThreads>;
  static constexpr int kStages = 3;
  static constexpr int kRowStats = 4;
  static constexpr int kDsElements = 0;

  static constexpr int kSmemElements =
      XTileS::kElements + XTileT::kElements + kStages * (YTileS::kElements + YTileT::kElements);
  static constexpr int kSmemBytes =
      kSmemElements * int(sizeof(Element)) + kStages * kBlockN * kRowStats * int(sizeof(float));
};

// The warp-specialized Hopper forward (attention_kl_fwd_sm90.cuh): the same two MMA warpgroups and tiles, plus a
// producer warpgroup that moves X once and the Y tiles through kStages shared-memory stages with TMA (bulk tensor
// copies completing on mbarriers), so the MMA warps issue no loads and never wait at a CTA-wide barrier. The
// producer is the last warpgroup, so the MMA threads keep thread indices 0..255 (what the policy's accumulator
// coordinates expect).
template <typename Element_, int kDimS_, int kDimT_, int kBlockN_ = 64, int kStages_ = 4, int kGroup_ = 4,
          int kProducerRegisters_ = 24>
struct KernelTraitsSm90Tma : KernelTraitsSm90<Element_, kDimS_, kDimT_, kBlockN_> {
  using Base = KernelTraitsSm90<Element_, kDimS_, kDimT_, kBlockN_>;
  using Element = Element_;
  static constexpr int kNMmaThreads = Base::kNThreads;  // 2 warpgroups
  static constexpr int kNMmaWarps = Base::kNWarps;
  static constexpr int kNThreads = kNMmaThreads + 128;  // + the producer warpgroup
  static constexpr int kStages = kStages_;
  // Key tiles per unrolled group of the MMA loop (attention_kl_fwd_sm90.cuh): one tile per group runs its products
  // without overlap, so longer groups overlap more, at the cost of code size.
  static constexpr int kGroup = kGroup_;
  // Registers per thread after setmaxnreg: the MMA warpgroups take what the producer gives back (2 x 128 x 240 +
  // 128 x 24 <= 64K). The dK kernel's producer also loads per-row statistics and keeps 40.
  static constexpr int kProducerRegisters = kProducerRegisters_;
  static constexpr int kMmaRegisters = cute::min(240, (65536 - 128 * kProducerRegisters) / 256 / 8 * 8);
  // The dQ kernel's gradient product dQ_s += dS K_s (attention_kl_bwd_sm90.cuh): dS from registers (the score
  // accumulators, converted), K_s from the Y stage read as [D_s, kBlockN] (MN-major B), 64 x D_s per warpgroup.
  using GradMmaS = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kDimS_>, _16>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));

  static constexpr int kXBytes = (Base::XTileS::kElements + Base::XTileT::kElements) * int(sizeof(Element));
  static constexpr int kStageBytes = (Base::YTileS::kElements + Base::YTileT::kElements) * int(sizeof(Element));
  // Tiles (each a multiple of 1024 bytes, the 128-byte swizzle's period), the per-Y-row statistics of the dK kernel
  // (kRowStats floats per row and stage: the KL rules' 4), then the mbarriers.
  static constexpr int kStatsOffset = kXBytes + kStages * kStageBytes;
  static constexpr int kBarrierOffset = kStatsOffset + kStages * kBlockN_ * Base::kRowStats * int(sizeof(float));
  static constexpr int kSmemBytes = kBarrierOffset + (2 * kStages + 1) * int(sizeof(uint64_t));
};

}  // namespace cuda
}  // namespace streamkl

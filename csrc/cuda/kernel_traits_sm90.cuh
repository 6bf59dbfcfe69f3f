// Compile-time shape of the Hopper-path (sm_90a) attention-KL kernels: warp-specialized, with the score products
// as warpgroup MMAs (wgmma) reading both operands from shared memory, so neither X nor Y fragments occupy registers.
// Torch-free.
//
// kMmaWarpgroups MMA warpgroups of 64 X rows each (two, kBlockM = 128, except the head-dim-64 forward's three) and a
// producer warpgroup that moves X once and the Y tiles (kBlockN rows) through kStages shared-memory stages with TMA,
// completing on mbarriers (tma_stream_sm90.cuh). The producer is the last warpgroup, so the MMA threads keep thread
// indices 0 .. kNMmaThreads - 1 (what the accumulator coordinates of the policies expect).
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

namespace streamkl {
namespace cuda {

using namespace cute;

// Floats per stage of staged per-Y-row statistics: the dK kernel's kRowStats score-gradient inputs per row, plus (an
// aggregated teacher's, kernels that stage statistics) the base-2 LSE of the item's teacher head per row.
constexpr int staged_row_floats(int block_n, int row_stats, bool aggregated_teacher) {
  return block_n * (row_stats + (aggregated_teacher && row_stats > 0 ? 1 : 0));
}

// Shared-memory tile [kRows, kDim] in the K-major 128-byte-swizzle layout that wgmma reads through a
// descriptor (and TMA writes).
template <typename Element, int kRows, int kDim>
struct GmmaSmemTile {
  static_assert(kDim % 64 == 0, "the Hopper path takes head dims that are multiples of 64");
  using Layout = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kRows>, Int<kDim>>{}));
  // The same memory seen as [kDim, kRows]: the MN-major B operand of a (score gradients x Y) product.
  using LayoutTransposed =
      decltype(composition(Layout{}, make_layout(Shape<Int<kDim>, Int<kRows>>{}, GenRowMajor{})));
  static constexpr int kElements = kRows * kDim;
};

// kBlockN: Y rows per tile (64: the forward's MMA warpgroups hold the accumulators of two tiles at once);
// kGroup: Y tiles per unrolled group of the forward's MMA loop (attention_kl_fwd_sm90.cuh; one tile per group runs
// its products without overlap, and 8 measured 20x slower at D=128 than 4); kProducerRegisters: registers the
// producer warpgroup keeps after setmaxnreg (the dK kernel's producer also loads per-row statistics and keeps 40);
// kRowStats: see below; kAggregatedTeacher: the stream of a head-aggregated teacher (aggregated_teacher_sm90.cuh),
// whose teacher X block changes with every item, so each stage holds one next to the Y tiles.
template <typename Element_, int kDimS_, int kDimT_, int kBlockN_ = 64, int kStages_ = 4, int kGroup_ = 4,
          int kProducerRegisters_ = 24, int kRowStats_ = 4, bool kAggregatedTeacher_ = false, int kMmaWarpgroups_ = 2>
struct KernelTraitsSm90 {
  static constexpr int kMmaWarpgroups = kMmaWarpgroups_;  // of 64 X rows each
  using Element = Element_;
  static constexpr int kDimS = kDimS_, kDimT = kDimT_;
  static constexpr int kBlockM = 64 * kMmaWarpgroups, kBlockN = kBlockN_;
  static constexpr int kNWarps = 4 * kMmaWarpgroups;  // MMA warps (the policies' thread-row arithmetic counts these)
  static constexpr int kNMmaThreads = kNWarps * 32, kNMmaWarps = kNWarps;
  static constexpr int kNThreads = kNMmaThreads + 128;  // + the producer warpgroup
  static constexpr int kStages = kStages_, kGroup = kGroup_;
  // Registers per thread after setmaxnreg: the MMA warpgroups take what the producer gives back (2 x 128 x 240 +
  // 128 x 24 <= 64K). ptxas still compiles the MMA role within the launch bound's share (168 registers with two MMA
  // warpgroups, 128 with three).
  static constexpr int kProducerRegisters = kProducerRegisters_;
  static constexpr int kMmaRegisters = cute::min(240, (65536 - 128 * kProducerRegisters) / kNMmaThreads / 8 * 8);

  // One 64 x kBlockN x 16 wgmma per warpgroup and k-step; the K extent only has to divide both head dims.
  using TiledMma = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, _64>>(),
                                           Layout<Shape<Int<kMmaWarpgroups>, _1, _1>>{}));
  // The gradient kernels' product dQ_s += dS K_s / dK_s += dS^T Q_s (attention_kl_bwd_sm90.cuh): dS from registers
  // (the score accumulators, converted), Y_s from its stage read as [D_s, kBlockN] (MN-major B), 64 x D_s per
  // warpgroup.
  using GradMmaS = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kDimS>, _16>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));

  using XTileS = GmmaSmemTile<Element, kBlockM, kDimS>;
  using XTileT = GmmaSmemTile<Element, kBlockM, kDimT>;
  using YTileS = GmmaSmemTile<Element, kBlockN, kDimS>;
  using YTileT = GmmaSmemTile<Element, kBlockN, kDimT>;
  // Floats per staged Y row of the dK kernel: the score-gradient rule's (score_grad_rules.cuh; 4 for the KL, 5 for
  // the JSD).
  static constexpr int kRowStats = kRowStats_;
  static constexpr bool kAggregatedTeacher = kAggregatedTeacher_;

  // X of both sides once (an aggregated teacher's X block travels in the stages instead), Y of both sides per stage.
  static constexpr int kXBytes = (XTileS::kElements + (kAggregatedTeacher ? 0 : XTileT::kElements)) * int(sizeof(Element));
  static constexpr int kTeacherStageBytes =
      (YTileT::kElements + (kAggregatedTeacher ? XTileT::kElements : 0)) * int(sizeof(Element));
  static constexpr int kStageBytes = YTileS::kElements * int(sizeof(Element)) + kTeacherStageBytes;
  // Floats per stage: the dK kernel's per-Y-row statistics, then (aggregated teacher, kernels that stage statistics:
  // the dK kernel) the base-2 LSEs of the item's teacher head by Y row (aggregated_teacher_sm90.cuh).
  static constexpr int kStageStats = staged_row_floats(kBlockN, kRowStats, kAggregatedTeacher);
  // Tiles (each a multiple of 1024 bytes, the 128-byte swizzle's period), the per-stage statistics, then the
  // mbarriers.
  static constexpr int kStatsOffset = kXBytes + kStages * kStageBytes;
  static constexpr int kBarrierOffset = kStatsOffset + kStages * kStageStats * int(sizeof(float));
  static constexpr int kSmemBytes = kBarrierOffset + (2 * kStages + 1) * int(sizeof(uint64_t));
  // The fused backward's dS and dQ tiles (FusedGradTraitsSm90); none here.
  static constexpr bool kFusedDq = false;
  static constexpr int kDsOffset = 0, kDqOffset = 0;
};

// The fused backward (fused_dq_sm90.cuh; the dK kernel with kFusedDq): the dK kernel's traits plus, after the
// barriers, a dS^T tile [kBlockM keys, kBlockN query rows] and a staging tile for the fp32 dQ tile [kBlockN query
// rows, kDimS] that the bulk reductions read. The dQ product dQ_tile = dS K_s splits the head dim over
// the two MMA warpgroups (each 64 columns: one 128-byte swizzle atom of K_s read transposed, which is why the head dim
// must be 128) and reads the dS tile transposed (MN-major A) and the key block K_s transposed (MN-major B).
template <typename Base>
struct FusedGradTraitsSm90 : Base {
  using Element = typename Base::Element;
  static_assert(Base::kBlockN == 64 && Base::kMmaWarpgroups == 2 && Base::kDimS == 128,
                "the fused backward runs 64-row query tiles against 128 keys at student head dim 128");
  static constexpr bool kFusedDq = true;
  using DsTile = GmmaSmemTile<Element, Base::kBlockM, Base::kBlockN>;
  using DqMma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<Base::kDimS / 2>, _16>, GMMA::Major::MN,
                           GMMA::Major::MN>(),
      Layout<Shape<_1, _2, _1>>{}));
  // Floats per staged dQ row: 8 of padding put the 8 rows that a warp's float2 stores cover on distinct banks, and
  // keep each row 16-byte aligned for the bulk reductions.
  static constexpr int kDqPitch = Base::kDimS + 8;
  static constexpr int kDsOffset = (Base::kSmemBytes + 1023) / 1024 * 1024;  // the swizzle's period
  static constexpr int kDqOffset = kDsOffset + DsTile::kElements * int(sizeof(Element));
  static constexpr int kSmemBytes = kDqOffset + Base::kBlockN * kDqPitch * int(sizeof(float));
  static_assert(kSmemBytes <= 227 * 1024, "the fused backward's shared memory exceeds a CTA's 227 KB");
};

// The most stages (up to 4) of an aggregated-teacher stream that fit the 227 KB of shared memory a CTA can have:
// 3 at head dims 64/128, 2 at 128/128.
template <typename Element, int kDimS, int kDimT, int kRowStats, int kBlockN = 64>
constexpr int aggregated_stages_sm90() {
  constexpr int kMaxSmem = 227 * 1024, kBlockM = 128;
  constexpr int x_bytes = kBlockM * kDimS * int(sizeof(Element));
  constexpr int stage_bytes = (kBlockN * (kDimS + kDimT) + kBlockM * kDimT) * int(sizeof(Element)) +
                              staged_row_floats(kBlockN, kRowStats, /*aggregated_teacher=*/true) * int(sizeof(float)) +
                              2 * int(sizeof(uint64_t));
  constexpr int fit = (kMaxSmem - x_bytes - int(sizeof(uint64_t))) / stage_bytes;
  static_assert(fit >= 2, "an aggregated-teacher stream needs two stages");
  return fit < 4 ? fit : 4;
}

}  // namespace cuda
}  // namespace streamkl

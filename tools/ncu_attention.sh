#!/usr/bin/env bash
# Nsight Compute summary of the attention-KL kernels (fwd, dQ, dK) at one shape, for tuning on the device.
# Usage: bash tools/ncu_attention.sh [N] [D]   (writes $OUT/ncu_N_D.txt)
set -uo pipefail
N=${1:-8192}; D=${2:-128}; OUT=${OUT:-/tmp/streamkl_out}
mkdir -p "$OUT"
ncu --kernel-name regex:attention_kl --launch-skip 3 --launch-count 3 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section InstructionStats \
    python3 tools/kernel_times.py --n "$N" --d "$D" --iters 2 > "$OUT/ncu_${N}_${D}.txt" 2>&1
grep -E "attention_kl_(fwd|bwd)|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Block Limit (Registers|Shared)|Warp Cycles Per Issued|Executed Ipc A" "$OUT/ncu_${N}_${D}.txt" | sed -E 's/void streamkl::cuda::(attention_kl_[a-z_]+)<.*/\1/' | head -60

#!/usr/bin/env bash
# Nsight Compute stall profile of the attention-KL forward kernel on the current path (STREAMKL_CUDA_PATH),
# for tuning on the device: throughput, issue activity and where the warps stall.
# Usage: bash tools/ncu_forward.sh TAG [N] [D]   (writes $OUT/ncu_fwd_TAG.txt, prints a digest)
set -uo pipefail
TAG=$1; N=${2:-8192}; D=${3:-128}; OUT=${OUT:-/tmp/streamkl_out}
mkdir -p "$OUT"
ncu --kernel-name regex:attention_kl_fwd --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active \
    python3 tools/kernel_times.py --n "$N" --d "$D" --iters 1 > "$OUT/ncu_fwd_${TAG}.txt" 2>&1
echo "== $TAG"
grep -E "Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Issue Slots Busy|Warp Cycles Per Issued|No Eligible|pipe_tensor|pipe_xu|pipe_fma|pipe_alu" "$OUT/ncu_fwd_${TAG}.txt" | head -20
# The largest stall reasons (warps per issued instruction).
grep -E "issue_stalled_.*ratio" "$OUT/ncu_fwd_${TAG}.txt" | awk '{print $NF, $1}' | sort -rn | head -8

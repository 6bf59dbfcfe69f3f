#!/usr/bin/env bash
# Nsight Compute profile of the head-aggregated kernels (DSA shape: 1 student head D_s=64 <- 64 teacher heads D=128,
# causal) for tuning on the device: throughput, memory, occupancy and where the warps stall.
# Usage (GPU machine, repo root, extension built): bash tools/ncu_aggregate.sh [N]   (writes $OUT/ncu_agg_N.txt)
set -uo pipefail
N=${1:-4096}; OUT=${OUT:-/tmp/streamkl_out}
mkdir -p "$OUT"
ncu --kernel-name regex:"attention_kl.*" --launch-skip 0 --launch-count 6 \
    --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section LaunchStats \
    --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,lts__t_sector_hit_rate.pct \
    python3 tools/kernel_times.py --n "$N" --d 128 --d-s 64 --heads 1 --aggregate 64 --causal --iters 1 \
    > "$OUT/ncu_agg_${N}.txt" 2>&1
python3 - "$OUT/ncu_agg_${N}.txt" <<'PY'
import re, sys
kernel = None
keep = re.compile(r"Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Grid Size|Block Size|Dynamic Shared|"
                  r"Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|L2 Hit|Issue Slots Busy|"
                  r"Warp Cycles Per Issued|No Eligible|pipe_tensor|pipe_xu|hit_rate")
stalls = []
for line in open(sys.argv[1]):
    m = re.match(r"\s+void (?:streamkl::cuda::)?(\w+)<", line)  # a kernel's report header
    if m:
        if stalls:
            print("  top stalls:", ", ".join(f"{n}={v:.2f}" for v, n in sorted(stalls, reverse=True)[:6]))
        stalls = []
        print("==", m.group(1)); continue
    s = re.search(r"issue_stalled_(\w+)_per_issue_active\.ratio\s+\S+\s+([\d.]+)", line)
    if s: stalls.append((float(s.group(2)), s.group(1))); continue
    if keep.search(line): print("  ", " ".join(line.split()))
if stalls: print("  top stalls:", ", ".join(f"{n}={v:.2f}" for v, n in sorted(stalls, reverse=True)[:6]))
PY

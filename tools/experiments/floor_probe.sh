#!/usr/bin/env bash
# Where the Hopper forward's time goes. tools/ab_forward.sh builds the working tree (bf16, head dims 64/64 and 128/128,
# Hopper forward only) and three timing-only variants of it (wrong values by design) side by side: every exponential
# moved from the MUFU unit to the FMA pipe (same instruction count), every score product at half its depth (half the
# tensor-core work), and both; then each build is timed once more by tools/forward_ab.py next to SDPA-cuDNN, the SM
# clock and board power sampled every 100 ms meanwhile. If the forward's time were max(tensor, MUFU), halving the
# products would not move it; if it were their sum, it would drop by half the tensor time.
# Not yet run on a device (written in session 12, when no device time was left for it).
# Usage (device, repo root): bash tools/experiments/floor_probe.sh   (logs: $OUT/floor_probe.tgz)
set -uo pipefail
OUT=${OUT:-/tmp/streamkl_out}
LOGS=$OUT/logs && mkdir -p "$LOGS"
here=tools/experiments
mkdir -p bench/out  # ignored by git; tools/ab_forward.sh takes patch paths relative to the repo root
cat $here/timing_exp_on_fma_pipe.patch $here/timing_half_depth_products.patch > bench/out/timing_both.patch
variants=(timing_exp_on_fma_pipe timing_half_depth_products timing_both)
OUT=$LOGS AB_DISABLE="FWD BWD FWDAGG BWDAGG FWDAGG90 BWDAGG90 BWD90" bash tools/ab_forward.sh \
  $here/timing_exp_on_fma_pipe.patch $here/timing_half_depth_products.patch bench/out/timing_both.patch
for name in base "${variants[@]}"; do
  dir=$PWD; [ "$name" = base ] || dir=/tmp/ab_$name  # where tools/ab_forward.sh built it
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 100 \
    > "$LOGS/smi_$name.csv" & smi=$!
  (cd /tmp && PYTHONPATH=$dir python3 "$OLDPWD/tools/forward_ab.py" --label "$name") > "$LOGS/again_$name.log" 2>&1
  kill $smi
  grep " fwd " "$LOGS/again_$name.log"
  awk -F', ' '{gsub(/ MHz/,"",$2); gsub(/ W/,"",$3); if ($3 > 300) {n++; c+=$2; w+=$3}} END {if (n) printf "  busy samples %d: SM clock %.0f MHz, power %.0f W\n", n, c/n, w/n}' "$LOGS/smi_$name.csv"
done
tar czf "$OUT/floor_probe.tgz" -C "$OUT" logs && rm -rf "$LOGS"

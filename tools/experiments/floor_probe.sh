#!/usr/bin/env bash
# Where the Hopper forward's time goes. Builds the working tree (bf16, head dims 64/64 and 128/128, Hopper forward and
# backward only) in place, and three timing-only variants of it (wrong values by design; forward only) side by side:
# every exponential moved from the MUFU unit to the FMA pipe (same instruction count), every score product at half
# its depth (half the tensor-core work), and both. Each build is timed by tools/forward_ab.py next to SDPA-cuDNN, the
# SM clock and board power sampled every 100 ms meanwhile. If the forward's time were max(tensor, MUFU), halving the
# products would not move it; if it were their sum, it would drop by half the tensor time.
# Not yet run on a device (written in session 12, when no device time was left for it).
# Usage (device, repo root): bash tools/experiments/floor_probe.sh   (logs: $OUT/floor_probe.tgz; the in-place build
# stays for the benchmarks that follow)
set -uo pipefail
OUT=${OUT:-/tmp/streamkl_out}
LOGS=$OUT/logs && mkdir -p "$LOGS"
python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl > "$LOGS/cutlass.log" 2>&1
export STREAMKL_CUDA_ARCHS=90 STREAMKL_DISABLE_FP16=1 STREAMKL_DISABLE_HD256X256=1 STREAMKL_DISABLE_HD32X32=1 \
  STREAMKL_DISABLE_HD96X96=1 STREAMKL_DISABLE_HD64X128=1 STREAMKL_DISABLE_HD128X64=1
for family in FWD BWD FWDAGG BWDAGG FWDAGG90 BWDAGG90; do export STREAMKL_DISABLE_$family=1; done
ROOT=$PWD
start=$(date +%s)
MAX_JOBS=16 python3 setup.py build_ext --inplace > "$LOGS/build_base.log" 2>&1 || { tail -30 "$LOGS/build_base.log"; exit 1; }
echo "base build: $(( $(date +%s) - start )) s"
variants=(timing_exp_on_fma_pipe timing_half_depth_products timing_both)
for name in "${variants[@]}"; do
  dir=/tmp/ab_$name
  rm -rf "$dir" && mkdir -p "$dir" && git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$dir"
  (cd "$dir" && patch -p1 -s < "$ROOT/tools/experiments/$name.patch" && STREAMKL_DISABLE_BWD90=1 MAX_JOBS=5 \
     python3 setup.py build_ext --inplace > "$LOGS/build_$name.log" 2>&1 || echo "$name: build FAILED") &
done
wait
echo "variant builds: $(( $(date +%s) - start )) s"
for name in base "${variants[@]}"; do
  dir=$ROOT; [ "$name" = base ] || dir=/tmp/ab_$name
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 100 \
    > "$LOGS/smi_$name.csv" & smi=$!
  args=""; [ "$name" = base ] && args=--backward
  (cd /tmp && PYTHONPATH=$dir python3 "$ROOT/tools/forward_ab.py" --label "$name" $args) > "$LOGS/ab_$name.log" 2>&1
  kill $smi
  grep -E "BAD| fwd" "$LOGS/ab_$name.log" | grep -v "^timing.*check" 
  awk -F', ' '{gsub(/ MHz/,"",$2); gsub(/ W/,"",$3); if ($3 > 300) {n++; c+=$2; w+=$3}} END {if (n) printf "  busy samples %d: SM clock %.0f MHz, power %.0f W\n", n, c/n, w/n}' "$LOGS/smi_$name.csv"
done
tar czf "$OUT/floor_probe.tgz" -C "$OUT" logs && rm -rf "$LOGS"

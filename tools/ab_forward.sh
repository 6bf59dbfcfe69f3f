#!/usr/bin/env bash
# A/B the forward kernel on the device: builds the working tree and each variant (a patch against it) side by
# side, forward kernels only (bf16, head dims 128x128 and 64x64, sm_90), then times each with forward_ab.py.
# Usage (on the GPU machine, repo root): bash tools/ab_forward.sh [variant.patch ...]   logs under $OUT
set -uo pipefail
OUT=${OUT:-/tmp/streamkl_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl > "$OUT/cutlass.log" 2>&1
# AB_DISABLE: the kernel families left out (default: the Hopper forward, so the Ampere forward is timed; AB_DISABLE=FWD
# times the Hopper path, which the dispatch picks on sm_90).
for family in ${AB_DISABLE:-FWD90}; do export STREAMKL_DISABLE_$family=1; done
export STREAMKL_CUDA_ARCHS=90 STREAMKL_DISABLE_FP16=1 \
  STREAMKL_DISABLE_HD256X256=1 STREAMKL_DISABLE_HD32X32=1 STREAMKL_DISABLE_HD96X96=1 \
  STREAMKL_DISABLE_HD64X128=1 STREAMKL_DISABLE_HD128X64=1
ROOT=$PWD
AB_ARGS=${AB_ARGS:-}
names=(base)
dirs=("$PWD")
for patch in "$@"; do
  name=$(basename "$patch" .patch)
  dir=/tmp/ab_$name
  rm -rf "$dir" && mkdir -p "$dir" && git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$dir"
  cp -r .cutlass "$dir" 2>/dev/null
  (cd "$dir" && patch -p1 -s < "$OLDPWD/$patch") || { echo "$name: patch failed"; continue; }
  names+=("$name")
  dirs+=("$dir")
done
jobs=$(( 16 / ${#dirs[@]} ))
for i in "${!dirs[@]}"; do
  (cd "${dirs[$i]}" && MAX_JOBS=$jobs python3 setup.py build_ext --inplace > "$OUT/build_${names[$i]}.log" 2>&1 \
     || echo "${names[$i]}: build FAILED") &
done
wait
for i in "${!dirs[@]}"; do
  (cd /tmp && PYTHONPATH="${dirs[$i]}" python3 "$ROOT/tools/forward_ab.py" --label "${names[$i]}" $AB_ARGS) 2>&1 | tee "$OUT/ab_${names[$i]}.log"
done

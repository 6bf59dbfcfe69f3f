#!/usr/bin/env bash
# One device call that must end inside the device's 10-minute limit: the full sm_90 build, the fused-backward tests,
# every other CUDA test file, then compute-sanitizer memcheck/racecheck of a small fwd+bwd with the time left (each
# step cut off at the deadline). tools/device_check.sh is the longer version (Ampere path forced, full smokes, the
# linear_kl sanitizers). Usage (device, repo root): bash tools/device_validate.sh [seconds, default 570]  (logs: $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/streamkl_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build, for the scripts under tools/ too
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} STREAMKL_CUDA_ARCHS=${STREAMKL_CUDA_ARCHS:-90}
start=$(date +%s)
deadline=$(( start + ${1:-570} ))
left() { echo $(( deadline - $(date +%s) )); }
python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl > "$OUT/cutlass.log" 2>&1
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; echo "build: FAILED"; exit 1; }
echo "build: ok, $(( $(date +%s) - start )) s (archs $STREAMKL_CUDA_ARCHS)"
timeout "$(left)" python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_attention_cuda_fused.py \
  > "$OUT/pytest_fused.log" 2>&1
echo "pytest fused: $(tail -1 "$OUT/pytest_fused.log")  [t=$(( $(date +%s) - start )) s]"
others=$(ls tests/test_attention_cuda*.py tests/test_linear_cuda.py | grep -v test_attention_cuda_fused.py)
timeout "$(left)" python3 -X faulthandler -m pytest -q -p no:cacheprovider $others --maxfail=10 > "$OUT/pytest_cuda.log" 2>&1
echo "pytest other CUDA files: rc=$? $(tail -1 "$OUT/pytest_cuda.log")  [t=$(( $(date +%s) - start )) s]"
# The N=8192 sweep against cuDNN (with the hardware-floor lines), if a minute is left.
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" python3 bench/attention.py --dims 64,128 --seqlens 8192 --methods ours,sdpa_cudnn --no-compile \
    --quiet --out "$OUT" > "$OUT/bench.log" 2>&1
  echo "bench: rc=$?  [t=$(( $(date +%s) - start )) s]"; sed -n '/^summary/,$p' "$OUT/bench.log"
fi
for tool in memcheck racecheck; do
  STREAMKL_STREAM_SPLITS=3 timeout "$(left)" compute-sanitizer --tool $tool --error-exitcode 9 \
    python3 tools/cuda_smoke.py --small > "$OUT/sanitizer_$tool.log" 2>&1
  echo "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)" \
       "[t=$(( $(date +%s) - start )) s]"
done
# Long context with the capped dQ workspace, with what is left.
if [ "$(left)" -gt 75 ]; then
  timeout "$(left)" python3 bench/long_context.py --seqlens 262144,1048576 --baseline-seqlens 16384 --no-compile \
    --repeats 1 --out "$OUT" > "$OUT/long_context.log" 2>&1
  echo "long context: rc=$?  [t=$(( $(date +%s) - start )) s]"; tail -8 "$OUT/long_context.log"
fi
grep -E "^(FAILED|ERROR)|BAD|Error" "$OUT"/pytest_*.log | head -20
# One archive back (the device returns at most 8 files).
(cd "$OUT" && tar czf /tmp/validate.tgz --exclude=validate.tgz . && find . -mindepth 1 -delete && mv /tmp/validate.tgz .)

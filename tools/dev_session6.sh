# Session-6 device run: build, compute-sanitizer on the small smoke cases (with an aggregated teacher), the DSA-shape
# kernel times. Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1 MAX_JOBS=16 STREAMKL_CUDA_ARCHS=90
python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl > $OUT/cutlass.log 2>&1
s=$(date +%s); python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1; echo "build rc=$? $(( $(date +%s)-s ))s"
for tool in memcheck racecheck; do
  timeout 90 compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/cuda_smoke.py --small > $OUT/sanitizer_$tool.log 2>&1
  echo "compute-sanitizer $tool rc=$? $(grep -cE '^ok' $OUT/sanitizer_$tool.log) ok $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/sanitizer_$tool.log | tail -1)"
done
grep -E "^(BAD|ERR)" $OUT/sanitizer_*.log
timeout 60 python3 tools/kernel_times.py --n 4096 --heads 1 --aggregate 64 --d-s 64 --causal --iters 5 > $OUT/dsa_kernels.log 2>&1; cut -c1-60,90-200 $OUT/dsa_kernels.log | tail -12
timeout 60 python3 tools/cuda_smoke.py > $OUT/smoke.log 2>&1; echo "smoke rc=$? $(grep -c '^ok' $OUT/smoke.log) ok"; grep -E "^(BAD|ERR)" $OUT/smoke.log

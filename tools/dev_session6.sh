# Session-6 device run (one call): build, aggregated-teacher tests, DSA scenario benchmark, the attention + linear CUDA
# suites, compute-sanitizer on the small smoke cases (now with an aggregated teacher). Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1 MAX_JOBS=16 STREAMKL_CUDA_ARCHS=90
python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl > $OUT/cutlass.log 2>&1
s=$(date +%s); python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1; echo "build rc=$? $(( $(date +%s)-s ))s"
timeout 90 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_attention_cuda_aggregate.py > $OUT/agg.log 2>&1; echo "aggregate tests rc=$? $(tail -1 $OUT/agg.log)"
timeout 120 python3 bench/attention.py --scenario dsa --out $OUT > $OUT/dsa.log 2>&1; echo "dsa rc=$?"; sed -n '/median/,/max |KL/p' $OUT/dsa.log
timeout 150 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_attention_cuda.py tests/test_attention_cuda_features.py tests/test_attention_cuda_jsd.py tests/test_attention_cuda_paths.py tests/test_attention_cuda_varlen.py tests/test_linear_cuda.py > $OUT/cuda.log 2>&1; echo "cuda suites rc=$? $(tail -1 $OUT/cuda.log)"
grep -E "^FAILED" $OUT/cuda.log | head -5
for tool in memcheck racecheck; do
  timeout 60 compute-sanitizer --tool $tool --error-exitcode 9 python3 tools/cuda_smoke.py --small > $OUT/sanitizer_$tool.log 2>&1
  echo "compute-sanitizer $tool rc=$? $(grep -cE '^ok' $OUT/sanitizer_$tool.log) ok $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $OUT/sanitizer_$tool.log | tail -1)"
done

# Session-6 device run: build, the crash repro (first backward on the Hopper path in a fresh process), the full smoke,
# the aggregated-teacher and path tests.
set -u
export PYTHONUNBUFFERED=1 MAX_JOBS=16 STREAMKL_CUDA_ARCHS=90
python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl > $OUT/cutlass.log 2>&1
s=$(date +%s); python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1; echo "build rc=$? $(( $(date +%s)-s ))s"
tail -5 $OUT/build.log | grep -i error | cut -c1-300
timeout 120 python3 tools/repro_smoke_crash.py 2>&1 | cut -c1-300
timeout 90 python3 -u -X faulthandler tools/cuda_smoke.py > $OUT/smoke.log 2>&1; echo "smoke rc=$? $(grep -c '^ok' $OUT/smoke.log) ok"; grep -E "^(BAD|ERR)" $OUT/smoke.log | cut -c1-300
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_attention_cuda_paths.py tests/test_attention_cuda_aggregate.py > $OUT/paths.log 2>&1; echo "paths+aggregate rc=$? $(tail -1 $OUT/paths.log)"

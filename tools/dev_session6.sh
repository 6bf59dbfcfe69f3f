# Session-6 device run: build, then the full cuda_smoke (unbuffered, so a crash shows the case it was in).
set -u
export PYTHONUNBUFFERED=1 MAX_JOBS=16 STREAMKL_CUDA_ARCHS=90
python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl > $OUT/cutlass.log 2>&1
s=$(date +%s); python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1; echo "build rc=$? $(( $(date +%s)-s ))s"
timeout 90 python3 -u -X faulthandler tools/cuda_smoke.py > $OUT/smoke.log 2>&1; echo "smoke rc=$? $(grep -c '^ok' $OUT/smoke.log) ok"; grep -E "^(BAD|ERR)" $OUT/smoke.log
tail -25 $OUT/smoke.log | cut -c1-250

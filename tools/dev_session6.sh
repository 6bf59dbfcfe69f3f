# Session-6 device run: build, then which variant of the first cuda_smoke case crashes.
set -u
export PYTHONUNBUFFERED=1 MAX_JOBS=16 STREAMKL_CUDA_ARCHS=90
python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl > $OUT/cutlass.log 2>&1
s=$(date +%s); python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1; echo "build rc=$? $(( $(date +%s)-s ))s"
timeout 200 python3 tools/repro_smoke_crash.py 2>&1 | cut -c1-400

set -u
export PYTHONUNBUFFERED=1 MAX_JOBS=16 STREAMKL_CUDA_ARCHS=90
python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl > $OUT/cutlass.log 2>&1
s=$(date +%s); python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1; echo "build rc=$? $(( $(date +%s)-s ))s"
tail -3 $OUT/build.log | cut -c1-300
timeout 200 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_attention_cuda_aggregate.py -x > $OUT/agg.log 2>&1; echo "agg rc=$?"; tail -15 $OUT/agg.log | cut -c1-400
timeout 60 python3 tools/host_overhead.py > $OUT/host.log 2>&1; cat $OUT/host.log

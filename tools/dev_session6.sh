# Session-6 device run: build, aggregated-teacher tests, host overhead, DSA scenario benchmark.
set -u
export PYTHONUNBUFFERED=1 MAX_JOBS=16 STREAMKL_CUDA_ARCHS=90
python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl > $OUT/cutlass.log 2>&1
s=$(date +%s); python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1; echo "build rc=$? $(( $(date +%s)-s ))s"
timeout 120 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_attention_cuda_aggregate.py tests/test_attention_cuda_jsd.py > $OUT/agg.log 2>&1; echo "agg+jsd rc=$? $(tail -1 $OUT/agg.log)"
timeout 60 python3 tools/host_overhead.py > $OUT/host.log 2>&1; grep -v Warn $OUT/host.log | grep -v warn_once
timeout 200 python3 bench/attention.py --scenario dsa --out $OUT > $OUT/dsa.log 2>&1; echo "dsa rc=$?"; tail -12 $OUT/dsa.log

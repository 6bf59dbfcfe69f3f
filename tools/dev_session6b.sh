set -u
export PYTHONUNBUFFERED=1
timeout 100 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_attention_cuda_aggregate.py > $OUT/agg.log 2>&1; echo "agg rc=$? $(tail -1 $OUT/agg.log)"
timeout 60 python3 tools/profile_host.py > $OUT/profile.log 2>&1; echo "profile rc=$?"
timeout 380 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_attention_cuda.py tests/test_attention_cuda_features.py tests/test_attention_cuda_jsd.py tests/test_attention_cuda_paths.py tests/test_attention_cuda_varlen.py -x > $OUT/cuda.log 2>&1; echo "cuda rc=$? $(tail -1 $OUT/cuda.log)"
grep -E "^FAILED|Error" $OUT/cuda.log | head

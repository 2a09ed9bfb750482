#!/usr/bin/env bash
# The CUDA checks, in one go on a GPU machine whose python3 has torch, transformers and accelerate:
#   bash benchmarks/gpu_check.sh OUT_DIR
# 1. benchmarks/mult-4x4-gpu.yaml end to end (bf16 autocast training, decoding on the GPU): accuracy
#    and examples/s at batch 1 and 256;
# 2. the implicit model's speed with bfloat16 weights;
# 3. the tests of the paths that change on a GPU (bf16 autocast, decoding device, hooks, KD stages).
# Each part has its own time limit, so that a slow one still leaves the others' results in OUT_DIR.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
run=runs/mult-4x4-gpu
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
  nproc; } > "$out/env.txt" 2>&1

start=$(date +%s)
timeout 420 python3 -m icot.cli pipeline benchmarks/mult-4x4-gpu.yaml --out "$run" > "$out/pipeline.log" 2>&1
echo "pipeline exit $? after $(( $(date +%s) - start )) s" >> "$out/pipeline.log"
cp "$run"/results.json "$run"/results.md "$run"/accuracy_vs_speed.png "$out/" 2>/dev/null
tar czf "$out/metrics.tar.gz" "$run"/*/metrics.jsonl "$run"/*/config.yaml 2>/dev/null

timeout 45 python3 -m icot.cli eval --model "$run/implicit" --data ../shared/data/mult/4x4/valid.txt --limit 200 \
    --dtype bfloat16 --json "$out/eval-implicit-bf16.json" > /dev/null 2>> "$out/pipeline.log"

timeout 110 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_evaluation.py \
    tests/test_models_implicit.py tests/test_training_kd.py "tests/test_training_loop.py::test_bf16_mixed_precision_autocasts_the_forward_and_keeps_float32_weights" \
    > "$out/tests.log" 2>&1
echo "pytest exit $?" >> "$out/tests.log"

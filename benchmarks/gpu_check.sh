#!/usr/bin/env bash
# The CUDA checks, in one go on a GPU machine whose python3 has torch, transformers and accelerate:
#   bash benchmarks/gpu_check.sh RUN_DIR OUT_DIR
# RUN_DIR holds a finished 4x4 run (teacher/, nocot/, student/, emulator/, implicit/), e.g. one trained
# on CPU by benchmarks/mult-4x4.yaml, so that the GPU figures are of the same models as the CPU ones.
# 1. speed of the three models on the GPU: batch 1 on the first 200 test lines, batch 256 on all 1000,
#    float32 weights, and the implicit model again in bfloat16 -> OUT_DIR/eval.json;
# 2. the couple stage trained on the GPU (cuDNN packs the emulator LSTM's weights into one buffer),
#    stopped by SIGTERM after checkpoints, then resumed from its checkpoint -> OUT_DIR/couple.log;
# 3. the tests of the paths that differ on a GPU -> OUT_DIR/tests.log.
# Each part has its own time limit, so that a slow one still leaves the others' results.
set -u
run=${1:?usage: gpu_check.sh RUN_DIR OUT_DIR}
out=${2:?usage: gpu_check.sh RUN_DIR OUT_DIR}
test_file=../shared/data/mult/4x4/valid.txt
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
  nproc; } > "$out/env.txt" 2>&1

timeout 120 python3 - "$run" "$test_file" "$out/eval.json" > "$out/eval.log" 2>&1 <<'PY'
import json, sys
from icot.data import read_examples
from icot.evaluation import evaluate, load_predictor
run, test_file, path = sys.argv[1:]
examples = read_examples(test_file, allow_empty_cot=True)
rows = []
for stage, dtype in (("nocot", "float32"), ("teacher", "float32"), ("implicit", "float32"), ("implicit", "bfloat16")):
    predictor = load_predictor(f"{run}/{stage}", device="cuda", dtype=dtype)
    for batch_size, limit in ((1, 200), (256, 0)):
        r = evaluate(predictor, examples, batch_size=batch_size, limit=limit, progress=False)
        rows.append({"model": stage, "dtype": dtype, **r})
        print(json.dumps(rows[-1]), flush=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
PY

work=/tmp/gpu-couple
python3 -m icot.cli data mult --digits 4 --count 20000 --seed 3 --out $work/train.txt --exclude $test_file > /dev/null
python3 -m icot.cli data mult --digits 4 --count 200 --seed 4 --out $work/valid.txt --exclude $test_file \
    --exclude $work/train.txt > /dev/null
couple=(train couple --config "$run/implicit/config.yaml" --student "$run/student" --emulator "$run/emulator"
        --out $work/implicit --data.train $work/train.txt --data.valid $work/valid.txt --couple.max_steps 5000
        --couple.save_every 20 --couple.eval_every 0 --couple.max_minutes 0 --couple.mixed_precision bf16
        --couple.epochs 100 --couple.log_every 10)
{ timeout -s TERM 35 python3 -m icot.cli "${couple[@]}"; echo "first run exit $?"
  timeout -s TERM 25 python3 -m icot.cli "${couple[@]}" --resume; echo "resumed run exit $?"
  grep -c '"event": "train"' $work/implicit/metrics.jsonl; tail -n 2 $work/implicit/metrics.jsonl; } > "$out/couple.log" 2>&1

timeout 110 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_evaluation.py tests/test_models_implicit.py \
    tests/test_models_hooks.py tests/test_training_kd.py tests/test_training_loop.py tests/test_training_resume.py \
    > "$out/tests.log" 2>&1
echo "pytest exit $?" >> "$out/tests.log"

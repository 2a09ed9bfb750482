#!/usr/bin/env bash
# The papers' runs that need a GPU, in one go on a device machine whose python3 has torch, transformers and
# accelerate (issue 12 item 5, issue 13 item 4):
#   bash benchmarks/gpu_paper.sh OUT_DIR [FLAG VALUE ...]
# 1. ICoT-SI, Bai et al.'s 4x4 recipe exactly (benchmarks/gpu-si-4x4-paper.yaml), its stepwise stage capped at
#    SI_MINUTES of wall time (default 4.5): the whole recipe where the GPU is fast enough, else its curve so far
#    and the measured steps/s, from which the next session sizes the rest (the same command continues it);
# 2. ICoT-KD at GPT-2 Small's shape (benchmarks/gpu-kd-4x4-12l.yaml), every stage capped by its max_minutes.
# Each part has its own time limit, so a slow one still leaves the others' results; everything worth keeping
# (records, configs, results.md/json, plots; no weights) is copied to OUT_DIR as it is produced. Extra flags
# go to both pipelines (a CPU smoke test passes tiny shapes and budgets; PYTHON picks the interpreter).
#
# The device image lacks jsonargparse and has transformers 5.17 (icot needs >= 5.23): they travel as wheels.
# Here, once (PyPI):  make gpu-wheels        (writes .whl/, about 18 MB, kept out of git)
# Then one device call, carrying .whl (a 4x4 data set is generated there: no weights travel):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site && bash benchmarks/gpu_paper.sh $OUT/gpu
set -u
out=${1:?usage: gpu_paper.sh OUT_DIR [FLAG VALUE ...]}
shift
work=${WORK:-/tmp/icot-gpu}
py=${PYTHON:-python3}
mkdir -p "$out" "$work"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  $py -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
  nproc; git rev-parse HEAD 2>/dev/null; } > "$out/env.txt" 2>&1

keep() {  # keep() RUN_DIR DEST: what a run leaves that is worth committing
    mkdir -p "$2"
    cp "$1"/results.* "$1"/*.png "$2"/ 2>/dev/null
    for stage in "$1"/*/; do
        name=$(basename "$stage")
        [ -f "$stage/metrics.jsonl" ] && cp "$stage/metrics.jsonl" "$2/$name-metrics.jsonl"
        [ -f "$stage/config.yaml" ] && cp "$stage/config.yaml" "$2/$name-config.yaml"
    done
}

si_minutes=${SI_MINUTES:-4.5}
start=$(date +%s)
timeout -s TERM $(( ${si_minutes%.*} * 60 + 150 )) $py -m icot.cli pipeline benchmarks/gpu-si-4x4-paper.yaml \
    --out "$work/si" --methods '[icot-si]' --stepwise.max_minutes "$si_minutes" "$@" > "$out/si.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" >> "$out/si.log"
keep "$work/si" "$out/si-4x4-paper"

start=$(date +%s)
timeout -s TERM ${KD_SECONDS:-300} $py -m icot.cli pipeline benchmarks/gpu-kd-4x4-12l.yaml \
    --out "$work/kd" "$@" > "$out/kd.log" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" >> "$out/kd.log"
keep "$work/kd" "$out/kd-4x4-12l"

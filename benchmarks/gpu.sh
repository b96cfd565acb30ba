#!/usr/bin/env bash
# Every device measurement of issues 13 and 14, as one script for the lent machine (one H100/H200, 16 cores,
# PyTorch with CUDA but no DeepSpeed, no network). Prepare here, once (both folders are ignored by git):
#   echo /.whl/ >> .git/info/exclude; mkdir -p .whl
#   .venv/bin/pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl           # ~20 s
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 hjson pydantic pydantic_core annotated_types typing_inspection zstandard \
#     orjson jsonlines gigatoken awkward awkward-cpp fastokens          # the versions .venv has (pip show)
#   .venv/bin/python benchmarks/shards.py --copies 1 --skip-neox     # makes benchmarks/.work/mini-pile-x1 (19 MB)
# then one call of the device tool's run, carrying both (~21 + 19 MB, under the 64 MiB limit):
#   run(command="bash benchmarks/gpu.sh", carry=[".whl", "benchmarks/.work/mini-pile-x1"], timeout_s=600)
# Each section has its own time limit and a failed one does not stop the next; everything printed is also kept in
# $OUT/gpu.log. Sections:
# 1. the GPU tests (pytest -m gpu: bf16/fp16 30 steps, bf16 resume, chunked loss on CUDA)
# 2. Pythia-1B as shipped but bf16, one GPU, beside the plain loop: tokens/s, MFU, peak memory, data wait
# 3. the 20B's width (4 layers, TP = PP = 1, micro 4 x 2,048): without and with activation checkpointing, and
#    plan's memory estimate for each
# 4. build-shards on ~10 GB (mini-Pile x 115) with 16 and 8 workers: GB/s of text, peak RSS, where the time went
set -uo pipefail
LOG="${OUT:-/tmp}/gpu.log"
exec > >(tee "$LOG") 2>&1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" || exit 1

section() {  # section SECONDS TITLE COMMAND...: run with a time limit; say how it ended, go on either way
  local limit=$1 title=$2 start=$SECONDS
  shift 2
  echo "== $title"
  timeout "$limit" "$@"
  echo "-- $title: exit $? after $((SECONDS - start)) s (limit $limit)"
}

section 100 "1. GPU tests" python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_gpu.py

section 170 "2. Pythia-1B, bf16, micro 8 x 2,048, defaults (compile on with CUDA), beside the plain loop" \
  python3 benchmarks/train.py --config configs/pythia-1B.yml --micro 8 --seq 2048 --steps 14 --warmup 4 --rounds 2 \
  --bf16

TWENTY=(--config configs/20B.yml --micro 4 --seq 2048 --steps 8 --warmup 3 --rounds 1 --bf16 --only-ours
  --set num_layers=4 --set model_parallel_size=1 --set pipe_parallel_size=1)
PLAN=(--config configs/20B.yml --gpus 1 --json --set num_layers=4 --set model_parallel_size=1
  --set pipe_parallel_size=1 --set train_micro_batch_size_per_gpu=4 --set gradient_accumulation_steps=1
  --set "zero_optimization={stage: 0}" --set "fp16={enabled: false}" --set "bf16={enabled: true}")
for ckpt in false true; do
  flag=()
  [ $ckpt = true ] && flag=(--checkpoint-activations)
  section 80 "3. the 20B's width, checkpoint_activations=$ckpt" python3 benchmarks/train.py "${TWENTY[@]}" "${flag[@]}"
  python3 -m cli plan "${PLAN[@]}" --set checkpoint_activations=$ckpt | python3 -c \
    "import json,sys; print('plan memory per GPU, GiB:', round(json.load(sys.stdin)['memory_gib']['total'], 2))"
done

for w in 16 8; do
  section 70 "4. build-shards, ~10 GB, --workers $w" python3 benchmarks/shards.py --only-ours --copies 115 \
    --workers $w --corpus benchmarks/.work/mini-pile-x1
done
date -u

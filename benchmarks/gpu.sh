#!/usr/bin/env bash
# Every device measurement of issues 13 and 14, as one script for the lent machine (one H100/H200, 16 cores,
# PyTorch with CUDA but no DeepSpeed, no network). Run from the repository root with the wheels in .whl/:
#   pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl     (here; builds in ~20 s)
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps -d .whl \
#     hjson pydantic pydantic_core annotated_types typing_inspection zstandard orjson jsonlines gigatoken \
#     awkward awkward-cpp fastokens xxhash numba llvmlite
# and the run tool's carry of .whl; budget ~12 minutes (STEPS below trims it). Sections:
# 1. the GPU tests (pytest -m gpu: bf16/fp16 30 steps, bf16 resume, chunked loss on CUDA)
# 2. Pythia-1B as shipped but bf16, one GPU, beside the plain loop: tokens/s, MFU, peak memory, data wait
# 3. the 20B's width (4 layers, TP = PP = 1, micro 4 x 2,048): without and with activation checkpointing, and
#    plan's memory estimate for each
# 4. build-shards on ~10 GB (mini-Pile x 115) with 16 and 8 workers, against the one-process ceiling
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
nproc

echo "== 1. GPU tests"
python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -15

echo "== 2. Pythia-1B, bf16, micro 8 x 2,048, defaults (compile on with CUDA), beside the plain loop"
python3 benchmarks/train.py --config configs/pythia-1B.yml --micro 8 --seq 2048 --steps 16 --warmup 4 --rounds 2 --bf16

TWENTY="--config configs/20B.yml --micro 4 --seq 2048 --steps 10 --warmup 4 --rounds 1 --bf16 --only-ours
  --set num_layers=4 --set model_parallel_size=1 --set pipe_parallel_size=1"
PLAN="--config configs/20B.yml --gpus 1 --json --set num_layers=4 --set model_parallel_size=1
  --set pipe_parallel_size=1 --set train_micro_batch_size_per_gpu=4 --set gradient_accumulation_steps=1
  --set zero_optimization={stage: 0} --set fp16={enabled: false} --set bf16={enabled: true}"
for ckpt in false true; do
  echo "== 3. the 20B's width, checkpoint_activations=$ckpt"
  flag=$([ $ckpt = true ] && echo --checkpoint-activations || true)
  python3 benchmarks/train.py $TWENTY $flag
  python3 -m cli plan $PLAN --set checkpoint_activations=$ckpt | python3 -c \
    "import json,sys; print('plan memory per GPU, GiB:', round(json.load(sys.stdin)['memory_gib']['total'], 2))"
done

echo "== 4. build-shards, ~10 GB, 16 and 8 workers"
for w in 16 8; do
  python3 benchmarks/shards.py --copies 115 --workers $w --skip-neox --corpus "${CORPUS:-benchmarks/.work/mini-pile-x1}"
done

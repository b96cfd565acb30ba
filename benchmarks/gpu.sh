#!/usr/bin/env bash
# The trainer's GPU checks, as one script for a one-GPU machine with PyTorch but without DeepSpeed:
#   .whl/  wheels of deepspeed (pip wheel --no-deps --no-build-isolation deepspeed==0.19.8) and what it and
#          pile_tools need beyond that machine's packages (hjson, pydantic, pydantic_core, annotated_types,
#          typing_inspection, zstandard, orjson), built for its Python.
# 1. bf16 MFU of Pythia-1B (micro-batch 8 x 2,048 tokens, one GPU) beside a plain PyTorch loop (bf16 autocast).
# 2. fp16 with dynamic loss scaling, which DeepSpeed refuses on CPU: Pythia-70M for 40 steps, then resumed.
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"

echo "== 1. bf16 MFU, Pythia-1B"
python3 benchmarks/train.py --config configs/pythia-1B.yml --micro 8 --seq 2048 --steps 16 --warmup 4 --rounds 2 --bf16

echo "== 2. fp16, dynamic loss scale, Pythia-70M: 40 steps, and 20 + --load + 20"
S="--config configs/pythia-70M.yml --data benchmarks/.work/train/shards --set train_iters=40 --set log_interval=10
   --set eval_interval=20 --set eval_iters=2 --set save_interval=20 --set seq_length=512 --set zero_stage=1"
rm -rf /tmp/fp16 /tmp/fp16b
python3 -m cli train $S --save /tmp/fp16
python3 -m cli train $S --save /tmp/fp16b --set exit_interval=20
python3 -m cli train $S --save /tmp/fp16b --load /tmp/fp16b
python3 - <<'PY'
import json
rows = lambda p: [(r["step"], r["loss"], r["loss_scale"]) for r in map(json.loads, open(p)) if r["kind"] == "train"]
a, b = rows("/tmp/fp16/metrics.jsonl"), rows("/tmp/fp16b/metrics.jsonl")
print("fp16 loss scales seen:", sorted({s for _, _, s in a}))
print("continuous vs resumed, same losses:", a == b, "max |diff|:", max(abs(x[1] - y[1]) for x, y in zip(a, b)))
PY

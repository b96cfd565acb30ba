#!/usr/bin/env bash
# bf16 MFU of Pythia-1B on one GPU with compile=true (regional torch.compile of the blocks), micro-batch 8 and 16.
# Same set-up as benchmarks/gpu.sh (wheels in .whl/ for a machine without DeepSpeed).
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for micro in 8 16; do
  echo "== Pythia-1B bf16 compile=true micro $micro"
  python3 benchmarks/train.py --config configs/pythia-1B.yml --micro $micro --seq 2048 --steps 14 --warmup 4 \
    --rounds 1 --bf16 --only-ours --set compile=true
done

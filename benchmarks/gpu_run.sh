#!/usr/bin/env bash
# On the device machine (an H100/H200 with the workplace's CUDA image): install the carried wheels, print the
# environment, run benchmarks/gpu.py within the device-time budget. Results land in $OUT (gpu.jsonl, gpu.log).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, diffusers, peft, bitsandbytes, transformers; print('torch', torch.__version__, 'diffusers',
diffusers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'transformers',
transformers.__version__)" | tee -a "$OUT/env.txt"
# Starts no configuration after 450 s, so the run ends well inside the 600 s command limit.
timeout 570 python3 benchmarks/gpu.py --out "$OUT/gpu.jsonl" --budget-s "${BUDGET_S:-450}" --compile "$@" 2>&1 \
    | tee "$OUT/gpu.log"

#!/usr/bin/env bash
# One device call for the GPU figures of several issues, most important first, each under its
# own time limit so a slow one cannot starve the rest; results land in $OUT as they finish.
#   1. device JPEG decode: no non-finite rows and embeddings equal to CPU decode (issue 13)
#   2. one MMRet-CLIP training step, ViT-B-16 bf16 at the paper's per-device batch (issue 11)
#   3. the transformers generation backend on a Llama-3-8B-shaped model (issue 9)
# The device's python3 has torch/transformers/lightning; wheels in .whl (git-ignored) carry
# the rest (polars, open_clip, tenacity, universal-pathlib).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 130 bash benchmarks/gpu_suite.sh --sections embedding,paper_profile --images 4000 \
    --cpu-decode-rows 0 --reserve-s 0 --budget-s 100; echo "gpu_suite rc=$?"
timeout 60 python3 -m benchmarks.gpu_training --batch 256 --steps 5 --warmup 2; \
    echo "gpu_training rc=$?"
cp benchmarks/results/gpu_training.json "$OUT/" 2>/dev/null || true
timeout 75 python3 -m benchmarks.gpu_generation --batch-sizes 16,64 --batches 1 \
    --new-tokens 64 --prompt-tokens 256 --budget-s 55; echo "gpu_generation rc=$?"
ls -la "$OUT"

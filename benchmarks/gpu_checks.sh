#!/usr/bin/env bash
# One device call for the GPU figures still missing, most important first, each under its own
# time limit so a slow one cannot starve the rest; results land in $OUT as they finish.
#   1. issue 13, the whole GPU suite: torch KNN 1M x 1M x 768 (pipelined transfers, a sweep of
#      larger block budgets), ViT-L-14 forward only and end to end with JPEGs decoded on the
#      device (non-finite rows and device-vs-CPU decode agreement after the side-stream fix),
#      the paper profile at 20k images (EVA02-L-14 with and without the padded MLP widths)
#      and the 20M extrapolation
#   2. with EXTRA=1: one MMRet-CLIP training step, ViT-B-16 bf16 at the paper's per-device
#      batch (issue 11), and the transformers generation backend on a Llama-3-8B-shaped model
#      (issue 9)
# The device's python3 has torch/transformers/lightning; wheels in .whl (git-ignored; fetch with
# `pip download --no-deps -d .whl polars polars-runtime-32 open_clip_torch ftfy wcwidth
# tenacity universal-pathlib pathlib-abc`) carry the rest. Run it with the device tool:
#   command "OUT=$OUT bash benchmarks/gpu_checks.sh", carry [".whl"], timeout_s 330
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 300 bash benchmarks/gpu_suite.sh --images 20000 --cpu-decode-rows 0 --reserve-s 80 \
    --budget-s 240; echo "gpu_suite rc=$?"
# Issues 11 and 9 are ended: their figures run only when asked for (EXTRA=1), so that this call
# and gpu_paper_assets.sh fit one session's 15 device-minutes with the machine's start-up.
if [ "${EXTRA:-0}" = 1 ]; then
    timeout 60 python3 -m benchmarks.gpu_training --batch 256 --steps 5 --warmup 2; \
        echo "gpu_training rc=$?"
    cp benchmarks/results/gpu_training.json "$OUT/" 2>/dev/null || true
    timeout 75 python3 -m benchmarks.gpu_generation --batch-sizes 16,64 --batches 1 \
        --new-tokens 64 --prompt-tokens 256 --budget-s 55; echo "gpu_generation rc=$?"
fi
ls -la "$OUT"

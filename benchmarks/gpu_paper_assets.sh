#!/usr/bin/env bash
# The second device call, made right after gpu_checks.sh while the machine is still held (its
# /tmp/site then has .whl's packages): adds .whl2 (Dagster, DuckDB, pydantic, SQLAlchemy, ...;
# `bash benchmarks/device_wheels.sh` fetches both sets) and runs the paper profile through the
# real Dagster assets at the paper's shapes (benchmarks/paper_profile_assets.py).
#   command "OUT=$OUT bash benchmarks/gpu_paper_assets.sh", carry [".whl2"], timeout_s 330
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
    .whl2/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/site:$PWD"
if ! python3 -c "import polars, open_clip" 2>/dev/null; then
    echo "polars/open_clip missing: the machine was given back since gpu_checks.sh; run it first"
    exit 3
fi
timeout 300 python3 -m benchmarks.paper_profile_assets --images "${IMAGES:-20000}"
echo "paper_profile_assets rc=$?"
ls -la "${OUT:-benchmarks/results}"

#!/usr/bin/env bash
# The GPU benchmark suite in one command (see benchmarks/gpu_suite.py): unbuffered output so
# progress shows as it happens; extra arguments are passed through (e.g. --check-env, --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m benchmarks.gpu_suite "$@"

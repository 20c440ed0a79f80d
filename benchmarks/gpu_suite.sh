#!/usr/bin/env bash
# The GPU benchmark suite in one command (see benchmarks/gpu_suite.py): unbuffered output so
# progress shows as it happens; extra arguments are passed through (e.g. --check-env).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_suite.py "$@"

#!/usr/bin/env bash
# Wheels for the accelerator machine (Python 3.12, x86-64, no network there), in two sets that
# each fit one call's 64 MiB carry; installed into /tmp/site, which lasts while the machine is
# held, so a second call soon after the first finds the first set there:
#   .whl   what the GPU suite needs beyond the machine's image (polars, open_clip, ...)
#   .whl2  the Dagster stack and DuckDB, for the paper profile through the real assets
# Versions are this environment's own (pip freeze), so the device runs what the tests ran.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
version() { "$PIP" freeze 2>/dev/null | grep -i "^$1==" | head -1; }
download() {
    local dest=$1; shift
    mkdir -p "$dest"
    local specs=()
    for name in "$@"; do specs+=("$(version "$name" || true)"); done
    "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$dest" "${specs[@]}"
}
grep -qxF "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
grep -qxF "/.whl2/" .git/info/exclude || echo "/.whl2/" >> .git/info/exclude
download .whl polars polars-runtime-32 open_clip_torch ftfy wcwidth tenacity universal_pathlib \
    pathlib_abc
download .whl2 dagster dagster-pipes dagster-shared duckdb pydantic pydantic_core annotated-types \
    typing-inspection SQLAlchemy alembic Mako structlog toposort watchdog docstring_parser \
    coloredlogs humanfriendly antlr4-python3-runtime grpcio grpcio-health-checking protobuf \
    tomli tomlkit python-dotenv platformdirs tzdata pytz httpx2 httpcore2 truststore
du -sh .whl .whl2

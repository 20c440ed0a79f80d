"""Shared by the benchmark scripts: where a figure came from, peak memory, and the result file.

Versions are read from package metadata rather than by importing torch, so asking for them does
not add torch's few hundred MB to the peak memory a benchmark is measuring.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_VERSIONED_PACKAGES = ("torch", "faiss-cpu", "faiss-gpu-cu12", "numpy", "polars")


def machine_info() -> dict[str, Any]:
    """Describe this machine and software stack so a figure can be read in context."""
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in _VERSIONED_PACKAGES if _version(name)},
        "gpu": _gpu_name(),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write `payload` to benchmarks/results/<name>.json and return the path.

    A payload without a "machine" entry gets `machine_info()` added, so every result file says
    which machine produced it.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    record = payload if "machine" in payload else {"machine": machine_info(), **payload}
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter for this process (Linux); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB since start or the last `reset_peak_rss`."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    # Without /proc: the lifetime peak (Linux reports KiB), which reset_peak_rss cannot clear.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now, in MiB (0 where /proc is unavailable)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024**2, 1)
    return None


def _gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return ", ".join(line.strip() for line in names.splitlines() if line.strip()) or None


REPO_ROOT = Path(__file__).resolve().parent.parent


def export_package(ref: str, into: Path) -> Path:
    """The `megapairs_assets` package as it was at git `ref`, under `into` (a baseline that a
    benchmark runs in a fresh process beside the current code)."""
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", ref, "megapairs_assets"],
        capture_output=True,
        check=True,
    ).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_json_child(command: list[str], what: str) -> dict:
    """Run a benchmark child process (no inherited PYTHONPATH, so the package it measures is
    the one its command puts first) and return the JSON object its last stdout line holds."""
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

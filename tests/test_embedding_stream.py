"""Several shards through one embedding pipeline: same vectors as one shard at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.embeddings.compute import embed_row_groups, embed_rows
from megapairs_assets.embeddings.device_input import batch_bounds
from megapairs_assets.embeddings.encoders import LoadedEncoder
from megapairs_assets.lib.step import StepResult, StepStream

CPU = torch.device("cpu")
LIMITS = ImageLimits()
DIM = 8


def _pixels(image: Image.Image) -> torch.Tensor:
    small = np.asarray(image.resize((4, 4)), dtype=np.float32) / 255.0
    return torch.from_numpy(small).permute(2, 0, 1)


def _batch_sensitive_image_vectors(pixels: torch.Tensor) -> torch.Tensor:
    # The batch's size leaks into every vector, so a batch that spanned two shards would give
    # different vectors than the same shard embedded alone.
    return pixels.flatten(1)[:, :DIM] + 0.1 * len(pixels)


def _batch_sensitive_text_vectors(texts: list[str]) -> torch.Tensor:
    lengths = torch.tensor([float(len(text)) for text in texts])
    return torch.stack([lengths + offset + len(texts) for offset in range(DIM)], dim=1)


IMAGE_ENCODER = LoadedEncoder(
    "fake:image", DIM, "image", _pixels, 4, _batch_sensitive_image_vectors
)
TEXT_ENCODER = LoadedEncoder(
    "fake:text", DIM, "text", None, None, _encode_texts=_batch_sensitive_text_vectors
)


def _shard(tmp_path: Path, name: str, count: int, broken: tuple[int, ...] = ()) -> pl.DataFrame:
    rng = np.random.default_rng(len(name) + count)
    uris, captions = [], []
    for index in range(count):
        path = tmp_path / f"{name}-{index}.jpg"
        if index in broken:
            path.write_bytes(b"not a jpeg")
        else:
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
        captions.append(None if index in broken else f"{name} picture {index}")
    return pl.DataFrame(
        {
            "image_id": [f"{name}/{index}" for index in range(count)],
            "source_uri": uris,
            "caption": captions,
        }
    )


def test_batches_never_span_two_groups() -> None:
    assert batch_bounds([5, 0, 3], 2) == [(0, 0, 2), (0, 2, 4), (0, 4, 5), (2, 5, 7), (2, 7, 8)]
    assert batch_bounds([], 4) == []


@pytest.mark.parametrize("encoder", [IMAGE_ENCODER, TEXT_ENCODER], ids=["image", "text"])
@pytest.mark.parametrize("workers", [0, 2])
def test_each_shard_gets_what_it_gets_alone(
    tmp_path: Path, encoder: LoadedEncoder, workers: int
) -> None:
    shards = [
        ("00000", _shard(tmp_path, "a", 5)),
        ("00001", _shard(tmp_path, "b", 0)),
        ("00002", _shard(tmp_path, "c", 7, broken=(5,))),
        ("00003", _shard(tmp_path, "d", 4, broken=(0, 1, 2, 3))),
    ]
    streamed = list(embed_row_groups(shards, encoder, LIMITS, 3, workers, CPU))

    assert [key for key, _ in streamed] == [key for key, _ in shards]
    for (key, rows), (_, result) in zip(shards, streamed, strict=True):
        alone = embed_rows(rows, encoder, LIMITS, 3, workers, CPU)
        assert result.ids == alone.ids, key
        assert np.array_equal(result.vectors, alone.vectors), key
        assert sorted(result.skipped) == sorted(alone.skipped), key
        assert len(result.ids) + len(result.skipped) == rows.height


def test_a_shard_is_handed_out_before_the_next_one_is_embedded(tmp_path: Path) -> None:
    shards = [(f"{i:05d}", _shard(tmp_path, f"s{i}", 4)) for i in range(3)]
    progress: list[int] = []
    stream = embed_row_groups(shards, IMAGE_ENCODER, LIMITS, 2, 0, CPU, on_progress=progress.append)
    key, first = next(stream)
    assert key == "00000" and len(first.ids) == 4
    # One batch of the next shard is in flight, the rest not yet read.
    assert sum(progress) < 12
    assert [key for key, _ in stream] == ["00001", "00002"]
    assert sum(progress) == 12


def test_each_group_gets_its_own_rows_even_when_ids_repeat(tmp_path: Path) -> None:
    # Groups are tracked per batch, not looked up by id: the same rows twice are two results.
    rows = _shard(tmp_path, "a", 3)
    results = list(embed_row_groups([("0", rows), ("1", rows)], IMAGE_ENCODER, LIMITS, 2, 0, CPU))
    assert [key for key, _ in results] == ["0", "1"]
    assert results[0][1].ids == results[1][1].ids == rows["image_id"].to_list()
    assert np.array_equal(results[0][1].vectors, results[1][1].vectors)


def test_a_step_stream_hands_out_partitions_in_its_order() -> None:
    stream = StepStream(iter([StepResult(partition="a"), StepResult(partition="b")]))
    assert stream("a").partition == "a"
    with pytest.raises(RuntimeError, match="gave partition 'b' where 'c' was asked for"):
        stream("c")
    with pytest.raises(RuntimeError, match="ended before partition 'd'"):
        stream("d")


def test_a_step_stream_runs_its_generator_to_the_end_after_the_last_partition() -> None:
    # What a generator does after its last result (the embeddings' final progress line, the
    # loader's drain) happens when the last partition is handed out, not at garbage collection.
    finished: list[str] = []

    def results() -> Iterator[StepResult]:
        yield StepResult(partition="a")
        yield StepResult(partition="b")
        finished.append("done")

    stream = StepStream(results(), ["a", "b"])
    stream("a")
    assert finished == []
    assert stream("b").partition == "b"
    assert finished == ["done"]

    def one_too_many() -> Iterator[StepResult]:
        yield StepResult(partition="a")
        yield StepResult(partition="z")

    with pytest.raises(RuntimeError, match="gave partition 'z' after the run's last, 'a'"):
        StepStream(one_too_many(), ["a"])("a")


def test_a_shard_without_its_corpus_table_fails_alone(tmp_path: Path) -> None:
    # Shards before it are embedded and handed out; the error comes when it is asked for.
    from megapairs_assets.embeddings.sources import SOURCES
    from megapairs_assets.embeddings.step import EmbeddingRun, embed_shards
    from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
    from megapairs_assets.lineage.catalog import (
        LineageCatalog,
        MaterializationRecord,
        NotMaterializedError,
        utc_now,
    )

    layout = DataLayout(tmp_path / "home")
    catalog = LineageCatalog(layout.catalog_path)
    for shard in ("00000", "00002"):
        rows = _shard(tmp_path, f"s{shard}", 3).with_columns(pl.col("image_id").alias("key"))
        write_parquet_atomic(rows, layout.corpus_images(shard))
        catalog.record(MaterializationRecord("image_corpus", shard, "r", "v", "t", utc_now(), 0))
    run = EmbeddingRun(SOURCES[0], IMAGE_ENCODER, 2, 0, CPU, torch.float32, LIMITS)
    stream = StepStream(embed_shards(["00000", "00001", "00002"], run, layout, catalog))
    assert stream("00000").row_counts["embedded"] == 3
    assert layout.shard_table(SOURCES[0].embedding_asset, "00000").exists()
    with pytest.raises(NotMaterializedError, match="image_corpus 00001: not materialized"):
        stream("00001")

"""One embedding code path: unit-norm float16 rows in input order, skips, the table on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.demo import DEMO_CORPUS_DIR
from megapairs_assets.demo.models import DEMO_CLIP_MODEL, ensure_demo_models
from megapairs_assets.embeddings.compute import (
    check_embeddings,
    embed_rows,
    read_embedding_table,
    write_embedding_table,
)
from megapairs_assets.embeddings.encoders import EncoderSpec, LoadedEncoder, load_encoder
from megapairs_assets.lib import storage

CPU = torch.device("cpu")
LIMITS = ImageLimits()
FAKE_DIM = 12


def _mean_colour_pixels(image: Image.Image) -> torch.Tensor:
    """A tiny preprocess: 4x4 thumbnail as a CHW tensor (top level, so workers can pickle it)."""
    small = np.asarray(image.resize((4, 4)), dtype=np.float32) / 255.0
    return torch.from_numpy(small).permute(2, 0, 1)


def _fake_image_vectors(pixels: torch.Tensor) -> torch.Tensor:
    # Deliberately not unit length, so normalisation is what the test observes.
    return 5.0 * pixels.flatten(1)[:, :FAKE_DIM] + 1.0


def _fake_text_vectors(texts: list[str]) -> torch.Tensor:
    lengths = torch.tensor([float(len(text)) for text in texts])
    return torch.stack([lengths + offset for offset in range(FAKE_DIM)], dim=1)


def _huge_text_vectors(texts: list[str]) -> torch.Tensor:
    # Raw outputs between 1e4 and 7e4: their squares overflow float16 (max 65504), and the
    # largest are not even representable in it, as real un-normalised model outputs can be.
    lengths = torch.tensor([float(len(text)) for text in texts])
    return torch.stack(
        [1e4 * (1.0 + 0.55 * offset) + 50.0 * lengths for offset in range(FAKE_DIM)], 1
    )


def _fake_encoder(modality: str) -> LoadedEncoder:
    if modality == "image":
        return LoadedEncoder(
            model_id="fake:image",
            dim=FAKE_DIM,
            modality="image",
            preprocess=_mean_colour_pixels,
            input_size_px=4,
            _encode_images=_fake_image_vectors,
        )
    return LoadedEncoder(
        model_id="fake:text",
        dim=FAKE_DIM,
        modality="text",
        preprocess=None,
        input_size_px=None,
        _encode_texts=_fake_text_vectors,
    )


def _corpus(tmp_path: Path, count: int) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    uris = []
    for index in range(count):
        path = tmp_path / f"{index}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    return pl.DataFrame(
        {
            "image_id": [f"img{index}" for index in range(count)],
            "source_uri": uris,
            "caption": [f"caption number {index}" for index in range(count)],
        }
    )


def _norms(vectors: np.ndarray) -> np.ndarray:
    return np.linalg.norm(vectors.astype(np.float32), axis=1)


# --- embed_rows ---------------------------------------------------------------------------


def test_images_become_unit_norm_float16_rows_in_input_order(tmp_path: Path) -> None:
    rows = _corpus(tmp_path, 7)
    progress: list[int] = []
    result = embed_rows(rows, _fake_encoder("image"), LIMITS, 3, 0, CPU, progress.append)

    assert result.ids == rows["image_id"].to_list()
    assert result.vectors.dtype == np.float16
    assert result.vectors.shape == (7, FAKE_DIM)
    np.testing.assert_allclose(_norms(result.vectors), 1.0, atol=1e-3)
    assert result.skipped == []
    assert progress == [3, 3, 1]
    assert result.items_per_s > 0


def test_unreadable_images_are_skipped_and_the_rest_is_embedded(tmp_path: Path) -> None:
    rows = _corpus(tmp_path, 5)
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    uris = rows["source_uri"].to_list()
    uris[1] = str(tmp_path / "gone.jpg")
    uris[3] = str(tmp_path / "broken.jpg")
    rows = rows.with_columns(pl.Series("source_uri", uris))

    result = embed_rows(rows, _fake_encoder("image"), LIMITS, 2, 0, CPU)

    assert result.ids == ["img0", "img2", "img4"]
    assert result.vectors.shape == (3, FAKE_DIM)
    reasons = {image_id: reason for image_id, reason, _ in result.skipped}
    assert reasons == {"img1": "missing_file", "img3": "decode_error"}


def test_worker_processes_survive_bad_images(tmp_path: Path) -> None:
    rows = _corpus(tmp_path, 9)
    uris = rows["source_uri"].to_list()
    uris[4] = str(tmp_path / "gone.jpg")
    rows = rows.with_columns(pl.Series("source_uri", uris))
    single = embed_rows(rows, _fake_encoder("image"), LIMITS, 4, 0, CPU)
    parallel = embed_rows(rows, _fake_encoder("image"), LIMITS, 4, 2, CPU)

    assert parallel.ids == single.ids == [f"img{i}" for i in range(9) if i != 4]
    assert [row[:2] for row in parallel.skipped] == [("img4", "missing_file")]
    np.testing.assert_array_equal(parallel.vectors, single.vectors)


def test_rows_without_caption_are_skipped_for_text(tmp_path: Path) -> None:
    rows = pl.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "source_uri": ["unused"] * 4,
            "caption": ["a dog", None, "   ", "a much longer caption"],
        }
    )
    progress: list[int] = []
    result = embed_rows(rows, _fake_encoder("text"), LIMITS, 8, 0, CPU, progress.append)

    assert result.ids == ["a", "d"]
    assert [(image_id, reason) for image_id, reason, _ in result.skipped] == [
        ("b", "no_caption"),
        ("c", "no_caption"),
    ]
    np.testing.assert_allclose(_norms(result.vectors), 1.0, atol=1e-3)
    assert sum(progress) == 4

    # With the corpus's caption_issue column, a skip says why the caption is missing.
    issues = [None, "bad_caption_file: b.json is not valid JSON", None, None]
    result = embed_rows(
        rows.with_columns(pl.Series("caption_issue", issues)),
        _fake_encoder("text"),
        LIMITS,
        8,
        0,
        CPU,
    )
    assert [detail for _, _, detail in result.skipped] == [
        "bad_caption_file: b.json is not valid JSON",
        "caption is null or empty",
    ]


def test_large_raw_outputs_still_give_finite_unit_rows() -> None:
    rows = pl.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "source_uri": ["unused"] * 3,
            "caption": ["x", "a longer caption", "the longest caption of the three"],
        }
    )
    encoder = LoadedEncoder(
        model_id="fake:huge",
        dim=FAKE_DIM,
        modality="text",
        preprocess=None,
        input_size_px=None,
        _encode_texts=_huge_text_vectors,
    )
    raw = _huge_text_vectors(rows["caption"].to_list()).double().numpy()
    assert raw.min() >= 1e4 and raw.max() > np.finfo(np.float16).max  # the premise holds

    result = embed_rows(rows, encoder, LIMITS, 2, 0, CPU)

    assert np.isfinite(result.vectors).all()
    np.testing.assert_allclose(_norms(result.vectors), 1.0, atol=1e-3)
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(result.vectors.astype(np.float64), expected, atol=2e-3)
    assert all(c.passed for c in check_embeddings(result.ids, result.vectors, result.ids))


def test_no_rows_give_an_empty_table_of_the_right_width(tmp_path: Path) -> None:
    rows = _corpus(tmp_path, 0)
    result = embed_rows(rows, _fake_encoder("image"), LIMITS, 4, 0, CPU)
    assert result.vectors.shape == (0, FAKE_DIM)
    write_embedding_table(tmp_path / "empty.parquet", result.ids, result.vectors, "fake:image")
    ids, vectors = read_embedding_table(tmp_path / "empty.parquet")
    assert len(ids) == 0 and vectors.shape == (0, FAKE_DIM)


def test_tiny_clip_embeds_a_demo_shard_with_workers(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    models = ensure_demo_models(tmp_path_factory.mktemp("models"))
    spec = EncoderSpec("open_clip_image", DEMO_CLIP_MODEL, str(models["clip_checkpoint"]), dim=128)
    encoder = load_encoder(spec, CPU, torch.float32)
    manifest = [json.loads(line) for line in (DEMO_CORPUS_DIR / "manifest.jsonl").open()]
    shard = [entry for entry in manifest if entry["shard"] == "00002"][:24]
    rows = pl.DataFrame(
        {
            "image_id": [entry["key"] for entry in shard],
            "source_uri": [
                f"{DEMO_CORPUS_DIR / '00002.tar'}#{entry['key']}.jpg" for entry in shard
            ],
            "caption": [entry["caption"] for entry in shard],
        }
    )
    result = embed_rows(rows, encoder, LIMITS, 8, 2, CPU)

    assert result.ids == rows["image_id"].to_list()
    assert result.vectors.shape == (24, 128)
    assert all(check.passed for check in check_embeddings(result.ids, result.vectors, result.ids))


# --- check_embeddings ---------------------------------------------------------------------


def _unit_rows(count: int, dim: int = 8) -> np.ndarray:
    values = np.random.default_rng(1).normal(size=(count, dim)).astype(np.float32)
    return (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float16)


def _by_name(outcomes: list) -> dict:
    return {check.name: check for check in outcomes}


def test_clean_float16_embeddings_pass_every_check() -> None:
    ids = ["a", "b", "c"]
    outcomes = _by_name(check_embeddings(ids, _unit_rows(3), ids))
    assert set(outcomes) == {"embeddings_finite", "embeddings_unit_norm", "embeddings_cover_inputs"}
    assert all(check.passed for check in outcomes.values())


def test_checks_name_the_offending_rows() -> None:
    vectors = _unit_rows(4)
    vectors[1, 0] = np.nan
    vectors[2] = vectors[2] * 2
    outcomes = _by_name(check_embeddings(["a", "b", "c", "d"], vectors, ["a", "b", "c", "d"]))

    assert not outcomes["embeddings_finite"].passed
    assert outcomes["embeddings_finite"].examples == ("b",)
    assert not outcomes["embeddings_unit_norm"].passed
    assert outcomes["embeddings_unit_norm"].examples[0].startswith("c ")
    assert outcomes["embeddings_cover_inputs"].passed


def test_coverage_catches_missing_extra_and_duplicate_ids() -> None:
    outcomes = _by_name(check_embeddings(["a", "a", "z"], _unit_rows(3), ["a", "b"]))
    coverage = outcomes["embeddings_cover_inputs"]
    assert not coverage.passed
    assert set(coverage.examples) == {"duplicate a (x2)", "missing b", "unexpected z"}


# --- the table on disk --------------------------------------------------------------------


def test_embedding_table_round_trips_exactly(tmp_path: Path) -> None:
    path = tmp_path / "tables" / "00000.parquet"
    ids = [f"id{i}" for i in range(5)]
    vectors = _unit_rows(5, dim=16)
    write_embedding_table(path, ids, vectors, "open_clip_image:ViT-B-32@openai")

    read_ids, read_vectors = read_embedding_table(path)
    assert read_ids.tolist() == ids
    assert read_vectors.dtype == np.float16
    np.testing.assert_array_equal(read_vectors, vectors)

    schema = pq.read_schema(path)
    assert schema.field("embedding").type == pa.list_(pa.float16(), 16)
    assert schema.metadata[b"model_id"] == b"open_clip_image:ViT-B-32@openai"
    assert schema.metadata[b"dim"] == b"16"
    assert [p.name for p in path.parent.iterdir()] == ["00000.parquet"]


def test_a_failed_write_leaves_the_previous_table_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "00000.parquet"
    write_embedding_table(path, ["old"], _unit_rows(1), "model-a")

    def crash_midway(table: pa.Table, where: str, **options: object) -> None:
        Path(where).write_bytes(b"half a parquet file")
        raise OSError("disk full")

    # Every table goes through the one atomic writer (lib/storage.py), which calls pyarrow.
    monkeypatch.setattr(storage.pq, "write_table", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_embedding_table(path, ["new"], _unit_rows(1), "model-b")

    monkeypatch.undo()
    ids, _ = read_embedding_table(path)
    assert ids.tolist() == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["00000.parquet"]


def test_writing_mismatched_ids_and_vectors_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one row of vectors per id"):
        write_embedding_table(tmp_path / "t.parquet", ["a", "b"], _unit_rows(3), "m")
    assert not (tmp_path / "t.parquet").exists()

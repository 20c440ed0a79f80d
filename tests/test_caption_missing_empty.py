"""A missing caption and an empty one are told apart, and neither costs the image.

Both leave `caption` null (captions are optional: the image embeddings still use the picture),
but `caption_issue` says which happened (`caption_missing` / `caption_empty`), the corpus step
counts them in `caption_issues`, and the caption embeddings' skip detail repeats the reason.
What is proved, for a webdataset tar, an image folder and a manifest: each kind of absent
caption gets its own issue code, a real caption none, a broken sidecar keeps its own code.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import torch
from image_factory import good_jpeg_bytes, write_tar_members

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import SourceSpec, iter_shard_records
from megapairs_assets.corpus.step import build_corpus_shard
from megapairs_assets.corpus.table import build_shard_table
from megapairs_assets.embeddings.compute import NO_CAPTION, embed_rows
from megapairs_assets.embeddings.encoders import LoadedEncoder
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog

LIMITS = ImageLimits()
_TEXT_ENCODER = LoadedEncoder(
    model_id="fake:text",
    dim=2,
    modality="text",
    preprocess=None,
    input_size_px=None,
    _encode_texts=lambda texts: torch.ones((len(texts), 2)),
)


def _code(issue: str | None) -> str | None:
    return issue.partition(":")[0] if issue else None


def _tar_corpus(folder: Path) -> SourceSpec:
    write_tar_members(
        folder / "00000.tar",
        [
            ("captioned.jpg", good_jpeg_bytes(1)),
            ("captioned.txt", b"a red bicycle"),
            ("empty.jpg", good_jpeg_bytes(2)),
            ("empty.txt", b""),
            ("blank.jpg", good_jpeg_bytes(3)),
            ("blank.txt", b"  \r\n\t "),
            ("none.jpg", good_jpeg_bytes(4)),
            ("json_empty.jpg", good_jpeg_bytes(5)),
            ("json_empty.json", json.dumps({"caption": ""}).encode()),
            ("json_without.jpg", good_jpeg_bytes(6)),
            ("json_without.json", json.dumps({"url": "http://example.org/x.jpg"}).encode()),
            ("broken.jpg", good_jpeg_bytes(7)),
            ("broken.json", b"{not json"),
        ],
    )
    return SourceSpec("webdataset", str(folder))


EXPECTED_CODES = {
    "captioned": None,
    "empty": "caption_empty",
    "blank": "caption_empty",
    "none": "caption_missing",
    "json_empty": "caption_empty",
    "json_without": "caption_missing",
    "broken": "bad_caption_file",
}


def test_tar_images_without_a_caption_say_whether_it_was_missing_or_empty(tmp_path):
    spec = _tar_corpus(tmp_path)
    images, quarantine = build_shard_table("00000", iter_shard_records(spec, "00000"), LIMITS)

    assert quarantine.height == 0  # no image is lost over its caption
    rows = {row["key"]: row for row in images.iter_rows(named=True)}
    assert {key: _code(row["caption_issue"]) for key, row in rows.items()} == EXPECTED_CODES
    assert rows["captioned"]["caption"] == "a red bicycle"
    assert all(rows[key]["caption"] is None for key in EXPECTED_CODES if key != "captioned")


def test_folder_and_manifest_sources_tell_the_two_apart_too(tmp_path):
    photos = tmp_path / "photos" / "trip"
    photos.mkdir(parents=True)
    (photos / "a.jpg").write_bytes(good_jpeg_bytes(1))
    (photos / "a.txt").write_text("")
    (photos / "b.jpg").write_bytes(good_jpeg_bytes(2))
    folder = SourceSpec("folder", str(tmp_path / "photos"))
    images, _ = build_shard_table("trip", iter_shard_records(folder, "trip"), LIMITS)
    codes = dict(zip(images["key"], images["caption_issue"].map_elements(_code), strict=True))
    assert codes == {"a": "caption_empty", "b": "caption_missing"}

    for key, data in (("c", good_jpeg_bytes(3)), ("d", good_jpeg_bytes(4))):
        (tmp_path / f"{key}.jpg").write_bytes(data)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "\n".join(
            json.dumps({"shard": "m", "key": key, "url": str(tmp_path / f"{key}.jpg"), **extra})
            for key, extra in (("c", {"caption": " "}), ("d", {}))
        )
        + "\n"
    )
    rows = list(iter_shard_records(SourceSpec("manifest", str(manifest)), "m"))
    images, quarantine = build_shard_table("m", rows, LIMITS)
    assert quarantine.height == 0
    codes = dict(zip(images["key"], images["caption_issue"].map_elements(_code), strict=True))
    assert codes == {"c": "caption_empty", "d": "caption_missing"}


def test_the_corpus_step_counts_them_and_the_caption_embeddings_repeat_why(tmp_path):
    spec = _tar_corpus(tmp_path / "corpus")
    home = tmp_path / "home"
    logged: list[str] = []
    result = build_corpus_shard(
        "00000",
        spec,
        LIMITS,
        DataLayout(home),
        LineageCatalog(home / "catalog.duckdb"),
        log=logged.append,
    )
    absent = sum(1 for code in EXPECTED_CODES.values() if code is not None)
    assert result.row_counts["caption_issues"] == absent
    assert result.row_counts["quarantined"] == 0
    assert any("caption issue" in line for line in logged)

    images = pl.read_parquet(result.outputs["images"])
    result = embed_rows(images, _TEXT_ENCODER, LIMITS, 8, 0, torch.device("cpu"))
    assert result.ids == ["00000/captioned"]
    skipped = result.skipped
    detail_code = {image_id.split("/")[1]: _code(detail) for image_id, _, detail in skipped}
    assert {reason for _, reason, _ in skipped} == {NO_CAPTION}
    assert detail_code == {k: v for k, v in EXPECTED_CODES.items() if v is not None}

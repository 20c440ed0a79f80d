"""A new user's second round of findings on what megapairs says: one numbering for manifest
problems, a single webdataset tar as a corpus, one `triplets[...]` line per shard, a truthful
cache count for model requests, and a summary that tells images without a caption apart from
quarantined ones."""

from __future__ import annotations

import json
from pathlib import Path

import image_factory as factory
import polars as pl
import pytest
from fault_server import ChatServer
from generation_fixtures import STEPS, http_settings, make_world, record_rows, run_all

from megapairs_assets.cli.summary import mining_lines, mining_summary, source_hint_lines
from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import (
    ShardReadError,
    SourceSpec,
    count_shard_records,
    detect_source_kind,
    iter_shard_records,
    scan_source,
    shard_uri,
)
from megapairs_assets.corpus.table import build_shard_table
from megapairs_assets.embeddings.compute import NO_CAPTION
from megapairs_assets.generation.describe import describe_pairs_for_shard, prefetch_descriptions
from megapairs_assets.generation.triplets import build_triplets_for_shard
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord, utc_now
from resources.corpus import CorpusSourceResource

LIMITS = ImageLimits()


def _quarantine_details(spec: SourceSpec, shard: str) -> dict[str, str]:
    _, quarantine = build_shard_table(shard, iter_shard_records(spec, shard), LIMITS)
    return dict(zip(quarantine["reason"], quarantine["detail"], strict=True))


def _jsonl_rows(folder: Path, count: int) -> list[dict]:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        (folder / "img" / f"{index}.jpg").write_bytes(factory.good_jpeg_bytes(index))
        rows.append({"path": f"img/{index}.jpg", "caption": f"photo {index}"})
    return rows


# --- 1. one numbering for a manifest's problems -----------------------------------------------


def test_jsonl_manifest_problems_name_the_files_line(tmp_path):
    rows = _jsonl_rows(tmp_path, 6)
    rows[2] = {"path": 42, "caption": "path is a number"}
    rows[4] = {"caption": "no path at all"}
    lines = [json.dumps(row) for row in rows]
    lines.insert(1, "{not json")  # line 2
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    # Line 1: row 0; line 2: bad; line 3: row 1; line 4: path 42; line 5; line 6: no path.
    spec = SourceSpec(kind="manifest", path=str(manifest))
    details = _quarantine_details(spec, "00000")
    assert details["bad_manifest_value"].startswith("line 4: 'path' is a number (42)")
    assert details["missing_file"] == "line 6 has no path or url"
    unread = scan_source(spec).unread
    assert [record.error.split(":")[0] for record in unread] == ["bad_manifest_line"]
    assert "line 2 is not JSON" in unread[0].error


def test_blank_lines_count_in_a_jsonl_manifests_line_numbers(tmp_path):
    # polars skips blank lines; the line number must still be the file's.
    rows = _jsonl_rows(tmp_path, 3)
    rows[2] = {"caption": "no path"}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(rows[0]) + "\n\n  \n" + "\n".join(map(json.dumps, rows[1:])))
    details = _quarantine_details(SourceSpec(kind="manifest", path=str(manifest)), "00000")
    assert details["missing_file"] == "line 5 has no path or url"


def test_parquet_manifest_problems_name_the_row_index(tmp_path):
    rows = _jsonl_rows(tmp_path, 4)
    table = pl.DataFrame(
        {
            "path": [row["path"] for row in rows[:3]] + [None],
            "caption": [row["caption"] for row in rows],
            "key": ["a", "b", "c", "d"],
        }
    )
    manifest = tmp_path / "m.parquet"
    table.write_parquet(manifest)
    details = _quarantine_details(SourceSpec(kind="manifest", path=str(manifest)), "00000")
    # The key ("d") is not where it is; the 0-based row index is.
    assert details["missing_file"] == "row 3 has no path or url"


# --- 2. a single .tar file is a webdataset corpus of one shard ---------------------------------


@pytest.mark.parametrize("name", ["000012.tar", "My Shard.TAR"])
def test_a_single_tar_is_a_corpus_of_one_shard_read_as_in_a_folder(tmp_path, name):
    in_folder = tmp_path / "folder"
    in_folder.mkdir()
    factory.write_wds_shard(in_folder / name, factory.good_items(3))
    single = tmp_path / name
    single.write_bytes((in_folder / name).read_bytes())
    (tmp_path / "other.tar").write_bytes(single.read_bytes())  # a sibling is not in the corpus
    assert detect_source_kind(single) == "webdataset"
    folder_spec = SourceSpec(kind="webdataset", path=str(in_folder))
    spec = SourceSpec(kind="webdataset", path=str(single))
    [shard] = scan_source(folder_spec).shards
    assert scan_source(spec).shards == [shard]
    assert scan_source(spec).unread == []
    assert shard_uri(spec, shard) == str(single)
    assert count_shard_records(spec, shard) == 3
    records = list(iter_shard_records(spec, shard))
    assert [(r.key, r.caption, r.data) for r in records] == [
        (r.key, r.caption, r.data) for r in iter_shard_records(folder_spec, shard)
    ]
    assert all(r.uri.startswith(f"{single.resolve()}#") for r in records)
    # What `megapairs demo --corpus one.tar` builds, with the same checks.
    resource = CorpusSourceResource(kind=detect_source_kind(single), path=str(single))
    resource.check_path()
    assert resource.shard_ids() == [shard]
    single.unlink()
    with pytest.raises(ShardReadError) as gone:
        list(iter_shard_records(spec, shard))
    assert gone.value.reason == "missing_shard"
    assert count_shard_records(spec, shard) is None
    other_spec = SourceSpec(kind="webdataset", path=str(tmp_path / "other.tar"))
    with pytest.raises(ShardReadError) as other:
        list(iter_shard_records(other_spec, shard))
    assert other.value.reason == "missing_shard"


# --- 3. one `triplets[<shard>]: N triplets` line: the shard step's -----------------------------


def test_the_triplet_step_leaves_the_count_line_to_the_shard_step(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(4,))
    with ChatServer() as server:
        settings = http_settings(server.base_url)
        run_all(world, settings, "00000", STEPS[:2])
    lines: list[str] = []
    result = build_triplets_for_shard(
        "00000", world.layout, world.catalog, settings, log=lines.append
    )
    assert result.row_count == 4 and result.row_count_key == "triplets"
    assert lines == []  # the count is in the result, logged once by shard_step
    # What only this step knows is still said: instructions whose mined pair is gone.
    path = world.layout.shard_table("mined_image_pairs", "00000")
    write_parquet_atomic(pl.read_parquet(path).slice(1), path)
    record_rows(world.catalog, "mined_image_pairs", "00000")
    result = build_triplets_for_shard(
        "00000", world.layout, world.catalog, settings, log=lines.append
    )
    assert lines == [
        "triplets[00000]: 1 pair's instructions have no mined pair (quarantined: pair_not_found)"
    ]
    assert result.rows["quarantine_log"]["reason"].to_list() == ["pair_not_found"]


# --- 4. what the model answered in this step is not "from the cache" ---------------------------


def test_answers_of_this_steps_prefetch_are_the_models_not_the_caches(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(3, 2))
    with ChatServer() as server:
        settings = http_settings(server.base_url)
        # What the asset does with several shards: one stream first, then each shard's step.
        prefetch_descriptions(list(world.shards), world.layout, world.catalog, settings)
        calls = server.count()
        lines: list[str] = []
        first = describe_pairs_for_shard(
            "00000", world.layout, world.catalog, settings, log=lines.append
        )
        assert server.count() == calls  # the prefetch answered them all
        said = "\n".join(lines)
        assert (
            "describe 00000 (model): 3 of 3 requests answered by the model just now "
            "(sent with this step's other shards); 0 to send"
        ) in said
        assert "cache" not in said
        assert first.metadata["model_prefetched"] == 3
        assert first.metadata["model_cache_hits"] == 0
        # A later run finds them in the cache an earlier run filled, and says so.
        lines.clear()
        again = describe_pairs_for_shard(
            "00000", world.layout, world.catalog, settings, log=lines.append
        )
    assert "3 of 3 requests answered from an earlier run's cache; 0 to send" in "\n".join(lines)
    assert again.metadata["model_prefetched"] == 0
    assert again.metadata["model_cache_hits"] == 3


# --- 5. images without a caption are kept, not quarantined; "no captions" is the reason -------


def _record_quarantine(catalog: LineageCatalog, stage: str, rows: list[tuple[str, str]]) -> None:
    frame = pl.DataFrame(
        [
            {"stage": stage, "shard": "00000", "key": key, "source_uri": None, "reason": reason}
            | {"detail": "-"}
            for key, reason in rows
        ]
    )
    record = MaterializationRecord(
        asset=stage,
        partition="00000",
        run_id="test",
        code_version="test",
        profile="test",
        started_at=utc_now(),
        duration_s=0.0,
    )
    catalog.record(record, rows={"quarantine_log": frame})


def _summary_of_a_corpus_without_captions(tmp_path: Path, dino_rows: int) -> dict:
    layout = DataLayout(tmp_path)
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    _record_quarantine(catalog, "image_corpus", [("bad", "decode_error")])
    no_caption = [(f"{n:04d}", NO_CAPTION) for n in range(3)]
    _record_quarantine(catalog, "caption_text_embeddings", no_caption)
    pairs = pl.DataFrame(
        {
            "pair_id": ["p1"],
            "sources": [["clip_image"]],
            "score_clip_image": [0.9],
            "score_dino_image": pl.Series([None], dtype=pl.Float32),
            "score_caption_text": pl.Series([None], dtype=pl.Float32),
        }
    )
    write_parquet_atomic(pairs, layout.shard_table("mined_image_pairs", "00000"))
    for asset, rows in (("caption_text_embeddings", 0), ("dino_image_embeddings", dino_rows)):
        table = pl.DataFrame(
            {"image_id": [f"00000/{n}" for n in range(rows)]}, schema={"image_id": pl.String}
        )
        write_parquet_atomic(table, layout.shard_table(asset, "00000"))
    return mining_summary(layout, catalog, ["00000"])


def test_images_without_a_caption_are_counted_apart_from_the_quarantine(tmp_path):
    summary = _summary_of_a_corpus_without_captions(tmp_path, dino_rows=3)
    assert mining_lines(summary) == [
        "  quarantined: 1",
        "    image_corpus: decode_error x1",
        "  no caption:  3 images (kept; the caption source skips them)",
    ]
    hints = source_hint_lines(summary)
    assert hints[0].startswith("    caption_text mined no pairs: no captions")
    # dino_image has rows and still mined nothing: that one is the band's story.
    assert hints[1].startswith("    a source mined no pairs: the band_positions table")
    assert len(hints) == 2


def test_no_band_hint_when_the_only_silent_source_had_no_captions(tmp_path):
    summary = _summary_of_a_corpus_without_captions(tmp_path / "a", dino_rows=3)
    summary["pairs_per_source"]["dino_image"] = 5
    hints = source_hint_lines(summary)
    assert len(hints) == 1 and "no captions" in hints[0]
    assert not any("band_positions" in line for line in hints)

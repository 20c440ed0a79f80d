"""Catalog lookups by long id lists: exact answers, and a bind cost that does not grow per id.

DuckDB's Python client tried (and failed) to import pandas twice for every string of a list
parameter; a 15,000-id lookup (one shard's KNN neighbours at 9,000 images) took ~2.5 s of a
~4 s mining step. The lookups now bind one JSON string (`corpus.id_lists`).
"""

from __future__ import annotations

import builtins
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from megapairs_assets.corpus.step import (
    IMAGE_LINEAGE,
    content_hashes,
    image_uris,
    other_shard_copies,
)
from megapairs_assets.generation.common import lookup_images
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord
from megapairs_assets.lineage.id_lists import IN_IDS, id_list

# Ids a file name (and so an image id) may hold: quotes, backslashes, JSON-special and
# non-ASCII characters, a separator control character.
ODD_IDS = ['s/quo"te', "s/back\\slash", "s/ünï😀", "s/tab\there", "s/unit\x1fsep", "s/[1,2]"]


def image_rows(shard: str, ids: list[str], hash_of: dict[str, str]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": ids,
            "shard": [shard] * len(ids),
            "key": [i.rpartition("/")[2] for i in ids],
            "source_uri": [f"/corpus/{i}.jpg" for i in ids],
            "caption": [f"caption of {i}" for i in ids],
            "content_hash": [hash_of[i] for i in ids],
            "width": [64] * len(ids),
            "height": [48] * len(ids),
        },
        schema_overrides={"width": pl.Int32, "height": pl.Int32},
    )


def record_shard(catalog: LineageCatalog, shard: str, rows: pl.DataFrame) -> None:
    record = MaterializationRecord(
        asset="image_corpus",
        partition=shard,
        run_id="test",
        code_version="test",
        profile="demo",
        started_at=datetime.now(UTC).replace(tzinfo=None),
        duration_s=0.0,
    )
    catalog.record(record, {IMAGE_LINEAGE.name: rows})


@pytest.fixture
def catalog(tmp_path: Path) -> LineageCatalog:
    """Two shards: `a` holds the odd ids and 2,000 plain ones; `b` copies two of `a`'s bytes."""
    plain = [f"a/{n:06d}" for n in range(2000)]
    ids_a = ODD_IDS + plain
    hash_of = {i: f"h-{i}" for i in ids_a}
    hash_of.update({"b/copy-odd": hash_of[ODD_IDS[2]], "b/copy-plain": hash_of[plain[7]]})
    hash_of["b/own"] = "h-own"
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    record_shard(catalog, "a", image_rows("a", ids_a, hash_of))
    record_shard(catalog, "b", image_rows("b", ["b/copy-odd", "b/copy-plain", "b/own"], hash_of))
    return catalog


def test_lookups_answer_exactly_the_ids_asked_for(catalog: LineageCatalog) -> None:
    wanted = [*ODD_IDS, "a/000003", "a/001999", "not/in/catalog"]
    hashes = content_hashes(catalog, wanted)
    assert dict(hashes.iter_rows()) == {i: f"h-{i}" for i in wanted if i != "not/in/catalog"}
    assert image_uris(catalog, wanted) == {
        i: f"/corpus/{i}.jpg" for i in wanted if i != "not/in/catalog"
    }
    found = lookup_images(catalog, wanted)
    assert set(found) == set(wanted) - {"not/in/catalog"}
    assert found[ODD_IDS[2]]["caption"] == f"caption of {ODD_IDS[2]}"
    assert content_hashes(catalog, []).height == 0
    assert lookup_images(catalog, []) == {}


def test_other_shard_copies_matches_hashes_across_shards(catalog: LineageCatalog) -> None:
    b_rows = catalog.query("SELECT * FROM image_lineage WHERE shard = 'b'")
    copies = other_shard_copies(catalog, "b", b_rows).sort("image_id")
    assert copies["image_id"].to_list() == sorted([ODD_IDS[2], "a/000007"])


def test_in_ids_matches_nothing_for_an_empty_list(catalog: LineageCatalog) -> None:
    frame = catalog.query(f"SELECT image_id FROM image_lineage WHERE image_id {IN_IDS}", ["[]"])
    assert frame.height == 0
    assert id_list([]) == "[]"


def test_binding_ids_does_not_import_per_id(
    catalog: LineageCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Imports during a lookup stay a handful whatever the list length (they were 2 per id)."""
    ids = [f"a/{n:06d}" for n in range(2000)]
    content_hashes(catalog, ids[:10])  # warm: first-use imports are not what is measured
    real_import = builtins.__import__
    calls = {"count": 0}

    def counting_import(*args: object, **kwargs: object) -> object:
        calls["count"] += 1
        return real_import(*args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", counting_import)
    hashes = content_hashes(catalog, ids)
    lookup_images(catalog, ids)
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert hashes.height == len(ids)
    assert calls["count"] < 200, f"{calls['count']} imports for {len(ids)} ids"

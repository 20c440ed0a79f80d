"""What the Dagster UI shows of the mining half: per-partition metadata a person reads.

One small real run (2 shards, the demo's tiny models) through `mining_half`, then each
partition's materialization event is read back from the instance, as the UI reads it. Markdown
meant to be read at a glance must stay under Dagster's inline limit (longer values hide behind
"[Show Markdown]"), thumbnails must be small JPEGs, and the whole event must stay small.
"""

from __future__ import annotations

import base64
import re

import dagster as dg
import image_factory as factory
import polars as pl
import pytest
from conftest import make_home, run_shards

from megapairs_assets.definitions import build_definitions
from megapairs_assets.lib.preview import INLINE_MARKDOWN_CHARS
from megapairs_assets.lib.storage import DataLayout
from resources.corpus import CorpusSourceResource

SHARDS = ["00000", "00001"]
SOURCES = ["clip_image", "dino_image", "caption_text"]
# A partition's whole metadata, serialized; thumbnails included. Generous, but far below the
# hundreds of kB a PNG-per-thumbnail event reached.
MAX_EVENT_BYTES = 48_000
MAX_THUMBNAIL_BYTES = 3_000
_DATA_URI = re.compile(r"data:image/(\w+);base64,([A-Za-z0-9+/=]+)")
_HISTOGRAM_ROW = re.compile(r"^(-?\d+\.\d+)-(-?\d+\.\d+) [^\d]*?(\d+)( \*)?$")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, demo_models_dir):
    root = tmp_path_factory.mktemp("ui-metadata")
    corpus = root / "corpus"
    for index, shard in enumerate(SHARDS):
        factory.write_wds_shard(
            corpus / f"{shard}.tar", factory.good_items(6 + index, first_seed=30 * index)
        )
    home = make_home(root, demo_models_dir)
    source = CorpusSourceResource(kind="webdataset", path=str(corpus))
    defs = build_definitions("demo", home, {"corpus_source": source})
    instance = dg.DagsterInstance.ephemeral()
    result = run_shards(defs, instance, SHARDS)
    assert result.success
    return instance, DataLayout(home), defs


def _event(instance: dg.DagsterInstance, asset: str, partition: str) -> dg.AssetMaterialization:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]),
        limit=1,
    ).records
    assert records, f"no materialization of {asset}[{partition}]"
    return records[0].asset_materialization


def _metadata(instance: dg.DagsterInstance, asset: str, partition: str) -> dict:
    event = _event(instance, asset, partition)
    return {key: getattr(value, "value", value) for key, value in event.metadata.items()}


def _histogram_rows(markdown: str) -> list[tuple[float, float, int, bool]]:
    rows = []
    for line in markdown.splitlines():
        match = _HISTOGRAM_ROW.match(line.strip())
        if match:
            start, end, count, marked = match.groups()
            rows.append((float(start), float(end), int(count), marked is not None))
    return rows


@pytest.mark.parametrize("asset", ["clip_image_knn", "dino_image_knn", "caption_text_knn"])
def test_knn_partition_shows_an_inline_score_histogram_of_its_own_rows(run, asset: str) -> None:
    instance, layout, defs = run
    k = defs.resources["knn_index"].k
    for shard in SHARDS:
        metadata = _metadata(instance, asset, shard)
        table = pl.read_parquet(layout.shard_table(asset, shard))
        histogram = metadata["score_histogram"]
        assert len(histogram) < INLINE_MARKDOWN_CHARS, "would hide behind [Show Markdown]"
        rows = _histogram_rows(histogram)
        assert rows, histogram
        assert sum(count for _, _, count, _ in rows) == table.height
        # Bins cover the scores: the lowest edge is the lowest score, the top the highest.
        assert rows[0][0] == pytest.approx(float(table["score"].min()), abs=1e-3)
        assert rows[-1][1] == pytest.approx(float(table["score"].max()), abs=1e-3)
        assert metadata["rows_neighbours"] == table.height == metadata["dagster/row_count"]
        # The setting, which a corpus smaller than k + 1 images cannot fill.
        assert metadata["neighbours_per_query"] == k >= int(table["rank"].max()) + 1
        assert "k" not in metadata and "rows_edges" not in metadata


def test_pairs_partition_marks_each_band_on_its_sources_neighbour_scores(run) -> None:
    instance, layout, defs = run
    bands = build_bands(defs)
    for shard in SHARDS:
        metadata = _metadata(instance, "mined_image_pairs", shard)
        for source in SOURCES:
            histogram = metadata[f"knn_score_histogram_{source}"]
            assert len(histogram) < INLINE_MARKDOWN_CHARS
            knn = pl.read_parquet(layout.shard_table(f"{source}_knn", shard))
            rows = _histogram_rows(histogram)
            assert sum(count for _, _, count, _ in rows) == knn.height
            low, high = bands[source]
            for start, end, _, marked in rows:
                assert marked == (start < high and end > low), (source, start, end)
            assert f"({low}, {high})" in histogram
        # The per-source counts are numbers (plottable), not a second Markdown table.
        assert "pairs_by_source" not in metadata
        pairs = pl.read_parquet(layout.shard_table("mined_image_pairs", shard))
        assert metadata["query_images_with_pairs"] == pairs["query_id"].n_unique()


def build_bands(defs: dg.Definitions) -> dict[str, tuple[float, float]]:
    """The mining bands of the run's resources."""
    return dict(defs.resources["mining"].params().bands)


def test_pairs_preview_is_narrow_and_its_scores_match_the_table(run) -> None:
    instance, layout, _ = run
    preview = _metadata(instance, "mined_image_pairs", "00000")["preview"]
    pairs = pl.read_parquet(layout.shard_table("mined_image_pairs", "00000"))
    by_pair = {(r["query_id"], r["target_id"]): r for r in pairs.iter_rows(named=True)}
    assert preview.records
    assert [column.name for column in preview.schema.columns] == [
        "query_id",
        "query_caption",
        "target_id",
        "target_caption",
        "scores",
    ]
    for record in preview.records:
        data = record.data
        assert len(data["query_caption"]) <= 48 and len(data["target_caption"]) <= 48
        row = by_pair[(data["query_id"], data["target_id"])]
        shown = dict(part.rsplit(" ", 1) for part in data["scores"].split("; "))
        assert sorted(shown) == sorted(row["sources"])
        for source, value in shown.items():
            assert float(value) == pytest.approx(row[f"score_{source}"], abs=1e-4)


def test_corpus_thumbnails_are_small_jpegs_with_their_captions(run) -> None:
    instance, layout, _ = run
    markdown = _metadata(instance, "image_corpus", "00001")["thumbnails"]
    images = pl.read_parquet(layout.corpus_images("00001"))
    found = _DATA_URI.findall(markdown)
    assert len(found) == min(8, images.height)
    for kind, encoded in found:
        assert kind == "jpeg"
        data = base64.b64decode(encoded)
        assert data[:2] == b"\xff\xd8" and len(data) < MAX_THUMBNAIL_BYTES
    for row in images.head(len(found)).iter_rows(named=True):
        assert f"`{row['image_id']}` | {row['caption']} |" in markdown


def test_pair_thumbnails_are_jpegs(run) -> None:
    instance, _, _ = run
    markdown = _metadata(instance, "mined_image_pairs", "00000")["thumbnails"]
    found = _DATA_URI.findall(markdown)
    assert found and {kind for kind, _ in found} == {"jpeg"}


@pytest.mark.parametrize("source", SOURCES)
def test_embedding_partition_names_its_vector_dimension(run, source: str) -> None:
    instance, layout, _ = run
    metadata = _metadata(instance, f"{source}_embeddings", "00000")
    table = pl.read_parquet(layout.shard_table(f"{source}_embeddings", "00000"))
    assert metadata["vector_dim"] == table["embedding"].dtype.shape[0]
    assert "dim" not in metadata
    # Nothing was skipped, so there is no reason table to show.
    assert metadata["rows_skipped"] == 0 and "skipped_by_reason" not in metadata


@pytest.mark.parametrize(
    "asset",
    [
        "image_corpus",
        "clip_image_embeddings",
        "clip_image_knn",
        "mined_image_pairs",
    ],
)
def test_each_partition_event_stays_small(run, asset: str) -> None:
    instance, _, _ = run
    for shard in SHARDS:
        event = _event(instance, asset, shard)
        size = len(dg.serialize_value(event))
        assert size < MAX_EVENT_BYTES, f"{asset}[{shard}]: {size} bytes"

"""The mining half materialized through Dagster on small corpora with bad input and bad config."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import dagster as dg
import image_factory as factory
import polars as pl
import pytest
from conftest import make_home, run_shards

from megapairs_assets.definitions import build_definitions
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog
from resources.corpus import CorpusSourceResource
from resources.encoders import EncoderResource

GOOD_SHARDS = ["00000", "00001", "00002"]
SOURCES = ["clip_image", "dino_image", "caption_text"]


def _temporary_files(folder: Path) -> list[Path]:
    """Files a writer left behind: every writer names its temporary files `.<name>...`."""
    return [path for path in folder.rglob(".*") if path.is_file()]


def _small_corpus(folder: Path) -> Path:
    """Three good shards, one shard full of bad input, one file that is not a tar."""
    for index, shard in enumerate(GOOD_SHARDS):
        factory.write_wds_shard(
            folder / f"{shard}.tar", factory.good_items(6, first_seed=10 * index)
        )
    bad_items = [
        *factory.good_items(3, first_seed=100),
        ("truncated", factory.truncated_jpeg_bytes(), "cut short"),
        ("one_pixel", factory.tiny_png_bytes(), "a dot"),
        ("huge", factory.huge_png_bytes(), "a bomb"),
        ("cmyk", factory.cmyk_jpeg_bytes(), "print colours"),
        ("sixteen_bit", factory.sixteen_bit_png_bytes(), "a deep ramp"),
        ("empty_caption", factory.good_jpeg_bytes(200), "  "),
        ("long_caption", factory.good_jpeg_bytes(201), factory.long_caption(10_000)),
    ]
    factory.write_wds_shard(folder / "00003.tar", bad_items)
    factory.write_not_a_tar(folder / "00004.tar")
    return folder


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path):
    root = tmp_path_factory.mktemp("small-run")
    corpus = _small_corpus(root / "corpus")
    home = make_home(root, demo_models_dir)
    defs = build_definitions(
        "demo",
        home,
        {"corpus_source": CorpusSourceResource(kind="webdataset", path=str(corpus))},
    )
    instance = dg.DagsterInstance.ephemeral()
    shards = [*GOOD_SHARDS, "00003", "00004"]
    result = run_shards(defs, instance, shards)
    return result, home, defs, instance, shards


def test_bad_input_never_fails_the_run(small_run) -> None:
    result, *_ = small_run
    assert result.success
    evaluations = result.get_asset_check_evaluations()
    assert evaluations, "the run evaluated no asset checks"
    failed = [(e.asset_key.to_user_string(), e.check_name) for e in evaluations if not e.passed]
    assert failed == []


def test_each_bad_input_is_in_the_quarantine_log(small_run) -> None:
    _, home, *_ = small_run
    catalog = LineageCatalog(DataLayout(home).catalog_path)
    reasons = dict(
        catalog.query(
            "SELECT coalesce(key, '<shard>') AS item, reason FROM quarantine_log "
            "WHERE stage = 'image_corpus'"
        ).iter_rows()
    )
    assert reasons["truncated"] == "decode_error"
    assert reasons["one_pixel"] == "too_small"
    assert reasons["huge"] == "too_large"
    assert reasons["<shard>"] == "not_a_tar"
    # Converted, not quarantined: CMYK and 16-bit images are kept and embedded.
    kept = set(pl.read_parquet(DataLayout(home).corpus_images("00003"))["key"])
    assert {"cmyk", "sixteen_bit", "empty_caption", "long_caption"} <= kept


def test_empty_caption_skips_only_the_caption_table(small_run) -> None:
    _, home, *_ = small_run
    layout = DataLayout(home)
    from megapairs_assets.embeddings.compute import read_embedding_table

    caption_ids, _ = read_embedding_table(layout.shard_table("caption_text_embeddings", "00003"))
    image_ids, _ = read_embedding_table(layout.shard_table("clip_image_embeddings", "00003"))
    assert "00003/empty_caption" in set(image_ids.tolist())
    assert "00003/empty_caption" not in set(caption_ids.tolist())
    skipped = LineageCatalog(layout.catalog_path).query(
        "SELECT reason FROM quarantine_log WHERE stage = 'caption_text_embeddings' AND key = ?",
        ["empty_caption"],
    )
    assert skipped["reason"].to_list() == ["no_caption"]


def test_unreadable_shard_flows_through_as_empty(small_run) -> None:
    _, home, *_ = small_run
    layout = DataLayout(home)
    assert pl.read_parquet(layout.corpus_images("00004")).height == 0
    assert pl.read_parquet(layout.shard_table("mined_image_pairs", "00004")).height == 0


def test_rematerializing_a_shard_replaces_its_outputs(small_run) -> None:
    _, home, defs, instance, _ = small_run
    layout = DataLayout(home)
    catalog = LineageCatalog(layout.catalog_path)
    before_pairs = pl.read_parquet(layout.shard_table("mined_image_pairs", "00000"))
    before_rows = catalog.query("SELECT count(*) AS n FROM image_lineage")["n"][0]
    again = run_shards(defs, instance, ["00000"])
    assert again.success
    after_pairs = pl.read_parquet(layout.shard_table("mined_image_pairs", "00000"))
    assert after_pairs.equals(before_pairs)  # deterministic for the seed
    assert catalog.query("SELECT count(*) AS n FROM image_lineage")["n"][0] == before_rows
    assert _temporary_files(layout.data_dir) == []
    # The shard's own rows, already in the catalog, are not copies "in another shard".
    evaluations = [
        (e.asset_key.to_user_string(), e.check_name, e.passed)
        for e in again.get_asset_check_evaluations()
    ]
    assert ("image_corpus", "corpus_content_unique_across_shards", True) in evaluations
    assert [e for e in evaluations if not e[2]] == []


def test_temporary_file_finder_matches_what_the_writers_name_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guards the leftover check above: learn the temporary names both table writers really
    # use, then show the finder reports a file of each name.
    import numpy as np

    from megapairs_assets.embeddings.compute import write_embedding_table
    from megapairs_assets.lib.storage import write_parquet_atomic

    moved: list[Path] = []
    real_replace = os.replace

    def spy(source: str | os.PathLike, target: str | os.PathLike) -> None:
        moved.append(Path(source))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", spy)
    write_parquet_atomic(pl.DataFrame({"a": [1]}), tmp_path / "written" / "00000.parquet")
    vectors = np.ones((1, 4), dtype=np.float16) / 2
    write_embedding_table(tmp_path / "written" / "00001.parquet", ["x"], vectors, "m")
    monkeypatch.undo()
    assert len(moved) == 2
    leftovers = tmp_path / "leftovers" / "clip_image_embeddings"
    leftovers.mkdir(parents=True)
    for source in moved:
        (leftovers / source.name).write_bytes(b"half a table")
    assert sorted(p.name for p in _temporary_files(tmp_path / "leftovers")) == sorted(
        source.name for source in moved
    )
    assert _temporary_files(tmp_path / "written") == []


def _materializations_of_run(catalog: LineageCatalog, run_id: str) -> dict[tuple[str, str], dict]:
    """(asset, partition) -> {"id": materialization id, "inputs": input_versions} for one run."""
    frame = catalog.query(
        "SELECT asset, partition, materialization_id, input_versions FROM materializations "
        "WHERE run_id = ?",
        [run_id],
    )
    found = {
        (asset, partition): {"id": materialization_id, "inputs": json.loads(inputs or "{}")}
        for asset, partition, materialization_id, inputs in frame.iter_rows()
    }
    assert len(found) == frame.height, "one materialization per (asset, shard) in a run"
    return found


def test_lineage_chain_links_each_stage_to_the_materialization_it_read(small_run) -> None:
    result, home, _, _, shards = small_run
    recorded = _materializations_of_run(
        LineageCatalog(DataLayout(home).catalog_path), result.run_id
    )
    corpus_id = {shard: recorded[("image_corpus", shard)]["id"] for shard in shards}
    for source in SOURCES:
        embeddings, knn = f"{source}_embeddings", f"{source}_knn"
        embedding_id = {}
        for shard in shards:
            inputs = recorded[(embeddings, shard)]["inputs"]
            assert inputs == {f"image_corpus/{shard}": corpus_id[shard]}, (embeddings, shard)
            embedding_id[f"{embeddings}/{shard}"] = recorded[(embeddings, shard)]["id"]
        for shard in shards:
            # Each shard's KNN searches the whole corpus: it read every shard's embeddings.
            inputs = recorded[(knn, shard)]["inputs"]
            assert set(inputs) >= {f"{embeddings}/{good}" for good in GOOD_SHARDS}, (knn, shard)
            assert inputs == {key: embedding_id[key] for key in inputs}, (knn, shard)
    for shard in shards:
        assert recorded[("mined_image_pairs", shard)]["inputs"] == {
            f"{source}_knn/{shard}": recorded[(f"{source}_knn", shard)]["id"] for source in SOURCES
        }, shard


def test_pair_lineage_names_each_knn_materialization_it_read(small_run) -> None:
    _, home, *_ = small_run
    catalog = LineageCatalog(DataLayout(home).catalog_path)
    # Each pair row, with the materialization (and run) of the mining step that wrote it.
    written = catalog.query(
        "SELECT DISTINCT p.shard, p.knn_versions, m.run_id FROM pair_lineage p "
        "JOIN materializations m USING (materialization_id)"
    )
    assert set(written["shard"]) >= set(GOOD_SHARDS), "the good shards gave pairs"
    for shard, knn_versions, run_id in written.iter_rows():
        named = json.loads(knn_versions)
        assert set(named) == set(SOURCES), shard
        knn_runs = catalog.query(
            "SELECT asset, partition, run_id FROM materializations "
            "WHERE materialization_id IN (SELECT unnest(?)) ORDER BY asset",
            [list(named.values())],
        )
        assert knn_runs.rows() == sorted((f"{s}_knn", shard, run_id) for s in SOURCES), shard


def test_unknown_model_fails_before_any_work(tmp_path: Path, demo_models_dir: Path) -> None:
    corpus = tmp_path / "corpus"
    factory.write_wds_shard(corpus / "00000.tar", factory.good_items(2))
    home = make_home(tmp_path, demo_models_dir)
    bad_encoder = EncoderResource(backend="open_clip_image", model="ViT-B-23", pretrained="x.pt")
    defs = build_definitions(
        "demo",
        home,
        {
            "corpus_source": CorpusSourceResource(kind="webdataset", path=str(corpus)),
            "clip_image_encoder": bad_encoder,
        },
    )
    result = run_shards(defs, dg.DagsterInstance.ephemeral(), ["00000"])
    assert not result.success
    messages = " ".join(
        event.event_specific_data.error.to_string()
        for event in result.all_events
        if event.is_failure and getattr(event.event_specific_data, "error", None)
    )
    assert "ViT-B-32" in messages  # the error suggests the close, real model name
    assert not DataLayout(home).shard_table("clip_image_embeddings", "00000").exists()


def test_wrong_dimension_is_reported_with_both_numbers(tmp_path: Path) -> None:
    from megapairs_assets.demo import MINILM_LOCAL_DIR
    from megapairs_assets.embeddings.encoders import EncoderConfigError

    resource = EncoderResource(
        backend="sentence_transformers", model=str(MINILM_LOCAL_DIR), dim=512
    )
    with pytest.raises(EncoderConfigError, match=r"384.*512|512.*384"):
        resource.validate()


def _materialize_one_shard(corpus: str, home: str, shard: str) -> None:
    """Runs in its own process: corpus and three embedding tables for one shard."""
    import torch

    torch.set_num_threads(1)  # four of these share two cores
    defs = build_definitions(
        "demo", Path(home), {"corpus_source": CorpusSourceResource(kind="webdataset", path=corpus)}
    )
    result = run_shards(
        defs, dg.DagsterInstance.ephemeral(), [shard], job_name="corpus_and_embeddings"
    )
    if not result.success:
        raise SystemExit(f"shard {shard} failed")


def test_parallel_processes_record_every_lineage_row(tmp_path: Path, demo_models_dir: Path) -> None:
    corpus = tmp_path / "corpus"
    shards = [f"{i:05d}" for i in range(4)]
    for index, shard in enumerate(shards):
        factory.write_wds_shard(
            corpus / f"{shard}.tar", factory.good_items(5, first_seed=20 * index)
        )
    home = make_home(tmp_path, demo_models_dir)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_materialize_one_shard, args=(str(corpus), str(home), s)) for s in shards
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0
    catalog = LineageCatalog(DataLayout(home).catalog_path)
    per_asset = catalog.query(
        "SELECT asset, count(DISTINCT partition) AS shards FROM materializations GROUP BY asset"
    )
    assert dict(per_asset.iter_rows()) == {
        "image_corpus": 4,
        "clip_image_embeddings": 4,
        "dino_image_embeddings": 4,
        "caption_text_embeddings": 4,
    }
    images = catalog.query("SELECT shard, count(*) AS n FROM image_lineage GROUP BY shard")
    assert sorted(images.rows()) == [(s, 5) for s in shards]

"""The mining half materialized through Dagster on small corpora with bad input and bad config."""

from __future__ import annotations

import multiprocessing as mp
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
    leftovers = list(layout.data_dir.rglob(".*.tmp-*"))
    assert leftovers == []


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
    from megapairs_assets.embeddings.encoders import MINILM_LOCAL_DIR, EncoderConfigError

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

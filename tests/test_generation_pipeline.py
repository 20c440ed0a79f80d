"""The generation stages end to end over HTTP against a real local server: triplets in the release
schema, the export and card, lineage, zero calls on a re-run, template changes, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from fault_server import ChatServer
from generation_fixtures import (
    STEPS,
    http_settings,
    make_world,
    record_step,
    run_all,
    with_template,
    write_pairs,
)
from PIL import Image

from megapairs_assets.generation.common import (
    DESCRIPTIONS_ASSET,
    EXPORT_ASSET,
    INSTRUCTIONS_ASSET,
    TRIPLETS_ASSET,
)
from megapairs_assets.generation.describe import describe_pairs_for_shard
from megapairs_assets.generation.export import export_triplets_for_shard
from megapairs_assets.generation.instruct import write_instructions_for_shard
from megapairs_assets.generation.prompts import PROMPTS_DIR
from megapairs_assets.generation.triplets import (
    build_triplets_for_shard,
    generation_summary,
)
from megapairs_assets.lineage.report import lineage_report


def test_http_pipeline_makes_release_triplets_and_a_rerun_makes_zero_calls(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(9, 7))
    with ChatServer() as server:
        settings = http_settings(server.base_url)
        first = {shard: run_all(world, settings, shard) for shard in world.shards}
        calls_first = server.count()

        for shard, results in first.items():
            for result in results.values():
                assert all(o.passed for o in result.outcomes), [
                    o for o in result.outcomes if not o.passed
                ]
            pairs = pl.read_parquet(world.layout.shard_table("mined_image_pairs", shard))
            assert results[TRIPLETS_ASSET].row_count == pairs.height
        assert calls_first == 2 * (9 + 7)  # one description and one instruction request per pair

        # Release schema: hns[0] == q_img, t_img never in hns, >= 3 instructions, paths exist.
        export_root = world.layout.data_dir / "triplet_export"
        for shard in world.shards:
            lines = (export_root / "triplets" / f"{shard}.jsonl").read_text().splitlines()
            rows = [json.loads(line) for line in lines]
            assert rows and all(set(row) == {"q_img", "q_text", "t_img", "hns"} for row in rows)
            for row in rows:
                assert row["hns"][0] == row["q_img"]
                assert row["t_img"] not in row["hns"]
                assert len(row["q_text"]) >= 3
                for path in [row["q_img"], row["t_img"], *row["hns"]]:
                    assert not Path(path).is_absolute()
                    with Image.open(export_root / path) as image:
                        assert image.size == (512, 512)
        card = (export_root / "README.md").read_text()
        assert "triplets: 16" in card and "test model" in card and "## Licence" in card

        # Lineage of one triplet, and the demo summary lines.
        triplet_id = pl.read_parquet(world.layout.shard_table(TRIPLETS_ASSET, "00000"))[
            "triplet_id"
        ][0]
        report = lineage_report(world.catalog, triplet_id)
        assert report is not None
        assert "test-model@fault-server" in report and "describe-images" in report
        assert "mined_image_pairs[00000]" in report and "WORD_NUM" in report
        assert lineage_report(world.catalog, "t-unknown") is None
        summary = generation_summary(world.layout, list(world.shards), export_root)
        assert "triplets:    16" in summary and triplet_id[:2] == "t-"

        # Second materialization with unchanged inputs: zero model calls, same tables.
        before = pl.read_parquet(world.layout.shard_table(INSTRUCTIONS_ASSET, "00000"))
        second = run_all(world, settings, "00000")
        assert server.count() == calls_first
        for asset in (DESCRIPTIONS_ASSET, INSTRUCTIONS_ASSET):
            metadata = second[asset].metadata
            assert metadata["model_calls"] == 0
            assert metadata["model_cache_hits"] == 9
        after = pl.read_parquet(world.layout.shard_table(INSTRUCTIONS_ASSET, "00000"))
        assert after.equals(before)


def test_changing_a_template_calls_again_only_for_that_step(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(8,))
    steps = STEPS[:2]
    with ChatServer() as server:
        settings = http_settings(server.base_url)
        run_all(world, settings, "00000", steps)
        assert server.count() == 16
        changed = tmp_path / "instructions_v2.toml"
        text = (PROMPTS_DIR / "instructions.toml").read_text()
        changed.write_text(text.replace("You write short search queries.", "Write queries."))
        results = run_all(world, with_template(settings, "instruct", str(changed)), "00000", steps)
        assert results[DESCRIPTIONS_ASSET].metadata["model_calls"] == 0
        assert results[INSTRUCTIONS_ASSET].metadata["model_calls"] == 8
        assert server.count() == 24
        hashes = pl.read_parquet(world.layout.shard_table(INSTRUCTIONS_ASSET, "00000"))
        assert hashes["template_hash"].n_unique() == 1


def test_prompts_are_the_same_whichever_way_pairs_are_split(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(10,))
    pairs = pl.read_parquet(world.layout.shard_table("mined_image_pairs", "00000"))
    triples = [
        (row["query_id"], row["target_id"], row["hard_negative_ids"])
        for row in pairs.iter_rows(named=True)
    ]
    write_pairs(world.layout, world.catalog, "part-a", triples[::2])
    write_pairs(world.layout, world.catalog, "part-b", triples[1::2])
    columns = ["pair_id", "word_num", "seed", "request_key"]
    with ChatServer() as server:
        settings = http_settings(server.base_url)
        tables = {}
        for shard in ("00000", "part-a", "part-b"):
            run_all(world, settings, shard, STEPS[:2])
            described = pl.read_parquet(world.layout.shard_table(DESCRIPTIONS_ASSET, shard))
            instructed = pl.read_parquet(world.layout.shard_table(INSTRUCTIONS_ASSET, shard))
            tables[shard] = described.select(columns).join(
                instructed.select("pair_id", "demo_ids", pl.col("request_key").alias("ik")),
                on="pair_id",
            )
    whole = tables["00000"].sort("pair_id")
    split = pl.concat([tables["part-a"], tables["part-b"]]).sort("pair_id")
    assert whole.height == len(triples)
    assert whole.equals(split)
    assert whole["word_num"].is_between(60, 100).all()
    assert whole["demo_ids"].list.len().eq(5).all()


def test_missing_images_and_captions_are_quarantined_with_reasons(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(6,), caption_of={"00000/000000002": None})
    pairs = pl.read_parquet(world.layout.shard_table("mined_image_pairs", "00000"))
    triples = [
        (r["query_id"], r["target_id"], r["hard_negative_ids"]) for r in pairs.iter_rows(named=True)
    ]
    triples.append(("00000/000000000", "99999/gone", ["00000/000000000"]))
    write_pairs(world.layout, world.catalog, "00000", triples)
    with ChatServer() as server:
        settings = with_template(http_settings(server.base_url), "describe", "describe_captions")
        result = describe_pairs_for_shard("00000", world.layout, world.catalog, settings)
    log = result.rows["quarantine_log"]
    reasons = dict(log.group_by("reason").len().iter_rows())
    assert reasons.get("missing_image") == 1
    uses_uncaptioned = pairs.filter(
        (pl.col("query_id") == "00000/000000002") | (pl.col("target_id") == "00000/000000002")
    ).height
    assert reasons.get("missing_caption", 0) == uses_uncaptioned
    assert result.row_count + log.height == len(triples)
    assert set(log.columns) == {"stage", "shard", "key", "source_uri", "reason", "detail"}


@pytest.mark.parametrize("side", [64])
def test_export_side_is_configurable_and_rerun_is_idempotent(tmp_path, side):
    from dataclasses import replace

    world = make_world(tmp_path, pairs_per_shard=(4,))
    with ChatServer() as server:
        settings = http_settings(server.base_url)
        settings = replace(
            settings,
            export=replace(settings.export, image_side_px=side, export_dir=str(tmp_path / "out")),
        )
        run_all(world, settings, "00000")
        again = export_triplets_for_shard("00000", world.layout, world.catalog, settings)
    assert all(o.passed for o in again.outcomes)
    # The asset page shows the exported rows, the first triplet's exported images and the card.
    assert again.preview is not None and again.preview.height == min(5, again.row_count)
    example = again.markdown["exported_example"]
    assert example.count("data:image/jpeg;base64,") >= 2 and "query, target" in example
    assert again.markdown["dataset_card"] == (tmp_path / "out" / "README.md").read_text()
    images = list((tmp_path / "out" / "images").rglob("*.jpg"))
    assert images
    with Image.open(images[0]) as image:
        assert image.size == (side, side)


def test_prefetch_across_shards_leaves_each_shard_step_nothing_to_call(tmp_path):
    from megapairs_assets.generation.describe import prefetch_descriptions
    from megapairs_assets.generation.instruct import prefetch_instructions
    from megapairs_assets.generation.store import ResponseStore, store_path

    flaky = "00001/000001003"
    world = make_world(
        tmp_path, pairs_per_shard=(6, 5), caption_of={flaky: "a drawing of a MFLAKY kettle (x)"}
    )
    pairs = pl.concat(
        pl.read_parquet(world.layout.shard_table("mined_image_pairs", s)) for s in world.shards
    )
    doomed = pairs.filter((pl.col("query_id") == flaky) | (pl.col("target_id") == flaky)).height
    assert doomed >= 1
    with ChatServer(faults={"MFLAKY": ["500"] * doomed}) as server:
        settings = with_template(
            http_settings(server.base_url, max_retries=0), "describe", "describe_captions"
        )
        stats = prefetch_descriptions(list(world.shards), world.layout, world.catalog, settings)
        assert (stats.calls, stats.failed) == (pairs.height, doomed)
        # Failures are not stored by a prefetch: the shard's own step retries and counts them.
        stored = sum(
            ResponseStore(store_path(world.layout, s, "describe")).counts().get("ok", 0)
            for s in world.shards
        )
        assert stored == pairs.height - doomed
        retried = 0
        for shard in world.shards:
            result = describe_pairs_for_shard(shard, world.layout, world.catalog, settings)
            record_step(world.catalog, DESCRIPTIONS_ASSET, result)
            # model_calls counts the prefetch's calls for the shard too (model_prefetched).
            retried += result.metadata["model_calls"] - result.metadata["model_prefetched"]
            assert result.rows["quarantine_log"].is_empty()
        assert retried == doomed
        calls = server.count()
        prefetch_instructions(list(world.shards), world.layout, world.catalog, settings)
        for shard in world.shards:
            result = write_instructions_for_shard(shard, world.layout, world.catalog, settings)
            # Every call was the prefetch's: the step itself made none.
            assert result.metadata["model_calls"] == result.metadata["model_prefetched"] > 0
            assert result.row_count == result.metadata["described_pairs"]
        assert server.count() == calls + pairs.height


def test_a_retired_shard_leaves_the_release_folder_and_the_training_input(tmp_path):
    from megapairs_assets.evaluation.step import read_triplets as scoring_triplets
    from megapairs_assets.training.step import read_triplet_shards

    world = make_world(tmp_path, pairs_per_shard=(6, 5, 4))
    root = world.layout.data_dir / "triplet_export"

    def names(shard):
        frame = pl.read_parquet(root / "triplets" / f"{shard}.parquet")
        return {
            p
            for row in frame.iter_rows(named=True)
            for p in [row["q_img"], row["t_img"], *row["hns"]]
        }

    with ChatServer() as server:
        settings = http_settings(server.base_url)
        for shard in world.shards:
            run_all(world, settings, shard)
        assert "triplets: 15" in (root / "README.md").read_text()
        named_by_00002 = names("00002")
        images_before = set((root / "images").rglob("*.jpg"))

        world.catalog.retire_partitions(["00001"], [asset for asset, _ in STEPS])
        frame, versions = read_triplet_shards(world.layout, world.catalog)
        assert set(versions) == {f"{TRIPLETS_ASSET}/00000", f"{TRIPLETS_ASSET}/00002"}
        assert frame.height == 10 and frame["triplet_id"].str.starts_with("t-").all()
        assert set(scoring_triplets(world.layout, world.catalog)[1]) == set(versions)

        # The next export (of 00000) withdraws 00001; the catalog no longer has 00001's images,
        # so 00000's triplets that name one are dropped, each with a quarantine row.
        export = run_all(world, settings, "00000", STEPS[-1:])[EXPORT_ASSET]
    assert sorted(p.name for p in (root / "triplets").iterdir()) == [
        f"{shard}.{ext}" for shard in ("00000", "00002") for ext in ("jsonl", "parquet")
    ]
    assert sorted(p.name for p in (root / "shards").iterdir()) == [
        f"{shard}{ext}" for shard in ("00000", "00002") for ext in (".images.parquet", ".json")
    ]
    dropped = export.rows["quarantine_log"]
    assert dropped.height >= 1 and set(dropped["reason"]) == {"export_image_not_in_catalog"}
    assert export.row_count + dropped.height == 6
    assert f"triplets: {export.row_count + 4}" in (root / "README.md").read_text()
    named_by_00000 = names("00000")
    assert not any(path.startswith("images/00001/") for path in named_by_00000)
    assert all((root / path).is_file() for path in named_by_00000 | named_by_00002)
    # 00002's exported triplets still name some of 00001's images until 00002 is exported
    # again (pairs reach across shards): those stay, the rest of 00001's images go.
    left = {f"images/00001/{p.name}" for p in (root / "images" / "00001").glob("*.jpg")}
    assert left and left == {p for p in named_by_00002 if p.startswith("images/00001/")}
    images_after = set((root / "images").rglob("*.jpg"))
    assert images_after < images_before
    assert export.metadata["orphaned_images_removed"] == len(images_before - images_after)


def test_a_step_whose_upstream_partition_was_never_materialized_says_so(tmp_path):
    from megapairs_assets.lineage.catalog import NotMaterializedError

    world = make_world(tmp_path, pairs_per_shard=(4,))
    with ChatServer() as server, pytest.raises(NotMaterializedError) as raised:
        build_triplets_for_shard(
            "00000", world.layout, world.catalog, http_settings(server.base_url)
        )
    message = str(raised.value)
    assert "pair_descriptions 00000: not materialized" in message
    assert "materialize pair_descriptions" in message

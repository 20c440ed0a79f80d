"""`megapairs lineage` as a new user tries it: pasted ids with spaces, abbreviated ids, a
partition's history, re-materialized and failed steps, retired shards, triplets, JSON, and the
catalog's schema and a read-only query from the command line."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from megapairs_assets.cli.lineage import register
from megapairs_assets.corpus.step import IMAGE_LINEAGE
from megapairs_assets.generation.triplets import TRIPLET_LINEAGE
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord
from megapairs_assets.lineage.report import lineage_data, lineage_report
from megapairs_assets.mining.pair_table import PAIR_LINEAGE

T0 = datetime(2026, 1, 1, 12, 0, 0)
SHARDS = ("00000", "00001")
PAIR, RETIRED_TARGET_PAIR, DROPPED_PAIR = "aaaa000011112222", "aaaa0000ffffeeee", "bbbb333344445555"
TRIPLET = f"t-{PAIR}"


def image_rows(shard: str) -> pl.DataFrame:
    keys = [f"{shard}{i:04d}" for i in range(3)]
    return pl.DataFrame(
        {
            "image_id": [f"{shard}/{k}" for k in keys],
            "shard": shard,
            "key": keys,
            "source_uri": [f"/corpus/{shard}.tar#{k}.jpg" for k in keys],
            "caption": [f"caption {k}" for k in keys],
            "content_hash": [f"{i:064x}" for i in range(3)],
            "width": 64,
            "height": 48,
        }
    )


class World:
    """A catalog holding two corpus shards, a KNN graph re-built after mining, mined pairs, a
    triplet, a failed re-mining of shard 00001, and shard 00001 retired."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.catalog = LineageCatalog(DataLayout(home).catalog_path)
        self.minute = 0
        corpus = {
            s: self.record("image_corpus", s, rows={IMAGE_LINEAGE.name: image_rows(s)})
            for s in SHARDS
        }
        self.old_knn = self.record(
            "clip_image_knn", "00000", inputs={f"image_corpus/{s}": corpus[s] for s in SHARDS}
        )
        pairs = pl.DataFrame(
            {
                "pair_id": [PAIR, RETIRED_TARGET_PAIR, DROPPED_PAIR],
                "query_id": ["00000/000000000"] * 3,
                "target_id": ["00000/000000001", "00001/000010000", "00000/000000002"],
                "shard": "00000",
                "sources": [["clip_image"]] * 3,
                "scores": [json.dumps({"score_clip_image": 0.99})] * 3,
                "hard_negative_ids": [["00000/000000000", "00000/000000002"]] * 3,
                "knn_versions": "{}",
            }
        )
        self.pairs = self.record(
            "mined_image_pairs",
            "00000",
            inputs={"clip_image_knn/00000": self.old_knn},
            rows={PAIR_LINEAGE.name: pairs},
        )
        self.new_knn = self.record("clip_image_knn", "00000", inputs={})
        texts = home / "triplets_00000.parquet"
        pl.DataFrame(
            {
                "triplet_id": [TRIPLET],
                "description": ["both show a cat; the target is drawn"],
                "q_text": [["a drawn one", "as a sketch", "in ink"]],
            }
        ).write_parquet(texts)
        self.triplets = self.record(
            "triplets",
            "00000",
            inputs={"mined_image_pairs/00000": self.pairs},
            outputs={"triplets": str(texts)},
            rows={TRIPLET_LINEAGE.name: triplet_rows(), "quarantine_log": dropped_pair()},
        )
        attempt = MaterializationRecord(
            "mined_image_pairs", "00001", "run-failed", "mining-v1", "test", self.tick(), 0.0
        )
        self.catalog.begin(attempt)
        self.catalog.fail(attempt.materialization_id, error="KeyError: 'score'\ntraceback...")
        self.failed = attempt.materialization_id
        self.catalog.retire_partitions(["00001"], ["image_corpus"])

    def tick(self) -> datetime:
        self.minute += 1
        return T0 + timedelta(minutes=self.minute)

    def record(
        self,
        asset: str,
        partition: str,
        inputs: dict[str, str] | None = None,
        rows: dict[str, pl.DataFrame] | None = None,
        outputs: dict[str, str] | None = None,
    ) -> str:
        m = MaterializationRecord(
            asset=asset,
            partition=partition,
            run_id=f"run-{self.minute:04d}",
            code_version=f"{asset}-v1",
            profile="test",
            started_at=self.tick(),
            duration_s=1.0,
            model_ids={"instruct": "tiny-llm@rev1"} if asset == "triplets" else {},
            input_versions=inputs or {},
            output_paths=outputs or {},
        )
        self.catalog.record(m, rows)
        return m.materialization_id


def triplet_rows() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "triplet_id": [TRIPLET],
            "pair_id": [PAIR],
            "shard": ["00000"],
            "query_id": ["00000/000000000"],
            "target_id": ["00000/000000001"],
            "hard_negative_ids": [["00000/000000000", "00000/000000002"]],
            "instruction_count": [3],
            "description_generator": ["tiny-llm, caption-based"],
            "description_model": ["tiny-llm@rev1"],
            "description_template": ["describe#abc"],
            "word_num": [40],
            "description_request_key": ["d" * 64],
            "instruction_generator": ["tiny-llm"],
            "instruction_model": ["tiny-llm@rev1"],
            "instruction_template": ["instructions#def"],
            "demo_ids": [["demo-1"]],
            "instruction_request_key": ["i" * 64],
            "input_versions": ["{}"],
        }
    )


def dropped_pair() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "stage": ["triplets"],
            "shard": ["00000"],
            "key": [DROPPED_PAIR],
            "source_uri": [None],
            "reason": ["too_few_instructions"],
            "detail": ["2 of 3"],
        },
        schema_overrides={"source_uri": pl.String},
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("newuser"))


def text(world: World, item: str, **options: object) -> str:
    found = lineage_report(world.catalog, item, **options)
    assert found is not None, item
    return found


def test_pasted_ids_with_spaces_and_abbreviated_ids_resolve(world: World) -> None:
    assert text(world, f"  {PAIR}\n") == text(world, PAIR)
    # The 12 characters every chain line prints find the materialization.
    shown = text(world, world.pairs[:12])
    assert shown.startswith(f"materialization {world.pairs}: mined_image_pairs[00000]")
    assert "run run-0003, profile test" in shown
    assert text(world, TRIPLET[:8]).startswith(f"triplet {TRIPLET} ")
    ambiguous = text(world, "aaaa0000")
    assert ambiguous.startswith("2 ids start with 'aaaa0000'; give one in full:")
    assert PAIR in ambiguous and RETIRED_TARGET_PAIR in ambiguous
    assert lineage_report(world.catalog, "aaaa") is None  # too short to expand
    assert lineage_report(world.catalog, "   ") is None


def test_a_chain_marks_an_input_rebuilt_since_and_says_the_output_is_stale(world: World) -> None:
    report = text(world, PAIR)
    knn_line = next(line for line in report.splitlines() if "clip_image_knn[00000]" in line)
    assert f"(superseded by {world.new_knn[:12]})" in knn_line
    # The rebuilt graph, and the retired shard the graph had searched.
    assert "stale: clip_image_knn/00000, image_corpus/00001 changed (re-materialized" in report
    data = lineage_data(world.catalog, PAIR)
    (knn,) = data["produced_by"]["inputs"]
    assert knn["current"] is False and data["produced_by"]["stale_inputs"] == [
        "clip_image_knn/00000"
    ]


def test_a_partition_lists_its_records_newest_first_and_why_the_newest_failed(
    world: World,
) -> None:
    report = text(world, "mined_image_pairs[00001]")
    assert report.splitlines()[:2] == [
        "mined_image_pairs[00001]: 1 record, newest first",
        "  not readable: its newest record is failed; readers refuse it until it is "
        "re-materialized",
    ]
    assert "error: KeyError: 'score'" in report and "traceback" not in report
    history = text(world, "clip_image_knn/00000")
    assert history.index(world.new_knn[:12]) < history.index(world.old_knn[:12])
    assert "(current; 1 older record)" in history
    data = lineage_data(world.catalog, "clip_image_knn[00000]")
    assert [r["materialization_id"] for r in data["records"]] == [world.new_knn, world.old_knn]
    assert data["readable"] is True


def test_a_triplet_shows_its_models_texts_and_chain(world: World) -> None:
    report = text(world, TRIPLET)
    assert "instructions: tiny-llm [tiny-llm@rev1]" in report
    assert "    - as a sketch" in report and "both show a cat" in report
    assert "images/00000/000000001.jpg" in report
    assert f"mined_image_pairs[00000] materialization {world.pairs[:12]}" in report
    data = lineage_data(world.catalog, TRIPLET)
    assert data["texts"]["q_text"] == ["a drawn one", "as a sketch", "in ink"]
    assert data["triplet"]["instruction_model"] == "tiny-llm@rev1"
    # A user holding an exported q_img path gets the image.
    assert text(world, "images/00000/000000001.jpg").startswith("image 00000/000000001\n")


def test_a_pair_names_its_triplet_its_drop_and_a_retired_shards_image(world: World) -> None:
    assert f"made into triplet {TRIPLET}" in text(world, PAIR)
    assert "dropped by triplets: too_few_instructions (2 of 3)" in text(world, DROPPED_PAIR)
    retired = text(world, RETIRED_TARGET_PAIR)
    assert "target image 00001/000010000: shard 00001 was retired" in retired


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megapairs")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = _cli(["lineage", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_prints_json_and_explains_ids_of_a_retired_shard(
    world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEGAPAIRS_HOME", str(world.home))
    code, out, _ = _run([PAIR, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["kind"] == "pair" and data["triplet_ids"] == [TRIPLET]
    assert data["produced_by"]["materialization_id"] == world.pairs
    code, out, _ = _run(["00000/000000000", "--json", "--limit", "1"], capsys)
    page = json.loads(out)["pairs"]
    assert (page["total"], len(page["items"]), page["limit"]) == (3, 1, 1)
    code, _, err = _run(["00001/000010000"], capsys)
    assert code == 1
    assert "shard 00001 left the corpus (retired)" in err
    assert "megapairs lineage image_corpus[00001]" in err


def test_the_cli_shows_the_schema_and_runs_read_only_sql(
    world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEGAPAIRS_HOME", str(world.home))
    code, out, _ = _run(["--schema", "--json"], capsys)
    schema = json.loads(out)
    assert code == 0 and schema["triplet_provenance"]["kind"] == "view"
    assert schema["materializations"]["comment"]
    code, out, _ = _run(["--schema"], capsys)
    assert "view quarantine_report: " in out
    sql = "SELECT triplet_id, instruction_model FROM triplet_provenance"
    code, out, _ = _run(["--sql", sql, "--json"], capsys)
    assert json.loads(out) == [{"triplet_id": TRIPLET, "instruction_model": "tiny-llm@rev1"}]
    code, _, err = _run(["--sql", "DELETE FROM materializations"], capsys)
    assert code == 2 and "read-only" in err and "Traceback" not in err
    code, out, _ = _run(["--snapshot", str(world.home / "copy.duckdb")], capsys)
    assert code == 0 and (world.home / "copy.duckdb").exists()

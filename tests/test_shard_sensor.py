"""The sensor registers shards as they appear and asks for their corpus, once each."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import image_factory as factory

from megapairs_assets.corpus.assets import KNN_ASSETS, build_shards_sensor, knn_refresh_requests
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord, utc_now
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from resources.corpus import CorpusSourceResource
from resources.storage import LineageCatalogResource

new_shards_sensor = build_shards_sensor(dg.DefaultSensorStatus.RUNNING, ["image_corpus"])


def _evaluate(
    instance: dg.DagsterInstance,
    corpus: Path,
    catalog_path: Path | None = None,
    cursor: str | None = None,
):
    catalog_path = catalog_path or corpus.parent / "catalog.duckdb"
    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={
            "corpus_source": CorpusSourceResource(kind="webdataset", path=str(corpus)),
            "catalog": LineageCatalogResource(path=str(catalog_path)),
        },
    )
    return new_shards_sensor(context)


def _apply(instance: dg.DagsterInstance, result: dg.SensorResult) -> None:
    for request in result.dynamic_partitions_requests:
        if isinstance(request, dg.DeleteDynamicPartitionsRequest):
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
        else:
            instance.add_dynamic_partitions(
                request.partitions_def_name, list(request.partition_keys)
            )


def test_new_shards_are_registered_and_requested_once(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    for shard in ("00000", "00001"):
        factory.write_wds_shard(corpus / f"{shard}.tar", factory.good_items(1))
    instance = dg.DagsterInstance.ephemeral()

    first = _evaluate(instance, corpus)
    assert isinstance(first, dg.SensorResult)
    assert sorted(r.partition_key for r in first.run_requests) == ["00000", "00001"]
    _apply(instance, first)
    assert instance.get_dynamic_partitions(SHARD_PARTITIONS_NAME) == ["00000", "00001"]

    assert isinstance(_evaluate(instance, corpus), dg.SkipReason)  # nothing new

    factory.write_wds_shard(corpus / "00002.tar", factory.good_items(1))
    third = _evaluate(instance, corpus)
    assert [r.partition_key for r in third.run_requests] == ["00002"]


def test_unreadable_source_skips_instead_of_crashing(tmp_path: Path) -> None:
    result = _evaluate(dg.DagsterInstance.ephemeral(), tmp_path / "does-not-exist")
    assert isinstance(result, dg.SkipReason)
    assert "unreadable" in str(result.skip_message)


def test_removed_shards_leave_the_partition_set_and_their_lineage_retires(tmp_path: Path) -> None:
    import polars as pl

    import megapairs_assets.corpus.step  # noqa: F401  (declares image_lineage)

    corpus = tmp_path / "corpus"
    for shard in ("00000", "00001"):
        factory.write_wds_shard(corpus / f"{shard}.tar", factory.good_items(1))
    instance = dg.DagsterInstance.ephemeral()
    _apply(instance, _evaluate(instance, corpus))
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    record = MaterializationRecord("image_corpus", "00001", "r", "v", "demo", utc_now(), 0.0)
    row = {
        "image_id": "00001/a",
        "shard": "00001",
        "key": "a",
        "source_uri": "u",
        "caption": "c",
        "content_hash": "h",
        "width": 16,
        "height": 16,
    }
    catalog.record(record, rows={"image_lineage": pl.DataFrame([row])})

    (corpus / "00001.tar").unlink()
    result = _evaluate(instance, corpus)
    assert isinstance(result, dg.SensorResult)
    # The remaining shard's KNN graphs listed neighbours in 00001: they are searched again.
    (request,) = result.run_requests
    assert sorted(k.to_user_string() for k in request.asset_selection) == sorted(KNN_ASSETS)
    assert request.tags["dagster/asset_partition_range_start"] == "00000"
    assert request.tags["dagster/asset_partition_range_end"] == "00000"
    _apply(instance, result)
    assert instance.get_dynamic_partitions(SHARD_PARTITIONS_NAME) == ["00000"]
    assert catalog.query("SELECT count(*) AS n FROM image_lineage")["n"][0] == 0
    # The shard's tables leave the dataset; its history stays.
    assert catalog.current_partitions("image_corpus") == []
    assert catalog.retired_partitions("image_corpus") == ["00001"]
    assert catalog.materializations([record.materialization_id])["status"][0] == "complete"


def test_a_source_holding_none_of_the_registered_shards_retires_nothing(tmp_path: Path) -> None:
    """A UI started without the home's corpus (its profile's own corpus instead) must not
    retire the user's shards: every shard gone at once is skipped, with what to do."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    for shard in ("a", "b"):
        factory.write_wds_shard(mine / f"{shard}.tar", factory.good_items(1))
    factory.write_wds_shard(other / "00000.tar", factory.good_items(1))
    instance = dg.DagsterInstance.ephemeral()
    _apply(instance, _evaluate(instance, mine))

    result = _evaluate(instance, other)
    assert isinstance(result, dg.SkipReason)
    assert "none of the 2 registered shards" in str(result.skip_message)
    assert "megapairs sync" in str(result.skip_message)
    assert instance.get_dynamic_partitions(SHARD_PARTITIONS_NAME) == ["a", "b"]
    # One shard of two gone is an ordinary removal.
    (mine / "b.tar").unlink()
    partial = _evaluate(instance, mine)
    assert isinstance(partial, dg.SensorResult)
    assert [r.partition_keys for r in partial.dynamic_partitions_requests] == [["b"]]


def test_demo_corpus_is_remembered_by_the_home_for_every_other_process(
    tmp_path: Path, monkeypatch
) -> None:
    """`megapairs demo --corpus` records its corpus in the home; the demo profile's resources,
    which the UI's code location, `sync` and `check` build, then read it."""
    import pytest

    from megapairs_assets.demo import DEMO_CORPUS_DIR
    from megapairs_assets.lib.errors import ConfigurationError
    from resources.corpus import CHOSEN_CORPUS_FILE, record_chosen_corpus
    from resources.profiles import build_resources

    home = tmp_path / "home"
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    assert build_resources("demo", home)["corpus_source"].path == str(DEMO_CORPUS_DIR)
    mine = CorpusSourceResource(kind="folder", path=str(tmp_path / "photos"))
    record_chosen_corpus(home, mine)
    chosen = build_resources("demo", home)["corpus_source"]
    assert (chosen.kind, chosen.path) == ("folder", str(tmp_path / "photos"))
    (home / CHOSEN_CORPUS_FILE).write_text("{not json")
    with pytest.raises(ConfigurationError, match=CHOSEN_CORPUS_FILE):
        build_resources("demo", home)


def test_knn_refresh_after_retiring_comes_in_backfill_sized_ranges() -> None:
    remaining = [f"{n:05d}" for n in range(130)]
    requests = knn_refresh_requests(remaining, ["00200"])
    ranges = [
        (r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
        for r in requests
    ]
    assert ranges == [("00000", "00063"), ("00064", "00127"), ("00128", "00129")]
    assert len({r.run_key for r in requests}) == 3  # one run each, once per retirement
    assert knn_refresh_requests(remaining, ["00201"])[0].run_key != requests[0].run_key


def test_new_shards_ask_for_their_corpus_only(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    factory.write_wds_shard(corpus / "00000.tar", factory.good_items(1))
    result = _evaluate(dg.DagsterInstance.ephemeral(), corpus)
    (request,) = result.run_requests
    assert [k.to_user_string() for k in request.asset_selection] == ["image_corpus"]


def test_a_shard_rewritten_in_place_or_still_growing_is_read_again(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    factory.write_wds_shard(corpus / "00000.tar", factory.good_items(2))
    whole = corpus / "00001.tar"
    factory.write_wds_shard(whole, factory.good_items(4, first_seed=10))
    complete = whole.read_bytes()
    whole.write_bytes(complete[: len(complete) // 2])  # still being copied when first seen
    instance = dg.DagsterInstance.ephemeral()

    first = _evaluate(instance, corpus)
    _apply(instance, first)
    assert first.cursor is not None
    quiet = _evaluate(instance, corpus, cursor=first.cursor)
    assert isinstance(quiet, dg.SkipReason)

    whole.write_bytes(complete)  # the copy finished
    grown = _evaluate(instance, corpus, cursor=first.cursor)
    assert isinstance(grown, dg.SensorResult)
    (request,) = grown.run_requests
    assert request.partition_key == "00001"
    assert [k.to_user_string() for k in request.asset_selection] == ["image_corpus"]
    assert not grown.dynamic_partitions_requests  # nothing registered or retired
    assert isinstance(_evaluate(instance, corpus, cursor=grown.cursor), dg.SkipReason)

    # Replaced by other pictures under the same name: read again, once.
    factory.write_wds_shard(whole, factory.good_items(4, first_seed=30))
    replaced = _evaluate(instance, corpus, cursor=grown.cursor)
    assert [r.partition_key for r in replaced.run_requests] == ["00001"]
    assert replaced.run_requests[0].run_key != request.run_key


def test_a_cursor_from_before_fingerprints_changes_nothing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    factory.write_wds_shard(corpus / "00000.tar", factory.good_items(1))
    instance = dg.DagsterInstance.ephemeral()
    _apply(instance, _evaluate(instance, corpus))
    assert isinstance(_evaluate(instance, corpus, cursor="not json"), dg.SkipReason)


def test_a_changed_shard_waits_for_the_runs_that_work_on_it(tmp_path: Path) -> None:
    # A step still reading the shard's old rows would land after a re-read and count as up to
    # date for automation: the re-read waits until no run works on the shard.
    corpus = tmp_path / "corpus"
    for shard in ("00000", "00001"):
        factory.write_wds_shard(corpus / f"{shard}.tar", factory.good_items(2))
    instance = dg.DagsterInstance.ephemeral()
    first = _evaluate(instance, corpus)
    _apply(instance, first)
    running = dg.DagsterRun(
        job_name="mine_and_generate",
        run_id="embedding-the-old-rows",
        status=dg.DagsterRunStatus.STARTED,
        tags={
            "dagster/asset_partition_range_start": "00000",
            "dagster/asset_partition_range_end": "00001",
        },
    )
    instance.add_run(running)
    factory.write_wds_shard(corpus / "00001.tar", factory.good_items(3, first_seed=9))

    waiting = _evaluate(instance, corpus, cursor=first.cursor)
    assert isinstance(waiting, dg.SkipReason)  # held, and still seen as changed next time
    assert isinstance(_evaluate(instance, corpus, cursor=first.cursor), dg.SkipReason)

    instance.report_run_failed(running)  # the run ends
    done = _evaluate(instance, corpus, cursor=first.cursor)
    assert [r.partition_key for r in done.run_requests] == ["00001"]

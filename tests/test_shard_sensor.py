"""The sensor registers shards as they appear and asks for their corpus, once each."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import image_factory as factory

from megapairs_assets.corpus.assets import new_shards_sensor
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from resources.corpus import CorpusSourceResource


def _evaluate(instance: dg.DagsterInstance, corpus: Path):
    context = dg.build_sensor_context(
        instance=instance,
        resources={"corpus_source": CorpusSourceResource(kind="webdataset", path=str(corpus))},
    )
    return new_shards_sensor(context)


def _apply(instance: dg.DagsterInstance, result: dg.SensorResult) -> None:
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


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

"""A corpus-wide asset (each partition reads every upstream partition, as the KNN graphs do)
is never requested in the tick that requests one of its inputs again: Dagster's backfill of
such a request fails at once and both are lost (seen live with the daemon)."""

from __future__ import annotations

import threading
import time

import dagster as dg

from megapairs_assets.orchestration.automation import (
    corpus_wide_automation,
    downstream_automation,
)

PARTITIONS = dg.StaticPartitionsDefinition(["00000", "00001"])
CORPUS_RELEASED = threading.Event()
CORPUS_STARTED = threading.Event()


@dg.asset(partitions_def=PARTITIONS)
def corpus() -> None:
    if not CORPUS_RELEASED.is_set():
        CORPUS_STARTED.set()
        assert CORPUS_RELEASED.wait(60), "the test never released the corpus step"


@dg.asset(partitions_def=PARTITIONS, deps=[corpus], automation_condition=downstream_automation())
def embeddings() -> None:
    return None


@dg.asset(
    partitions_def=PARTITIONS,
    deps=[dg.AssetDep(embeddings, partition_mapping=dg.AllPartitionMapping())],
    automation_condition=corpus_wide_automation(),
)
def knn() -> None:
    return None


ASSETS = [corpus, embeddings, knn]
DEFS = dg.Definitions(assets=ASSETS)


def _materialize(instance: dg.DagsterInstance, assets: list, partition: str) -> None:
    assert dg.materialize(
        ASSETS, selection=assets, partition_key=partition, instance=instance
    ).success


def _requested(result, asset: dg.AssetsDefinition) -> set[str]:
    return result.get_requested_partitions(asset.key)


def test_the_graphs_wait_for_an_input_requested_in_the_same_tick() -> None:
    instance = dg.DagsterInstance.ephemeral()
    CORPUS_RELEASED.set()
    for partition in PARTITIONS.get_partition_keys():
        _materialize(instance, ASSETS, partition)
    settled = dg.evaluate_automation_conditions(DEFS, instance)

    # Shard 00001's corpus is being read again while shard 00000's embeddings land.
    CORPUS_RELEASED.clear()
    CORPUS_STARTED.clear()
    reread = threading.Thread(target=_materialize, args=(instance, [corpus], "00001"), daemon=True)
    reread.start()
    assert CORPUS_STARTED.wait(60)
    _materialize(instance, [embeddings], "00000")
    held = dg.evaluate_automation_conditions(DEFS, instance, cursor=settled.cursor)
    assert _requested(held, knn) == set()  # its input 00001 is being redone upstream

    CORPUS_RELEASED.set()
    reread.join(60)
    deadline = time.monotonic() + 30
    while instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The tick that asks for 00001's embeddings again does not also ask for the graphs...
    released = dg.evaluate_automation_conditions(DEFS, instance, cursor=held.cursor)
    assert _requested(released, embeddings) == {"00001"}
    assert _requested(released, knn) == set()
    # ...they follow once those embeddings landed, every shard once.
    _materialize(instance, [embeddings], "00001")
    after = dg.evaluate_automation_conditions(DEFS, instance, cursor=released.cursor)
    assert _requested(after, knn) == {"00000", "00001"}

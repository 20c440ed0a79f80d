"""Automation waits for upstream work still running two levels up, not only one, and for an
upstream whose latest run failed.

The shape is the mining half's fan-in: one corpus, two embedding tables, a KNN graph on each and
one mining asset reading both graphs. A real run that is still embedding one source holds the
mining of that shard, even though the other source's graph has already landed; once the run
finishes, the shard is mined exactly once.
"""

from __future__ import annotations

import threading
import time

import dagster as dg

from megapairs_assets.orchestration.automation import downstream_automation, upstream_in_progress

PARTITIONS = dg.StaticPartitionsDefinition(["00000", "00001"])
EMBEDDING_RELEASED = threading.Event()
EMBEDDING_STARTED = threading.Event()
DINO_KNN_FAILS = threading.Event()


@dg.asset(partitions_def=PARTITIONS)
def corpus() -> None:
    return None


def _eager(
    name: str, deps: list[str], *, block: bool = False, fails: threading.Event | None = None
) -> dg.AssetsDefinition:
    @dg.asset(
        name=name,
        deps=deps,
        partitions_def=PARTITIONS,
        automation_condition=downstream_automation(),
    )
    def _asset() -> None:
        if fails is not None and fails.is_set():
            raise RuntimeError(f"{name} fails this time")
        if block and not EMBEDDING_RELEASED.is_set():
            EMBEDDING_STARTED.set()
            assert EMBEDDING_RELEASED.wait(60), "the test never released the embedding step"

    return _asset


ASSETS = [
    corpus,
    _eager("clip_embeddings", ["corpus"]),
    _eager("dino_embeddings", ["corpus"], block=True),
    _eager("clip_knn", ["clip_embeddings"]),
    _eager("dino_knn", ["dino_embeddings"], fails=DINO_KNN_FAILS),
    _eager("mined_pairs", ["clip_knn", "dino_knn"]),
]
DEFS = dg.Definitions(assets=ASSETS)


def _materialize(
    instance: dg.DagsterInstance, names: list[str], partition: str, *, succeeds: bool = True
) -> None:
    selection = [a for a in ASSETS if a.key.to_user_string() in names]
    result = dg.materialize(
        ASSETS,
        selection=selection,
        partition_key=partition,
        instance=instance,
        raise_on_error=False,
    )
    assert result.success == succeeds


def _requested(result: dg.AutomationResult | object, name: str) -> set[str]:
    return result.get_requested_partitions(dg.AssetKey(name))  # type: ignore[attr-defined]


def test_upstream_in_progress_looks_the_given_number_of_levels_up() -> None:
    assert "2 levels" in upstream_in_progress().get_label()
    assert "1 levels" in upstream_in_progress(1).get_label()


def test_mining_waits_for_an_embedding_run_two_levels_up_and_then_runs_once() -> None:
    instance = dg.DagsterInstance.ephemeral()
    names = [a.key.to_user_string() for a in ASSETS]
    for partition in PARTITIONS.get_partition_keys():
        EMBEDDING_RELEASED.set()
        _materialize(instance, names, partition)
    settled = dg.evaluate_automation_conditions(DEFS, instance)
    assert settled.total_requested == 0

    # A run re-embedding DINOv2 for shard 00001 is in progress...
    EMBEDDING_RELEASED.clear()
    EMBEDDING_STARTED.clear()
    slow = threading.Thread(
        target=_materialize, args=(instance, ["dino_embeddings"], "00001"), daemon=True
    )
    slow.start()
    assert EMBEDDING_STARTED.wait(60)
    # ...while another run refreshes the CLIP side of the same shard end to end.
    _materialize(instance, ["clip_embeddings", "clip_knn"], "00001")

    during = dg.evaluate_automation_conditions(DEFS, instance, cursor=settled.cursor)
    # eager() alone would mine 00001 now: its direct deps are clip_knn (updated) and dino_knn
    # (not itself in progress). The DINOv2 run above it holds the mining back.
    assert _requested(during, "mined_pairs") == set()
    assert _requested(during, "dino_knn") == set()

    EMBEDDING_RELEASED.set()
    slow.join(60)
    assert not slow.is_alive()
    deadline = time.monotonic() + 30
    while instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])):
        assert time.monotonic() < deadline, "the embedding run never finished"
        time.sleep(0.1)

    after = dg.evaluate_automation_conditions(DEFS, instance, cursor=during.cursor)
    # One tick asks for the DINOv2 graph and the mining of shard 00001 together (one run, in
    # graph order), and nothing for the shard that did not change.
    assert _requested(after, "dino_knn") == {"00001"}
    assert _requested(after, "mined_pairs") == {"00001"}
    assert _requested(after, "clip_knn") == set()


def test_mining_waits_while_an_upstream_graphs_latest_run_failed() -> None:
    instance = dg.DagsterInstance.ephemeral()
    names = [a.key.to_user_string() for a in ASSETS]
    EMBEDDING_RELEASED.set()
    DINO_KNN_FAILS.clear()
    for partition in PARTITIONS.get_partition_keys():
        _materialize(instance, names, partition)
    settled = dg.evaluate_automation_conditions(DEFS, instance)

    # The DINOv2 graph of 00001 fails; the CLIP side of the same shard lands.
    DINO_KNN_FAILS.set()
    try:
        _materialize(instance, ["dino_knn"], "00001", succeeds=False)
    finally:
        DINO_KNN_FAILS.clear()
    _materialize(instance, ["clip_embeddings", "clip_knn"], "00001")
    held = dg.evaluate_automation_conditions(DEFS, instance, cursor=settled.cursor)
    assert _requested(held, "mined_pairs") == set()  # it would fail on the failed graph

    # Re-materialized clean: the shard is mined once.
    _materialize(instance, ["dino_knn"], "00001")
    after = dg.evaluate_automation_conditions(DEFS, instance, cursor=held.cursor)
    assert _requested(after, "mined_pairs") == {"00001"}

"""Dagster wiring of benchmark scores: (retriever, benchmark) partitions and a checkpoint sensor.

`benchmark_scores` is partitioned two ways: `retriever` (dynamic: the base model and every
trained checkpoint, registered as they appear) x `benchmark` (the fixed benchmark keys of
`evaluation.run`). A new checkpoint therefore scores only its own partitions; nothing already
scored runs again. `rescore_trained_checkpoints` re-scores a checkpoint only when it was
materialized again after its last scores.
"""

from typing import Any

import dagster as dg

from megapairs_assets.evaluation.catalog_rows import SCORES_TABLE
from megapairs_assets.evaluation.run import BENCHMARK_KEYS, SCORE_COLUMNS
from megapairs_assets.evaluation.step import (
    ASSET_NAME,
    SCORE_CHECKS,
    SCORE_WARNINGS,
    TRIPLETS_ASSET,
    RetrieverPool,
    known_retrievers,
    score_partition,
    trained_retrievers_by_config,
)
from megapairs_assets.lib.step import StepResult
from megapairs_assets.orchestration.partitions import step_placement
from megapairs_assets.orchestration.settings_version import fields, weights_label
from megapairs_assets.orchestration.shard_step import Stage, materialize_partitions
from megapairs_assets.training.names import ASSET_NAME as CHECKPOINT_ASSET
from resources.device import DeviceResource

# To move with the resource to resources/evaluation.py (see the report to the lead).
from resources.evaluation import EvaluationResource
from resources.storage import LineageCatalogResource, StorageResource

RETRIEVER_PARTITIONS_NAME = "retrievers"
RETRIEVER_DIMENSION, BENCHMARK_DIMENSION = "retriever", "benchmark"
retriever_partitions = dg.DynamicPartitionsDefinition(name=RETRIEVER_PARTITIONS_NAME)
benchmark_partitions = dg.StaticPartitionsDefinition(list(BENCHMARK_KEYS))
score_partitions = dg.MultiPartitionsDefinition(
    {RETRIEVER_DIMENSION: retriever_partitions, BENCHMARK_DIMENSION: benchmark_partitions}
)


def score_settings(resources: Any) -> dict[str, Any]:
    """What decides the scores besides the retriever and the benchmark's files: the base
    retriever, the held-out split and the numbers the retriever runs in (not batch sizes,
    workers or where the benchmarks sit)."""
    evaluation = resources.evaluation
    settings = fields(
        evaluation, ("base_model", "heldout_fraction", "heldout_max_queries", "precision")
    )
    if evaluation.base_pretrained:
        settings["base_pretrained"] = weights_label(evaluation.base_pretrained)
    return settings


STAGE = Stage(
    ASSET_NAME,
    "benchmark-scores-v2",
    SCORE_CHECKS,
    SCORE_WARNINGS,
    settings=score_settings,
    # The catalog's words for the same columns (its extra `partition` column is not in the file).
    columns={name: text for name, text in SCORES_TABLE.column_docs if name in SCORE_COLUMNS},
)


def score_partition_key(retriever_id: str, benchmark: str) -> dg.MultiPartitionKey:
    """The `benchmark_scores` partition of one retriever on one benchmark."""
    return dg.MultiPartitionKey({RETRIEVER_DIMENSION: retriever_id, BENCHMARK_DIMENSION: benchmark})


def split_partition_key(partition: str) -> tuple[str, str]:
    """(retriever id, benchmark) of a `benchmark_scores` partition key."""
    keys = score_partitions.get_partition_key_from_str(partition).keys_by_dimension
    return keys[RETRIEVER_DIMENSION], keys[BENCHMARK_DIMENSION]


@dg.asset(
    name=ASSET_NAME,
    partitions_def=score_partitions,
    # Only the held-out benchmark reads triplets; it reads every shard of them.
    deps=[dg.AssetDep(TRIPLETS_ASSET, partition_mapping=dg.AllPartitionMapping())],
    group_name="evaluation",
    code_version=STAGE.code_version,
    kinds={"faiss", "open_clip"},
    # Like the other model-loading steps: two scoring runs (base and trained, as the sensors
    # launch them) take turns on a GPU instead of loading both models at once.
    pool="gpu",
    check_specs=STAGE.check_specs(),
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=16),
    # On Kubernetes: one GPU embeds the queries and the gallery (as the embedding assets ask),
    # memory for the gallery's cached vectors and the FAISS index beside the model.
    **step_placement(1, "32Gi"),
)
def benchmark_scores(
    context: dg.AssetExecutionContext,
    evaluation: EvaluationResource,
    device: DeviceResource,
    storage: StorageResource,
    catalog: LineageCatalogResource,
) -> dg.MaterializeResult:
    """Zero-shot CIR scores of one retriever on one benchmark, with the official metrics.

    CIRCO mAP@5/10/25/50; CIRR Recall@1/5/10/50 (reference removed), Recall_subset@1/2/3
    and Avg(R@5,R_subset@1); FashionIQ Recall@10/50 per category and mean; GeneCIS
    Recall@1/2/3 per task and mean; our held-out split of the triplets Recall@1/5/10 and mAP@5.
    Benchmark images are decoded as the official loaders do; scores are exact, ties by gallery
    order. Test splits (CIRCO test, CIRR test1) write the evaluation servers' files instead. A
    benchmark whose files are absent is a `skipped` row naming the path looked at. Gallery
    embeddings are cached per retriever weights, gallery version, decoding, batch size and
    device; scores are also rows of the catalog table `benchmark_scores`.
    """
    layout, lineage = storage.layout(), catalog.catalog()
    # The device comes from the profile; the precision is evaluation's own (float32 unless set).
    pool = RetrieverPool(device.torch_device(), evaluation.torch_dtype())
    base, settings = evaluation.base_spec(), evaluation.settings()
    config = {
        "roots": {name: str(path) if path else None for name, path in evaluation.roots().items()},
        "heldout_fraction": evaluation.heldout_fraction,
        "heldout_max_queries": evaluation.heldout_max_queries,
        "device": str(device.torch_device()),
        "precision": evaluation.precision,
    }

    def step(partition: str) -> StepResult:
        retriever_id, benchmark = split_partition_key(partition)
        if retriever_id == base.retriever_id:
            # Said before any benchmark file is read, naming the setting of the weights.
            evaluation.check_base_weights()
        return score_partition(
            partition,
            retriever_id,
            benchmark,
            base,
            evaluation.sources,
            settings,
            layout,
            lineage,
            pool,
            config=config,
            log=context.log.info,
        )

    return materialize_partitions(context, STAGE, step, lineage, storage.profile)


def build_checkpoint_sensor(default_status: dg.DefaultSensorStatus) -> dg.SensorDefinition:
    """The sensor that registers new retrievers (base model, trained checkpoints) and scores
    them on every benchmark."""

    @dg.sensor(
        name="new_retrievers_sensor",
        minimum_interval_seconds=60,
        default_status=default_status,
        asset_selection=[ASSET_NAME],
    )
    def new_retrievers_sensor(
        context: dg.SensorEvaluationContext,
        evaluation: EvaluationResource,
        storage: StorageResource,
    ) -> dg.SensorResult | dg.SkipReason:
        """Registers the base retriever and each complete checkpoint export that appeared under
        `<data>/mmret_clip_checkpoint/`, and requests its scores on every benchmark whose files
        are configured (and the held-out split)."""
        try:
            found = list(known_retrievers(evaluation.base_spec(), storage.layout()))
        except Exception as error:  # a bad folder must not kill the sensor daemon
            return dg.SkipReason(f"cannot list retrievers: {error}")
        known = set(context.instance.get_dynamic_partitions(RETRIEVER_PARTITIONS_NAME))
        new = [retriever_id for retriever_id in found if retriever_id not in known]
        # A scoring run of a base model whose weights are not on this machine is certain to
        # fail: leave it unregistered (so it is new again once they are) and say why.
        base_id = evaluation.base_spec().retriever_id
        missing_base = evaluation.base_weights_problem() if base_id in new else None
        if missing_base:
            new.remove(base_id)
            context.log.warning(f"not scoring the base retriever {base_id}: {missing_base}")
        if not new:
            if missing_base:
                return dg.SkipReason(f"base retriever {base_id} not scored: {missing_base}")
            return dg.SkipReason(f"no new retriever ({len(found)} known)")
        # Unconfigured benchmarks would only record `skipped`; they stay one click away.
        benchmarks = evaluation.configured_benchmarks()
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(partition_key=score_partition_key(retriever_id, benchmark))
                for retriever_id in new
                for benchmark in benchmarks
            ],
            dynamic_partitions_requests=[retriever_partitions.build_add_request(new)],
        )

    return new_retrievers_sensor


def register_retrievers(instance: dg.DagsterInstance, retriever_ids: list[str]) -> list[str]:
    """Add retriever partitions not yet known (for `megapairs demo`); returns the new ones."""
    known = set(instance.get_dynamic_partitions(RETRIEVER_PARTITIONS_NAME))
    new = [r for r in retriever_ids if r not in known]
    if new:
        instance.add_dynamic_partitions(RETRIEVER_PARTITIONS_NAME, new)
    return new


def build_rescore_sensor(default_status: dg.DefaultSensorStatus) -> dg.SensorDefinition:
    """Scores a checkpoint again each time it is re-trained (same folder, so same retriever
    id: `new_retrievers_sensor` alone would never score it twice)."""

    @dg.sensor(
        name="rescore_trained_checkpoints",
        minimum_interval_seconds=60,
        default_status=default_status,
        asset_selection=[ASSET_NAME],
    )
    def rescore_trained_checkpoints(
        context: dg.SensorEvaluationContext,
        evaluation: EvaluationResource,
        storage: StorageResource,
    ) -> dg.SensorResult | dg.SkipReason:
        """For each `mmret_clip_checkpoint` materialization since the cursor, request its
        retriever's scores on the configured benchmarks (and the held-out split) that were not
        materialized after it. Scores newer than the checkpoint (e.g. `megapairs demo`'s)
        already describe those weights and are not redone; a checkpoint never scored at all is
        `new_retrievers_sensor`'s to register and score."""
        after = int(context.cursor) if context.cursor else None
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(CHECKPOINT_ASSET), after_storage_id=after),
            limit=100,
            ascending=True,
        ).records
        if not records:
            return dg.SkipReason("no new checkpoint materialization")
        newest = max(record.storage_id for record in records)
        # The latest materialization of each training config in this batch, unless it holds
        # the same weights as the one before it (a finished config re-materialized exports its
        # final checkpoint again: same content, same data version, same scores).
        checkpoints: dict[str, int] = {}
        for record in records:
            if record.partition_key is not None:
                checkpoints[record.partition_key] = record.storage_id
        for config in [c for c in checkpoints if checkpoint_unchanged(context.instance, c)]:
            context.log.info(f"{config}: the checkpoint's content is unchanged; not re-scored")
            del checkpoints[config]
        try:
            by_config = trained_retrievers_by_config(evaluation.base_spec(), storage.layout())
        except Exception as error:  # a bad folder must not kill the sensor daemon
            return dg.SkipReason(f"cannot list retrievers: {error}")
        run_requests = stale_score_requests(
            context.instance, checkpoints, by_config, evaluation.configured_benchmarks()
        )
        run_requests += stale_base_heldout_request(
            context.instance, evaluation.base_spec().retriever_id
        )
        return dg.SensorResult(
            run_requests=run_requests or None,
            skip_reason=None if run_requests else "every new checkpoint is already scored",
            cursor=str(newest),
        )

    return rescore_trained_checkpoints


# The event tag holding a materialization's data version (Dagster's DATA_VERSION_TAG).
_DATA_VERSION_TAG = "dagster/data_version"


def checkpoint_unchanged(instance: dg.DagsterInstance, config: str) -> bool:
    """Whether the latest checkpoint of `config` has the data version of the one before it
    (its export's content: see `lib.step.content_version`)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(CHECKPOINT_ASSET), asset_partitions=[config]),
        limit=2,
    ).records
    if len(records) < 2:
        return False
    versions = [(r.asset_materialization.tags or {}).get(_DATA_VERSION_TAG) for r in records]
    return versions[0] is not None and versions[0] == versions[1]


HELDOUT_BENCHMARK = "heldout"


def stale_base_heldout_request(instance: dg.DagsterInstance, base_id: str) -> list[dg.RunRequest]:
    """The base retriever's held-out score again when it predates the newest triplets: the
    held-out split comes with them, so a base scored before them (a fresh instance's sensor
    scores it at once, on no split) or on older ones would not compare with the trained
    checkpoints' scores. Nothing when the base is not registered (`new_retrievers_sensor`'s)
    or no triplets were made."""
    if base_id not in set(instance.get_dynamic_partitions(RETRIEVER_PARTITIONS_NAME)):
        return []
    triplets = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(TRIPLETS_ASSET)), limit=1, ascending=False
    ).records
    if not triplets:
        return []
    newest_triplets = triplets[0].storage_id
    key = str(score_partition_key(base_id, HELDOUT_BENCHMARK))
    scored = instance.get_latest_storage_id_by_partition(
        dg.AssetKey(ASSET_NAME), dg.DagsterEventType.ASSET_MATERIALIZATION, {key}
    )
    if scored.get(key, -1) > newest_triplets:
        return []
    return [dg.RunRequest(partition_key=key, run_key=f"{newest_triplets}:{key}")]


def stale_score_requests(
    instance: dg.DagsterInstance,
    checkpoints: dict[str, int],
    retrievers_by_config: dict[str, list[str]],
    benchmarks: list[str],
) -> list[dg.RunRequest]:
    """Score runs for the (retriever, benchmark) partitions of re-materialized checkpoints
    whose latest score predates the checkpoint materialization (`checkpoints`: config ->
    its storage id). Retrievers never scored, or not yet registered, are left out."""
    known = set(instance.get_dynamic_partitions(RETRIEVER_PARTITIONS_NAME))
    wanted = {
        (config, retriever_id, benchmark): str(score_partition_key(retriever_id, benchmark))
        for config in checkpoints
        for retriever_id in retrievers_by_config.get(config, [])
        if retriever_id in known
        for benchmark in benchmarks
    }
    if not wanted:
        return []
    scored = instance.get_latest_storage_id_by_partition(
        dg.AssetKey(ASSET_NAME),
        dg.DagsterEventType.ASSET_MATERIALIZATION,
        set(wanted.values()),
    )
    ever_scored = {rid for (_, rid, _), key in wanted.items() if key in scored}
    return [
        dg.RunRequest(partition_key=key, run_key=f"{checkpoints[config]}:{rid}:{benchmark}")
        for (config, rid, benchmark), key in wanted.items()
        if rid in ever_scored and scored.get(key, -1) < checkpoints[config]
    ]

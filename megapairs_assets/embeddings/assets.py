"""Dagster wiring of the three embedding tables: one factory over the source registry."""

from typing import Any

import dagster as dg

from megapairs_assets.corpus.assets import image_corpus
from megapairs_assets.embeddings.compute import EMBEDDING_COLUMN_DESCRIPTIONS
from megapairs_assets.embeddings.encoders import LoadedEncoder, encoder_backend, encoder_model_id
from megapairs_assets.embeddings.sources import SOURCES, SimilaritySource
from megapairs_assets.embeddings.step import (
    EMBEDDING_CHECKS,
    EmbeddingRun,
    LazyEncoder,
    embed_shards,
)
from megapairs_assets.lib.step import StepStream
from megapairs_assets.orchestration.partitions import (
    DOWNSTREAM_AUTOMATION,
    shard_asset_options,
    step_placement,
)
from megapairs_assets.orchestration.settings_version import (
    SettingsOf,
    fields,
    settings_code_version,
    weights_label,
)
from megapairs_assets.orchestration.shard_step import Stage, materialize_partitions


def embedding_settings(source: SimilaritySource) -> SettingsOf:
    """What decides a source's vectors: its model and the configured precision (not batch
    size, workers or where images are decoded). Weights given as a path count by file name
    here, so moving the models folder (or the data root holding the demo's) re-embeds nothing;
    what the weights hold counts by their bytes, in each table's reuse key (`weights_digest`
    in the step), since this code version is computed where the weights may not be (the
    webserver, the daemon)."""

    def settings(resources: Any) -> dict[str, Any]:
        encoder = fields(
            getattr(resources, source.encoder_key), ("backend", "model", "pretrained", "dim")
        )
        for name in ("model", "pretrained"):
            if isinstance(encoder[name], str):
                encoder[name] = weights_label(encoder[name])
        return {"encoder": encoder, "dtype": resources.device.dtype}

    return settings


def embedding_stage(source: SimilaritySource) -> Stage:
    """The stage of one source's embedding table."""
    return Stage(
        source.embedding_asset,
        "embeddings-v1",
        EMBEDDING_CHECKS,
        settings=embedding_settings(source),
        columns=EMBEDDING_COLUMN_DESCRIPTIONS,
    )


def build_embedding_asset(source: SimilaritySource) -> dg.AssetsDefinition:
    """The asset for one source's embedding table."""
    stage = embedding_stage(source)

    @dg.asset(
        name=source.embedding_asset,
        description=source.description
        + " float16, L2-normalised, keyed by image_id; one Parquet file per shard.",
        deps=[image_corpus],
        kinds={"pytorch", "parquet"},
        pool="gpu",
        automation_condition=DOWNSTREAM_AUTOMATION,
        required_resource_keys={
            source.encoder_key,
            "device",
            "storage",
            "catalog",
            "corpus_source",
        },
        check_specs=stage.check_specs(),
        **shard_asset_options("embeddings", stage.code_version, **step_placement(1, "32Gi")),
    )
    def _embedding_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        resources = context.resources
        encoder_resource = getattr(resources, source.encoder_key)
        device, dtype = resources.device.torch_device(), resources.device.torch_dtype()
        model_id = encoder_model_id(encoder_resource.spec())

        def load() -> LoadedEncoder:
            context.log.info(f"loading {model_id} on {resources.device.describe()}")
            return encoder_resource.load(device, dtype)

        for note in encoder_resource.notes():
            context.log.info(f"{source.embedding_asset}: {note}")
        # Which bytes the weights are: new weights at the same path embed every shard again,
        # the same bytes anywhere keep the tables (embeddings/weights.py).
        weights = encoder_resource.weights_digest(log=context.log.info)

        # Loaded only when a shard has to be embedded: shards whose inputs are unchanged keep
        # their tables (embeddings/reuse.py), and loading is a large part of a short step.
        encoder = LazyEncoder(encoder_backend(encoder_resource.backend).modality, load)
        run = EmbeddingRun(
            source=source,
            encoder=encoder,
            batch_size=encoder_resource.batch_size,
            num_workers=encoder_resource.num_workers,
            device=device,
            dtype=dtype,
            limits=resources.corpus_source.limits(),
            image_decode=encoder_resource.image_decode,
            # What Dagster shows as the code version, with this run's settings (as shard_step
            # records it), so a run-config override of the model never reuses a table.
            code_version=settings_code_version(stage.code_version, stage.settings(resources)),
            reuse_unchanged=encoder_resource.reuse_unchanged,
            weights_digest=weights,
        )
        if not run.reuse_unchanged:
            context.log.info(f"{source.embedding_asset}: reuse_unchanged is off; embedding all")
        layout, lineage = resources.storage.layout(), resources.catalog.catalog()
        # The run's shards share one input pipeline (embed_shards), handed out per shard.
        shards = embed_shards(
            context.partition_keys, run, layout, lineage, context.log.info, warn=context.log.warning
        )
        result = materialize_partitions(
            context,
            stage,
            StepStream(shards, context.partition_keys),
            lineage,
            resources.storage.profile,
            run_metadata={
                "model_id": model_id,
                "device": resources.device.describe(),
                **({"weights_sha256": weights[:16]} if weights else {}),
            },
        )
        if not encoder.loaded:
            context.log.info(
                f"{source.embedding_asset}: no shard needed the model (unchanged, or changed "
                f"only by removed rows); {model_id} was not loaded"
            )
        return result

    return _embedding_asset


embedding_assets = [build_embedding_asset(source) for source in SOURCES]
embedding_stages = [embedding_stage(source) for source in SOURCES]

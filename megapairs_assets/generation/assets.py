"""Dagster wiring of generation (method.md §4-6): descriptions, instructions, triplets, export.

Each asset is a declaration over a plain per-shard function; the shard-step helper records
lineage and turns outcomes into blocking checks. The two model-calling assets run in the
`generation` pool, so a backfill of many shards cannot open (shards x max_in_flight)
connections against one server at once.
"""

from collections.abc import Callable
from typing import Any

import dagster as dg

from megapairs_assets.generation.backends.base import BackendSpec, GenerationBackend
from megapairs_assets.generation.common import (
    DESCRIPTIONS_ASSET,
    EXPORT_ASSET,
    INSTRUCTIONS_ASSET,
    PAIRS_ASSET,
    TRIPLETS_ASSET,
    export_dir,
)
from megapairs_assets.generation.describe import (
    DESCRIPTION_CHECKS,
    DESCRIPTION_COLUMN_DESCRIPTIONS,
    DESCRIPTION_WARNING_CHECKS,
    describe_pairs_for_shard,
    prefetch_descriptions,
)
from megapairs_assets.generation.export import (
    EXPORT_CHECKS,
    export_triplets_for_shard,
    update_release_folder,
)
from megapairs_assets.generation.instruct import (
    INSTRUCTION_CHECKS,
    INSTRUCTION_COLUMN_DESCRIPTIONS,
    prefetch_instructions,
    write_instructions_for_shard,
)
from megapairs_assets.generation.resource import GenerationResource
from megapairs_assets.generation.runner import RunStats, stats_table
from megapairs_assets.generation.settings import GenerationSettings
from megapairs_assets.generation.triplets import (
    RELEASE_COLUMN_DESCRIPTIONS,
    TRIPLET_CHECKS,
    TRIPLET_COLUMN_DESCRIPTIONS,
    build_triplets_for_shard,
)
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.orchestration.partitions import DOWNSTREAM_AUTOMATION, shard_asset_options
from megapairs_assets.orchestration.settings_version import fields
from megapairs_assets.orchestration.shard_step import Stage, materialize_partitions
from resources.storage import LineageCatalogResource, StorageResource

GENERATION_POOL = "generation"
GROUP = "generation"

# Which pairs go to the model and how requests are drawn: shared by both model steps.
_SAMPLE_FIELDS = ("model_fraction", "model_pairs_per_shard", "heuristic_fill", "seed")
# Which answers are kept as written in the wanted language: shared by both model steps.
_LANGUAGE_FIELDS = ("answer_language", "answer_language_min_confidence")


def _file_hash(load: Callable[[str], Any], name: str) -> str:
    """A prompt file's content hash; a missing or broken file gets a marker (the step itself
    then fails with the loader's message) instead of breaking the code location."""
    try:
        return load(name).hash
    except Exception as error:  # any loader error: the step itself reports it
        return f"unreadable:{name}:{type(error).__name__}"


def _step_settings(generation: Any, step: str) -> dict[str, Any]:
    """A model step's backend model and the name its server is asked for (not its servers or
    timeouts), template content, sampling."""
    from megapairs_assets.generation.prompts import load_template

    backend = getattr(generation, f"{step}_backend")
    template = getattr(generation, f"{step}_template")
    # Only when set: a profile that never names a served model keeps its settings version.
    served = backend.spec().served_model
    return {
        "backend": backend.backend,
        "model_id": backend.model_id,
        **({"served_model": served} if served else {}),
        "template": _file_hash(load_template, template),
        "sampling": getattr(generation, f"{step}_sampling").model_dump(),
        **fields(generation, _SAMPLE_FIELDS),
    }


def describe_settings(resources: Any) -> dict[str, Any]:
    """What decides the descriptions: model, prompt file content, sampling, sample, limits."""
    generation = resources.generation
    return {
        **_step_settings(generation, "describe"),
        **fields(generation, ("description_min_words", "description_max_words", *_LANGUAGE_FIELDS)),
    }


def instruct_settings(resources: Any) -> dict[str, Any]:
    """What decides the instructions: as for descriptions, plus the demonstration pool."""
    from megapairs_assets.generation.prompts import load_demo_pool

    generation = resources.generation
    return {
        **_step_settings(generation, "instruct"),
        "demo_pool": _file_hash(load_demo_pool, generation.demo_pool),
        **fields(generation, ("instruction_max_words", *_LANGUAGE_FIELDS)),
    }


def export_settings(resources: Any) -> dict[str, Any]:
    """What decides the release folder: image size, where it is, the dataset card's lines."""
    return fields(
        resources.generation, ("export_image_side_px", "export_dir", "licence", "dataset_name")
    )


DESCRIBE_STAGE = Stage(
    DESCRIPTIONS_ASSET,
    "generation-describe-v1",
    DESCRIPTION_CHECKS,
    DESCRIPTION_WARNING_CHECKS,
    settings=describe_settings,
    columns=DESCRIPTION_COLUMN_DESCRIPTIONS,
)
INSTRUCT_STAGE = Stage(
    INSTRUCTIONS_ASSET,
    "generation-instruct-v1",
    INSTRUCTION_CHECKS,
    settings=instruct_settings,
    columns=INSTRUCTION_COLUMN_DESCRIPTIONS,
)
TRIPLET_STAGE = Stage(
    TRIPLETS_ASSET, "generation-triplets-v1", TRIPLET_CHECKS, columns=TRIPLET_COLUMN_DESCRIPTIONS
)
EXPORT_STAGE = Stage(
    EXPORT_ASSET,
    "generation-export-v1",
    EXPORT_CHECKS,
    settings=export_settings,
    columns=RELEASE_COLUMN_DESCRIPTIONS,
)


@dg.asset(
    name=DESCRIPTIONS_ASSET,
    deps=[PAIRS_ASSET],
    kinds={"parquet"},
    pool=GENERATION_POOL,
    automation_condition=DOWNSTREAM_AUTOMATION,
    check_specs=DESCRIBE_STAGE.check_specs(),
    **shard_asset_options(GROUP, DESCRIBE_STAGE.code_version),
)
def pair_descriptions(
    context: dg.AssetExecutionContext,
    generation: GenerationResource,
    storage: StorageResource,
    catalog: LineageCatalogResource,
) -> dg.MaterializeResult:
    """What each mined pair's two images share and what sets each apart, at a length asked of
    the model per pair: a number of words drawn at random from the generation setting
    `word_num_range` (60 to 100 by default), kept in the row's `word_num` column.

    The profile's multimodal model sees both images (the demo's text-only model reads the two
    captions instead, and its rows say "caption-based"); pairs outside the model sample get
    caption-heuristic text when enabled. Every row names its generator, model, template and
    request key; every rejection is a quarantine row with a reason (a model answer in another
    language than `answer_language`: wrong_language). Cached per request: a re-run with
    unchanged inputs makes no model call.
    """
    layout, lineage, settings = storage.layout(), catalog.catalog(), generation.settings()
    backends = generation.backend_factory("describe")
    run_metadata = _prefetch(context, prefetch_descriptions, layout, lineage, settings, backends)
    return materialize_partitions(
        context,
        DESCRIBE_STAGE,
        lambda shard: describe_pairs_for_shard(
            shard,
            layout,
            lineage,
            settings,
            log=context.log.info,
            backend_factory=backends,
            warn=context.log.warning,
        ),
        lineage,
        storage.profile,
        run_metadata,
    )


@dg.asset(
    name=INSTRUCTIONS_ASSET,
    deps=[DESCRIPTIONS_ASSET],
    kinds={"parquet"},
    pool=GENERATION_POOL,
    automation_condition=DOWNSTREAM_AUTOMATION,
    check_specs=INSTRUCT_STAGE.check_specs(),
    **shard_asset_options(GROUP, INSTRUCT_STAGE.code_version),
)
def pair_instructions(
    context: dg.AssetExecutionContext,
    generation: GenerationResource,
    storage: StorageResource,
    catalog: LineageCatalogResource,
) -> dg.MaterializeResult:
    """At least three retrieval instructions per pair, written from its description.

    Each model request carries five demonstrations drawn (per pair id) from the shipped pool of
    fifty; answers are parsed out of chatter, fences, numbering or truncation, then filtered
    (empty, in another language than `answer_language`, duplicate, overlong, naming "the
    target image" or "image 2", copying the description), each rejection with its reason.
    """
    layout, lineage, settings = storage.layout(), catalog.catalog(), generation.settings()
    backends = generation.backend_factory("instruct")
    run_metadata = _prefetch(context, prefetch_instructions, layout, lineage, settings, backends)
    return materialize_partitions(
        context,
        INSTRUCT_STAGE,
        lambda shard: write_instructions_for_shard(
            shard,
            layout,
            lineage,
            settings,
            log=context.log.info,
            backend_factory=backends,
            warn=context.log.warning,
        ),
        lineage,
        storage.profile,
        run_metadata,
    )


@dg.asset(
    name=TRIPLETS_ASSET,
    deps=[PAIRS_ASSET, DESCRIPTIONS_ASSET, INSTRUCTIONS_ASSET],
    kinds={"parquet"},
    automation_condition=DOWNSTREAM_AUTOMATION,
    check_specs=TRIPLET_STAGE.check_specs(),
    **shard_asset_options(GROUP, TRIPLET_STAGE.code_version),
)
def triplets(
    context: dg.AssetExecutionContext,
    generation: GenerationResource,
    storage: StorageResource,
    catalog: LineageCatalogResource,
) -> dg.MaterializeResult:
    """Training triplets in the MegaPairs release schema: q_img, q_text, t_img, hns.

    `hns[0]` is always the query image; image fields are paths relative to the export folder.
    Parquet (with ids and generators) and JSON Lines (release fields only) per shard, plus
    row-level lineage (`megapairs lineage <triplet id>`). The page shows a few examples.
    """
    layout, lineage, settings = storage.layout(), catalog.catalog(), generation.settings()
    return materialize_partitions(
        context,
        TRIPLET_STAGE,
        lambda shard: build_triplets_for_shard(
            shard, layout, lineage, settings, log=context.log.info
        ),
        lineage,
        storage.profile,
    )


@dg.asset(
    name=EXPORT_ASSET,
    deps=[TRIPLETS_ASSET],
    kinds={"parquet", "json"},
    automation_condition=DOWNSTREAM_AUTOMATION,
    check_specs=EXPORT_STAGE.check_specs(),
    **shard_asset_options(GROUP, EXPORT_STAGE.code_version),
)
def triplet_export(
    context: dg.AssetExecutionContext,
    generation: GenerationResource,
    storage: StorageResource,
    catalog: LineageCatalogResource,
) -> dg.MaterializeResult:
    """The release folder: triplet files, images at 512x512 and a generated dataset card.

    The card counts triplets, the source mix, the models and templates, and how many rows the
    caption heuristic wrote; its licence line comes from the profile.
    """
    layout, lineage, settings = storage.layout(), catalog.catalog(), generation.settings()
    # The card reads every shard's figures: written once per step, after its last shard (or,
    # when a shard fails first, for what the shards before it exported).
    last_shard = context.partition_keys[-1]
    card_written = False

    def export_shard(shard: str) -> StepResult:
        nonlocal card_written
        result = export_triplets_for_shard(
            shard, layout, lineage, settings, log=context.log.info, write_card=shard == last_shard
        )
        card_written = shard == last_shard
        return result

    try:
        return materialize_partitions(context, EXPORT_STAGE, export_shard, lineage, storage.profile)
    finally:
        if not card_written:
            update_release_folder(export_dir(layout, settings.export.export_dir), settings, layout)


def _prefetch(
    context: dg.AssetExecutionContext,
    prefetch: Callable[..., RunStats],
    layout: DataLayout,
    lineage: LineageCatalog,
    settings: GenerationSettings,
    backend_factory: Callable[[BackendSpec], GenerationBackend],
) -> dict[str, Any]:
    """With several shards in one step, send their model requests as one stream first (a
    local model batches across shards); the per-shard steps then find the answers cached.
    Returns run-level metadata saying what the prefetch cost."""
    shards = list(context.partition_keys)
    if len(shards) < 2:
        return {}
    stats = prefetch(
        shards,
        layout,
        lineage,
        settings,
        log=context.log.info,
        backend_factory=backend_factory,
        warn=context.log.warning,
    )
    return {
        "run_prefetch_calls": stats.calls,
        "run_prefetch_retries": stats.retries,
        "run_prefetch": dg.MetadataValue.md(stats_table({"prefetch": stats})),
    }


generation_assets = [pair_descriptions, pair_instructions, triplets, triplet_export]
generation_stages = [DESCRIBE_STAGE, INSTRUCT_STAGE, TRIPLET_STAGE, EXPORT_STAGE]

"""Step 5 of the method: turn each pair description into retrieval instructions.

`write_instructions_for_shard` reads one shard's descriptions. A pair described by a model gets
an instruction request to the configured LLM with `demos_per_request` demonstrations drawn from
the shipped pool (a keyed sample per pair id); a pair described by the caption heuristic gets
heuristic instructions. Every answer is parsed (the list is recovered from chatter, fences,
numbering or truncation) and filtered; rejected instructions and pairs left with fewer than
`min_instructions` become quarantine rows with reasons. Output:
`data/pair_instructions/<shard>.parquet`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import polars as pl

from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationBackend,
    GenerationRequest,
    SamplingParams,
    request_key,
    shared_backend,
)
from megapairs_assets.generation.backends.heuristic import HEURISTIC_BACKEND
from megapairs_assets.generation.common import (
    DESCRIPTIONS_ASSET,
    GENERATED_COLUMN_DESCRIPTIONS,
    INSTRUCTIONS_ASSET,
    GenerationStepError,
    QuarantineLog,
    counts_by,
    generator_name,
    lacking_provenance,
    lookup_images,
    raise_if_step_calls_failing,
    read_shard_table,
    sampling_json,
)
from megapairs_assets.generation.parsing import (
    REASON_MISSING_CAPTION,
    REASON_TOO_FEW,
    InstructionLimits,
    drop_cut_item,
    filter_instructions,
    parse_instruction_list,
)
from megapairs_assets.generation.prompts import (
    PromptTemplate,
    combined_hash,
    content_hash,
    demo_ids_for_pairs,
    instruction_messages,
    load_demo_pool,
    load_template,
    request_seed_for,
)
from megapairs_assets.generation.runner import RunStats, prefetch_shards, settle_shard_requests
from megapairs_assets.generation.settings import GenerationSettings
from megapairs_assets.generation.store import (
    ResponseStore,
    StoredResponse,
    open_store,
)
from megapairs_assets.lib.quality import CheckOutcome, outcome
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog

STEP = "instruct"
# v2: articles chosen per word ("an illustration", "on the theme of animals"); a new
# version is a new request key, so no cached v1 text with "a illustration" is reused.
HEURISTIC_INSTRUCT_TEMPLATE = {"id": "caption-heuristic-instruct", "version": 2}
HEURISTIC_INSTRUCT_HASH = content_hash(HEURISTIC_INSTRUCT_TEMPLATE)
HEURISTIC_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0)

INSTRUCTION_SCHEMA = pl.Schema(
    {
        "pair_id": pl.String,
        "query_id": pl.String,
        "target_id": pl.String,
        "instructions": pl.List(pl.String),
        "generator": pl.String,
        "model_id": pl.String,
        "served_model": pl.String,
        "backend": pl.String,
        "template_id": pl.String,
        "template_hash": pl.String,
        "demo_pool_hash": pl.String,
        "demo_ids": pl.List(pl.String),
        "seed": pl.Int64,
        "sampling": pl.String,
        "request_key": pl.String,
        "description_request_key": pl.String,
        "parse_method": pl.String,
        "rejected_instructions": pl.Int16,
        "prompt_tokens": pl.Int32,
        "completion_tokens": pl.Int32,
    }
)
"""One row per pair with at least `min_instructions` accepted instructions."""
INSTRUCTION_COLUMN_DESCRIPTIONS: dict[str, str] = {
    **GENERATED_COLUMN_DESCRIPTIONS,
    "instructions": "the accepted instructions: each asks for the target given the query image",
    "demo_pool_hash": "hash of the demonstration pool the few-shot examples came from (null "
    "for the heuristic)",
    "demo_ids": "ids of the few-shot demonstrations in the prompt, keyed-random per pair",
    "description_request_key": "request_key of the description this row was written from "
    "(pair_descriptions.request_key)",
    "parse_method": "how the list was read from the model's answer: json, json_object (one "
    "query per key), json_truncated, python_list or numbered",
    "rejected_instructions": "instructions the filters dropped for this pair (their reasons "
    "are in the quarantine log)",
}

INSTRUCTION_CHECKS = {
    "enough_instructions": "Every pair has at least the minimum number of instructions (3)",
    "instructions_pass_filters": "No kept instruction breaks a filter rule (re-checked)",
    "instructions_have_provenance": "Every row names its generator, model, template and request",
}


@dataclass(frozen=True)
class _Planned:
    request: GenerationRequest
    row: dict[str, Any]
    spec: BackendSpec
    template_id: str
    template_hash: str
    demo_pool_hash: str | None
    demo_ids: tuple[str, ...]


def write_instructions_for_shard(
    shard: str,
    layout: DataLayout,
    catalog: LineageCatalog,
    settings: GenerationSettings,
    *,
    log: Callable[[str], None] | None = None,
    backend_factory: Callable[[BackendSpec], GenerationBackend] = shared_backend,
    warn: Callable[[str], None] | None = None,
) -> StepResult:
    """Write one shard's instructions; see the module docstring."""
    descriptions, input_versions = read_shard_table(catalog, layout, DESCRIPTIONS_ASSET, shard)
    quarantine = QuarantineLog(INSTRUCTIONS_ASSET, shard)
    template = load_template(settings.instruct.template)
    if template.step != STEP:
        raise GenerationStepError(f"template {template.id!r} is for step {template.step!r}")
    limits = _limits_for(template, settings.instruction_limits)
    images = lookup_images(
        catalog, descriptions["query_id"].to_list() + descriptions["target_id"].to_list()
    )
    model_plans, heuristic_plans = _plan_requests(
        descriptions, images, template, settings, quarantine
    )
    settled = settle_shard_requests(
        [p.request for p in model_plans],
        [p.request for p in heuristic_plans],
        open_store(layout, shard, STEP, settings.max_attempts, log=warn or log),
        lambda: backend_factory(settings.instruct.backend),
        lambda: backend_factory(settings.heuristic),
        flush_every=settings.flush_every,
        retry_quarantined=settings.retry_quarantined,
        label=f"instruct {shard}",
        log=log,
        warn=warn,
    )
    raise_if_step_calls_failing(
        settled.model_stats, settings, STEP, shard, settings.instruct.backend
    )
    uri_of = {image_id: row["source_uri"] for image_id, row in images.items()}
    rows = settled.accepted_rows(
        model_plans,
        heuristic_plans,
        lambda plan, answer: _accept(plan, answer, limits, settings, quarantine, uri_of),
    )
    table = pl.DataFrame(rows, schema=INSTRUCTION_SCHEMA).sort("pair_id")
    path = layout.shard_table(INSTRUCTIONS_ASSET, shard)
    write_parquet_atomic(table, path)

    return StepResult(
        partition=shard,
        outputs={"instructions": path},
        row_counts={"instruction_rows": table.height, "quarantined": len(quarantine.rows)},
        row_count_key="instruction_rows",
        config={
            "template": settings.instruct.template,
            "backend": settings.instruct.backend.backend,
            "sampling": settings.instruct.sampling.as_dict(),
            "demo_pool": settings.demo_pool,
            "seed": settings.seed,
            "max_attempts": settings.max_attempts,
            "instruction_limits": vars(limits),
            "answer_language": vars(settings.answer_language),
        },
        input_versions=input_versions,
        model_ids={
            "instruct": settings.instruct.backend.model_id,
            "heuristic": settings.heuristic.model_id,
        },
        rows={"quarantine_log": quarantine.frame()},
        outcomes=check_instructions(table, limits),
        preview=table.select("pair_id", "generator", "instructions").head(5),
        metadata={
            "described_pairs": descriptions.height,
            "model_requests": len(model_plans),
            "heuristic_requests": len(heuristic_plans),
            "instructions": int(table["instructions"].list.len().sum()) if table.height else 0,
            **settled.stats_metadata(),
            "rows_by_generator": counts_by(table, "generator"),
            "rows_by_served_model": counts_by(table, "served_model"),
            "rejections_by_reason": quarantine.reason_counts(),
        },
        markdown={"requests": settled.stats_markdown()},
    )


def prefetch_instructions(
    shards: Sequence[str],
    layout: DataLayout,
    catalog: LineageCatalog,
    settings: GenerationSettings,
    *,
    log: Callable[[str], None] | None = None,
    backend_factory: Callable[[BackendSpec], GenerationBackend] = shared_backend,
    warn: Callable[[str], None] | None = None,
) -> RunStats:
    """The model requests of several shards as one stream (see `runner.prefetch_shards`)."""
    template = load_template(settings.instruct.template)

    def plan_shard(shard: str) -> tuple[list[GenerationRequest], ResponseStore]:
        descriptions, _ = read_shard_table(catalog, layout, DESCRIPTIONS_ASSET, shard)
        images = lookup_images(
            catalog, descriptions["query_id"].to_list() + descriptions["target_id"].to_list()
        )
        plans, _ = _plan_requests(
            descriptions, images, template, settings, QuarantineLog(INSTRUCTIONS_ASSET, shard)
        )
        store = open_store(layout, shard, STEP, settings.max_attempts, log=warn or log)
        return [plan.request for plan in plans], store

    return prefetch_shards(
        shards,
        plan_shard,
        lambda: backend_factory(settings.instruct.backend),
        flush_every=settings.flush_every,
        label=f"instruct {len(shards)} shards",
        log=log,
        warn=warn,
    )


def instruction_limits_for(settings: GenerationSettings) -> InstructionLimits:
    """The limits instructions are held to: the settings' word bounds with the instruction
    template's count range (what pair_instructions keeps, and triplets check)."""
    return _limits_for(load_template(settings.instruct.template), settings.instruction_limits)


def _limits_for(template: PromptTemplate, limits: InstructionLimits) -> InstructionLimits:
    """The template's requested count range wins over the defaults, so prompt and filter agree."""
    return replace(
        limits,
        min_instructions=template.instruction_count("min_instructions"),
        max_instructions=template.instruction_count("max_instructions"),
    )


def _plan_requests(
    descriptions: pl.DataFrame,
    images: dict[str, dict[str, Any]],
    template: PromptTemplate,
    settings: GenerationSettings,
    quarantine: QuarantineLog,
) -> tuple[list[_Planned], list[_Planned]]:
    pool = load_demo_pool(settings.demo_pool)
    demos_per_request = template.instruction_count("demos_per_request")
    model_hash = combined_hash(template.hash, pool.hash)
    spec = settings.instruct.backend
    sampling = settings.instruct.sampling
    model_plans: list[_Planned] = []
    heuristic_plans: list[_Planned] = []
    model_rows = descriptions.filter(pl.col("backend") != HEURISTIC_BACKEND)
    demo_ids_of = dict(
        zip(
            model_rows["pair_id"].to_list(),
            demo_ids_for_pairs(
                settings.seed, model_rows["pair_id"].to_list(), pool, demos_per_request
            ),
            strict=True,
        )
    )
    for row in descriptions.iter_rows(named=True):
        pair_id = row["pair_id"]
        if row["backend"] == HEURISTIC_BACKEND:
            query, target = images.get(row["query_id"]), images.get(row["target_id"])
            if not (query and target and query["caption"] and target["caption"]):
                quarantine.add(
                    pair_id,
                    query["source_uri"] if query else None,
                    REASON_MISSING_CAPTION,
                    "heuristic instructions need both captions",
                )
                continue
            inputs = {
                "query_caption": query["caption"],
                "target_caption": target["caption"],
                "description": row["description"],
            }
            key = request_key(
                settings.heuristic.model_id, HEURISTIC_INSTRUCT_HASH, inputs, HEURISTIC_SAMPLING, 0
            )
            heuristic_plans.append(
                _Planned(
                    request=GenerationRequest(
                        key=key,
                        step=STEP,
                        messages=(),
                        sampling=HEURISTIC_SAMPLING,
                        seed=0,
                        inputs=inputs,
                    ),
                    row=row,
                    spec=settings.heuristic,
                    template_id=HEURISTIC_INSTRUCT_TEMPLATE["id"],
                    template_hash=HEURISTIC_INSTRUCT_HASH,
                    demo_pool_hash=None,
                    demo_ids=(),
                )
            )
            continue
        demo_ids = demo_ids_of[pair_id]
        seed = request_seed_for(settings.seed, STEP, pair_id)
        inputs = {"description": row["description"], "demo_ids": list(demo_ids)}
        model_plans.append(
            _Planned(
                request=GenerationRequest(
                    key=request_key(
                        spec.model_id, model_hash, inputs, sampling, seed, spec.served_model
                    ),
                    step=STEP,
                    messages=(),
                    render=partial(
                        instruction_messages,
                        template,
                        row["description"],
                        [pool.by_id(d) for d in demo_ids],
                    ),
                    sampling=sampling,
                    seed=seed,
                    inputs=inputs,
                ),
                row=row,
                spec=spec,
                template_id=template.id,
                template_hash=model_hash,
                demo_pool_hash=pool.hash,
                demo_ids=demo_ids,
            )
        )
    return model_plans, heuristic_plans


def _accept(
    plan: _Planned,
    response: StoredResponse | None,
    limits: InstructionLimits,
    settings: GenerationSettings,
    quarantine: QuarantineLog,
    uri_of: dict[str, str],
) -> dict[str, Any] | None:
    row = plan.row
    pair_id, key = row["pair_id"], plan.request.key
    query_uri = uri_of.get(row["query_id"])
    response = quarantine.answered(pair_id, query_uri, response, key, settings.max_attempts)
    if response is None:
        return None
    parsed = parse_instruction_list(response.text)
    if parsed.reason is not None:
        quarantine.add(
            pair_id,
            query_uri,
            parsed.reason,
            f"{plan.spec.display_name}: {(response.text or '')[:300]!r}",
        )
        return None
    parsed, cut = drop_cut_item(parsed, response.text, response.finish_reason)
    language = None if plan.spec.backend == HEURISTIC_BACKEND else settings.answer_language
    kept, rejections = filter_instructions(parsed.items, row["description"], limits, language)
    rejections = [cut, *rejections] if cut is not None else rejections
    for rejection in rejections:
        quarantine.add(
            pair_id, query_uri, rejection.reason, f"{rejection.detail}: {rejection.text!r}"
        )
    if len(kept) < limits.min_instructions:
        quarantine.add(
            pair_id,
            query_uri,
            REASON_TOO_FEW,
            f"{len(kept)} valid of {len(parsed.items)} parsed; need {limits.min_instructions}",
        )
        return None
    return {
        "pair_id": pair_id,
        "query_id": row["query_id"],
        "target_id": row["target_id"],
        "instructions": kept,
        "generator": generator_name(plan.spec, None),
        "model_id": plan.spec.model_id,
        # What the backend says wrote the answer (an HTTP server's `model` field); an answer
        # stored without one was the configured model's.
        "served_model": response.model_id or plan.spec.model_id,
        "backend": plan.spec.backend,
        "template_id": plan.template_id,
        "template_hash": plan.template_hash,
        "demo_pool_hash": plan.demo_pool_hash,
        "demo_ids": list(plan.demo_ids),
        "seed": plan.request.seed,
        "sampling": sampling_json(plan.request.sampling.as_dict()),
        "request_key": key,
        "description_request_key": row["request_key"],
        "parse_method": parsed.how,
        "rejected_instructions": len(rejections),
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
    }


def check_instructions(table: pl.DataFrame, limits: InstructionLimits) -> list[CheckOutcome]:
    """The blocking checks of pair_instructions (names in INSTRUCTION_CHECKS)."""
    too_few = table.filter(pl.col("instructions").list.len() < limits.min_instructions)
    breaking = []
    for row in table.select("pair_id", "instructions").iter_rows(named=True):
        # Re-check against no description: the copy rule needs it, the other rules do not.
        _, rejections = filter_instructions(row["instructions"], "", limits)
        if rejections:
            breaking.append(f"{row['pair_id']}: {rejections[0].reason}")
    return [
        outcome(
            "enough_instructions",
            too_few["pair_id"].to_list(),
            f"every pair has >= {limits.min_instructions} instructions",
        ),
        outcome("instructions_pass_filters", breaking, "kept instructions obey every rule"),
        outcome(
            "instructions_have_provenance",
            lacking_provenance(table),
            "generator, model, template and request key are set",
        ),
    ]

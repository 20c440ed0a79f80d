"""Step 4 of the method: describe each mined pair (common points, then each image's own).

`describe_pairs_for_shard` reads one shard's mined pairs, builds one request per pair (the
sampled pairs to the configured model, the rest to the caption heuristic when enabled), settles
them through the shard's response cache, cleans and checks every answer, and writes
`data/pair_descriptions/<shard>.parquet`. Rejected pairs become quarantine rows with a reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import polars as pl

from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationBackend,
    GenerationRequest,
    ImageInput,
    SamplingParams,
    request_key,
    shared_backend,
)
from megapairs_assets.generation.backends.heuristic import HEURISTIC_BACKEND
from megapairs_assets.generation.common import (
    DESCRIPTIONS_ASSET,
    GENERATED_COLUMN_DESCRIPTIONS,
    PAIRS_ASSET,
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
    REASON_MISSING_IMAGE,
    DescriptionLimits,
    check_description,
    clean_description,
)
from megapairs_assets.generation.prompts import (
    content_hash,
    describe_messages,
    load_template,
    request_seed_for,
    word_num_for,
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
from megapairs_assets.lib.storage import DataLayout, read_parquet, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog

STEP = "describe"
# v2: styles made plural by their head noun ("both pieces of clip art", not "both piece of
# clip arts"); a new version is a new request key, so no cached v1 text is reused.
HEURISTIC_DESCRIBE_TEMPLATE = {"id": "caption-heuristic-describe", "version": 2}
HEURISTIC_DESCRIBE_HASH = content_hash(HEURISTIC_DESCRIBE_TEMPLATE)
HEURISTIC_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0)

DESCRIPTION_SCHEMA = pl.Schema(
    {
        "pair_id": pl.String,
        "query_id": pl.String,
        "target_id": pl.String,
        "description": pl.String,
        "generator": pl.String,
        "model_id": pl.String,
        "served_model": pl.String,
        "backend": pl.String,
        "input_mode": pl.String,
        "template_id": pl.String,
        "template_hash": pl.String,
        "word_num": pl.Int16,
        "seed": pl.Int64,
        "sampling": pl.String,
        "request_key": pl.String,
        "prompt_tokens": pl.Int32,
        "completion_tokens": pl.Int32,
        "finish_reason": pl.String,
    }
)
"""One accepted description per pair; every column names what made it."""
DESCRIPTION_COLUMN_DESCRIPTIONS: dict[str, str] = {
    **GENERATED_COLUMN_DESCRIPTIONS,
    "description": "the MLLM's text on what the two images share and how they differ",
    "input_mode": "what the model saw of the pair: images (pixels) or captions",
    "word_num": "the length in words asked of the model (keyed-random per pair; null for the "
    "heuristic)",
    "finish_reason": "why generation stopped, as the server reported (stop, length, ...)",
}

# When one text is this share of a shard's model descriptions (of at least the minimum rows),
# the model did not see what sets the pairs apart: a warning, never a failure.
REPEATED_DESCRIPTION_SHARE = 0.5
REPEATED_DESCRIPTION_MIN_ROWS = 4

# The rule the `descriptions_varied` check holds a shard to: what it says when it passes ("ok:
# <rule>") and what the failing rows break.
VARIED_DESCRIPTIONS_RULE = (
    f"no one text is {REPEATED_DESCRIPTION_SHARE:.0%} or more of the model descriptions (checked "
    f"from {REPEATED_DESCRIPTION_MIN_ROWS} model rows)"
)

DESCRIPTION_CHECKS = {
    "one_description_per_pair": "Each pair_id has at most one description",
    "descriptions_within_bounds": "Every description's word count lies within the limits",
    "descriptions_have_provenance": "Every row names its generator, model, template and request",
}
DESCRIPTION_WARNING_CHECKS = {
    "descriptions_varied": "No one text is half or more of a shard's model descriptions (at "
    "least 4): one text for most pairs means the model did not see what sets them apart",
}


@dataclass(frozen=True)
class _Planned:
    """A request and the row facts that go with it."""

    request: GenerationRequest
    pair: dict[str, Any]
    spec: BackendSpec
    input_mode: str
    template_id: str
    template_hash: str
    word_num: int | None
    query_uri: str | None


def describe_pairs_for_shard(
    shard: str,
    layout: DataLayout,
    catalog: LineageCatalog,
    settings: GenerationSettings,
    *,
    log: Callable[[str], None] | None = None,
    backend_factory: Callable[[BackendSpec], GenerationBackend] = shared_backend,
    warn: Callable[[str], None] | None = None,
) -> StepResult:
    """Describe one shard's pairs; see the module docstring. Re-running calls no model for a
    pair whose request is already in the cache."""
    pairs, input_versions = read_shard_table(catalog, layout, PAIRS_ASSET, shard)
    pairs = pairs.select("pair_id", "query_id", "target_id")
    quarantine = QuarantineLog(DESCRIPTIONS_ASSET, shard)
    model_plans, heuristic_plans = _plan_requests(
        pairs, catalog, settings, quarantine, _previous_model_sample(layout, shard)
    )
    settled = settle_shard_requests(
        [p.request for p in model_plans],
        [p.request for p in heuristic_plans],
        open_store(layout, shard, STEP, settings.max_attempts, log=warn or log),
        lambda: backend_factory(settings.describe.backend),
        lambda: backend_factory(settings.heuristic),
        flush_every=settings.flush_every,
        retry_quarantined=settings.retry_quarantined,
        label=f"describe {shard}",
        log=log,
        warn=warn,
    )
    raise_if_step_calls_failing(
        settled.model_stats, settings, STEP, shard, settings.describe.backend
    )
    rows = settled.accepted_rows(
        model_plans,
        heuristic_plans,
        lambda plan, answer: _accept(plan, answer, settings, quarantine),
    )
    table = pl.DataFrame(rows, schema=DESCRIPTION_SCHEMA).sort("pair_id")
    path = layout.shard_table(DESCRIPTIONS_ASSET, shard)
    write_parquet_atomic(table, path)
    repeated = RepeatedDescriptions.of(table)
    if repeated.suspicious:
        (warn or log or (lambda _: None))(f"describe {shard}: {repeated.warning()}")

    return StepResult(
        partition=shard,
        outputs={"descriptions": path},
        row_counts={"descriptions": table.height, "quarantined": len(quarantine.rows)},
        row_count_key="descriptions",
        config=_config(settings),
        input_versions=input_versions,
        model_ids={
            "describe": settings.describe.backend.model_id,
            "heuristic": settings.heuristic.model_id,
        },
        rows={"quarantine_log": quarantine.frame()},
        outcomes=[
            *check_descriptions(table, settings.description_limits),
            repeated.outcome(),
        ],
        preview=table.select("pair_id", "generator", "word_num", "description").head(5),
        metadata={
            "pairs": pairs.height,
            "model_requests": len(model_plans),
            "heuristic_requests": len(heuristic_plans),
            "not_sampled": pairs.height
            - len(model_plans)
            - len(heuristic_plans)
            - _missing(quarantine),
            **settled.stats_metadata(),
            "rows_by_generator": counts_by(table, "generator"),
            "rows_by_served_model": counts_by(table, "served_model"),
            "rejections_by_reason": quarantine.reason_counts(),
            # Near 1: one text for every pair (see RepeatedDescriptions); a figure to plot.
            "model_descriptions_top_share": round(repeated.top_share, 3),
        },
        markdown={"requests": settled.stats_markdown()},
    )


@dataclass(frozen=True)
class RepeatedDescriptions:
    """How often a shard's model descriptions repeat one text (the caption heuristic's rows
    are left out: they are templates). Different pairs should get different descriptions;
    one text for most of them means the model did not see what sets the pairs apart (a
    text-only model sent pictures, a template that lost its inputs)."""

    rows: int
    top_count: int
    top_text: str

    @classmethod
    def of(cls, table: pl.DataFrame) -> RepeatedDescriptions:
        texts = table.filter(pl.col("backend") != HEURISTIC_BACKEND)["description"]
        if texts.is_empty():
            return cls(0, 0, "")
        counts = texts.value_counts(sort=True)
        return cls(texts.len(), counts["count"][0], counts["description"][0])

    @property
    def top_share(self) -> float:
        """The most repeated text's share of the model rows (0 without model rows)."""
        return self.top_count / self.rows if self.rows else 0.0

    @property
    def suspicious(self) -> bool:
        return (
            self.rows >= REPEATED_DESCRIPTION_MIN_ROWS
            and self.top_share >= REPEATED_DESCRIPTION_SHARE
        )

    def outcome(self) -> CheckOutcome:
        """The `descriptions_varied` warning check: fails on a suspicious shard."""
        return outcome(
            "descriptions_varied",
            [self.top_text[:120]] * self.top_count if self.suspicious else [],
            VARIED_DESCRIPTIONS_RULE,
        )

    def warning(self) -> str:
        return (
            f"{self.top_count} of {self.rows} model descriptions are the same text "
            f"({self.top_text[:120]!r}): the model did not tell these pairs apart; check that "
            "it reads what the template sends (input_mode images needs a vision-language "
            "model) and its served_model"
        )


def prefetch_descriptions(
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

    def plan_shard(shard: str) -> tuple[list[GenerationRequest], ResponseStore]:
        pairs, _ = read_shard_table(catalog, layout, PAIRS_ASSET, shard)
        plans, _ = _plan_requests(
            pairs.select("pair_id", "query_id", "target_id"),
            catalog,
            settings,
            QuarantineLog(DESCRIPTIONS_ASSET, shard),
            _previous_model_sample(layout, shard),
        )
        store = open_store(layout, shard, STEP, settings.max_attempts, log=warn or log)
        return [plan.request for plan in plans], store

    return prefetch_shards(
        shards,
        plan_shard,
        lambda: backend_factory(settings.describe.backend),
        flush_every=settings.flush_every,
        label=f"describe {len(shards)} shards",
        log=log,
        warn=warn,
    )


def _missing(quarantine: QuarantineLog) -> int:
    unplannable = (REASON_MISSING_IMAGE, REASON_MISSING_CAPTION)
    return sum(1 for row in quarantine.rows if row["reason"] in unplannable)


def _previous_model_sample(layout: DataLayout, shard: str) -> set[str]:
    """The pairs the model described in the shard's current descriptions table (none without
    a readable one): the sample keeps them while they are still pairs of the shard, so adding
    a shard re-sends only the requests of sampled pairs that left (see `PairSample`)."""
    try:
        table = read_parquet(layout.shard_table(DESCRIPTIONS_ASSET, shard), ["pair_id", "backend"])
    except OSError:  # not written yet (FileNotFoundError) or damaged (TableReadError)
        return set()
    return set(table.filter(pl.col("backend") != HEURISTIC_BACKEND)["pair_id"].to_list())


def _plan_requests(
    pairs: pl.DataFrame,
    catalog: LineageCatalog,
    settings: GenerationSettings,
    quarantine: QuarantineLog,
    previous_sample: set[str],
) -> tuple[list[_Planned], list[_Planned]]:
    template = load_template(settings.describe.template)
    spec = settings.describe.backend
    if template.step != STEP:
        raise GenerationStepError(f"template {template.id!r} is for step {template.step!r}")
    images = lookup_images(catalog, pairs["query_id"].to_list() + pairs["target_id"].to_list())
    sampled = settings.model_sample.select(
        pairs["pair_id"].to_list(), settings.seed, keep=previous_sample
    )
    model_plans: list[_Planned] = []
    heuristic_plans: list[_Planned] = []
    for pair in pairs.iter_rows(named=True):
        query, target = images.get(pair["query_id"]), images.get(pair["target_id"])
        if query is None or target is None:
            missing = pair["query_id"] if query is None else pair["target_id"]
            quarantine.add(
                pair["pair_id"],
                query["source_uri"] if query else None,
                REASON_MISSING_IMAGE,
                f"image {missing} is not in its corpus shard",
            )
            continue
        to_model = pair["pair_id"] in sampled
        if not to_model and not settings.heuristic_fill:
            continue
        needs_captions = not to_model or template.input_mode == "captions"
        if needs_captions and not (query["caption"] and target["caption"]):
            quarantine.add(
                pair["pair_id"],
                query["source_uri"],
                REASON_MISSING_CAPTION,
                "caption-based generation needs both captions",
            )
            continue
        if to_model:
            model_plans.append(_model_plan(pair, query, target, template, spec, settings))
        else:
            heuristic_plans.append(_heuristic_plan(pair, query, target, settings))
    return model_plans, heuristic_plans


def _model_plan(
    pair: dict[str, Any],
    query: dict[str, Any],
    target: dict[str, Any],
    template: Any,
    spec: BackendSpec,
    settings: GenerationSettings,
) -> _Planned:
    word_num = word_num_for(settings.seed, pair["pair_id"], settings.word_num_range)
    seed = request_seed_for(settings.seed, STEP, pair["pair_id"])
    sampling = settings.describe.sampling
    if template.input_mode == "images":
        # Pixels are identified by content hash: a moved file is not a new request.
        inputs: dict[str, Any] = {
            "word_num": word_num,
            "query": {"image_id": query["image_id"], "content_hash": query["content_hash"]},
            "target": {"image_id": target["image_id"], "content_hash": target["content_hash"]},
        }
        render = partial(describe_messages, template, word_num)
    else:
        inputs = {
            "word_num": word_num,
            "query_caption": query["caption"],
            "target_caption": target["caption"],
        }
        render = partial(describe_messages, template, word_num, query["caption"], target["caption"])
    request = GenerationRequest(
        key=request_key(spec.model_id, template.hash, inputs, sampling, seed, spec.served_model),
        step=STEP,
        messages=(),
        render=render,
        sampling=sampling,
        seed=seed,
        images={
            "query": ImageInput(query["source_uri"], query["content_hash"]),
            "target": ImageInput(target["source_uri"], target["content_hash"]),
        },
        inputs=inputs,
    )
    return _Planned(
        request=request,
        pair=pair,
        spec=spec,
        input_mode=template.input_mode,
        template_id=template.id,
        template_hash=template.hash,
        word_num=word_num,
        query_uri=query["source_uri"],
    )


def _heuristic_plan(
    pair: dict[str, Any],
    query: dict[str, Any],
    target: dict[str, Any],
    settings: GenerationSettings,
) -> _Planned:
    inputs = {"query_caption": query["caption"], "target_caption": target["caption"]}
    spec = settings.heuristic
    request = GenerationRequest(
        key=request_key(spec.model_id, HEURISTIC_DESCRIBE_HASH, inputs, HEURISTIC_SAMPLING, 0),
        step=STEP,
        messages=(),
        sampling=HEURISTIC_SAMPLING,
        seed=0,
        inputs=inputs,
    )
    return _Planned(
        request=request,
        pair=pair,
        spec=spec,
        input_mode="captions",
        template_id=HEURISTIC_DESCRIBE_TEMPLATE["id"],
        template_hash=HEURISTIC_DESCRIBE_HASH,
        word_num=None,
        query_uri=query["source_uri"],
    )


def _accept(
    plan: _Planned,
    response: StoredResponse | None,
    settings: GenerationSettings,
    quarantine: QuarantineLog,
) -> dict[str, Any] | None:
    pair_id = plan.pair["pair_id"]
    key = plan.request.key
    response = quarantine.answered(pair_id, plan.query_uri, response, key, settings.max_attempts)
    if response is None:
        return None
    description = clean_description(response.text)
    rejection = check_description(
        description,
        settings.description_limits,
        response.finish_reason,
        # The caption heuristic writes English templates around the captions: only a model
        # can drift into another language.
        None if plan.spec.backend == HEURISTIC_BACKEND else settings.answer_language,
    )
    if rejection is not None:
        quarantine.add(
            pair_id,
            plan.query_uri,
            rejection.reason,
            f"{rejection.detail}; {plan.spec.display_name}: {description[:300]!r}",
        )
        return None
    return {
        "pair_id": pair_id,
        "query_id": plan.pair["query_id"],
        "target_id": plan.pair["target_id"],
        "description": description,
        "generator": generator_name(plan.spec, plan.input_mode),
        "model_id": plan.spec.model_id,
        # What the backend says wrote the answer (an HTTP server's `model` field); an answer
        # stored without one was the configured model's.
        "served_model": response.model_id or plan.spec.model_id,
        "backend": plan.spec.backend,
        "input_mode": plan.input_mode,
        "template_id": plan.template_id,
        "template_hash": plan.template_hash,
        "word_num": plan.word_num,
        "seed": plan.request.seed,
        "sampling": sampling_json(plan.request.sampling.as_dict()),
        "request_key": key,
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "finish_reason": response.finish_reason,
    }


def _config(settings: GenerationSettings) -> dict[str, Any]:
    return {
        "template": settings.describe.template,
        "backend": settings.describe.backend.backend,
        "sampling": settings.describe.sampling.as_dict(),
        "model_sample": {
            "fraction": settings.model_sample.fraction,
            "max_pairs_per_shard": settings.model_sample.max_pairs_per_shard,
        },
        "heuristic_fill": settings.heuristic_fill,
        "seed": settings.seed,
        "word_num_range": list(settings.word_num_range),
        "max_attempts": settings.max_attempts,
        "description_limits": vars(settings.description_limits),
        "answer_language": vars(settings.answer_language),
    }


def check_descriptions(table: pl.DataFrame, limits: DescriptionLimits) -> list[CheckOutcome]:
    """The blocking checks of pair_descriptions (names in DESCRIPTION_CHECKS)."""
    words = table["description"].str.count_matches(r"[\w']+")
    out_of_bounds = table.filter((words < limits.min_words) | (words > limits.max_words))
    return [
        outcome(
            "one_description_per_pair",
            table.filter(pl.col("pair_id").is_duplicated())["pair_id"].unique().to_list(),
            "each pair_id has at most one description",
        ),
        outcome(
            "descriptions_within_bounds",
            out_of_bounds["pair_id"].to_list(),
            f"descriptions have {limits.min_words}..{limits.max_words} words",
        ),
        outcome(
            "descriptions_have_provenance",
            lacking_provenance(table),
            "generator, model, template and request key are set",
        ),
    ]

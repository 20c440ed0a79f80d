"""Test worlds for the generation stages: images + catalog rows + mined pairs, and tiny models.

`make_world` writes small PNG images, registers them as `image_corpus` rows in a fresh lineage
catalog and writes `mined_image_pairs` tables (recorded as complete materializations, so the
stages read real versions). `build_tiny_llm` / `build_tiny_vlm` save random-weight Llama /
Llava models with a byte-level BPE tokenizer trained on the spot: offline, a few seconds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
from PIL import Image

from megapairs_assets.generation.backends.base import BackendSpec, SamplingParams
from megapairs_assets.generation.common import (
    DESCRIPTIONS_ASSET,
    EXPORT_ASSET,
    INSTRUCTIONS_ASSET,
    TRIPLETS_ASSET,
)
from megapairs_assets.generation.describe import describe_pairs_for_shard
from megapairs_assets.generation.export import export_triplets_for_shard
from megapairs_assets.generation.instruct import write_instructions_for_shard
from megapairs_assets.generation.settings import GenerationSettings, PairSample, StepSettings
from megapairs_assets.generation.triplets import build_triplets_for_shard
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord, utc_now
from megapairs_assets.mining.pairs import pair_id_for, pairs_schema

THINGS = ["bicycle", "teapot", "owl", "guitar", "lighthouse", "pumpkin", "rocket", "cactus"]
STYLES = ["a flat drawing of", "clip art of", "an illustration of", "a cartoon picture of"]
TAGS = ["objects", "animals", "music", "buildings", "food", "space", "plants"]


@dataclass(frozen=True)
class World:
    home: Path
    layout: DataLayout
    catalog: LineageCatalog
    shards: tuple[str, ...]
    image_ids: tuple[str, ...]


def caption_for(index: int) -> str:
    return (
        f"{STYLES[index % len(STYLES)]} a {THINGS[index % len(THINGS)]} "
        f"({TAGS[index % len(TAGS)]}, {TAGS[(index + 3) % len(TAGS)]})"
    )


def make_world(
    root: Path,
    pairs_per_shard: Sequence[int] = (12,),
    images_per_shard: int = 8,
    caption_of: dict[str, str | None] | None = None,
) -> World:
    """A data root with images, catalog image rows and pairs tables for shards 00000, 00001..."""
    home = root / "home"
    layout = DataLayout(home)
    catalog = LineageCatalog(layout.catalog_path)
    shards = tuple(f"{i:05d}" for i in range(len(pairs_per_shard)))
    image_ids: list[str] = []
    for shard_index, shard in enumerate(shards):
        rows = []
        for i in range(images_per_shard):
            key = f"{shard_index * 1000 + i:09d}"
            image_id = f"{shard}/{key}"
            path = root / "images" / shard / f"{key}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            colour = tuple(int(b) for b in hashlib.sha256(image_id.encode()).digest()[:3])
            Image.new("RGB", (40 + i, 32), colour).save(path)
            caption = caption_for(shard_index * images_per_shard + i)
            if caption_of and image_id in caption_of:
                caption = caption_of[image_id]
            rows.append(
                {
                    "image_id": image_id,
                    "shard": shard,
                    "key": key,
                    "source_uri": str(path),
                    "caption": caption,
                    "content_hash": hashlib.sha256(path.read_bytes()).hexdigest(),
                    "width": 40 + i,
                    "height": 32,
                }
            )
            image_ids.append(image_id)
        record_rows(catalog, "image_corpus", shard, rows={"image_lineage": pl.DataFrame(rows)})
    for shard_index, (shard, count) in enumerate(zip(shards, pairs_per_shard, strict=True)):
        write_pairs(
            layout, catalog, shard, _pairs_for(shard_index, count, image_ids, images_per_shard)
        )
    return World(home, layout, catalog, shards, tuple(image_ids))


def _pairs_for(
    shard_index: int, count: int, image_ids: list[str], images_per_shard: int
) -> list[tuple[str, str, list[str]]]:
    """`count` pairs whose queries are this shard's images and targets any other image."""
    own = image_ids[shard_index * images_per_shard : (shard_index + 1) * images_per_shard]
    pairs = []
    for n in range(count):
        query = own[n % len(own)]
        others = [i for i in image_ids if i != query]
        target = others[(n * 7 + 3) % len(others)]
        negatives = [i for i in others if i != target][n % 3 : n % 3 + 3]
        pairs.append((query, target, [query, *negatives]))
    return list({(q, t): (q, t, h) for q, t, h in pairs}.values())


def write_pairs(
    layout: DataLayout,
    catalog: LineageCatalog,
    shard: str,
    pairs: Sequence[tuple[str, str, list[str]]],
) -> pl.DataFrame:
    """Write a mined_image_pairs table (schema of the mining stage) and record it complete."""
    schema = pairs_schema(("caption_text",))
    frame = pl.DataFrame(
        [
            {
                "pair_id": pair_id_for(q, t),
                "query_id": q,
                "target_id": t,
                "sources": ["caption_text"],
                "score_caption_text": 0.8,
                "best_rank": 1,
                "hard_negative_ids": negatives,
            }
            for q, t, negatives in pairs
        ],
        schema=schema,
    ).sort("query_id", "target_id")
    write_parquet_atomic(frame, layout.shard_table("mined_image_pairs", shard))
    record_rows(catalog, "mined_image_pairs", shard)
    return frame


def record_rows(
    catalog: LineageCatalog,
    asset: str,
    shard: str,
    rows: dict[str, pl.DataFrame] | None = None,
    output_paths: dict[str, str] | None = None,
) -> None:
    catalog.record(
        MaterializationRecord(
            asset=asset,
            partition=shard,
            run_id="test",
            code_version="test",
            profile="test",
            started_at=utc_now(),
            duration_s=0.0,
            output_paths=output_paths or {},
        ),
        rows=rows,
    )


def record_step(catalog: LineageCatalog, asset: str, result) -> None:
    """Record a plain step's result as the shard_step helper does (rows, outputs, versions)."""
    catalog.record(
        MaterializationRecord(
            asset=asset,
            partition=result.partition,
            run_id="test",
            code_version="test",
            profile="test",
            started_at=utc_now(),
            duration_s=0.0,
            config=result.config,
            model_ids=result.model_ids,
            input_versions=result.input_versions,
            row_counts=result.row_counts,
            output_paths={k: str(v) for k, v in result.outputs.items()},
        ),
        rows=result.rows,
    )


# The generation steps in order, each with the asset it materializes.
STEPS = (
    (DESCRIPTIONS_ASSET, describe_pairs_for_shard),
    (INSTRUCTIONS_ASSET, write_instructions_for_shard),
    (TRIPLETS_ASSET, build_triplets_for_shard),
    (EXPORT_ASSET, export_triplets_for_shard),
)


def run_all(world, settings, shard: str, steps=STEPS) -> dict:
    """Run `steps` for one shard, recording each as a complete materialization."""
    results = {}
    for asset, step in steps:
        result = step(shard, world.layout, world.catalog, settings)
        record_step(world.catalog, asset, result)
        results[asset] = result
    return results


def http_settings(base_url: str, **http_options) -> GenerationSettings:
    """Both steps through the openai_http backend at `base_url`, every pair to the model."""
    options = {
        "base_urls": [base_url],
        "served_model": "test-model",
        "max_in_flight": 4,
        "request_timeout_s": 5.0,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        **http_options,
    }
    spec = BackendSpec("openai_http", "test-model@fault-server", "test model", options)
    return GenerationSettings(
        describe=StepSettings(spec, "describe_images", SamplingParams(max_tokens=120)),
        instruct=StepSettings(spec, "instructions", SamplingParams(max_tokens=80)),
        model_sample=PairSample(fraction=1.0),
        heuristic_fill=False,
    )


def with_template(settings: GenerationSettings, step: str, template: str) -> GenerationSettings:
    current = getattr(settings, step)
    return replace(settings, **{step: replace(current, template=template)})


# -- tiny models ------------------------------------------------------------------------------

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>", "<image>"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([caption_for(i) for i in range(50)], trainer)
    # A tokenizer made this way defaults to emitting token_type_ids, which Llama's generate
    # refuses ("model_kwargs are not used"); name only the inputs the model takes.
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=_CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],
        extra_special_tokens={"image_token": "<image>"},
    )


def _text_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llm(root: Path) -> Path:
    """A random LlamaForCausalLM with a chat template, saved once under `root`."""
    out = root / "tiny-llm"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(_text_config(tokenizer))
    staging = root / "tiny-llm.staging"
    tokenizer.save_pretrained(staging)
    model.save_pretrained(staging)
    staging.rename(out)
    return out


def build_tiny_vlm(root: Path) -> Path:
    """A random Llava (CLIP vision tower + Llama) with its processor, saved once under `root`."""
    out = root / "tiny-vlm"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    staging = root / "tiny-vlm.staging"
    processor.save_pretrained(staging)
    model.save_pretrained(staging)
    staging.rename(out)
    return out


def quarantine_reasons(result) -> dict[str, int]:
    frame = result.rows["quarantine_log"]
    return {r: n for r, n in frame.group_by("reason").len().iter_rows()} if frame.height else {}


def dumps(value) -> str:
    return json.dumps(value, sort_keys=True)

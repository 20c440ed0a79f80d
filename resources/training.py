"""Training settings as a Dagster resource (to live in `resources/training.py`), and the
demo and paper settings (to move into `resources/profiles.py`).

Each partition of `mmret_clip_checkpoint` is a named training config; `TrainingResource.configs`
maps every name to its settings, so a team trains several variants side by side (a base and a
large model, a learning-rate sweep) and each checkpoint keeps its own lineage.

| setting | demo | paper (`mmret-base` / `mmret-large`) |
|---|---|---|
| backbone | tiny local open_clip (untrained) | ViT-B-16 / ViT-L-14, OpenAI weights (QuickGELU) |
| batch, negatives | 64 queries, query image + 3 | 2048 queries (8 x 256), query image + 3 |
| temperature | 0.02 | 0.02 |
| AdamW lr, schedule | 5e-4, 6 warm-up steps, decay to 0 | 5e-6, 500 warm-up steps, decay to 0 |
| steps | 60 (3,840 queries: about 1.8 epochs of the demo triplets) | 15,000 / 25,000 |
| hardware | CPU, float32, 1 torch thread | 8 GPUs, `ddp_spawn`, bf16, gradient checkpointing |

The paper's batch is global: on fewer GPUs (`paper_training_settings(devices=...)`, the
profile's `MEGAPAIRS_TRAIN_DEVICES`) each device takes more of it (2048 / 4 = 512 queries on
4 GPUs), so the maths and the checkpoint's fingerprint stay the same.

The demo model starts from random weights, so it needs a learning rate a hundred times the
paper's, which fine-tunes a pretrained CLIP. Warm-up and weight decay are not in the paper;
the values here are ours.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import dagster as dg
from pydantic import Field

from megapairs_assets.training.config import (
    ALL_VISIBLE_GPUS,
    DEFAULT_MAX_UNREADABLE_IMAGE_FRACTION,
    ResolvedTraining,
    TrainingConfig,
    TrainingConfigError,
    check_config_name,
    resolve_config,
)

DEMO_CONFIG_NAME = "demo"
PAPER_BASE_CONFIG_NAME = "mmret-base"
PAPER_LARGE_CONFIG_NAME = "mmret-large"


class TrainingSettings(dg.Config):
    """One named training config; see `megapairs_assets.training.config.TrainingConfig`."""

    model: str = Field(description="open_clip model name (OpenAI weights: the -quickgelu names)")
    pretrained: str | None = Field(
        default=None, description="Pretrained tag in the local cache, or a checkpoint file"
    )
    batch_size: int = Field(default=2048, description="Queries per optimizer step, all devices")
    hard_negatives: int = Field(
        default=4,
        description="Negatives per query: the query image (hns[0]) plus hard_negatives - 1 of "
        "its mined ones, drawn per step",
    )
    temperature: float = Field(default=0.02, description="InfoNCE temperature (fixed)")
    learning_rate: float = Field(default=5e-6, description="AdamW peak learning rate")
    weight_decay: float = Field(default=0.0, description="AdamW weight decay (2-d weights only)")
    warmup_steps: int = Field(
        default=500,
        description="Steps of linear warm-up from 0 (peak at this step), then linear decay to 0",
    )
    max_steps: int = Field(default=15_000, description="Optimizer steps in total")
    accelerator: Literal["auto", "cpu", "gpu"] = Field(default="auto", description="Trainer")
    devices: int = Field(
        default=1,
        description=f"Devices per node ({ALL_VISIBLE_GPUS}: every visible GPU); each takes "
        "batch_size / (devices x num_nodes) queries",
    )
    num_nodes: int = Field(default=1, description="Nodes")
    strategy: str = Field(
        default="auto", description="Lightning strategy; auto = ddp_spawn on several devices"
    )
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        default="auto", description="auto = bf16-mixed on GPU, 32-true on CPU"
    )
    gradient_checkpointing: bool | None = Field(default=None, description="None = on for GPU runs")
    checkpoint_every_n_steps: int = Field(
        default=500, description="How often last.ckpt (the resume point) is rewritten"
    )
    num_workers: int = Field(default=8, description="Image decode worker processes per device")
    image_cache_items: int = Field(
        default=0, description="Decoded images kept in memory per loader process"
    )
    cpu_threads: int | None = Field(
        default=None, description="torch threads for CPU runs (None: one per core)"
    )
    seed: int = Field(default=0, description="Data order, instruction sampling, RNG")
    max_unreadable_image_fraction: float = Field(
        default=DEFAULT_MAX_UNREADABLE_IMAGE_FRACTION,
        description="Share of image reads that may fail (moved or deleted corpus images) before "
        "the run stops and exports nothing (0: none may)",
    )
    setting_hints: dict[str, str] = Field(
        default_factory=dict,
        description="Config field (pretrained, devices) -> how the profile sets it (e.g. the "
        "environment variable it reads), added to every error about that field",
    )

    def to_config(self) -> TrainingConfig:
        return TrainingConfig(**self.model_dump(exclude={"setting_hints"}))


class TrainingResource(dg.ConfigurableResource):
    """Named training configs (the partitions of `mmret_clip_checkpoint`) and where images live.

    `image_root`: where relative image paths of the triplets resolve; empty means the image ids
    of each triplet are looked up in the catalog's corpus rows (the original images).
    `demo_models_dir`: build the demo's tiny models there before training (demo profile only).
    """

    configs: dict[str, TrainingSettings] = Field(description="config name -> settings")
    image_root: str | None = Field(default=None, description="Root of relative image paths")
    demo_models_dir: str | None = Field(default=None, description="Build demo models here first")

    def config_for(self, name: str) -> TrainingConfig:
        """The settings of one named config; an unknown name lists the known ones."""
        if name not in self.configs:
            known = ", ".join(sorted(self.configs)) or "none"
            raise TrainingConfigError(
                f"no training config named {name!r} (known: {known}); add it to the training "
                "resource's `configs`, or remove the partition"
            )
        return self.configs[name].to_config()

    def resolve(self, name: str, gpu_count: int | None = None) -> ResolvedTraining:
        """`resolve_config` of one named config on this machine: every problem at once, each
        with the profile's hint for the setting that fixes it."""
        with self.hinted_errors(name):
            # The name becomes a partition key and a folder: a bad one fails here, in the
            # readiness check, before any work (not at the end of generation).
            check_config_name(name)
            return resolve_config(self.config_for(name), gpu_count=gpu_count)

    @contextmanager
    def hinted_errors(self, name: str) -> Iterator[None]:
        """Add the config's `setting_hints` to a TrainingConfigError raised inside: the
        training code knows which field is wrong, the profile which variable sets it."""
        try:
            yield
        except TrainingConfigError as error:
            hints = self.configs[name].setting_hints if name in self.configs else {}
            raise error.with_hints(hints) from None

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Config names are not checked here: one bad name would fail every run that uses the
        # resource, the good configs' training included. Each partition's step checks its own.
        if self.demo_models_dir:
            from pathlib import Path

            from megapairs_assets.demo.models import ensure_demo_models

            ensure_demo_models(Path(self.demo_models_dir))


def demo_training_settings(models_dir: str) -> dict[str, TrainingSettings]:
    """The demo's one config: the tiny local model, CPU, under a minute on 2 cores."""
    from megapairs_assets.demo.models import DEMO_CLIP_MODEL

    return {
        DEMO_CONFIG_NAME: TrainingSettings(
            model=DEMO_CLIP_MODEL,
            pretrained=f"{models_dir}/{DEMO_CLIP_MODEL}.pt",
            batch_size=64,
            hard_negatives=4,
            temperature=0.02,
            learning_rate=5e-4,
            weight_decay=0.1,
            warmup_steps=6,
            max_steps=60,
            accelerator="auto",
            checkpoint_every_n_steps=20,
            num_workers=0,
            image_cache_items=1024,
            # One thread: on 2 shared cores, 2 threads thrash (33 s vs 78-133 s measured).
            cpu_threads=1,
        )
    }


def paper_training_settings(devices: int = 8) -> dict[str, TrainingSettings]:
    """MMRet-base and MMRet-large at the paper's settings (method.md §7), for one node of
    `devices` GPUs (the paper's 8; `ALL_VISIBLE_GPUS` for every GPU the node shows). The batch
    stays the paper's global 2048, split evenly over the devices."""
    common = {
        "pretrained": "openai",
        "batch_size": 2048,
        "hard_negatives": 4,
        "temperature": 0.02,
        "learning_rate": 5e-6,
        "warmup_steps": 500,
        "devices": devices,
        "checkpoint_every_n_steps": 500,
        "num_workers": 8,
    }
    return {
        PAPER_BASE_CONFIG_NAME: TrainingSettings(
            model="ViT-B-16-quickgelu", max_steps=15_000, **common
        ),
        PAPER_LARGE_CONFIG_NAME: TrainingSettings(
            model="ViT-L-14-quickgelu", max_steps=25_000, **common
        ),
    }


def demo_training_resource(models_dir: str) -> TrainingResource:
    """The demo profile's training resource."""
    return TrainingResource(configs=demo_training_settings(models_dir), demo_models_dir=models_dir)


def paper_training_resource() -> TrainingResource:
    """The paper profile's training resource."""
    return TrainingResource(configs=paper_training_settings())

"""Training settings for one MMRet-CLIP checkpoint, and the checks that run before any work.

`TrainingConfig` is plain data (a profile or a Dagster resource builds it). `resolve_config`
checks it cheaply (no weights read, no data read) and turns "auto" choices into concrete
Trainer arguments, so a typo, a batch that does not split over the devices or a backbone whose
weights are not on this machine fails the step in a second with a message saying what to change,
not an hour into a run.

The paper's numbers (method.md §7): batch 2048, 1 positive + 4 hard negatives per query (the
query image is one of the 4), temperature 0.02, AdamW at lr 5e-6 with linear decay, 15k steps
for ViT-B/16 and 25k for ViT-L/14, counted in optimizer steps. The paper does not give the
warm-up length or the weight decay; `PAPER_*` below record our choices and say so.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megapairs_assets.lib.errors import ConfigurationError

Accelerator = Literal["auto", "cpu", "gpu"]
Precision = Literal["auto", "32-true", "bf16-mixed", "16-mixed"]

# Strategies that work when the Trainer is started inside one already-running process (a Dagster
# step, a test). Lightning's plain "ddp" relaunches `sys.argv` for every rank, which would re-run
# the Dagster step command; it is right only when a launcher (torchrun) started the ranks.
_IN_PROCESS_MULTI_DEVICE_STRATEGY = "ddp_spawn"
_KNOWN_STRATEGIES = (
    "auto",
    "ddp",
    "ddp_spawn",
    "ddp_fork",
    "ddp_notebook",
    "fsdp",
    "deepspeed",
    "single_device",
)
# Settings that change how fast a run goes but not what it computes: a run killed under one
# value may resume under another (see `TrainingConfig.fingerprint`).
_HARDWARE_FIELDS = frozenset(
    {
        "devices",
        "num_nodes",
        "accelerator",
        "strategy",
        "num_workers",
        "checkpoint_every_n_steps",
        "image_cache_items",
        "gradient_checkpointing",
        "cpu_threads",
    }
)
# Guards that decide whether a run may go on, not what it computes: never in the fingerprint.
_GUARD_FIELDS = frozenset({"max_unreadable_image_fraction"})
DEFAULT_MAX_UNREADABLE_IMAGE_FRACTION = 0.5


_CONFIG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


ALL_VISIBLE_GPUS = -1
"""`devices` value meaning every GPU this machine shows (at least one device): Lightning's
own convention for "all available devices"."""

# The settings that decide what a config learns (the others say where and how fast it trains):
# what a resumed run must match, and what the checkpoint's code version carries.
SCIENCE_SETTINGS = (
    "model",
    "pretrained",
    "batch_size",
    "hard_negatives",
    "temperature",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "max_steps",
    "seed",
)


class TrainingConfigError(ConfigurationError):
    """A training config that cannot work; the message says what is wrong and what to change.

    `problems` holds (setting, message) pairs: the config field a problem is about ("devices",
    "pretrained", or None), so a profile can add the one setting of its own that changes that
    field (`with_hints`). One error may carry several independent problems (the devices and the
    backbone weights), said at once.
    """

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.problems: tuple[tuple[str | None, str], ...] = ((setting, message),)

    @classmethod
    def of(cls, errors: Sequence[TrainingConfigError]) -> TrainingConfigError:
        """One error saying every problem of `errors`."""
        if len(errors) == 1:
            return errors[0]
        problems = tuple(problem for error in errors for problem in error.problems)
        combined = cls("; also, ".join(message for _, message in problems))
        combined.problems = problems
        return combined

    def with_hints(self, hints: Mapping[str, str]) -> TrainingConfigError:
        """This error with the hint of each setting it is about after that problem (each hint
        once)."""
        parts, added = [], set()
        for setting, message in self.problems:
            hint = hints.get(setting) if setting else None
            if hint and hint not in added:
                added.add(hint)
                message = f"{message}. {hint}"
            parts.append(message)
        if not added:
            return self
        hinted = type(self)("; also, ".join(parts))
        hinted.problems = self.problems
        return hinted


def check_config_name(config_name: str) -> None:
    """A config name names a folder and a partition: keep it to a safe, short key."""
    if not _CONFIG_NAME.match(config_name):
        raise TrainingConfigError(
            f"training config name {config_name!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(it names a folder and a partition)"
        )


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides one training run.

    model / pretrained: the open_clip backbone (a model name, and a pretrained tag whose weights
        are in the local cache or a local checkpoint file). OpenAI's CLIP weights were trained
        with QuickGELU, so they go with the `-quickgelu` model names (`ViT-B-16-quickgelu`).
    batch_size: queries per optimizer step over all devices (the paper's 2048).
    hard_negatives: negatives per query from its `hns` list, the query image (hns[0]) included;
        the other `hard_negatives - 1` are drawn at each step from all of the row's mined ones
        (`data.mined_negative_indices`); a row with fewer is padded and the padding masked out
        of the loss.
    temperature: InfoNCE temperature (fixed; the model's own logit scale is not used).
    learning_rate / weight_decay / warmup_steps / max_steps: AdamW with linear warm-up from 0 to
        `learning_rate` over `warmup_steps` (the peak at step `warmup_steps`), then linear decay
        to 0 at `max_steps` (`module.linear_warmup_decay`).
    accelerator / devices / num_nodes / strategy: the Lightning Trainer's hardware; `devices`
        -1 (`ALL_VISIBLE_GPUS`) means every visible GPU, or one device without GPUs; `strategy`
        "auto" means one device, or `ddp_spawn` for several (safe inside a Dagster step). The
        batch is global: each device takes batch_size / (devices x num_nodes) queries.
    precision: "auto" = bf16 mixed precision on GPU, float32 on CPU.
    gradient_checkpointing: None = on for GPU runs (the paper's batch does not fit otherwise).
    checkpoint_every_n_steps: how often `last.ckpt` is rewritten (the resume point after a kill).
    num_workers: DataLoader processes decoding images.
    image_cache_items: preprocessed images kept in memory per loader process (the demo reads its
        320 images again and again; at paper scale every image is seen rarely, so 0).
    cpu_threads: torch threads for a CPU run (None: torch's default, one per core). A small
        model gains little from a second thread and loses a lot when another process wants
        the core: the demo measured 33 s with 1 thread and 78-133 s with 2 on a busy 2-core box.
    seed: data order, instruction sampling and initial RNG state.
    max_unreadable_image_fraction: the share of image reads that may fail (missing or broken
        corpus images) before the run stops with an error naming them; below it a failed image
        costs its query (or its slot as a negative) and the `images_loaded` check reports it.
        0 allows none. Not part of the fingerprint.
    """

    model: str
    pretrained: str | None
    batch_size: int = 2048
    hard_negatives: int = 4
    temperature: float = 0.02
    learning_rate: float = 5e-6
    weight_decay: float = 0.0
    warmup_steps: int = 500
    max_steps: int = 15_000
    accelerator: Accelerator = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Precision = "auto"
    gradient_checkpointing: bool | None = None
    checkpoint_every_n_steps: int = 500
    num_workers: int = 8
    image_cache_items: int = 0
    cpu_threads: int | None = None
    seed: int = 0
    max_unreadable_image_fraction: float = DEFAULT_MAX_UNREADABLE_IMAGE_FRACTION

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for metadata and lineage."""
        return dataclasses.asdict(self)

    def fingerprint(self, data_versions: dict[str, str]) -> str:
        """Identity of what a run computes: a `last.ckpt` is resumed only under the same one.

        Hardware settings are left out, so a run killed on 8 GPUs may finish on 4 (the global
        batch, hence the data order and the maths, stay the same).
        """
        payload = json.dumps(
            {"config": self.science_settings(), "data": data_versions}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def science_settings(self) -> dict[str, Any]:
        """The settings that decide what a run computes (all but the hardware ones); a local
        `pretrained` file stands for its name, size and modification time."""
        science = {
            k: v
            for k, v in self.as_dict().items()
            if k not in _HARDWARE_FIELDS and k not in _GUARD_FIELDS
        }
        if self.pretrained and Path(self.pretrained).is_file():
            # A path says nothing about its bytes; its size and mtime are a cheap proxy.
            path = Path(self.pretrained)
            stat = path.stat()
            science["pretrained"] = f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"
        return science


@dataclass(frozen=True)
class ResolvedTraining:
    """A checked config with every "auto" decided: what the Trainer is given."""

    config: TrainingConfig
    accelerator: Literal["cpu", "gpu"]
    devices: int
    world_size: int
    per_device_batch_size: int
    strategy: str
    precision: str
    gradient_checkpointing: bool
    embed_dim: int
    image_size_px: int

    def trainer_kwargs(self) -> dict[str, Any]:
        """Hardware arguments for `lightning.pytorch.Trainer`."""
        return {
            "accelerator": self.accelerator,
            "devices": self.devices,
            "num_nodes": self.config.num_nodes,
            "strategy": self.strategy,
            "precision": self.precision,
        }


def resolve_config(config: TrainingConfig, gpu_count: int | None = None) -> ResolvedTraining:
    """Check `config` without loading weights or data and decide its "auto" settings.

    `gpu_count` overrides the number of visible GPUs (tests). Raises `TrainingConfigError`,
    with the hardware and the backbone problems together when both are wrong.
    """
    _check_numbers(config)
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    errors: list[TrainingConfigError] = []
    try:
        accelerator, devices = _resolve_devices(config, gpu_count)
        world_size = devices * config.num_nodes
        _check_batch_split(config, devices, world_size)
        strategy = _resolve_strategy(config, world_size)
    except TrainingConfigError as error:
        errors.append(error)
    try:
        embed_dim, image_size_px = _check_backbone(config.model, config.pretrained)
    except TrainingConfigError as error:
        errors.append(error)
    if errors:
        raise TrainingConfigError.of(errors)
    precision = config.precision
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = accelerator == "gpu"
    return ResolvedTraining(
        config=config,
        accelerator=accelerator,
        devices=devices,
        world_size=world_size,
        per_device_batch_size=config.batch_size // world_size,
        strategy=strategy,
        precision=precision,
        gradient_checkpointing=checkpointing,
        embed_dim=embed_dim,
        image_size_px=image_size_px,
    )


def _check_batch_split(config: TrainingConfig, devices: int, world_size: int) -> None:
    if config.batch_size % world_size:
        nearest = max(config.batch_size // world_size, 1) * world_size
        divisors = [n for n in range(1, 9) if config.batch_size % (n * config.num_nodes) == 0]
        raise TrainingConfigError(
            f"batch_size={config.batch_size} does not split evenly over {world_size} devices "
            f"(devices={devices} x num_nodes={config.num_nodes}); use a batch size that is "
            f"a multiple of {world_size}, e.g. {nearest}, or a device count that divides it "
            f"({', '.join(map(str, divisors))} per node)",
            setting="devices",
        )


def _check_numbers(config: TrainingConfig) -> None:
    if config.devices < 1 and config.devices != ALL_VISIBLE_GPUS:
        raise TrainingConfigError(
            f"devices must be >= 1, or {ALL_VISIBLE_GPUS} for every visible GPU; "
            f"got {config.devices}",
            setting="devices",
        )
    positive_ints = {
        "batch_size": config.batch_size,
        "max_steps": config.max_steps,
        "num_nodes": config.num_nodes,
        "checkpoint_every_n_steps": config.checkpoint_every_n_steps,
        "hard_negatives": config.hard_negatives,
    }
    for name, value in positive_ints.items():
        if value < 1:
            hint = " (the query image, hns[0], is always one)" if name == "hard_negatives" else ""
            raise TrainingConfigError(f"{name} must be >= 1{hint}, got {value}")
    if config.cpu_threads is not None and config.cpu_threads < 1:
        raise TrainingConfigError(f"cpu_threads must be >= 1 or None, got {config.cpu_threads}")
    for name, value in {
        "warmup_steps": config.warmup_steps,
        "num_workers": config.num_workers,
        "image_cache_items": config.image_cache_items,
    }.items():
        if value < 0:
            raise TrainingConfigError(f"{name} must be >= 0, got {value}")
    if config.warmup_steps >= config.max_steps:
        raise TrainingConfigError(
            f"warmup_steps={config.warmup_steps} must be below max_steps={config.max_steps}: "
            "the schedule warms up, then decays linearly to 0 at max_steps"
        )
    if not config.temperature > 0:
        raise TrainingConfigError(f"temperature must be > 0, got {config.temperature}")
    if not config.learning_rate > 0:
        raise TrainingConfigError(f"learning_rate must be > 0, got {config.learning_rate}")
    if config.weight_decay < 0:
        raise TrainingConfigError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if not 0.0 <= config.max_unreadable_image_fraction < 1.0:
        raise TrainingConfigError(
            "max_unreadable_image_fraction must be at least 0 (every image must load) and below "
            f"1 (a run with no image is never useful), got {config.max_unreadable_image_fraction}"
        )
    if config.precision not in ("auto", "32-true", "bf16-mixed", "16-mixed"):
        raise TrainingConfigError(
            f"precision={config.precision!r} is not one of auto, 32-true, bf16-mixed, 16-mixed"
        )


def _resolve_devices(config: TrainingConfig, gpu_count: int) -> tuple[Literal["cpu", "gpu"], int]:
    """(accelerator, devices per node) for this machine."""
    if config.accelerator not in ("auto", "cpu", "gpu"):
        raise TrainingConfigError(
            f"accelerator={config.accelerator!r} is not one of auto, cpu, gpu"
        )
    accelerator = config.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if gpu_count > 0 else "cpu"
    devices = config.devices
    if devices == ALL_VISIBLE_GPUS:
        devices = max(gpu_count, 1) if accelerator == "gpu" else 1
    if config.accelerator == "auto" and gpu_count == 0 and devices > 1:
        # Lightning would start `devices` CPU processes, each holding a copy of the model:
        # never what a config written for GPUs means.
        raise TrainingConfigError(
            f"devices={devices} asks for {devices} GPUs, but no GPU is visible here "
            "(accelerator='auto' would train on as many CPU processes); lower devices to 1 to "
            "train on the CPU, set accelerator='cpu' to run several CPU processes on purpose, "
            "or run where the GPUs are",
            setting="devices",
        )
    if accelerator == "gpu" and devices > gpu_count:
        raise TrainingConfigError(
            f"devices={devices} GPUs per node were asked for but {gpu_count} are visible; "
            "lower devices (the batch size must stay a multiple of devices x num_nodes) or run "
            "on a machine with more GPUs",
            setting="devices",
        )
    if accelerator == "cpu" and config.precision in ("bf16-mixed", "16-mixed"):
        raise TrainingConfigError(
            f"precision={config.precision!r} on the CPU is slower than float32, not faster; "
            "use precision='auto' or '32-true' for CPU runs"
        )
    return accelerator, devices


def _resolve_strategy(config: TrainingConfig, world_size: int) -> str:
    if config.strategy not in _KNOWN_STRATEGIES:
        close = difflib.get_close_matches(config.strategy, _KNOWN_STRATEGIES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise TrainingConfigError(
            f"strategy={config.strategy!r} is not one of {', '.join(_KNOWN_STRATEGIES)}.{hint}"
        )
    if config.strategy != "auto":
        return config.strategy
    if world_size == 1:
        return "auto"
    # Under torchrun (or SLURM) the ranks already exist and plain DDP joins them.
    launched = "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
    return "ddp" if launched else _IN_PROCESS_MULTI_DEVICE_STRATEGY


def _check_backbone(model: str, pretrained: str | None) -> tuple[int, int]:
    """The backbone's (embedding size, image side) if its config and weights are here."""
    import open_clip

    from megapairs_assets.embeddings.encoders import register_bundled_model_configs

    register_bundled_model_configs()
    model_config = open_clip.get_model_config(model)
    if model_config is None:
        close = difflib.get_close_matches(model, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise TrainingConfigError(f"open_clip has no model named {model!r}.{hint}")
    if not pretrained:
        raise TrainingConfigError(
            f"no backbone weights: `pretrained` is empty for {model!r}, so training would start "
            "from random weights; set a pretrained tag (e.g. 'openai') or a local checkpoint file",
            setting="pretrained",
        )
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained in tags:
        tag_config = open_clip.get_pretrained_cfg(model, pretrained)
        if tag_config.get("quick_gelu", False) != model_config.get("quick_gelu", False):
            raise TrainingConfigError(
                f"the {pretrained!r} weights were trained with QuickGELU but {model!r} uses "
                f"GELU, so they would load into the wrong activation; use "
                f"'{model}-quickgelu' (the open_clip name for these weights)"
            )
        _check_tag_cached(model, pretrained)
    elif not Path(pretrained).is_file():
        raise TrainingConfigError(
            f"backbone weights missing: pretrained={pretrained!r} is neither a known tag for "
            f"{model!r} (known: {', '.join(tags) or 'none'}) nor an existing checkpoint file",
            setting="pretrained",
        )
    vision = model_config.get("vision_cfg", {})
    image_size = vision.get("image_size", 224)
    side = int(image_size if isinstance(image_size, int) else max(image_size))
    return int(model_config["embed_dim"]), side


def _check_tag_cached(model: str, tag: str) -> None:
    """Nothing is downloaded at run time: a tag's weights must already be in a local cache
    (the Hugging Face hub cache or open_clip's `~/.cache/clip`, as open_clip itself looks)."""
    from megapairs_assets.lib.open_clip_weights import cached_pretrained_weights

    try:
        cached_pretrained_weights(model, tag)
    except ConfigurationError as error:
        raise TrainingConfigError(
            f"backbone weights missing: {error}", setting="pretrained"
        ) from None

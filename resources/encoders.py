"""Encoder resources: one per embedding table, all loaded through the same real loaders."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import dagster as dg
import torch
from pydantic import Field, ValidationInfo, field_validator

from megapairs_assets.embeddings.encoders import (
    EncoderSpec,
    LoadedEncoder,
    encoder_notes,
    load_encoder,
    validate_encoder_spec,
    weights_digest,
)
from megapairs_assets.lib.errors import ConfigurationError

_LOCAL_DIR_PREFIX = "local-dir:"
# What a weights file given as `pretrained` ends in (a tag never does, nor holds a slash).
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


class EncoderResource(dg.ConfigurableResource):
    """An embedding model, named by config; where its weights live is the loader's business.

    `demo_models_dir`, when set, builds the bundled tiny demo models there on first use (the
    embedded default); real profiles leave it empty and point at hub ids in the local cache or
    local files. The spec is validated when a step starts, before any work: an unknown model
    name or a wrong `dim` fails the step with a message saying what to change.
    """

    backend: Literal["open_clip_image", "open_clip_text", "dinov2", "sentence_transformers"]
    model: str = Field(description="open_clip model name, DINOv2 hub id / local dir, or ST dir")
    pretrained: str | None = Field(default=None, description="open_clip tag or local checkpoint")
    dim: int | None = Field(default=None, description="Expected embedding size, checked up front")
    batch_size: int = Field(default=64, description="Items per forward pass")
    num_workers: int | None = Field(
        default=2, description="Decode/preprocess workers; None = chosen from the machine"
    )
    image_decode: Literal["auto", "cpu", "device"] = Field(
        default="auto",
        description="Where JPEGs are decoded: auto (CPU until device decoding is verified on "
        "this stack), cpu, or device (nvJPEG on the GPU)",
    )
    reuse_unchanged: bool = Field(
        default=True,
        description="Keep a shard's table when its images (or captions) and the encoder settings "
        "are unchanged (a content key in the table's footer); false embeds every shard again",
    )
    demo_models_dir: str | None = Field(default=None, description="Build demo models here first")
    setting_hint: str | None = Field(
        default=None,
        description="How to point the profile at other weights (e.g. the environment variable "
        "it reads), added to every configuration error about this model",
    )

    @field_validator("model", "pretrained", "demo_models_dir")
    @classmethod
    def _absolute_local_paths(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if value.startswith(_LOCAL_DIR_PREFIX):
            return _LOCAL_DIR_PREFIX + _absolute(value.removeprefix(_LOCAL_DIR_PREFIX))
        names_a_path = {
            "demo_models_dir": lambda: True,
            "pretrained": lambda: _names_a_checkpoint(value),
            # An open_clip `model` is a registered name; the others may be local folders.
            "model": lambda: (
                not str(info.data.get("backend", "")).startswith("open_clip")
                and _names_a_model_folder(value)
            ),
        }[info.field_name]
        return _absolute(value) if names_a_path() else value

    def spec(self) -> EncoderSpec:
        return EncoderSpec(
            backend=self.backend, model=self.model, pretrained=self.pretrained, dim=self.dim
        )

    def validate(self) -> int:
        """Check the config without loading weights; returns the embedding size."""
        if self.demo_models_dir:
            from megapairs_assets.demo.models import ensure_demo_models

            ensure_demo_models(Path(self.demo_models_dir))
        with self._hinted_errors():
            return validate_encoder_spec(self.spec())

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.validate()

    def load(self, device: torch.device, dtype: torch.dtype) -> LoadedEncoder:
        """Load the model once for a step; callers reuse it for every batch and partition."""
        with self._hinted_errors():
            return load_encoder(self.spec(), device, dtype)

    def weights_digest(self, log: Callable[[str], None] | None = None) -> str | None:
        """The sha256 of the weights' bytes (`embeddings.encoders.weights_digest`)."""
        with self._hinted_errors():
            return weights_digest(self.spec(), log)

    def notes(self) -> list[str]:
        """What a step should say about these weights before using them (cheap)."""
        return encoder_notes(self.spec())

    @property
    def model_id(self) -> str:
        return f"{self.backend}:{self.model}" + (f"@{self.pretrained}" if self.pretrained else "")

    @contextmanager
    def _hinted_errors(self) -> Iterator[None]:
        """Add `setting_hint` to a configuration error: the loader knows what is wrong, the
        profile knows which setting the user changes to fix it."""
        try:
            yield
        except ConfigurationError as error:
            if not self.setting_hint:
                raise
            raise type(error)(f"{error}. {self.setting_hint}") from None


def _absolute(path: str) -> str:
    # Not resolved: a symlink the user named (`models/current`) stays the name they gave.
    return os.path.abspath(os.path.expanduser(path))


def _names_a_checkpoint(value: str) -> bool:
    """Whether an open_clip `pretrained` value is a path rather than a tag (or `hf-hub:`)."""
    if value.startswith("hf-hub:") or not value.strip():
        return False
    return (
        Path(value).expanduser().exists()
        or value.startswith((".", "~", os.sep))
        or "/" in value
        or os.sep in value
        or value.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def _names_a_model_folder(value: str) -> bool:
    """Whether a DINOv2 / sentence-transformers `model` is a path rather than a hub id, as the
    loader tells them apart (a hub id is `name` or `org/name` that is not a local folder)."""
    if not value.strip():
        return False
    return (
        Path(value).expanduser().exists()
        or value.startswith((".", "~", os.sep))
        or value.count("/") > 1
    )

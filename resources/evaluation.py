"""The evaluation settings as a Dagster resource. Every field shows in the UI's resource tab."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import dagster as dg
import polars as pl
import torch
from pydantic import Field

from megapairs_assets.evaluation.heldout import ImageLocator
from megapairs_assets.evaluation.run import (
    BENCHMARK_FAMILY,
    BenchmarkSources,
    EvaluationSettings,
)
from megapairs_assets.retriever.model import RetrieverSpec


class EvaluationResource(dg.ConfigurableResource):
    """Which retriever is the base, where the public benchmarks live, how to embed and rank.

    A benchmark root left empty is reported as skipped, never scored. Roots hold the official
    layouts (see `megapairs_assets/evaluation/loaders/`).
    """

    base_model: str = Field(description="open_clip model name of the base retriever")
    base_pretrained: str | None = Field(
        default=None, description="Its pretrained tag or local checkpoint file"
    )
    demo_models_dir: str | None = Field(
        default=None, description="Build the demo's tiny models here first (demo profile only)"
    )
    setting_hint: str | None = Field(
        default=None,
        description="How the profile sets the base retriever's weights (e.g. the environment "
        "variable it reads), added to every error about them",
    )
    circo_root: str | None = Field(default=None, description="CIRCO folder (annotations/, ...)")
    cirr_root: str | None = Field(default=None, description="CIRR folder (captions/, ...)")
    fashioniq_root: str | None = Field(default=None, description="FashionIQ folder")
    genecis_root: str | None = Field(default=None, description="GeneCIS folder")
    heldout_fraction: float = Field(
        default=0.05,
        description="Share of query images held out of training (as queries, targets and "
        "negatives), for our benchmark",
    )
    heldout_max_queries: int | None = Field(
        default=None,
        description="Cap on held-out query images (lowest hashes kept): scored, and kept out of "
        "training; the rest train",
    )
    precision: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="Numbers the retriever runs in. float32 by default, as the benchmarks' own "
        "evaluation code does: bf16 changed some queries' top-1 on an H200 (measured)",
    )
    batch_size: int = Field(default=64, description="Images or texts per forward pass")
    num_workers: int = Field(default=2, description="Image decode worker processes")
    query_batch_size: int = Field(default=16_384, description="Queries per faiss search call")

    def base_spec(self) -> RetrieverSpec:
        return RetrieverSpec(self.base_model, self.base_pretrained)

    def roots(self) -> dict[str, Path | None]:
        return {
            "circo": _path(self.circo_root),
            "cirr": _path(self.cirr_root),
            "fashioniq": _path(self.fashioniq_root),
            "genecis": _path(self.genecis_root),
        }

    def sources(
        self,
        triplets: Callable[[], pl.DataFrame | None] | None = None,
        locate_images: ImageLocator | None = None,
    ) -> BenchmarkSources:
        """Benchmark sources; `triplets` returns all the project's triplets (or None) and
        `locate_images` finds their images by id."""
        return BenchmarkSources(
            roots=self.roots(),
            triplets=triplets,
            locate_images=locate_images,
            heldout_fraction=self.heldout_fraction,
            heldout_max_queries=self.heldout_max_queries,
        )

    def configured_benchmarks(self) -> list[str]:
        """Benchmark keys worth scoring: those whose root is set, and the held-out split."""
        roots = self.roots()
        return [
            key
            for key, family in BENCHMARK_FAMILY.items()
            if family == "heldout" or roots.get(family) is not None
        ]

    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.precision)

    def settings(self) -> EvaluationSettings:
        return EvaluationSettings(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            query_batch_size=self.query_batch_size,
        )

    def prepare(self) -> None:
        """Build the demo models when this profile uses them (idempotent, process-safe)."""
        if self.demo_models_dir:
            from megapairs_assets.demo.models import ensure_demo_models

            ensure_demo_models(Path(self.demo_models_dir))

    def base_weights_problem(self) -> str | None:
        """Why the base retriever cannot be loaded on this machine (its pretrained file is
        missing, or its tag's weights are in no local cache), with `setting_hint`; None when
        they are here, or are the demo's, built on first use. Reads no weights."""
        from megapairs_assets.lib.errors import ConfigurationError
        from megapairs_assets.lib.open_clip_weights import cached_pretrained_weights

        pretrained = self.base_pretrained
        if self.demo_models_dir or not pretrained or Path(pretrained).expanduser().exists():
            return None
        try:
            cached_pretrained_weights(self.base_model, pretrained)  # a tag, or a path not there
        except ConfigurationError as error:
            return f"{error}. {self.setting_hint}" if self.setting_hint else str(error)
        return None

    def check_base_weights(self) -> None:
        """Build the demo's models if this profile uses them, then raise ConfigurationError
        when the base retriever's weights are not here (`base_weights_problem`)."""
        from megapairs_assets.lib.errors import ConfigurationError

        self.prepare()
        problem = self.base_weights_problem()
        if problem:
            raise ConfigurationError(f"base retriever {self.base_spec().retriever_id}: {problem}")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.prepare()


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None

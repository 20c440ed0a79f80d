"""Where the image corpus comes from and which images are accepted."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field, field_validator

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import DEFAULT_SHARD_SIZE, SourceSpec, list_shards
from megapairs_assets.lib.errors import ConfigurationError


class CorpusSourceResource(dg.ConfigurableResource):
    """The corpus: img2dataset webdataset shards, a folder of images, or a manifest.

    A shard is the unit of partitioning, retry and backfill (see megapairs_assets.corpus.sources).

    `path` is kept absolute, made so from the folder the resource is built in (the shell's,
    for `megapairs` commands and `megapairs ui`), so a run worker or a UI started in another
    folder reads the same corpus; a leading `~` is expanded.
    """

    kind: Literal["webdataset", "folder", "manifest"] = Field(
        description="webdataset: a .tar shard or a folder of them; folder: images, or one "
        "subfolder per shard; manifest: parquet/jsonl with path|url, caption[, key][, shard]"
    )
    path: str = Field(description="The tar file or folder, image folder or manifest file")
    shard_size: int = Field(
        default=DEFAULT_SHARD_SIZE,
        description="Images per shard where the source does not group them: manifest rows "
        "without a shard column, and a folder's loose top-level images beyond this many (cut "
        "by file name into shards of about this many: root, root-<first image>, ...)",
    )
    min_side_px: int = Field(default=16, description="Smaller images are quarantined (too_small)")
    max_pixels: int = Field(
        default=178_956_970, description="Larger images are quarantined before decoding (too_large)"
    )
    max_caption_chars: int = Field(default=1000, description="Longer captions are truncated")
    max_aspect_ratio: float | None = Field(
        default=20.0,
        description="Longer/shorter side above this is quarantined from the header "
        "(extreme_aspect_ratio); None turns the bound off",
    )
    only_shards: list[str] | None = Field(
        default=None,
        description="Restrict the corpus to these shards (a fixed sample, e.g. for CI checks); "
        "None = every shard the source lists",
    )
    setting_hint: str | None = Field(
        default=None,
        description="How to point the profile at another corpus (e.g. the environment variable "
        "it reads), added to every error about the corpus path",
    )

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.strip() or "://" in value:
            return value  # empty: reported by check_path; a URL is no local path
        # Not resolved: a symlink the user named stays the name they gave.
        return os.path.abspath(os.path.expanduser(value))

    def spec(self) -> SourceSpec:
        return SourceSpec(kind=self.kind, path=self.path, shard_size=self.shard_size)

    def check_path(self) -> None:
        """Cheap checks of `path` (it exists and has the kind's shape: a folder, a manifest
        file, or for webdataset also a single `.tar` shard), without listing shards.

        Raises ConfigurationError saying what is wrong, with `setting_hint` added.
        """
        path = Path(self.path)  # as the source reads it (absolute, `~` expanded)
        problem = None
        if not self.path.strip():
            problem = "the corpus path is empty"
        elif not path.exists():
            problem = f"corpus source {self.path} does not exist"
        elif self.kind == "manifest" and not path.is_file():
            problem = f"manifest corpus source {self.path} is not a file"
        elif self.kind == "webdataset" and path.is_file() and path.suffix.lower() == ".tar":
            pass  # a single shard: a corpus of one tar
        elif self.kind != "manifest" and not path.is_dir():
            problem = (
                f"{self.kind} corpus source {self.path} is not a folder: give the folder that "
                "holds the .tar shards or image folders, a .tar shard, or a "
                ".parquet/.jsonl/.ndjson manifest"
            )
        if problem:
            raise ConfigurationError(self._with_hint(problem))

    def shard_ids(self) -> list[str]:
        """The corpus: the source's current shards (restricted to `only_shards` if set)."""
        self.check_path()
        try:
            shards = list_shards(self.spec())
        except ConfigurationError as error:
            raise type(error)(self._with_hint(str(error))) from None
        if self.only_shards is None:
            return shards
        wanted = set(self.only_shards)
        return [shard for shard in shards if shard in wanted]

    def limits(self) -> ImageLimits:
        return ImageLimits(
            min_side_px=self.min_side_px,
            max_pixels=self.max_pixels,
            max_caption_chars=self.max_caption_chars,
            max_aspect_ratio=self.max_aspect_ratio,
        )

    def _with_hint(self, message: str) -> str:
        return f"{message}; {self.setting_hint}" if self.setting_hint else message


CHOSEN_CORPUS_FILE = "corpus_source.json"
"""In a home: the corpus `megapairs demo --corpus` chose, so every other process on the home
(the UI's code location, its sensors, `sync`, `check`) reads the same corpus; without it they
would read the profile's own (the bundled demo corpus) and retire the user's shards."""


def record_chosen_corpus(home: Path, source: CorpusSourceResource) -> None:
    """Remember `source` as the home's corpus (atomically; replaces an earlier choice)."""
    import json

    from megapairs_assets.lib.storage import write_atomic

    home.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"kind": source.kind, "path": source.path}, indent=2) + "\n"
    write_atomic(home / CHOSEN_CORPUS_FILE, lambda tmp: Path(tmp).write_text(text))


def chosen_corpus(home: Path) -> CorpusSourceResource | None:
    """The corpus an earlier `megapairs demo --corpus` chose for this home; None when none was
    chosen. A record that cannot be read is a configuration error naming the file (guessing
    would point the home at another corpus and retire its shards)."""
    import json

    record = home / CHOSEN_CORPUS_FILE
    if not record.is_file():
        return None
    try:
        chosen = json.loads(record.read_text())
        return CorpusSourceResource(kind=chosen["kind"], path=chosen["path"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigurationError(
            f"{record} (the corpus `megapairs demo --corpus` chose for this home) cannot be "
            f"read ({error}): run `megapairs demo --corpus <path>` again, or delete the file "
            "to use the profile's own corpus"
        ) from None

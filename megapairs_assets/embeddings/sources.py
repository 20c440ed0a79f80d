"""The three similarity sources (method.md §2): one registry, read by every stage and profile.

A source names its encoder resource, its embedding table, its KNN graph and its default
similarity band. Adding a source is adding a row here; nothing else lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

# The paper's band: a neighbour is a target only if its cosine lies in (0.8, 0.96) (method.md §3).
PAPER_BAND: tuple[float, float] = (0.8, 0.96)


@dataclass(frozen=True)
class SimilaritySource:
    """One similarity source: what it captures and where its artifacts live."""

    name: str
    encoder_key: str
    embedding_asset: str
    knn_asset: str
    description: str
    default_band: tuple[float, float] = PAPER_BAND


SOURCES: tuple[SimilaritySource, ...] = (
    SimilaritySource(
        "clip_image",
        "clip_image_encoder",
        "clip_image_embeddings",
        "clip_image_knn",
        "CLIP (EVA-CLIP in the paper) image embeddings: same object or concept (source I).",
    ),
    SimilaritySource(
        "dino_image",
        "dino_image_encoder",
        "dino_image_embeddings",
        "dino_image_knn",
        "DINOv2 image embeddings: similar layout, texture, background (source D).",
    ),
    SimilaritySource(
        "caption_text",
        "caption_text_encoder",
        "caption_text_embeddings",
        "caption_text_knn",
        "Caption text embeddings: related described content (source T).",
    ),
)
SOURCE_NAMES: tuple[str, ...] = tuple(source.name for source in SOURCES)


def source_named(name: str) -> SimilaritySource:
    """The source called `name`, or a clear error listing the known ones."""
    for source in SOURCES:
        if source.name == name:
            return source
    raise KeyError(f"unknown similarity source {name!r}; known: {', '.join(SOURCE_NAMES)}")

"""What a loaded benchmark is: images to embed, the gallery to rank, and the queries.

Every loader (CIRCO, CIRR, FashionIQ, GeneCIS, our held-out split) returns a `BenchmarkSplit`,
so embedding, caching, ranking and scoring are one code path. Image ids are strings; the first
`gallery_size` images form the gallery a query ranks, and later ones are reference images
that are not candidates (rare: a reference missing from its split's gallery).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megapairs_assets.corpus.uris import split_tar_member

MetricKind = Literal["circo", "cirr", "recall", "genecis", "heldout"]
"""Which official definition scores the split (see `megapairs_assets.evaluation.metrics`)."""

OFFICIAL_DECODING = "pil-open-convert-rgb-v1"
"""Image decoding of the public benchmarks: as their official loaders open a file,
`Image.open(path).convert("RGB")` (no EXIF rotation, no reduced-scale JPEG decode)."""
CORPUS_DECODING = "corpus-upright-jpeg-draft-v1"
"""Image decoding of the corpus, training and search (`corpus.images.open_image_for_model`:
EXIF orientation applied, JPEGs decoded at reduced scale): the held-out split, whose images
are corpus images, is embedded as training saw them."""
# Both names are part of the gallery cache key: change one whenever that decoding changes.

# GeneCIS attribute crops: the box grows by this fraction of its size on each side (left/top),
# then is padded to a square with black, as the benchmark's own evaluation code does.
GENECIS_BOX_DILATION = 0.7


@dataclass(frozen=True)
class ImageRef:
    """Where one benchmark image's pixels come from.

    uri: a file path, or a corpus `source_uri` (`<tar>#<member>` for webdataset members).
    box: (x, y, width, height) of a GeneCIS object instance in pixels; the image is cropped
        around it (dilated by GENECIS_BOX_DILATION) and padded to a square.
    """

    uri: str
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class CirQuery:
    """One composed query: a reference image and a modification text.

    targets: ids of the correct images (CIRCO: all ground truths; elsewhere the one target).
        Empty on test splits, whose answers are hidden.
    subset: CIRR's `img_set` members (for Recall_subset).
    candidates: GeneCIS only: this query's own candidate list, target first.
    """

    query_id: str
    reference_id: str
    text: str
    targets: tuple[str, ...] = ()
    subset: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()


@dataclass
class BenchmarkSplit:
    """One loaded split of one benchmark (a FashionIQ category or a GeneCIS task is a split).

    files: the annotation files read, part of the gallery version.
    remove_reference: CIRR deletes the reference image from each query's ranking.
    gallery_name: names the gallery in the embedding cache when several splits share one
        (CIRCO val and test both rank all of COCO unlabeled2017); empty: the split's own.
    discarded: queries the official protocol leaves out, with why (GeneCIS keeps only queries
        whose gallery has the most common length).
    image_decoding: how its images are decoded (OFFICIAL_DECODING or CORPUS_DECODING).
    """

    benchmark: str
    split: str
    metric_kind: MetricKind
    image_ids: list[str]
    image_refs: list[ImageRef]
    gallery_size: int
    queries: list[CirQuery]
    has_ground_truth: bool
    remove_reference: bool = False
    files: list[Path] = field(default_factory=list)
    discarded: dict[str, int] = field(default_factory=dict)
    gallery_name: str = ""
    image_decoding: str = OFFICIAL_DECODING

    def __post_init__(self) -> None:
        if len(self.image_ids) != len(self.image_refs):
            raise ValueError("image_ids and image_refs differ in length")
        if len(set(self.image_ids)) != len(self.image_ids):
            raise ValueError(f"{self.benchmark}/{self.split}: image ids repeat")
        if not 0 < self.gallery_size <= len(self.image_ids):
            raise ValueError(f"{self.benchmark}/{self.split}: gallery size out of range")

    @property
    def gallery_ids(self) -> list[str]:
        return self.image_ids[: self.gallery_size]

    def index_of(self) -> dict[str, int]:
        """Image id -> row in `image_ids` (and in the embedding matrix)."""
        return {image_id: row for row, image_id in enumerate(self.image_ids)}

    @property
    def cache_name(self) -> str:
        """The gallery's name in the embedding cache (`gallery_name`, else the split)."""
        return self.gallery_name or self.split

    def images_version(self, file_stamps: Sequence[str] | None = None) -> str:
        """Changes when anything that shapes the image embeddings changes: the cache key.

        Hashes the image ids, where each image comes from (path, crop box) and each local
        file's size and modification time. Replacing an image file therefore invalidates cached
        embeddings; renaming the root does not (paths are hashed relative to their common
        folder), nor does editing a caption (annotation files shape the queries, not the
        images).

        file_stamps: each image's `file_stamp`, one per image, when the caller already stat'ed
        the files (a search gallery's listing does), so none is stat'ed again; None: they are
        stat'ed here (`stamp_files`: once per file, once per tar for all its members).
        """
        uris = [ref.uri for ref in self.image_refs]
        if file_stamps is None:
            file_stamps = stamp_files(uris)
        elif len(file_stamps) != len(uris):
            raise ValueError(f"{len(file_stamps)} file stamps for {len(uris)} images")
        digest = hashlib.sha256()
        base = _common_parent(uris)
        for image_id, ref, stamp in zip(self.image_ids, self.image_refs, file_stamps, strict=True):
            digest.update(json.dumps([image_id, _relative(ref.uri, base), ref.box]).encode())
            digest.update(stamp.encode())
        digest.update(str(self.gallery_size).encode())
        return digest.hexdigest()[:16]

    def gallery_version(self, images_version: str | None = None) -> str:
        """The version a score row records: the images (`images_version`, computed unless
        given) plus the annotation files' bytes, so two scores with one version saw the same
        images and queries."""
        digest = hashlib.sha256((images_version or self.images_version()).encode())
        for path in self.files:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()[:16]


ABSENT_FILE_STAMP = "absent"
"""The stamp of a file that cannot be stat'ed (gone, or a remote URL)."""


def file_stamp(status: os.stat_result) -> str:
    """What `images_version` hashes of one file: its size in bytes and modification time (ns),
    from a stat the caller already made."""
    return f"{status.st_size}:{status.st_mtime_ns}"


def stamp_of_path(path: str) -> str:
    """`file_stamp` of the file at `path` (one stat, links followed), ABSENT_FILE_STAMP when it
    cannot be stat'ed."""
    try:
        return file_stamp(os.stat(path))
    except (OSError, ValueError):  # ValueError: a NUL byte in a uri read from a manifest
        return ABSENT_FILE_STAMP


def stamp_files(uris: Iterable[str]) -> list[str]:
    """Each uri's stamp: its file's, or for a tar member (`<tar>#<member>`, corpus.uris) its
    tar's, which is stat'ed once for all its members (a tar gallery of 1M members on network
    storage would otherwise stat the one tar 1M times)."""
    tars: dict[str, str] = {}
    stamps = []
    for uri in uris:
        member = split_tar_member(uri)
        if member is None:
            stamps.append(stamp_of_path(uri))
            continue
        tar_path = member[0]
        if tar_path not in tars:
            tars[tar_path] = stamp_of_path(tar_path)
        stamps.append(tars[tar_path])
    return stamps


def _common_parent(uris: list[str]) -> str:
    if not uris:
        return ""
    try:
        return os.path.commonpath([os.path.dirname(uri) for uri in uris])
    except ValueError:  # mixed absolute and relative paths
        return ""


def _relative(uri: str, base: str) -> str:
    return os.path.relpath(uri, base) if base else uri

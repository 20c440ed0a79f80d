"""Search a gallery of images with a retriever: composed, image-only or text-only queries.

What the search command runs, as plain functions (no argparse, no Dagster):

- a gallery is a folder of images (walked recursively), one webdataset `.tar` shard or a folder
  of them, a corpus manifest (`.parquet`/`.jsonl`, read by `corpus.sources`), or the current
  image corpus of a home (the catalog's `image_lineage` rows);
- its raw image projections go through the evaluation's gallery cache (`evaluation.
  gallery_cache`, under `<home>/benchmark_gallery_cache/<retriever>/search-<gallery>/`), keyed
  by the retriever's weights, the precision and the images' version (ids, paths, file sizes
  and times, by the same rule as a benchmark's gallery), so a second search of the same
  gallery with the same retriever embeds nothing;
- a query is an image, a text, or both fused by MMRet's rule (`Retriever.encode_queries`:
  the raw projections summed, then normalised); candidates are normalised image projections,
  so a score is a cosine similarity;
- the query image itself is not a result (`identical_rows`): gallery images with exactly its
  bytes (sha256: the corpus's listed hash, else hashed only when the sizes match; folders,
  tars and manifests list sizes), and on the corpus the image whose triplet-export copy it is, are
  left out and counted, unless the caller keeps them (`include_query`).

An image that cannot be read is left out of the ranking and listed (count and first few), never
fatal; its cached row is NaN, so a cached search still knows which ones they were. Entries that
cannot even be listed (an unreadable tar, a FIFO or broken link, a manifest row without a local
file) are listed too. A cache that cannot be written costs the cache, not the search. A gallery
with nothing readable, a query image that cannot be decoded or a malformed queries file is a
`SearchDataError`; a gallery path or query image that does not exist is a `SearchConfigError`.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import html
import io
import json
import os
import re
import stat
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from megapairs_assets.corpus.images import (
    ImageFailure,
    ImageLimits,
    ImageRejected,
    content_hash,
    open_image_for_model,
    open_image_rgb,
    prepare_image_for_model,
    read_uri_bytes,
)
from megapairs_assets.corpus.sources import (
    SourceSpec,
    detect_source_kind,
    is_image_name,
    list_manifest_rows,
)
from megapairs_assets.corpus.uris import TAR_SUFFIX, split_tar_member, tar_member_uri
from megapairs_assets.evaluation.benchmark import (
    BenchmarkSplit,
    ImageRef,
    file_stamp,
    stamp_files,
    stamp_of_path,
)
from megapairs_assets.evaluation.gallery_cache import CacheKey, GalleryCache
from megapairs_assets.evaluation.scoring import top_k
from megapairs_assets.generation.common import image_relpath
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.storage import write_atomic
from megapairs_assets.retriever.model import Retriever, normalize_rows

# The gallery cache's "benchmark" field for search galleries: their entries live beside the
# benchmarks' (`<retriever>/search-<gallery>/`) and can never be mistaken for one.
SEARCH_CACHE_NAMESPACE = "search"
CORPUS_GALLERY = "corpus"
# A user's gallery is what it is: a thumbnail-sized image is still a candidate (the benchmarks'
# rule, evaluation.images). The pixel and aspect bounds stay: they bound memory.
GALLERY_LIMITS = ImageLimits(min_side_px=1)
FAILURES_SHOWN = 3  # unreadable images named in a message; the count covers them all
CAPTION_CHARS_SHOWN = 60
THUMBNAIL_SIDE_PX = 160
THUMBNAIL_JPEG_QUALITY = 75
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_CAPTION_SIDECARS = (".txt", ".json")
_MAX_CAPTION_BYTES = 64_000


class SearchConfigError(ConfigurationError):
    """A search asked for something that is not there (a gallery path, a query image)."""


class SearchDataError(ValueError):
    """The data cannot be searched: an empty or unreadable gallery, a query image that does
    not decode, a malformed queries file. The message names the file."""


# --- the gallery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GalleryItem:
    """One candidate image: its id in the gallery, where its pixels are, its caption if known.

    item_id: the path below the gallery folder, `<tar name>#<member>`, `<shard>/<key>` of a
    manifest row, or the corpus image_id. uri: an absolute path or `<tar path>#<member>`
    (corpus.uris), as `read_uri_bytes` reads. content_hash (sha256 hex of the file's bytes) and
    size_bytes: when the listing knew them (the corpus: the hash; folders, tars and manifests:
    the size); they find the gallery's copies of a query image (`identical_rows`).
    file_stamp: the image file's (a member's: its tar's) size and modification time as the
    listing stat'ed them (`evaluation.benchmark.file_stamp`), hashed into the cache key so that
    key costs no second stat per file; None (the corpus): stat'ed when the key is built.
    """

    item_id: str
    uri: str
    caption: str | None = None
    content_hash: str | None = None
    size_bytes: int | None = None
    file_stamp: str | None = None


@dataclass
class Gallery:
    """The images a search ranks, in a fixed order (the rows of the cached projections).

    name: what messages call it; cache_name: its name in the gallery cache (a safe folder name
    made from the gallery's place); unlisted: "<where>: <why>" for what could not even be listed
    (an unreadable tar); captions_listed: captions came with the listing (the corpus), else a
    hit's caption is read from its sidecar (`<stem>.txt`/`.json`, webdataset's `<key>.txt`).
    export_root (the corpus only): the home's triplet export folder, whose
    `images/<shard>/<key>.jpg` is a re-encoded copy of the corpus image `<shard>/<key>`.
    """

    name: str
    cache_name: str
    items: list[GalleryItem]
    unlisted: list[str] = field(default_factory=list)
    captions_listed: bool = False
    export_root: Path | None = None


GALLERY_FORMS = (
    "a folder of images, a webdataset .tar shard, a folder of them, or a .parquet/.jsonl "
    "manifest (rows with `path` and `caption`)"
)


def gallery_from_path(path: Path) -> Gallery:
    """The gallery at `path`: a folder of images, a `.tar` shard, a folder of `.tar` shards, or
    a corpus manifest (`.parquet`/`.jsonl`/`.ndjson`, read by the corpus's own reader).

    Raises SearchConfigError when `path` does not exist or is another kind of file, and
    SearchDataError when it holds no image at all or is a manifest that cannot be read.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise SearchConfigError(f"gallery {path} does not exist; give {GALLERY_FORMS}")
    path = path.resolve()
    if path.is_file():
        if _is_manifest(path):
            gallery = _manifest_gallery(path)
        elif path.name.lower().endswith(TAR_SUFFIX):
            gallery = _tar_gallery(path, [path])
        else:
            raise SearchConfigError(
                f"gallery {path} is a file but neither a webdataset .tar shard nor a "
                f".parquet/.jsonl manifest; give {GALLERY_FORMS}"
            )
    elif not path.is_dir():
        raise SearchConfigError(f"gallery {path} is neither a folder nor a .tar file")
    elif detect_source_kind(path) == "webdataset":  # the corpus's rule: a folder with .tar files
        with os.scandir(path) as entries:
            tars = sorted(
                Path(entry.path)
                for entry in entries
                if entry.name.lower().endswith(TAR_SUFFIX) and _is_file_entry(entry)
            )
        gallery = _tar_gallery(path, tars)
    else:
        gallery = _folder_gallery(path)
    if not gallery.items:
        problems = f" ({'; '.join(gallery.unlisted[:FAILURES_SHOWN])})" if gallery.unlisted else ""
        raise SearchDataError(f"gallery {path} holds no images{problems}")
    return gallery


def gallery_from_corpus(catalog: Any, home: Path, export_root: Path | None = None) -> Gallery:
    """The current image corpus of `home`: every row of the catalog's `image_lineage` table,
    with its caption and content hash. `export_root`: the home's triplet export folder, so a
    query picked from it (as the demo's summary suggests) counts as its corpus image.
    SearchDataError when no corpus has been built there yet."""
    import megapairs_assets.corpus.step  # noqa: F401  (declares the image_lineage table)

    missing = (
        f"no image corpus under {home} yet: run `megapairs demo` (or materialize image_corpus) "
        "first, set MEGAPAIRS_HOME to the home that holds it, or pass --gallery"
    )
    if getattr(catalog, "path", None) is not None and not catalog.path.exists():
        raise SearchDataError(missing)
    frame = catalog.read_only_query(
        "SELECT image_id, source_uri, caption, content_hash FROM image_lineage ORDER BY image_id"
    )
    if frame.height == 0:
        raise SearchDataError(missing)
    items = [
        GalleryItem(image_id, uri, caption, content_hash)
        for image_id, uri, caption, content_hash in zip(
            frame["image_id"],
            frame["source_uri"],
            frame["caption"],
            frame["content_hash"],
            strict=True,
        )
    ]
    return Gallery(
        f"image corpus of {home}",
        CORPUS_GALLERY,
        items,
        captions_listed=True,
        export_root=export_root,
    )


def _folder_gallery(root: Path) -> Gallery:
    """Every image file below `root` (hidden entries skipped, folder links not followed), by
    path, in `os.walk`'s order: a folder's files by name, then its subfolders by name.

    Each image is stat'ed once, and that one stat serves twice: it says whether the image is a
    regular file, and it gives the size and time the cache key hashes (`file_stamp`), so a
    search of 1M files on network storage stats 1M times, not 2M. An image name that is not a
    regular file (a FIFO would block the read forever, a broken link has nothing to read) and a
    subfolder that cannot be listed are listed in `unlisted`, not ranked.
    """
    items: list[GalleryItem] = []
    unlisted: list[str] = []
    folders = [str(root)]  # a stack, so a folder's subfolders are walked in name order
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            unlisted.append(f"{folder}: cannot be listed ({_os_reason(error)})")
            continue
        subfolders: list[str] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not is_image_name(entry.name):
                if _is_walked_folder(entry):
                    subfolders.append(entry.path)
                continue
            try:
                status = os.stat(entry.path)  # links followed, as reading the image does
            except OSError as error:
                gone = error.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
                what = "a broken link" if gone else f"cannot be stat'ed ({_os_reason(error)})"
                unlisted.append(f"{entry.path}: {what}")
                continue
            if stat.S_ISDIR(status.st_mode):  # a folder named like an image: walked as one
                if not entry.is_symlink():
                    subfolders.append(entry.path)
                continue
            if not stat.S_ISREG(status.st_mode):
                unlisted.append(f"{entry.path}: not a regular file")
                continue
            item_id = Path(entry.path).relative_to(root).as_posix()
            items.append(
                GalleryItem(
                    item_id, entry.path, size_bytes=status.st_size, file_stamp=file_stamp(status)
                )
            )
        folders.extend(reversed(subfolders))
    return Gallery(str(root), _cache_name(root), items, unlisted)


def _is_walked_folder(entry: os.DirEntry[str]) -> bool:
    """Whether `os.walk` (links not followed) would walk into `entry`: a folder, not a link.
    Free on most file systems (the listing's entry type), a stat only where it lacks one."""
    try:
        return entry.is_dir() and not entry.is_symlink()
    except OSError:
        return False


def _is_file_entry(entry: os.DirEntry[str]) -> bool:
    """Whether `entry` is a regular file, links followed (as `Path.is_file`), from the listing's
    entry type where the file system gives one."""
    try:
        return entry.is_file()
    except OSError:
        return False


def _os_reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _tar_gallery(where: Path, tars: Sequence[Path]) -> Gallery:
    """The image members of each tar, in archive order (a name repeated in one tar: the first
    copy, the one `read_uri_bytes` serves). Only headers are read here, not the images; each
    tar is stat'ed once, its members' `file_stamp`."""
    items: list[GalleryItem] = []
    unlisted: list[str] = []
    for tar_path in tars:
        seen: set[str] = set()
        stamp = stamp_of_path(str(tar_path))
        try:
            with tarfile.open(tar_path, mode="r:") as tar:
                for member in tar:
                    if member.isfile() and is_image_name(member.name) and member.name not in seen:
                        seen.add(member.name)
                        uri = tar_member_uri(str(tar_path), member.name)
                        item_id = f"{tar_path.name}#{member.name}"
                        items.append(
                            GalleryItem(item_id, uri, size_bytes=member.size, file_stamp=stamp)
                        )
        except (tarfile.TarError, OSError, EOFError) as error:
            state = f"read up to image {len(seen)}" if seen else "not a readable tar"
            unlisted.append(f"{tar_path}: {state} ({type(error).__name__}: {error})")
    return Gallery(str(where), _cache_name(where), items, unlisted)


def _is_manifest(path: Path) -> bool:
    """Whether the corpus reads the file `path` as a manifest (its rule: the suffix)."""
    try:
        return detect_source_kind(path) == "manifest"
    except ConfigurationError:  # a file, but not a manifest
        return False


def _manifest_gallery(manifest: Path) -> Gallery:
    """Every row of a corpus manifest, parsed by the corpus's reader (`corpus.sources.
    list_manifest_rows`): `path` relative to the manifest or absolute, `caption`, optional
    `key`/`shard`; an item's id is `<shard>/<key>`, as the corpus would name it. A row the
    corpus would not read (no path, a URL, a missing file or one that is not a regular file, a
    malformed line) is listed in `unlisted` with its reason.

    No image is read here (the corpus's one stat per row gives the size and time the cache key
    hashes; a tar of member rows is stat'ed once more), so a search whose embeddings come from the
    cache reads no image file at all; finding a query's copies reads only the rows of its size
    (`identical_rows`). A file that is there but cannot be read or decoded is found by the embedding
    pass, which leaves it out and says so, as in any gallery.
    """
    try:
        listing = list_manifest_rows(SourceSpec("manifest", str(manifest)))
    except ConfigurationError as error:  # empty, no path column, not Parquet: the data's fault
        raise SearchDataError(f"gallery {error}") from None
    items: list[GalleryItem] = []
    unlisted = [f"{record.uri}: {record.error}" for record in listing.unread]
    for entry in listing.entries:
        if entry.problem is not None:
            unlisted.append(f"{entry.uri}: {entry.problem}" if entry.uri else entry.problem)
            continue
        item_id = f"{entry.shard}/{entry.key}"
        # The corpus's one stat per row gives the stamp; tar members get theirs below.
        stamp = None if entry.mtime_ns is None else f"{entry.size_bytes}:{entry.mtime_ns}"
        items.append(
            GalleryItem(
                item_id, entry.uri, entry.caption, size_bytes=entry.size_bytes, file_stamp=stamp
            )
        )
    unstamped = [index for index, item in enumerate(items) if item.file_stamp is None]
    stamps = stamp_files(items[index].uri for index in unstamped)  # a tar: one stat for all
    for index, stamp in zip(unstamped, stamps, strict=True):
        items[index] = dataclasses.replace(items[index], file_stamp=stamp)
    return Gallery(str(manifest), _cache_name(manifest), items, unlisted, captions_listed=True)


def _cache_name(place: Path) -> str:
    """A folder name for a gallery's cache entries: its name plus a hash of where it is, so two
    galleries called `photos` in different places never evict each other's embeddings."""
    digest = hashlib.sha256(str(place).encode()).hexdigest()[:10]
    stem = _UNSAFE_NAME.sub("-", place.name).strip("-._")[:60] or "gallery"
    return f"{stem}-{digest}"


def item_caption(item: GalleryItem) -> str | None:
    """The item's caption: the listed one, else its sidecar's (`.txt`, or `.json` with a
    "caption"), None when there is none or it cannot be read."""
    if item.caption is not None:
        return item.caption
    member = split_tar_member(item.uri)
    if member is not None:
        tar_path, name = member
        head, _, base = name.rpartition("/")
        key = (f"{head}/" if head else "") + base.split(".", 1)[0]  # webdataset's key rule
        candidates = [tar_member_uri(tar_path, key + suffix) for suffix in _CAPTION_SIDECARS]
    else:
        candidates = [str(Path(item.uri).with_suffix(suffix)) for suffix in _CAPTION_SIDECARS]
    for uri in candidates:
        try:
            data = read_uri_bytes(uri)
        except ImageRejected:
            continue
        caption = _caption_text(data[:_MAX_CAPTION_BYTES], uri.endswith(".json"))
        if caption:
            return caption
    return None


def _caption_text(data: bytes, is_json: bool) -> str | None:
    text = data.decode("utf-8", errors="replace").strip()
    if not is_json:
        return " ".join(text.split()) or None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    caption = value.get("caption") if isinstance(value, dict) else None
    if not isinstance(caption, str):
        return None
    return " ".join(caption.split()) or None


# --- embedding the gallery ---------------------------------------------------------------------


@dataclass
class GalleryEmbeddings:
    """A gallery's raw image projections, one row per item; NaN rows are unreadable images.

    failures: "<uri>: <why>" for unreadable images (all of them when just embedded; after a
    cache hit, the first FAILURES_SHOWN read again for their reason). reused: from the cache.
    cache_entry: where they are cached, None when the cache could not be written.
    """

    gallery: Gallery
    projections: np.ndarray
    failures: list[str]
    reused: bool
    cache_entry: Path | None  # None: the cache could not be written

    @property
    def readable_rows(self) -> np.ndarray:
        return np.flatnonzero(np.isfinite(self.projections).all(axis=1))

    @property
    def unreadable_count(self) -> int:
        return len(self.gallery.items) - len(self.readable_rows)

    def skipped_message(self) -> str | None:
        """One line on what was left out of the ranking (unreadable images, unlisted tars)."""
        parts = []
        if self.unreadable_count:
            hidden = self.unreadable_count - min(len(self.failures), FAILURES_SHOWN)
            more = f" (and {hidden} more)" if hidden > 0 else ""
            parts.append(
                f"{self.unreadable_count} of {len(self.gallery.items)} gallery images cannot be "
                f"read and are left out: {'; '.join(self.failures[:FAILURES_SHOWN])}{more}"
            )
        unlisted = self.gallery.unlisted
        if unlisted:
            hidden = len(unlisted) - FAILURES_SHOWN
            more = f" (and {hidden} more)" if hidden > 0 else ""
            entries = "entry is" if len(unlisted) == 1 else "entries are"
            parts.append(
                f"{len(unlisted)} other gallery {entries} left out: "
                + "; ".join(unlisted[:FAILURES_SHOWN])
                + more
            )
        return "; ".join(parts) or None


def gallery_cache_key(retriever: Retriever, gallery: Gallery) -> CacheKey:
    """The cache key of `gallery` embedded by `retriever`, as the evaluation builds one: the
    images' version comes from `BenchmarkSplit.images_version` (a gallery is a split without
    queries), so a replaced file is a new key and a renamed root is not. The files' sizes and
    times are the listing's (`GalleryItem.file_stamp`); only items listed without one (the
    corpus) are stat'ed here, a tar once for all its members."""
    items = gallery.items
    unstamped = iter(stamp_files(item.uri for item in items if item.file_stamp is None))
    stamps = [next(unstamped) if item.file_stamp is None else item.file_stamp for item in items]
    as_split = BenchmarkSplit(
        benchmark=SEARCH_CACHE_NAMESPACE,
        split=gallery.cache_name,
        metric_kind="recall",
        image_ids=[item.item_id for item in items],
        image_refs=[ImageRef(item.uri) for item in items],
        gallery_size=len(items),
        queries=[],
        has_ground_truth=False,
    )
    return CacheKey(
        retriever_id=retriever.retriever_id,
        weights_fingerprint=retriever.spec.fingerprint(),
        benchmark=SEARCH_CACHE_NAMESPACE,
        split=gallery.cache_name,
        gallery_version=as_split.images_version(stamps),
        image_count=len(items),
        precision=str(retriever.dtype).removeprefix("torch."),
    )


def embed_gallery(
    retriever: Retriever,
    gallery: Gallery,
    cache: GalleryCache,
    batch_size: int = 64,
    num_workers: int = 0,
    refresh: bool = False,
    log: Callable[[str], None] | None = None,
) -> GalleryEmbeddings:
    """The gallery's projections from the cache, else embedded (with progress) and stored.

    `refresh` embeds again even when the cache holds an entry (an image that was unreadable
    then may be readable now without its file having changed).
    """
    key = gallery_cache_key(retriever, gallery)
    failures: list[str] = []

    def compute() -> np.ndarray:
        projections, found = embed_images(retriever, gallery, batch_size, num_workers, log)
        failures.extend(found)
        return projections

    not_cached: list[str] = []

    def cache_failed(problem: str) -> None:  # a full disk costs the cache, not the search
        not_cached.append(problem)
        (log or _stderr)(f"megapairs search: {problem}")

    if refresh:
        projections, reused = compute(), False
        problem = cache.try_store(key, projections)
        if problem is not None:
            cache_failed(problem)
    else:
        projections, reused = cache.get_or_compute(key, compute, cache_failed)
    entry = None if not_cached else cache.entry_dir(key)
    embeddings = GalleryEmbeddings(gallery, projections, failures, reused, entry)
    if reused:
        unreadable = np.flatnonzero(~np.isfinite(projections).all(axis=1))
        embeddings.failures = [
            _why_unreadable(retriever, gallery.items[row].uri)
            for row in unreadable[:FAILURES_SHOWN]
        ]
    return embeddings


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def embed_images(
    retriever: Retriever,
    gallery: Gallery,
    batch_size: int,
    num_workers: int,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(raw projections with a NaN row per unreadable image, "<uri>: <why>" per such image)."""
    loader = DataLoader(
        _GalleryImages([item.uri for item in gallery.items], retriever),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        # As the evaluation does: workers only decode, and fork starts them in milliseconds.
        multiprocessing_context=(
            "fork" if num_workers > 0 and sys.platform.startswith("linux") else None
        ),
    )
    rows: list[np.ndarray] = []
    chunks: list[np.ndarray] = []
    failures: list[str] = []
    with Progress(len(gallery.items), "gallery", "images", log=log) as progress:
        for indices, pixels, batch_failures in loader:
            failures += batch_failures
            if pixels is not None:
                rows.append(indices)
                chunks.append(retriever.project_pixels(pixels))
            progress.update(len(batch_failures) + len(indices))
    dim = chunks[0].shape[1] if chunks else retriever.dim
    projections = np.full((len(gallery.items), dim), np.nan, dtype=np.float32)
    if chunks:
        projections[np.concatenate(rows)] = np.concatenate(chunks)
    return projections, failures


class _GalleryImages(Dataset):
    """Gallery images as preprocessed tensors; a failure comes back as a message, never raised
    (one unreadable file must not end the pass)."""

    def __init__(self, uris: list[str], retriever: Retriever) -> None:
        self.uris = uris
        self.preprocess = retriever.preprocess
        self.input_side_px = retriever.input_side_px

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        uri = self.uris[index]
        prepared = prepare_image_for_model(uri, GALLERY_LIMITS, self.input_side_px, self.preprocess)
        if isinstance(prepared, ImageFailure):
            return index, None, f"{uri}: {prepared.reason}: {prepared.detail}"
        return index, prepared, None


def _collate(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[np.ndarray, torch.Tensor | None, list[str]]:
    ok = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    failures = [message for _, _, message in items if message is not None]
    indices = np.array([index for index, _ in ok], dtype=np.int64)
    return indices, (torch.stack([p for _, p in ok]) if ok else None), failures


def _why_unreadable(retriever: Retriever, uri: str) -> str:
    """Why a cached-unreadable image failed, read again (cheap: only the few shown)."""
    prepared = prepare_image_for_model(
        uri, GALLERY_LIMITS, retriever.input_side_px, retriever.preprocess
    )
    if isinstance(prepared, ImageFailure):
        return f"{uri}: {prepared.reason}: {prepared.detail}"
    return f"{uri}: unreadable when the gallery was embedded, readable now (search with --refresh)"


# --- queries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchQuery:
    """One query: a reference image, a text, or both (then fused by MMRet's rule)."""

    image: Path | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.image is None and not (self.text or "").strip():
            raise ValueError("a query needs an image, a text or both")

    @property
    def kind(self) -> str:
        if self.image is not None and self.text:
            return "image+text"
        return "image" if self.image is not None else "text"

    def describe(self) -> str:
        parts = [f"image {self.image}"] if self.image is not None else []
        parts += [f"text {self.text!r}"] if self.text else []
        return " + ".join(parts)


def read_queries_file(path: Path) -> list[SearchQuery]:
    """Queries from a JSON Lines file: one {"image": ..., "text": ...} object a line (either
    key may be left out; a relative image path is read from the file's folder; blank lines
    are skipped). SearchConfigError when the file is not there, SearchDataError naming the
    line for anything else wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SearchConfigError(f"queries file {path} does not exist or is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise SearchDataError(f"cannot read queries file {path}: {error}") from error
    queries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except ValueError as error:
            raise SearchDataError(f"{where}: not a JSON object ({error})") from None
        if not isinstance(value, dict):
            raise SearchDataError(
                f'{where}: expected an object like {{"image": ..., '
                f'"text": ...}}, got {type(value).__name__}'
            )
        unknown = sorted(set(value) - {"image", "text"})
        if unknown:
            raise SearchDataError(f"{where}: unknown key(s) {', '.join(unknown)}")
        image, text = value.get("image"), value.get("text")
        for name, item in (("image", image), ("text", text)):
            if item is not None and not isinstance(item, str):
                raise SearchDataError(f"{where}: {name} must be a string")
        if not image and not (text or "").strip():
            raise SearchDataError(f"{where}: a query needs an image, a text or both")
        image_path = None
        if image:
            image_path = Path(image).expanduser()
            image_path = image_path if image_path.is_absolute() else path.parent / image_path
            problem = query_image_problem(image_path)
            if problem is not None:
                raise SearchDataError(f"{where}: query image {image_path} {problem}")
        queries.append(SearchQuery(image_path, text.strip() if text else None))
    if not queries:
        raise SearchDataError(f"queries file {path} holds no queries")
    return queries


def query_image_problem(path: Path) -> str | None:
    """Why `path` cannot be a query image ("does not exist", "is not a file"), None when it
    can. A `<tar>#<member>` uri, as a hit's path reads (search more like a hit), names the
    member: its tar must be a file; a missing member is found when it is read."""
    member = split_tar_member(str(path))
    where = Path(member[0]) if member is not None else path
    if where.is_file():
        return None
    return "is not a file" if where.exists() else "does not exist"


def read_query_image(path: Path) -> bytes:
    """The bytes of a query image (a file or a `<tar>#<member>` uri); SearchConfigError when
    it is not there, SearchDataError when it cannot be read."""
    problem = query_image_problem(path)
    if problem is not None:
        raise SearchConfigError(f"query image {path} {problem}")
    try:
        return read_uri_bytes(str(path))
    except ImageRejected as error:
        raise SearchDataError(f"query image {path} cannot be read: {error}") from None


def open_query_images(
    queries: Sequence[SearchQuery], input_side_px: int | None = None
) -> dict[Path, Image.Image]:
    """Each distinct query image decoded as RGB, as the gallery's images are (for a retriever
    whose input side is `input_side_px`), so an image searched for itself scores 1;
    SearchConfigError for one that is not there, SearchDataError for one that does not
    decode."""
    images: dict[Path, Image.Image] = {}
    for query in queries:
        if query.image is None or query.image in images:
            continue
        problem = query_image_problem(query.image)
        if problem is not None:
            raise SearchConfigError(f"query image {query.image} {problem}")
        try:
            images[query.image] = open_image_for_model(
                str(query.image), GALLERY_LIMITS, input_side_px
            )
        except ImageRejected as error:
            raise SearchDataError(f"query image {query.image} cannot be used: {error}") from None
    return images


def encode_search_queries(
    retriever: Retriever, queries: Sequence[SearchQuery], images: dict[Path, Image.Image]
) -> np.ndarray:
    """One unit row per query: fused image + text (MMRet's rule), or one modality's embedding."""
    rows: list[np.ndarray | None] = [None] * len(queries)
    by_kind: dict[str, list[int]] = {}
    for index, query in enumerate(queries):
        by_kind.setdefault(query.kind, []).append(index)
    for kind, indices in by_kind.items():
        pictures = [images[queries[i].image] for i in indices] if kind != "text" else []
        texts = [queries[i].text or "" for i in indices]
        if kind == "image+text":
            encoded = retriever.encode_queries(pictures, texts)
        elif kind == "image":
            encoded = retriever.encode_images(pictures)
        else:
            encoded = retriever.encode_texts(texts)
        for i, row in zip(indices, encoded, strict=True):
            rows[i] = row
    return np.stack(rows).astype(np.float32, copy=False)


# --- ranking -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """One ranked gallery image: rank from 1, cosine similarity, the item and its caption."""

    rank: int
    score: float
    item: GalleryItem
    caption: str | None


@dataclass
class QueryResult:
    """A query's hits; query_copies_left_out: readable gallery images that are the query image
    itself (`identical_rows`), not ranked (0 when they were kept, or for a text query)."""

    query: SearchQuery
    hits: list[Hit]
    query_copies_left_out: int = 0


def identical_rows(gallery: Gallery, image_paths: Sequence[Path]) -> dict[Path, list[int]]:
    """For each query image, the gallery rows that are that image: the rows whose file holds
    exactly its bytes (sha256), and for the corpus, the image whose triplet-export copy
    (`<export>/images/<shard>/<key>.jpg`, re-encoded, so other bytes) the query is.

    Cheap on any gallery, for any number of queries: listed hashes (the corpus) are looked
    up; any other item is read and hashed only when its size equals a query file's (a folder
    image's, tar member's or manifest row's size comes with the listing; an item listed
    without one is stat'ed, once per search).
    SearchConfigError / SearchDataError when a query image is not there / cannot be read.
    """
    by_hash: dict[str, list[int]] = {}
    unhashed = []
    for row, item in enumerate(gallery.items):
        if item.content_hash is not None:
            by_hash.setdefault(item.content_hash, []).append(row)
        else:
            unhashed.append(row)
    by_size: dict[int | None, list[int]] | None = None  # built at the first image query
    by_export_path: dict[str, list[int]] | None = None  # built at the first exported query
    hashes: dict[int, str | None] = {}
    found: dict[Path, list[int]] = {}
    for path in dict.fromkeys(image_paths):
        data = read_query_image(path)
        digest = content_hash(data)
        rows = set(by_hash.get(digest, ()))
        if unhashed:
            if by_size is None:
                by_size = {}
                for row in unhashed:
                    by_size.setdefault(_size_bytes(gallery.items[row]), []).append(row)
            for row in by_size.get(len(data), []) + by_size.get(None, []):
                if row not in hashes:
                    hashes[row] = _item_hash(gallery.items[row])
                if hashes[row] == digest:
                    rows.add(row)
        exported = _export_relative_path(gallery, path)
        if exported is not None:
            if by_export_path is None:
                by_export_path = {}
                for row, item in enumerate(gallery.items):
                    by_export_path.setdefault(image_relpath(item.item_id), []).append(row)
            rows.update(by_export_path.get(exported, ()))
        found[path] = sorted(rows)
    return found


def _export_relative_path(gallery: Gallery, path: Path) -> str | None:
    """`path` relative to the gallery's triplet export folder, None when it is not inside."""
    if gallery.export_root is None:
        return None
    try:
        return path.resolve().relative_to(gallery.export_root.resolve()).as_posix()
    except (OSError, ValueError):  # not under the export folder
        return None


def _size_bytes(item: GalleryItem) -> int | None:
    if item.size_bytes is not None:
        return item.size_bytes
    if split_tar_member(item.uri) is not None:
        return None  # not listed: hash it (a tar gallery always lists sizes)
    try:
        return os.stat(item.uri).st_size
    except OSError:
        return -1  # gone: it cannot be a copy of anything


def _item_hash(item: GalleryItem) -> str | None:
    try:
        return content_hash(read_uri_bytes(item.uri))
    except ImageRejected:
        return None


def rank_gallery(
    query_embeddings: np.ndarray,
    embeddings: GalleryEmbeddings,
    top_k_images: int,
    left_out: Sequence[Sequence[int]] | None = None,
) -> list[list[tuple[int, float]]]:
    """Per query, the best (gallery row, score) pairs, best first (ties by gallery order).

    Candidates are the readable rows' normalised projections, less the query's `left_out`
    rows (one sequence per query); exact inner-product search (evaluation.scoring.top_k).
    SearchDataError when no gallery image is readable.
    """
    rows = embeddings.readable_rows
    if len(rows) == 0:
        raise SearchDataError(
            f"no image of gallery {embeddings.gallery.name} can be read: "
            + "; ".join(embeddings.failures[:FAILURES_SHOWN])
        )
    if top_k_images < 1:
        raise ValueError(f"top_k_images must be positive, got {top_k_images}")
    left_out = left_out or [()] * len(query_embeddings)
    candidates = normalize_rows(embeddings.projections[rows])
    # Search deep enough that the best `top_k_images` remain once a query's rows are dropped.
    extra = max((len(out) for out in left_out), default=0)
    found = top_k(query_embeddings, candidates, min(top_k_images + extra, len(rows)))
    ranked = []
    for indices, scores, out in zip(found.indices, found.scores, left_out, strict=True):
        dropped = set(out)
        hits = [
            (int(rows[i]), float(s))
            for i, s in zip(indices, scores, strict=True)
            if i >= 0 and int(rows[i]) not in dropped
        ]
        ranked.append(hits[:top_k_images])
    return ranked


def search(
    retriever: Retriever,
    queries: Sequence[SearchQuery],
    images: dict[Path, Image.Image],
    embeddings: GalleryEmbeddings,
    top_k_images: int = 10,
    include_query: bool = False,
) -> list[QueryResult]:
    """Rank the gallery for every query; the hits carry captions (read for hits only).

    A gallery image with exactly the bytes of the query's image (the query picked from the
    gallery itself) is left out and counted, unless `include_query`; text queries leave out
    nothing.
    """
    query_embeddings = encode_search_queries(retriever, queries, images)
    items = embeddings.gallery.items
    copies: dict[Path, list[int]] = {}
    if not include_query:
        copies = identical_rows(embeddings.gallery, [q.image for q in queries if q.image])
    left_out = [copies.get(query.image, []) if query.image else [] for query in queries]
    ranked = rank_gallery(query_embeddings, embeddings, top_k_images, left_out)
    readable = set(embeddings.readable_rows.tolist())
    return [
        QueryResult(
            query,
            [
                Hit(rank, score, items[row], item_caption(items[row]))
                for rank, (row, score) in enumerate(hits, start=1)
            ],
            sum(row in readable for row in out),
        )
        for query, hits, out in zip(queries, ranked, left_out, strict=True)
    ]


def left_out_note(result: QueryResult) -> str | None:
    """One line on the query's own copies left out of its results, None when there were none."""
    count = result.query_copies_left_out
    if not count:
        return None
    copies = "image is" if count == 1 else "images are"
    return f"{count} gallery {copies} the query image itself, left out (--include-query keeps it)"


# --- output --------------------------------------------------------------------------------


def results_markdown(results: Sequence[QueryResult]) -> str:
    """One Markdown table per query: rank, score, path, caption (shortened)."""
    blocks = []
    for number, result in enumerate(results, start=1):
        lines = [f"**query {number}** · {result.query.describe()}", ""]
        note = left_out_note(result)
        lines += [f"_{note}_", ""] if note else []
        if not result.hits:
            lines.append("no gallery image left to rank")
            blocks.append("\n".join(lines))
            continue
        lines += ["| rank | score | path | caption |", "|---|---|---|---|"]
        for hit in result.hits:
            caption = _cell(hit.caption or "")
            if len(caption) > CAPTION_CHARS_SHOWN:
                caption = caption[: CAPTION_CHARS_SHOWN - 3] + "..."
            lines.append(f"| {hit.rank} | {hit.score:.4f} | {_cell(hit.item.uri)} | {caption} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_json(
    results: Sequence[QueryResult], embeddings: GalleryEmbeddings, retriever_id: str
) -> dict[str, Any]:
    """Everything the table shows, plus the gallery's size, cache use and what was skipped."""
    gallery = embeddings.gallery
    return {
        "retriever_id": retriever_id,
        "gallery": {
            "name": gallery.name,
            "images": len(gallery.items),
            "searched": len(embeddings.readable_rows),
            "embeddings_reused": embeddings.reused,
            "cache_entry": str(embeddings.cache_entry) if embeddings.cache_entry else None,
            "unreadable": embeddings.unreadable_count,
            "unreadable_examples": embeddings.failures[:FAILURES_SHOWN],
            "unlisted": gallery.unlisted,
        },
        "queries": [
            {
                "image": str(result.query.image) if result.query.image is not None else None,
                "text": result.query.text,
                "kind": result.query.kind,
                "query_copies_left_out": result.query_copies_left_out,
                "results": [
                    {
                        "rank": hit.rank,
                        "score": hit.score,
                        "id": hit.item.item_id,
                        "path": hit.item.uri,
                        "caption": hit.caption,
                    }
                    for hit in result.hits
                ],
            }
            for result in results
        ],
    }


def write_html(
    path: Path,
    results: Sequence[QueryResult],
    images: dict[Path, Image.Image],
    retriever_id: str,
    gallery_name: str,
) -> Path:
    """A self-contained page: each query's image (or text) and its hits as small inline JPEG
    thumbnails (THUMBNAIL_SIDE_PX) with rank, score, path and caption. Written atomically."""
    sections = []
    for number, result in enumerate(results, start=1):
        query = result.query
        picture = _thumbnail_tag(images[query.image], str(query.image)) if query.image else ""
        text = f"<p class='text'>{html.escape(query.text)}</p>" if query.text else ""
        note = left_out_note(result) or ("" if result.hits else "no gallery image left to rank")
        text += f"<p class='note'>{html.escape(note)}</p>" if note else ""
        cards = []
        for hit in result.hits:
            thumbnail = _gallery_thumbnail(hit.item.uri)
            caption = html.escape(hit.caption or "")
            cards.append(
                f"<figure>{thumbnail}<figcaption><b>#{hit.rank}</b> {hit.score:.4f}<br>"
                f"<span class='path'>{html.escape(hit.item.uri)}</span><br>{caption}"
                "</figcaption></figure>"
            )
        sections.append(
            f"<section><h2>query {number}: {html.escape(query.kind)}</h2>"
            f"<div class='query'>{picture}{text}</div>"
            f"<div class='hits'>{''.join(cards)}</div></section>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>megapairs search</title>"
        "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;"
        "width:180px;vertical-align:top;margin:4px}figcaption{font-size:12px;"
        "overflow-wrap:anywhere}.path{color:#666}.query{margin-bottom:.5em}"
        ".text{font-size:18px}.note{color:#666;font-style:italic}img{max-width:160px;max-height:160px}</style></head><body>"
        f"<h1>megapairs search</h1><p>retriever <code>{html.escape(retriever_id)}</code>, "
        f"gallery <code>{html.escape(gallery_name)}</code></p>{''.join(sections)}</body></html>"
    )
    path = Path(path)
    write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def _gallery_thumbnail(uri: str) -> str:
    try:
        picture = open_image_rgb(uri, GALLERY_LIMITS, max_side_px=THUMBNAIL_SIDE_PX)
    except ImageRejected as error:
        return f"<div class='missing'>{html.escape(str(error))}</div>"
    return _thumbnail_tag(picture, uri)


def _thumbnail_tag(picture: Image.Image, alt: str) -> str:
    thumb = picture.copy()
    thumb.thumbnail((THUMBNAIL_SIDE_PX, THUMBNAIL_SIDE_PX))
    buffer = io.BytesIO()
    thumb.convert("RGB").save(buffer, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img src='data:image/jpeg;base64,{encoded}' alt='{html.escape(alt, quote=True)}'>"

"""Where corpus images come from, read shard by shard.

Three layouts are understood, each named by a `SourceSpec`:

- `webdataset`: a folder of `*.tar` shards as written by img2dataset (`000000012.jpg` next to
  `000000012.txt` / `000000012.json`; a `.caption` member is read as a folder's is, after
  `.txt` and before `.json`); one tar is one shard, read as a stream. A single `.tar` file
  given as the source is a corpus of that one shard, its id made from its name as in a
  folder of tars (`000012.tar` is shard `000012`). img2dataset's
  own bookkeeping beside a shard (`<shard>.parquet`, `<shard>_stats.json`) is recognised and
  skipped: the tar holds the same captions.
- `folder`: a folder of images with optional sidecar captions (`<stem>.txt`, `<stem>.caption`
  or `<stem>.json`, extension in any letter case); each immediate subfolder holding images is
  a shard, images at the top level form `root`, or, when there are more of them than the
  spec's `shard_size`, shards cut where their sorted names say (content-defined, so adding
  photos re-cuts only the shard they fall in): `root`, `root-IMG_0412`, ... named by their
  first image (`cut_loose_images`). Deeper folders are reported, not read.
- `manifest`: a parquet or jsonl table with a `path` or `url` column, a `caption` column and
  optional `key`/`id` and `shard` columns; without a `shard` column every `shard_size` rows
  form a shard, by position (see `_shard_id_expr` for why not cut like loose images).
  A problem with one row names the place a user finds it in the file: `line N` (the file's
  line, counted from 1, blank lines included) in a jsonl manifest, `row N` (the row index,
  counted from 0, as polars and pandas show it) in a parquet one. A row without `key`/`id` is
  keyed by its row index among the non-blank rows, zero-padded (`000000013`).

Every entry is either read or reported. `scan_source` lists the shards and, as `unread`
records, every entry no shard reads: a name that cannot be made safe as a shard id (shard ids
become file names, see `megapairs_assets.lib.storage.is_safe_partition_key`; a tar or folder
named with spaces or accents gets a derived id, `derived_shard_id`), a compressed tar or any
other file the layout does not use. A tar member's key is its path up to the first dot of its
base name, folders included (webdataset's rule), unless the tar's names only pair up when cut
at the last dot (`a.b.c.jpg` + `a.b.c.txt`, see `_choose_key_rule`); a sample's further
images (`k.png` after `k.jpg`) are records of their own with the sample's caption. In a folder
an image's key is its stem, or its full name when an earlier image took that stem (`twin.jpg`,
`twin.png`). `count_shard_records` says how many records a shard holds before reading it;
`SourceListings` lets the shards of one run share a folder's listing; `list_manifest_rows`
lists a manifest's rows as its records would hold them, without reading an image.
Inside a shard, reading never raises for a single bad item:
it yields a `RawRecord` whose `error` says what is wrong (links, FIFOs and unknown members of a
tar included), so the table builder can quarantine it. Only a shard that cannot be read at all
raises `ShardReadError`. Nothing is ever downloaded: remote URLs are reported, not fetched.
Tar directory members carry no data and are passed over.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tarfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from stat import S_ISREG
from typing import Literal

import polars as pl

from megapairs_assets.corpus.images import ImageRejected, read_uri_bytes
from megapairs_assets.corpus.uris import (
    TAR_SUFFIX,
    is_remote,
    resolve_local,
    resolved_path,
    split_tar_member,
    tar_member_uri,
)
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.storage import (
    MAX_PARTITION_KEY_CHARS,
    SAFE_PARTITION_KEY_RULE,
    check_partition_key,
    is_safe_partition_key,
)

SourceKind = Literal["webdataset", "folder", "manifest"]

# Read as images (any letter case). HEIC/HEIF files are read too, so that a build of Pillow
# that cannot decode them quarantines each one with a reason instead of skipping it.
IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff", "avif"}
    | {"heic", "heif"}
)
_IMAGE_EXTENSIONS_TEXT = "." + ", .".join(sorted(IMAGE_EXTENSIONS))
ROOT_SHARD = "root"
DEFAULT_SHARD_SIZE = 1000
"""Images per shard where the source does not group them itself: manifest rows without a
`shard` column, and, on average, a folder's loose top-level images (see `cut_loose_images`)."""
UNASSIGNED_SHARD = "unassigned"
_SHARD_ID_DIGITS = 5
_ROW_KEY_DIGITS = 9
_ROW = "__row_index"
# A jsonl manifest row's line in its file, counted from 1: what its problems are reported by.
_LINE = "__line_number"
_SHARD_ID = "__shard_id"
# A folder image's caption files: `<stem>.txt` or `<stem>.caption` (text), `<stem>.json`.
_CAPTION_SIDECARS = ("txt", "caption", "json")
# A tar member's part of its sample, by extension: the caption files a folder reads, in the
# same order of preference.
_MEMBER_SLOTS = dict(zip(_CAPTION_SIDECARS, ("text", "caption", "metadata"), strict=True))
_CAPTION_TEXT_SLOTS = ("text", "caption")
# img2dataset writes these next to each <shard>.tar; they repeat what the tar holds.
_IMG2DATASET_COMPANIONS = (".parquet", "_stats.json")
_COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
_MANIFEST_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# A name that is not a safe shard id gets one derived from it: unsafe characters become '_'
# and a short hash of the original name is appended, so two names never share an id.
_UNSAFE_ID_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
_DERIVED_ID_HASH_BYTES = 4
_DERIVED_ID_HASH_CHARS = 2 * _DERIVED_ID_HASH_BYTES
# Manifest columns the source reads, and the JSON value types each accepts (anything else in a
# row is a bad value for that row, never a reason to refuse the file).
_TEXT_COLUMNS = ("path", "url", "caption")
_ID_COLUMNS = ("key", "id", "shard")
_MANIFEST_COLUMNS = _TEXT_COLUMNS + _ID_COLUMNS
_WINDOWS_DRIVE = re.compile(r"^([A-Za-z]):[\\/]")
_CAPTION_ISSUE = "__caption_issue"
_ROW_ISSUE = "__row_issue"


@dataclass(frozen=True)
class SourceSpec:
    """One image source: its layout, where it lives and how many images make a shard where the
    source does not say (manifest rows without a shard column, a folder's loose images)."""

    kind: SourceKind
    path: str
    shard_size: int = DEFAULT_SHARD_SIZE


@dataclass(frozen=True)
class RawRecord:
    """One item as the source holds it, before any validation.

    `uri` is a plain path, `"<tar path>#<member name>"` for a tar member, or the remote URL.
    When the bytes could not be read, `data` is None and `error` reads `"reason_code: detail"`.
    A caption problem that does not cost the image (a sidecar that is not JSON or not UTF-8, a
    caption that is not text) is `caption_issue`, in the same `"reason_code: detail"` form.
    """

    key: str
    uri: str
    caption: str | None
    data: bytes | None
    error: str | None = None
    caption_issue: str | None = None


@dataclass(frozen=True)
class SourceScan:
    """What a source holds: its shard ids, and a record for every entry no shard reads.

    Each `unread` record has no bytes and an `error` (`unsafe_shard_id`, `unsupported_file`,
    `missing_image`) naming the entry, so it can be reported like a quarantined item.
    """

    shards: list[str]
    unread: list[RawRecord]


class ShardReadError(Exception):
    """A whole shard cannot be read (for example the file is not a tar); `reason` is a code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SourceListings:
    """The folder listings of one corpus run, made once each and shared by its shards.

    A folder corpus's loose images (`root`, `root-IMG_0412`, ...) are cut from a listing of the
    whole top folder, so without sharing every shard lists that folder twice (its progress
    count, then its read) and works out every image's key and the cut again: ~180 listings
    for the ~90 shards of a 100,000-image folder, ~0.3 s each. Instead the `image_corpus` asset
    makes one `SourceListings` per Dagster step (one run's partitions, read one after another)
    and hands it to `scan_source`, `count_shard_records` and `iter_shard_records`;
    `build_corpus_shard` makes its own when given none, so a shard's count and read share one
    listing.

    Why this is never stale: an instance lives only as long as the step that made it and is
    passed down explicitly, never kept in a global or keyed by time, so each run lists the
    folder afresh. Within a run the listing is a snapshot on purpose: every shard of the run is
    cut from the same list, so a file added or removed while the run goes cannot move a cut
    between two of its shards (an image read by two shards, or by none); a listed file gone by
    the time it is read is quarantined as `missing_file`, and the next run sees the change.
    The top folder's listing (and its images' keys and cut) is kept for the whole run; of any
    other folder (a subfolder shard) only the latest, so memory stays one shard's listing. Not
    thread-safe: one step reads its shards one after another.
    """

    def __init__(self) -> None:
        self._top: dict[str, _FolderEntries] = {}
        self._latest: tuple[str, _FolderEntries] | None = None

    def top_folder(self, root: Path) -> _FolderEntries:
        """The listing of a source's top folder, made at the first call of the run."""
        found = self._top.get(str(root))
        if found is None:
            found = self._top[str(root)] = _folder_entries(root)
        return found

    def shard_folder(self, folder: Path) -> _FolderEntries:
        """The listing of a subfolder shard, shared by its count and its read."""
        if self._latest is None or self._latest[0] != str(folder):
            self._latest = (str(folder), _folder_entries(folder))
        return self._latest[1]


def scan_source(spec: SourceSpec, listings: SourceListings | None = None) -> SourceScan:
    """Sorted shard ids of a source, plus every entry of it that no shard reads.

    Only safe shard ids are listed, so no name in the source can become a path outside the data
    root; existing ids do not change as data is added. A tar or folder whose name is not safe
    gets an id derived from it (`derived_shard_id`). A source that is missing or of the wrong
    type raises `ConfigurationError`. `listings`: the run's shared folder listings (see
    `SourceListings`); None lists afresh.
    """
    root = Path(spec.path)
    if not root.exists():
        raise ConfigurationError(f"corpus source {spec.path} does not exist")
    if spec.kind == "webdataset" and _is_single_tar(root):
        return _scan_webdataset(root)
    if spec.kind in ("webdataset", "folder") and not root.is_dir():
        raise ConfigurationError(f"{spec.kind} corpus source {spec.path} is not a folder")
    if spec.kind == "manifest" and not root.is_file():
        raise ConfigurationError(f"manifest {spec.path} is not a file")
    if spec.kind == "webdataset":
        return _scan_webdataset(root)
    if spec.kind == "folder":
        return _scan_folder(root, spec.shard_size, listings or SourceListings())
    if spec.kind == "manifest":
        return _scan_manifest_shards(spec)
    raise ValueError(f"unknown source kind {spec.kind!r}")


def list_shards(spec: SourceSpec) -> list[str]:
    """Sorted ids of the shards a source holds (see `scan_source` for what is left out).

    A source with no shard at all is unusable as a corpus: `ConfigurationError`, saying what
    the source holds instead.
    """
    scan = scan_source(spec)
    if not scan.shards:
        raise ConfigurationError(_no_shards_message(spec, scan.unread))
    return scan.shards


def shard_file_fingerprints(spec: SourceSpec, shards: list[str]) -> dict[str, str]:
    """shard -> `<size>:<mtime_ns>:<ctime_ns>` of the file or folder that holds it, for the
    shards that have one of their own: a webdataset `.tar`, or an image folder (its entries
    added or removed; a picture rewritten inside it is not seen). Flat-folder and manifest
    shards have none. What the shard sensor compares between ticks to see a shard replaced or
    still being written in place."""
    root = Path(spec.path)
    if spec.kind == "webdataset" and _is_single_tar(root):
        paths = {stem: root for stem in [_tar_stem(root.name)] if stem in shards}
    elif spec.kind == "webdataset":
        paths = {shard: root / f"{shard}{TAR_SUFFIX}" for shard in shards}
    elif spec.kind == "folder":
        paths = {shard: root / shard for shard in shards}
    else:
        return {}
    fingerprints = {}
    for shard, path in paths.items():
        try:
            status = path.stat()
        except OSError:  # gone since the listing, or named otherwise (case): nothing to compare
            continue
        fingerprints[shard] = f"{status.st_size}:{status.st_mtime_ns}:{status.st_ctime_ns}"
    return fingerprints


def _similar_name_hint(path: Path) -> str:
    """` (did you mean <sibling>?)` when the missing path's folder holds a close name (a typo
    in the last part of `--corpus`), else ""."""
    try:
        siblings = [entry.name for entry in path.parent.iterdir()]
    except OSError:  # the folder is missing too, or unreadable: nothing to suggest
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1)
    return f" (did you mean {path.parent / close[0]}?)" if close else ""


def detect_source_kind(path: Path) -> SourceKind:
    """Which layout reads `path`: a manifest file, a `.tar` shard or a folder of them
    (webdataset), or image folders.

    Raises `ConfigurationError` saying what is wrong: the path does not exist, or is a file
    that is neither a `.parquet`/`.jsonl` manifest nor a `.tar` shard. Extensions are compared
    case-insensitively.
    """
    if not path.exists() and not path.is_symlink():
        # A quoted `--corpus "~/photos"` reaches us unexpanded; the shell only expands bare `~`.
        home_hint = (
            f" (a leading ~ is not expanded here: write {Path(path).expanduser()} instead)"
            if str(path).startswith("~")
            else _similar_name_hint(path)
        )
        raise ConfigurationError(
            f"corpus {path} does not exist{home_hint}; give a folder of webdataset .tar shards, "
            "a folder of images or of image folders (one per shard) or a .parquet/.jsonl/.ndjson "
            "manifest"
        )
    if not path.exists():
        raise ConfigurationError(f"corpus {path} is a broken symbolic link")
    if path.is_file():
        if path.suffix.lower() in _MANIFEST_SUFFIXES:
            return "manifest"
        if _tar_stem(path.name) is not None:
            return "webdataset"
        raise ConfigurationError(
            f"corpus {path} is a file but neither a manifest nor a .tar shard: a manifest ends "
            "in .parquet, .jsonl or .ndjson; otherwise give a .tar shard or the folder that "
            "holds the .tar shards or image folders"
        )
    if not path.is_dir():
        raise ConfigurationError(f"corpus {path} is {_entry_kind(path)}, not a folder or manifest")
    if any(_tar_stem(entry.name) is not None and entry.is_file() for entry in path.iterdir()):
        return "webdataset"
    return "folder"


def derived_shard_id(name: str) -> str | None:
    """The shard id of a tar or folder called `name`: the name itself when it is safe, else a
    safe id made from it, or None when nothing safe can stand for it.

    A derived id keeps the name's letters (accents dropped, other characters as `_`) and ends
    with a hash of the exact name, so it is stable across runs and two names never share one:
    `my shard` -> `my_shard-<8 hex>`. Hidden names (`.x`, `.`, `..`), names holding a path
    separator or a NUL, and names that are not valid Unicode (undecodable bytes) get None.
    """
    if is_safe_partition_key(name):
        return name
    if not name or name.startswith(".") or "/" in name or "\x00" in name:
        return None
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in a file name; no table could hold it
        return None
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    stem = _UNSAFE_ID_CHARACTERS.sub("_", ascii_name)
    stem = re.sub(r"^[^A-Za-z0-9]+", "", stem)
    stem = (stem or "shard")[: MAX_PARTITION_KEY_CHARS - _DERIVED_ID_HASH_CHARS - 1]
    digest = hashlib.blake2b(encoded, digest_size=_DERIVED_ID_HASH_BYTES).hexdigest()
    return f"{stem}-{digest}"


def shard_uri(spec: SourceSpec, shard_id: str) -> str:
    """Where a whole shard lives: the tar, the subfolder, or the manifest file."""
    if spec.kind == "webdataset":
        return str(_webdataset_tar(Path(spec.path), shard_id) or spec.path)
    if spec.kind == "folder":
        name = _shard_entry_name(Path(spec.path), shard_id, "folder")
        if name is not None or not _has_loose_form(shard_id):
            return str(Path(spec.path) / (name or shard_id))
    return spec.path


def iter_shard_records(
    spec: SourceSpec, shard_id: str, listings: SourceListings | None = None
) -> Iterator[RawRecord]:
    """Yield every item of one shard in source order.

    `ShardReadError` is raised while iterating (at the first item) when the shard cannot be
    read at all: missing, or not a tar. A `shard_id` that `scan_source` could never list (not
    safe as a file name) raises ValueError at once. `listings`: the run's shared folder
    listings (see `SourceListings`); None lists afresh.
    """
    check_partition_key(shard_id, f"shard of {spec.kind} source {spec.path}")
    root = Path(spec.path)
    listings = listings or SourceListings()
    if spec.kind == "webdataset":
        tar_path = _webdataset_tar(root, shard_id)
        if tar_path is None:
            return _missing_shard(f"{root} is a single .tar shard, and not shard {shard_id!r}")
        return _iter_tar_records(tar_path)
    if spec.kind == "folder":
        if _has_loose_form(shard_id):
            return _iter_loose_records(root, shard_id, spec.shard_size, listings)
        name = _shard_entry_name(root, shard_id, "folder")
        return _iter_folder_records(root / (name or shard_id), listings)
    if spec.kind == "manifest":
        return _iter_manifest_records(spec, shard_id)
    raise ValueError(f"unknown source kind {spec.kind!r}")


def count_shard_records(
    spec: SourceSpec, shard_id: str, listings: SourceListings | None = None
) -> int | None:
    """How many records `iter_shard_records(spec, shard_id)` will yield, when that is cheap to
    know before reading; None when it is not (the shard is unreadable, or not a local file).

    It is the progress total of the corpus step, so it costs a small fraction of reading the
    shard: a tar's member headers only (a seekable tar skips each member's data), a folder's
    listing (pass the same `listings` to the read, and it is listed once), or the manifest's
    shard column. A shard that breaks mid-way yields one more record than its headers promise
    (`truncated_shard`); progress tolerates that. Never raises.
    """
    listings = listings or SourceListings()
    try:
        check_partition_key(shard_id, f"shard of {spec.kind} source {spec.path}")
        root = Path(spec.path)
        if spec.kind == "webdataset":
            tar_path = _webdataset_tar(root, shard_id)
            return None if tar_path is None else _count_tar_records(tar_path)
        if spec.kind == "folder":
            loose = _loose_images_of(root, shard_id, spec.shard_size, listings)
            if loose is not None:
                return loose.stop - loose.start
            name = _shard_entry_name(root, shard_id, "folder")
            found = listings.shard_folder(root / (name or shard_id))
            return len(found.image_names) + len(found.unread) + len(found.subfolders)
        if spec.kind == "manifest":
            return _manifest_shard_rows(spec, shard_id)[0].height
    except Exception:  # a progress total must never fail the step; reading reports the problem
        return None
    return None


def is_image_name(name: str) -> bool:
    """Whether a file name carries one of the image extensions the corpus reads."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def _unread(uri: str, reason: str, detail: str, key: str = "") -> RawRecord:
    return RawRecord(
        key=_printable(key),
        uri=_printable(uri),
        caption=None,
        data=None,
        error=f"{reason}: {_printable(detail)}",
    )


def _printable(text: str) -> str:
    """`text` as valid Unicode: a file name's undecodable bytes (surrogates) as `\\udcXX`."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_valid_unicode(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class _ShardCandidate:
    """A tar or subfolder that may become a shard, before ids are handed out."""

    name: str  # the entry's file name
    base: str  # what its id is made from: the tar's stem or the folder's name
    uri: str
    where: str  # how a report names it: "tar file 'x.tar'", "folder 'x'"
    canonical: bool  # its id reads straight back to it (safe name, lower-case .tar)


def _assign_shard_ids(candidates: list[_ShardCandidate]) -> tuple[list[str], list[RawRecord]]:
    """(shard ids, reports): each candidate gets `derived_shard_id(base)` unless taken.

    Canonical entries claim their ids first, then the others in name order; `_shard_entry_name`
    follows the same order, so an id always reads back the entry it was given to.
    """
    taken: dict[str, str] = {}
    refused: list[RawRecord] = []
    for candidate in sorted(candidates, key=lambda c: (not c.canonical, c.name)):
        shard_id = derived_shard_id(candidate.base)
        if shard_id is None:
            refused.append(_unsafe_shard_id(candidate.uri, candidate.base, candidate.where))
        elif shard_id in taken:
            refused.append(
                _unread(
                    candidate.uri,
                    "unsafe_shard_id",
                    f"{candidate.where} would be shard {shard_id!r}, which {taken[shard_id]!r} "
                    "already is; rename one of them to have both read",
                )
            )
        else:
            taken[shard_id] = candidate.name
    return sorted(taken), refused


def _shard_entry_name(root: Path, shard_id: str, kind: str) -> str | None:
    """The tar or subfolder of `root` that `scan_source` gave `shard_id`, None if none."""
    literal = f"{shard_id}{TAR_SUFFIX}" if kind == "webdataset" else shard_id
    literal_path = root / literal
    if literal_path.is_file() if kind == "webdataset" else literal_path.is_dir():
        return literal
    if not root.is_dir():
        return None
    for entry in sorted(root.iterdir(), key=lambda entry: entry.name):
        base = _tar_stem(entry.name) if kind == "webdataset" else entry.name
        is_shard = entry.is_file() if kind == "webdataset" else entry.is_dir()
        if base is not None and is_shard and derived_shard_id(base) == shard_id:
            return entry.name
    return None


def _is_single_tar(root: Path) -> bool:
    """Whether a webdataset source is one `.tar` file rather than a folder of them; a source
    that is gone still counts by its name, so its shard reads as `missing_shard`."""
    return _tar_stem(root.name) is not None and not root.is_dir()


def _webdataset_tar(root: Path, shard_id: str) -> Path | None:
    """The tar a webdataset source gave `shard_id`: the source itself when it is that one tar,
    None when it is another single tar, else the folder's tar of that id (a path that may not
    be there: reading it is then `missing_shard`)."""
    if _is_single_tar(root):
        return root if derived_shard_id(_tar_stem(root.name) or "") == shard_id else None
    name = _shard_entry_name(root, shard_id, "webdataset")
    return root / (name or f"{shard_id}{TAR_SUFFIX}")


def _missing_shard(detail: str) -> Iterator[RawRecord]:
    """Raises `missing_shard` at the first item, as reading a tar that is gone does."""
    raise ShardReadError("missing_shard", detail)
    yield  # a generator: the error comes while iterating, as `iter_shard_records` says


def _tar_stem(name: str) -> str | None:
    """The stem of a `.tar` shard's file name (any letter case), None for any other name."""
    if len(name) > len(TAR_SUFFIX) and name.lower().endswith(TAR_SUFFIX):
        return name[: -len(TAR_SUFFIX)]
    return None


def _no_shards_message(spec: SourceSpec, unread: list[RawRecord]) -> str:
    if spec.kind == "manifest" and not unread:
        return f"manifest {spec.path} has no rows"
    if not unread:
        what = ".tar shards" if spec.kind == "webdataset" else "images or image folders"
        return f"{spec.kind} corpus source {spec.path} is empty: it holds no {what}"
    reasons: dict[str, int] = {}
    for record in unread:
        reason = (record.error or "").partition(":")[0]
        reasons[reason] = reasons.get(reason, 0) + 1
    counts = ", ".join(f"{reason} x{count}" for reason, count in sorted(reasons.items()))
    first = (unread[0].error or "").partition(":")[2].strip()
    return (
        f"{spec.kind} corpus source {spec.path} has no shard to read: {len(unread)} entries "
        f"are not read ({counts}); first: {first}"
    )


def _unsafe_shard_id(uri: str, shard_id: str, where: str, key: str = "") -> RawRecord:
    return _unread(
        uri,
        "unsafe_shard_id",
        f"{where} names shard {shard_id!r}, which is not safe as a file name "
        f"({SAFE_PARTITION_KEY_RULE}); rename it to have it read",
        key,
    )


def _entry_kind(entry: Path) -> str:
    if entry.is_symlink() and not entry.exists():
        return "a broken symbolic link"
    if entry.is_dir():
        return "a folder"
    if entry.is_file():
        return "a file"
    return "not a regular file (FIFO, socket or device)"


# --- webdataset ---------------------------------------------------------------------------


@dataclass
class _KeyGroup:
    """The members of one sample key inside a tar (image, .txt / .caption caption, .json
    metadata)."""

    key: str
    tar_uri: str
    image: bytes | None = None
    text: bytes | None = None
    caption: bytes | None = None  # a `.caption` member: the caption when there is no `.txt`
    metadata: bytes | None = None
    member_names: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # slot -> member name
    # Further images of the sample in other formats (`k.png` after `k.jpg`): (name, bytes).
    extras: list[tuple[str, bytes]] = field(default_factory=list)

    def put(self, slot: str, member_name: str, data: bytes) -> None:
        setattr(self, slot, data)
        self.member_names.append(member_name)
        self.names[slot] = member_name

    def records(self) -> Iterator[RawRecord]:
        """The sample's record, then one per extra image with the same key and caption: the
        table builder keeps the first that decodes and quarantines the rest (duplicate_key).

        The caption comes from `.txt`, else `.caption`, else the `.json` (a folder's order); a
        `.caption` beside a `.txt` is reported after them as not read, never silently dropped.
        """
        text_slot = "text" if self.text is not None else "caption"
        caption, caption_issue = _caption_from_sidecars(
            self.text if self.text is not None else self.caption,
            self.metadata,
            self.names.get(text_slot, ""),
            self.names.get("metadata", ""),
        )
        if self.image is None:
            yield RawRecord(
                key=self.key,
                uri=tar_member_uri(self.tar_uri, self.member_names[0]),
                caption=caption,
                data=None,
                error=f"missing_image: key {self.key} has only {', '.join(self.member_names)}",
                caption_issue=caption_issue,
            )
        else:
            images = [(self.names["image"], self.image), *self.extras]
            for member_name, data in images:
                yield RawRecord(
                    key=self.key,
                    uri=tar_member_uri(self.tar_uri, member_name),
                    caption=caption,
                    data=data,
                    caption_issue=caption_issue,
                )
        if self.text is not None and self.caption is not None:
            unused, used = self.names["caption"], self.names["text"]
            yield _unread(
                tar_member_uri(self.tar_uri, unused),
                "unsupported_member",
                f"{unused} is not read: {used} already gives the caption of {self.key}",
                key=self.key,
            )


class _SampleGrouping:
    """Which sample each member of a tar joins, member by member (webdataset's grouping).

    Consecutive members with one key form a sample holding at most one member per slot
    (image, text, metadata). A member whose slot the sample already holds starts a new sample
    with the same key (a repeated key, which the table builder quarantines), except an image
    under another field name (webdataset's name for what follows the key: `k.png` after
    `k.jpg`, `k.target.jpg` after `k.input.jpg`): that is an extra image of the same sample,
    so the sample's caption still reaches its first image. Reading and counting both use this.
    """

    def __init__(self) -> None:
        self.key: str | None = None
        self._fields: dict[str, str] = {}  # slot -> field name of the member holding it

    def holds_both_captions(self) -> bool:
        """Whether the current sample has a `.txt` and a `.caption` (one is reported unread)."""
        return "text" in self._fields and "caption" in self._fields

    def place(self, key: str, slot: str, member_name: str) -> Literal["join", "extra", "new"]:
        base, key_base = member_name.rpartition("/")[2], key.rpartition("/")[2]
        field_name = base[len(key_base) + 1 :].lower()
        if key == self.key and slot in self._fields:
            if slot == "image" and self._fields[slot] != field_name:
                return "extra"
        elif key == self.key:
            self._fields[slot] = field_name
            return "join"
        self.key, self._fields = key, {slot: field_name}
        return "new"


def _scan_webdataset(root: Path) -> SourceScan:
    # A single tar is read as a folder holding just it (no sibling of it is part of the corpus).
    entries = [root] if _is_single_tar(root) else sorted(root.iterdir(), key=lambda e: e.name)
    tar_stems = {
        stem for entry in entries if (stem := _tar_stem(entry.name)) is not None and entry.is_file()
    }
    candidates: list[_ShardCandidate] = []
    unread: list[RawRecord] = []
    root_uri = root.resolve()
    for entry in entries:
        uri = str(root_uri if entry == root else root_uri / entry.name)
        stem = _tar_stem(entry.name)
        if stem is not None and entry.is_file():
            canonical = entry.name == f"{stem}{TAR_SUFFIX}" and is_safe_partition_key(stem)
            where = f"tar file {entry.name!r}"
            candidates.append(_ShardCandidate(entry.name, stem, uri, where, canonical))
        elif _is_img2dataset_companion(entry, tar_stems):
            continue
        else:
            unread.append(_unsupported_webdataset_entry(entry, uri))
    shards, refused = _assign_shard_ids(candidates)
    return SourceScan(shards=shards, unread=sorted(unread + refused, key=lambda r: r.uri))


def _is_img2dataset_companion(entry: Path, tar_stems: set[str]) -> bool:
    return entry.is_file() and any(
        entry.name.endswith(suffix) and entry.name[: -len(suffix)] in tar_stems
        for suffix in _IMG2DATASET_COMPANIONS
    )


def _unsupported_webdataset_entry(entry: Path, uri: str) -> RawRecord:
    name = entry.name.lower()
    if entry.is_file() and name.endswith(_COMPRESSED_TAR_SUFFIXES):
        detail = "is a compressed tar; only plain .tar shards are read (decompress it first)"
    elif entry.is_file() and _is_readable_image(entry.name):
        detail = (
            "is an image beside .tar shards: a folder that holds .tar files is read as a "
            "webdataset corpus, which reads only the tars (keep loose images in a folder of "
            "their own, or pack them into a .tar shard)"
        )
    elif entry.is_dir() and _holds_an_image(entry):
        detail = (
            "is a folder of images beside .tar shards: a folder that holds .tar files is read "
            "as a webdataset corpus, which reads only the tars (give image folders a corpus "
            "folder of their own)"
        )
    elif entry.is_file() and Path(entry.name).suffix.lower() in _MANIFEST_SUFFIXES:
        detail = (
            f"is a {Path(entry.name).suffix} file, not a .tar shard (a manifest is read only "
            "when it is itself given as the corpus)"
        )
    elif entry.is_file():
        detail = "is not a .tar shard"
    else:
        detail = f"is {_entry_kind(entry)}, not a .tar shard"
    return _unread(uri, "unsupported_file", f"{entry.name} {detail}; it is not read")


def _iter_tar_records(tar_path: Path) -> Iterator[RawRecord]:
    tar_uri = str(tar_path.resolve())
    key_of = _tar_key_rule(tar_path)
    with _open_tar_stream(tar_path) as tar:
        grouping = _SampleGrouping()
        group: _KeyGroup | None = None
        member_being_read: str | None = None
        failure: Exception | None = None
        try:
            for member in tar:
                # A streamed TarFile keeps every header it has read (tar.members); nothing here
                # looks back, so dropping them keeps a long tar's memory flat (webdataset's own
                # tar reader does the same).
                tar.members = []
                if member.isdir():
                    continue
                slot = _member_slot(member)
                if slot is None:
                    yield _unsupported_member(tar_uri, member, key_of)
                    continue
                key = key_of(member.name)
                placement = grouping.place(key, slot, member.name)
                if placement == "new" or group is None:
                    if group is not None:
                        yield from group.records()
                    group = _KeyGroup(key=key, tar_uri=tar_uri)
                member_being_read = member.name
                data = _read_member(tar, member)
                member_being_read = None
                if placement == "extra":
                    group.extras.append((member.name, data))
                else:
                    group.put(slot, member.name, data)
        except (tarfile.TarError, OSError, EOFError) as exc:
            failure = exc
        # tarfile ends quietly when a file stops at a header; only the missing end-of-archive
        # marker tells an interrupted download from a complete shard.
        if failure is None and not _has_end_marker(tar_path, tar.offset):
            failure = tarfile.ReadError("no end-of-archive marker")
    if failure is None:
        if group is not None:
            yield from group.records()
        return
    # The sample whose member broke is incomplete; one whose members all arrived is kept.
    if member_being_read is None and group is not None and group.image is not None:
        yield from group.records()
    yield _truncated_record(tar_path, tar_uri, member_being_read, failure, key_of)


def _count_tar_records(tar_path: Path) -> int | None:
    """The records `_iter_tar_records` makes of a tar, from its member headers alone."""
    if not tar_path.is_file():
        return None
    members = _tar_member_kinds(tar_path)
    return _group_members(members, _choose_key_rule(members))[0]


def _group_members(
    members: tuple[tuple[str, str], ...], key_of: Callable[[str], str]
) -> tuple[int, int]:
    """(records, lost samples) that reading a tar of these (name, kind) members would give.

    Lost samples are the ones the table builder would refuse for their key alone: a key that
    appears again, an extra image of a sample, a caption without an image.
    """
    grouping = _SampleGrouping()
    records = lost = 0
    keys_seen: set[str] = set()
    has_image = True
    for name, kind in members:
        slot = _slot_of(name) if kind == "file" else None
        if kind == "dir":
            continue
        if slot is None:
            records += 1
            continue
        key = key_of(name)
        placement = grouping.place(key, slot, name)
        if placement == "join":
            has_image = has_image or slot == "image"
            # The second of a `.txt` and a `.caption` makes the sample report one unread.
            if slot in _CAPTION_TEXT_SLOTS and grouping.holds_both_captions():
                records += 1
            continue
        records += 1
        if placement == "extra":
            lost += 1
            continue
        lost += (not has_image) + (key in keys_seen)
        keys_seen.add(key)
        has_image = slot == "image"
    return records, lost + (not has_image)


def _tar_key_rule(tar_path: Path) -> Callable[[str], str]:
    """The sample-key rule of one tar (`_choose_key_rule`), from its headers; webdataset's
    rule when the headers cannot be read (reading the shard then reports what is wrong)."""
    try:
        return _choose_key_rule(_tar_member_kinds(tar_path))
    except (OSError, tarfile.TarError, EOFError, ValueError):
        return _member_key


def _choose_key_rule(members: tuple[tuple[str, str], ...]) -> Callable[[str], str]:
    """webdataset's key rule (`_member_key`: up to the first dot of the base name), unless the
    tar's names only pair up when cut at their last dot.

    `a.b.c.jpg` + `a.b.c.txt` next to `a.b.d.jpg` + `a.b.d.txt` are, by webdataset's rule, all
    sample `a`, and every sample after the first would be lost as a repeated key. When cutting
    at the last dot loses fewer samples, the whole tar is keyed that way (`a.b.c`, `a.b.d`).
    The choice depends only on the tar's member names, so it is the same on every run; for
    names with at most one dot (img2dataset's) both rules agree.
    """
    if not any(name.rpartition("/")[2].count(".") > 1 for name, _ in members):
        return _member_key
    _, lost_first_dot = _group_members(members, _member_key)
    _, lost_last_dot = _group_members(members, _member_key_at_last_dot)
    return _member_key_at_last_dot if lost_last_dot < lost_first_dot else _member_key


def _file_version(path: Path) -> tuple[int, ...]:
    """What the per-file caches below are keyed by: inode, size, mtime and ctime in ns.

    ctime as well as mtime: tools that copy a file's mtime (`cp -p`, `rsync -a`) can give a
    rewritten file its old mtime and size, never its old ctime (nothing sets it but a write),
    so a long-lived process (the code server running sensors) never reads a stale version.
    """
    stat = path.stat()
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _tar_member_kinds(tar_path: Path) -> tuple[tuple[str, str], ...]:
    """(member name, "file" | "dir" | "other") of each member of a tar, from its headers.

    Cached per file version: counting a shard and choosing its key rule read them once.
    """
    return _read_tar_member_kinds(str(tar_path), _file_version(tar_path))


# Header fields of a ustar block (POSIX.1-1988), as byte offsets.
_NAME, _SIZE, _TYPE, _PREFIX = (0, 100), (124, 136), 156, (345, 500)
# tarfile's own classes: regular files carry data, the others (links, devices, FIFOs) none.
_FILE_TYPES = frozenset(b"07\x00")
_DATALESS_TYPES = {ord("5"): "dir", **{ord(flag): "other" for flag in "12346"}}


@lru_cache(maxsize=4)
def _read_tar_member_kinds(tar_path: str, _version: tuple[int, ...]) -> tuple[tuple[str, str], ...]:
    """(member name, "file" | "dir" | "other") of each member, reading only the headers.

    Plain ustar headers (what img2dataset and Python's tarfile write for ordinary names) are
    parsed directly with one 512-byte read each, which is ~10x cheaper than `tarfile`'s
    `TarInfo` per member; the first header this does not cover (pax or GNU long names, sparse
    files, a base-256 size) hands the whole walk to `tarfile`, which seeks over the data too.
    """
    kinds: list[tuple[str, str]] = []
    with open(tar_path, "rb", buffering=0) as raw:
        descriptor, offset = raw.fileno(), 0
        while True:
            header = os.pread(descriptor, tarfile.BLOCKSIZE, offset)
            if len(header) < tarfile.BLOCKSIZE or not any(header):
                return tuple(kinds)
            flag, size_field = header[_TYPE], header[_SIZE[0] : _SIZE[1]]
            if (flag not in _FILE_TYPES and flag not in _DATALESS_TYPES) or size_field[0] & 0x80:
                break
            # As tarfile reads a header: a non-empty ustar prefix is the name's folder.
            name = header[_NAME[0] : _NAME[1]].split(b"\x00", 1)[0]
            prefix = header[_PREFIX[0] : _PREFIX[1]].split(b"\x00", 1)[0]
            name = prefix + b"/" + name if prefix else name
            text = name.decode("utf-8", "surrogateescape")
            size = int(size_field.split(b"\x00", 1)[0].strip() or b"0", 8)
            if flag in _FILE_TYPES:
                # An old (V7) tar writes a folder as a type-NUL file whose name ends in '/'.
                kind = "dir" if flag == 0 and text.endswith("/") else "file"
                offset += tarfile.BLOCKSIZE * (1 + -(-size // tarfile.BLOCKSIZE))
            else:
                kind = _DATALESS_TYPES[flag]
                offset += tarfile.BLOCKSIZE
            kinds.append((text.rstrip("/") if kind == "dir" else text, kind))
    # Random-access mode on a regular file seeks over each member's data: headers only.
    with tarfile.open(tar_path, mode="r:") as tar:
        return tuple(
            (member.name, "dir" if member.isdir() else "file" if member.isfile() else "other")
            for member in tar
        )


def _has_end_marker(tar_path: Path, end_offset: int) -> bool:
    with tar_path.open("rb") as raw:
        raw.seek(end_offset)
        block = raw.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def _open_tar_stream(tar_path: Path) -> tarfile.TarFile:
    if not tar_path.is_file():
        raise ShardReadError("missing_shard", f"{tar_path} does not exist")
    try:
        # Stream mode reads the archive once, front to back, and never touches the disk. Plain
        # tar only (as img2dataset writes), so member offsets are file offsets.
        return tarfile.open(tar_path, mode="r|")
    except (tarfile.TarError, OSError) as exc:
        raise ShardReadError("not_a_tar", f"{tar_path}: {exc}") from exc


def _truncated_record(
    tar_path: Path,
    tar_uri: str,
    member_being_read: str | None,
    exc: Exception,
    key_of: Callable[[str], str],
) -> RawRecord:
    return RawRecord(
        key=key_of(member_being_read) if member_being_read else "",
        uri=tar_uri,
        caption=None,
        data=None,
        error=f"truncated_shard: {tar_path.name} breaks off"
        f"{f' in {member_being_read}' if member_being_read else ''} ({exc}); "
        "later members are lost",
    )


def _unsupported_member(
    tar_uri: str, member: tarfile.TarInfo, key_of: Callable[[str], str]
) -> RawRecord:
    if member.issym():
        what = f"a symbolic link to {member.linkname!r}"
    elif member.islnk():
        what = f"a hard link to {member.linkname!r}"
    elif member.isfifo():
        what = "a FIFO"
    elif member.ischr() or member.isblk():
        what = "a device"
    elif member.isfile():
        what = "a file of a kind the corpus does not read (image, .txt, .caption or .json)"
    else:
        what = f"a tar entry of type {member.type!r}"
    return _unread(
        tar_member_uri(tar_uri, member.name),
        "unsupported_member",
        f"{member.name} is {what}; only regular image and caption files are read",
        key=key_of(member.name),
    )


def _member_slot(member: tarfile.TarInfo) -> str | None:
    return _slot_of(member.name) if member.isfile() else None


def _slot_of(file_name: str) -> str | None:
    """Which part of a sample a regular member named so is: image, text (`.txt`), caption
    (`.caption`) or metadata (`.json`); extensions in any letter case, as in a folder."""
    if is_image_name(file_name):
        return "image"
    extension = file_name.rsplit(".", 1)[-1].lower()
    return _MEMBER_SLOTS.get(extension)


def _member_key(member_name: str) -> str:
    """webdataset's sample key: the member path up to the first dot of its base name.

    Folders are part of the key (`a/x.jpg` and `b/x.jpg` are two samples, as in webdataset's
    own `base_plus_ext`); a leading `./` or `/` is not, so `./000012.jpg` stays `000012`.
    """
    return _cut_member_name(member_name, at_last_dot=False)


def _member_key_at_last_dot(member_name: str) -> str:
    """The key of a member of a tar whose names carry dots (`_choose_key_rule`): its path up to
    the last dot of its base name (`photos/a.b.c.jpg` -> `photos/a.b.c`)."""
    return _cut_member_name(member_name, at_last_dot=True)


def _cut_member_name(member_name: str, at_last_dot: bool) -> str:
    """A member's path without a leading `./` or `/`, cut at the first or last dot of its base
    name; folders stay part of the key."""
    path = member_name
    while path.startswith(("./", "/")):
        path = path[2:] if path.startswith("./") else path[1:]
    folder, _, base = path.rpartition("/")
    stem = base.rsplit(".", 1)[0] if at_last_dot else base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder and stem else stem


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    extracted = tar.extractfile(member)
    return extracted.read() if extracted is not None else b""


def _caption_from_sidecars(
    text: bytes | None, metadata: bytes | None, text_name: str, metadata_name: str
) -> tuple[str | None, str | None]:
    """(caption, caption issue) from a `.txt` caption, else the `.json`'s `caption` field.

    A leading UTF-8 byte-order mark is dropped. A `.json` that is not JSON, or a caption that
    is not text, gives no caption and a `bad_caption_file` / `bad_caption_value` issue; the
    image is still read, since the picture is fine and image-only stages can use it.
    """
    if text is not None:
        return _decode_caption_text(text, text_name)
    if metadata is None:
        return None, None
    try:
        value = json.loads(metadata.removeprefix(_UTF8_BOM).decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"bad_caption_file: {metadata_name} is not UTF-8 JSON ({exc.reason})"
    except json.JSONDecodeError as exc:
        return None, f"bad_caption_file: {metadata_name} is not valid JSON ({_json_error(exc)})"
    if not isinstance(value, dict):
        return None, (
            f"bad_caption_file: {metadata_name} holds a JSON {_json_type(value)}, not an object"
        )
    caption = value.get("caption")
    if caption is None or isinstance(caption, str):
        return caption, None
    return None, f"bad_caption_value: 'caption' in {metadata_name} is {_describe_value(caption)}"


def _decode_caption_text(text: bytes, name: str) -> tuple[str | None, str | None]:
    """A `.txt` caption as text. Not UTF-8: decoded as Windows-1252 and flagged.

    Captions written by older Windows tools and scrapers are mostly Windows-1252 / Latin-1;
    decoding them that way keeps the words ('café' instead of 'caf\ufffd'), which is what the
    text encoder and the describe step need, while the `caption_not_utf8` issue keeps the guess
    visible. Quarantining the image for it would lose a usable picture over its sidecar, and a
    silent replacement character would hide the problem (the old behaviour).
    """
    text = text.removeprefix(_UTF8_BOM)
    try:
        return text.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        where = f"byte 0x{text[exc.start]:02x} at offset {exc.start}"
    try:
        decoded, encoding = text.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:  # five bytes cp1252 leaves undefined; Latin-1 maps every byte
        decoded, encoding = text.decode("latin-1"), "Latin-1"
    return decoded, f"caption_not_utf8: {name} is not UTF-8 ({where}); decoded as {encoding}"


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"{exc.msg} at line {exc.lineno} column {exc.colno}"


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _describe_value(value: object, max_chars: int = 60) -> str:
    """'a list ([1, 2])': the JSON type of a value that should have been text, and its start."""
    shown = json.dumps(value, ensure_ascii=False, default=str)
    if len(shown) > max_chars:
        shown = shown[: max_chars - 3] + "..."
    return f"a {_json_type(value)} ({shown}), not text"


# --- folder -------------------------------------------------------------------------------


@dataclass
class _FolderEntries:
    """One folder's entries sorted by name: images, their caption sidecars, subfolders, and
    what none of them reads. Names stay text until a caller needs paths (listing is the
    progress total of a shard, so it stays cheap)."""

    folder: Path
    image_names: list[str] = field(default_factory=list)
    # image stem -> {"text" | "metadata": sidecar file name}
    sidecars: dict[str, dict[str, str]] = field(default_factory=dict)
    subfolders: list[Path] = field(default_factory=list)
    unread: list[RawRecord] = field(default_factory=list)
    _keys: list[str] | None = field(default=None, init=False, repr=False)
    _cuts: dict[int, dict[str, LooseCut]] = field(default_factory=dict, init=False, repr=False)

    def image_keys(self) -> list[str]:
        """The key of each of `image_names` (`_folder_keys`), worked out once per listing: the
        shards of a big flat folder each take their slice of it."""
        if self._keys is None:
            self._keys = [key for _, key in _folder_keys(self.image_names)]
        return self._keys

    def loose_cuts(self, shard_size: int) -> dict[str, LooseCut]:
        """Shard id -> cut of `image_names` as loose images (`cut_loose_images`), in name
        order, worked out once per listing and shard size (it hashes every name)."""
        if shard_size not in self._cuts:
            cuts = _cut_loose_images(self.image_names, self.image_keys(), shard_size)
            self._cuts[shard_size] = {cut.shard_id: cut for cut in cuts}
        return self._cuts[shard_size]


def _folder_entries(folder: Path) -> _FolderEntries:
    # scandir's entries know their type from the listing itself (no stat per file on local
    # file systems), which keeps listing a 5,000-image shard to a few milliseconds.
    with os.scandir(folder) as listing:
        is_file = {entry.name: entry.is_file() for entry in listing}
    names = sorted(is_file)
    found = _FolderEntries(folder)
    found.image_names = [name for name in names if is_file[name] and _is_readable_image(name)]
    stems = {_stem(name) for name in found.image_names}
    folder_uri = folder.resolve()
    claimed = set(found.image_names)
    unread: list[tuple[str, str, str]] = []  # (name, reason, detail)
    caption_names = [name for name in names if is_file[name] and _is_caption_name(name)]
    # `.txt` before `.caption` before `.json`, so the preferred sidecar claims its image first.
    caption_names.sort(key=lambda name: (_CAPTION_SIDECARS.index(_extension(name)), name))
    for name in caption_names:
        if name in claimed:
            continue
        stem, slot = _stem(name), _sidecar_slot(name)
        if stem not in stems:
            continue
        held = found.sidecars.setdefault(stem, {})
        if slot in held:
            # `a.txt` beside `a.caption` or `a.TXT`: one caption per image, never a silent pick.
            detail = f"{name} is not read: {held[slot]} already gives the caption of {stem}"
            unread.append((name, "unsupported_file", detail))
        else:
            held[slot] = name
        claimed.add(name)
    for name in names:
        if name in claimed:
            continue
        entry = folder / name
        if is_file[name] and _is_caption_name(name):
            unread.append((name, "missing_image", f"{name} is a caption file without an image"))
        elif is_file[name]:
            unread.append((name, "unsupported_file", f"{name} {_unread_file_detail(name)}"))
        elif entry.is_dir():
            found.subfolders.append(entry)
        else:
            unread.append((name, "unsupported_file", f"{name} is {_entry_kind(entry)}; not read"))
    found.unread = [
        _unread(str(folder_uri / name), reason, detail) for name, reason, detail in sorted(unread)
    ]
    return found


def _is_readable_image(name: str) -> bool:
    return not name.startswith(".") and is_image_name(name) and _is_valid_unicode(name)


def _stem(name: str) -> str:
    """A file name without its last extension (`a.b.jpg` -> `a.b`), as `Path.stem` has it."""
    return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


def _sidecar_slot(name: str) -> str:
    """`text` for a `.txt` / `.caption` caption file, `metadata` for `.json` (any case)."""
    return "metadata" if _extension(name) == "json" else "text"


def _holds_an_image(folder: Path) -> bool:
    """Whether `folder` holds a file `_folder_entries` would read as an image.

    Listing a corpus lists its shards this way, stopping at the first image: every KNN step
    lists the corpus, and sorting and checking all of a shard's files (what reading it does)
    made each listing cost a stat of every file of every shard (~0.9 s at 9,000 images).
    """
    with os.scandir(folder) as entries:
        return any(_is_readable_image(entry.name) and entry.is_file() for entry in entries)


def _first_nested_image(folder: Path) -> str | None:
    """The path (relative to `folder`) of an image somewhere below `folder`'s own level, found
    by a walk that stops at the first one; None when there is none."""
    for current, subfolders, files in os.walk(folder):
        subfolders.sort()
        if Path(current) == folder:
            continue
        image = next((name for name in sorted(files) if _is_readable_image(name)), None)
        if image is not None:
            return str((Path(current) / image).relative_to(folder))
    return None


def _count_images_below(folder: Path) -> int:
    """How many images `folder` and its subfolders hold (to say what a nested folder costs)."""
    return sum(1 for _, _, files in os.walk(folder) for name in files if _is_readable_image(name))


def _unread_file_detail(name: str) -> str:
    if not _is_valid_unicode(name):
        return "has a name that is not valid UTF-8; rename it to have it read"
    if name.startswith("."):
        return "is a hidden file; it is not read"
    if _tar_stem(name) is not None:
        return (
            "is a webdataset .tar shard, not an image; a folder of .tar shards is a webdataset "
            "corpus (keep the shards apart from image folders)"
        )
    if Path(name).suffix.lower() in _MANIFEST_SUFFIXES:
        return (
            f"is a {Path(name).suffix} file, not an image; it is not read (a manifest is read "
            "only when it is itself given as the corpus)"
        )
    return f"is not an image the corpus reads ({_IMAGE_EXTENSIONS_TEXT}); it is not read"


def _is_caption_name(name: str) -> bool:
    return not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in _CAPTION_SIDECARS


def _scan_folder(root: Path, shard_size: int, listings: SourceListings) -> SourceScan:
    top = listings.top_folder(root)
    candidates: list[_ShardCandidate] = []
    unread = list(top.unread)
    root_uri = root.resolve()
    for subfolder in top.subfolders:
        uri = str(root_uri / subfolder.name)
        if not _holds_an_image(subfolder):
            unread.append(_unread(uri, "unsupported_file", _imageless_folder_detail(subfolder)))
        else:
            canonical = is_safe_partition_key(subfolder.name)
            where = f"folder {subfolder.name!r}"
            candidates.append(
                _ShardCandidate(subfolder.name, subfolder.name, uri, where, canonical)
            )
    shards, refused = _assign_shard_ids(candidates)
    if top.image_names:
        loose_ids = list(top.loose_cuts(shard_size))
        both = sorted(set(loose_ids) & set(shards))
        if both:
            raise ConfigurationError(
                f"{root} has images at the top level and a subfolder named {both[0]!r}; both "
                f"would be shard {both[0]!r}: move the top-level images into a subfolder"
            )
        shards = sorted([*shards, *loose_ids])
    return SourceScan(shards=shards, unread=sorted(unread + refused, key=lambda r: r.uri))


def _iter_folder_records(folder: Path, listings: SourceListings) -> Iterator[RawRecord]:
    if not folder.is_dir():
        raise ShardReadError("missing_shard", f"{folder} is not a folder")
    found = listings.shard_folder(folder)
    yield from _folder_image_records(found, zip(found.image_names, found.image_keys(), strict=True))
    yield from found.unread
    folder_uri = folder.resolve()
    for subfolder in found.subfolders:
        images = _count_images_below(subfolder)
        count = "1 image" if images == 1 else f"{images} images"
        lost = f"; {count} in it not read" if images else ""
        yield _unread(
            str(folder_uri / subfolder.name),
            "unsupported_file",
            f"{subfolder.name} is a folder inside shard {folder.name}; only one level is read"
            f"{lost} (move them into the shard folder, or make the folder a shard of its own)",
        )


def _folder_image_records(
    found: _FolderEntries, keyed_names: Iterable[tuple[str, str]]
) -> Iterator[RawRecord]:
    """A record per (image file name, key) of a listed folder, its caption read beside it."""
    # Paths are made one image at a time: a Path per listed image costs ~0.5 KiB each. The
    # folder is resolved once for all its images (each still checked for being a link).
    resolved_folders: dict[str, str] = {}
    for name, key in keyed_names:
        image_path = found.folder / name
        caption, caption_issue = _folder_caption(image_path, found.sidecars.get(_stem(name)))
        uri = resolved_path(image_path, resolved_folders)
        yield _read_local(key, uri, caption, caption_issue)


# --- a folder's loose images: content-defined cuts ------------------------------------------

_LOOSE_ID_PREFIX = f"{ROOT_SHARD}-"
# A loose image's name is a cut name when the first 8 bytes of its BLAKE2b digest, read as a
# number, fall under 1/shard_size of their range: a hash of the name alone, never Python's
# `hash`, which is salted per process (PYTHONHASHSEED).
_CUT_HASH_BYTES = 8
_CUT_HASH_RANGE = 1 << (8 * _CUT_HASH_BYTES)


@dataclass(frozen=True)
class LooseCut:
    """One shard of a folder's loose images: its id and its images, by position in name order
    (`start` to `stop`, stop excluded) among all the folder's loose images."""

    shard_id: str
    start: int
    stop: int


def loose_shard_bounds(shard_size: int) -> tuple[int, int]:
    """(fewest, most) images of a shard cut from more than `shard_size` loose images: a
    quarter of `shard_size` (at least 1) and four times it."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return max(1, shard_size // 4), 4 * shard_size


def is_cut_name(name: str, shard_size: int) -> bool:
    """Whether the loose image file `name` starts a piece of the folder's cut: the first bytes
    of a BLAKE2b digest of the name fall under 1/`shard_size` of their range, so about one
    name in `shard_size` does, the same in every process and on every machine."""
    digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=_CUT_HASH_BYTES)
    return int.from_bytes(digest.digest(), "big") * shard_size < _CUT_HASH_RANGE


def cut_loose_images(image_names: list[str], shard_size: int) -> list[LooseCut]:
    """The shards of a folder's loose (top-level) images, given their file names sorted.

    Up to `shard_size` images are the one shard `root`, as always, so existing homes keep it.
    More are cut where the names say, not by position (the idea of rsync's and FastCDC's
    content-defined chunking, applied to the sorted names), so adding photos re-cuts little:

    - a piece starts at the first name and at every cut name (`is_cut_name`, about one name in
      `shard_size`);
    - a piece of fewer than a quarter of `shard_size` images joins the shard before it (the
      first shard takes pieces until it holds that many). Each piece is judged by its own
      size, so, unlike skipping cut names near the previous cut (FastCDC's minimum), one new
      name cannot move a chain of later cuts;
    - a shard of more than four times `shard_size` images (a long run without a cut name,
      ~2% of shards) is split into equal parts by position.

    So adding or removing an image that is not a cut name changes only the shard it falls in,
    unless its piece crosses a quarter of `shard_size` (the piece then splits off as a shard of
    its own, or joins the shard before) or the shard crosses four times `shard_size` (its equal
    parts move). Adding a cut name splits one shard in two where it falls (when fewer than a
    quarter of `shard_size` images follow it before the next cut name, it just joins its
    shard; when that few precede it in its shard's first piece, those join the shard before).
    Shards hold ~1.3 x `shard_size` images on average, within `loose_shard_bounds`.

    Ids never count positions, which shift when a cut appears: the first shard is always `root`
    (a photo sorting before all others joins it); every other is `root-<key of its first
    image>` (`root-IMG_0412`), or, where that is not a safe shard id (spaces, accents, over 128
    characters), `derived_shard_id`'s safe form of it, ending in a hash. Keys are
    `_folder_keys`', given over all loose images and unique, so ids are too; should a hash
    collision give an id twice, that cut is not made. No images, no shard.
    """
    keys = [key for _, key in _folder_keys(image_names)]
    return _cut_loose_images(image_names, keys, shard_size)


def _cut_loose_images(names: list[str], keys: list[str], shard_size: int) -> list[LooseCut]:
    fewest, most = loose_shard_bounds(shard_size)
    count = len(names)
    if count <= shard_size:
        return [LooseCut(ROOT_SHARD, 0, count)] if count else []
    piece_starts = [0, *(i for i in range(1, count) if is_cut_name(names[i], shard_size))]
    piece_stops = [*piece_starts[1:], count]
    shard_starts = [0]
    for start, stop in zip(piece_starts[1:], piece_stops[1:], strict=True):
        # A short piece, or one after a first shard still too short, joins the shard before.
        if stop - start >= fewest and start - shard_starts[-1] >= fewest:
            shard_starts.append(start)
    starts: list[int] = []
    for start, stop in zip(shard_starts, [*shard_starts[1:], count], strict=True):
        parts = -(-(stop - start) // most)
        starts.extend(start + (stop - start) * part // parts for part in range(parts))
    cuts: list[LooseCut] = []
    taken: set[str] = set()
    for start, stop in zip(starts, [*starts[1:], count], strict=True):
        shard_id = _loose_shard_id(keys[start]) if start else ROOT_SHARD
        if shard_id in taken:
            cuts[-1] = LooseCut(cuts[-1].shard_id, cuts[-1].start, stop)
        else:
            taken.add(shard_id)
            cuts.append(LooseCut(shard_id, start, stop))
    return cuts


def _loose_shard_id(key: str) -> str:
    """`root-<key>`, or a safe id derived from it (with a hash) where it is not safe."""
    derived = derived_shard_id(f"{_LOOSE_ID_PREFIX}{key}")
    if derived is None:  # only a key with '/', NUL or undecodable bytes, which none has
        raise ValueError(f"loose image key {key!r} cannot name a shard")
    return derived


def _has_loose_form(shard_id: str) -> bool:
    """Whether `shard_id` looks like a loose-image shard's id (`root`, `root-...`)."""
    return shard_id == ROOT_SHARD or shard_id.startswith(_LOOSE_ID_PREFIX)


@dataclass(frozen=True)
class _LooseImages:
    """The loose images one shard of a folder's top level holds."""

    found: _FolderEntries  # the top level's listing
    start: int  # this shard's first image, by position among them in name order
    stop: int


def _loose_images_of(
    root: Path, shard_id: str, shard_size: int, listings: SourceListings
) -> _LooseImages | None:
    """Which loose images shard `shard_id` reads; None when it is a subfolder's id.

    A subfolder named `shard_id` is that subfolder (scan_source refuses one whose id is also a
    loose shard's). Otherwise `root` and `root-...` name loose images only as
    `cut_loose_images` cuts the folder as it is now; such an id that is neither a current cut
    nor a subfolder's derived id (a retired cut: `root-IMG_0412` after a cut name joined it to
    the shard before, or a positional `root-00003` of an older version) is a missing shard, so
    no image is read by two shards.
    """
    if not _has_loose_form(shard_id) or (root / shard_id).is_dir():
        return None
    found = listings.top_folder(root)
    cuts = found.loose_cuts(shard_size)
    cut = cuts.get(shard_id)
    if cut is not None:
        return _LooseImages(found, cut.start, cut.stop)
    if _shard_entry_name(root, shard_id, "folder") is not None:
        return None  # a subfolder whose name derives to this id (`root-my trip`)
    if not cuts:
        raise ShardReadError("missing_shard", f"{root} holds no loose images nor {shard_id!r}")
    ids = list(cuts)
    span = repr(ids[0]) if len(ids) == 1 else f"{ids[0]!r} to {ids[-1]!r}"
    raise ShardReadError(
        "missing_shard",
        f"{root} holds {len(found.image_names)} loose images, read as {len(ids)} "
        f"shard{'s' if len(ids) > 1 else ''} ({span}), not {shard_id!r}: the folder changed "
        "since that shard was listed, and its images are now read by those",
    )


def _iter_loose_records(
    root: Path, shard_id: str, shard_size: int, listings: SourceListings
) -> Iterator[RawRecord]:
    """The records of one shard of a folder's loose images, or of the subfolder `shard_id`
    names. Keys are given over all loose images before cutting, so an image's key never
    depends on where a cut falls. The top level's other entries are reported by scan_source,
    not by a shard."""
    if not root.is_dir():
        raise ShardReadError("missing_shard", f"{root} is not a folder")
    loose = _loose_images_of(root, shard_id, shard_size, listings)
    if loose is None:
        name = _shard_entry_name(root, shard_id, "folder")
        yield from _iter_folder_records(root / (name or shard_id), listings)
        return
    names = loose.found.image_names[loose.start : loose.stop]
    keys = loose.found.image_keys()[loose.start : loose.stop]
    yield from _folder_image_records(loose.found, zip(names, keys, strict=True))


def _imageless_folder_detail(folder: Path) -> str:
    nested = _first_nested_image(folder)
    if nested is None:
        return f"folder {folder.name} holds no images"
    return (
        f"folder {folder.name} holds no images at its own level, only deeper ({nested}), and "
        "only one level of folders is read: give that folder as the corpus to read its "
        "sub-folders as shards, or move the images up into shard folders"
    )


def _folder_keys(image_names: list[str]) -> Iterator[tuple[str, str]]:
    """Each image file name with its key: the file stem, as always; an image whose stem an
    earlier one (by name) already took, such as `twin.png` after `twin.jpg`, is keyed by its
    full name.

    Every other file keeps the key it always had, so existing image ids do not change.
    """
    stems = {_stem(name) for name in image_names}
    taken: set[str] = set()
    for name in image_names:
        key = _stem(name)
        if key in taken and name not in stems:
            key = name
        taken.add(key)
        yield name, key


def _folder_caption(
    image_path: Path, sidecars: dict[str, str] | None
) -> tuple[str | None, str | None]:
    """(caption, caption issue) of a folder image from the sidecars `_folder_entries` found:
    `<stem>.txt` or `<stem>.caption` (extension in any letter case), else `<stem>.json`."""
    sidecars = sidecars or {}
    text_name, metadata_name = sidecars.get("text"), sidecars.get("metadata")
    try:
        text = (image_path.parent / text_name).read_bytes() if text_name else None
        metadata = (image_path.parent / metadata_name).read_bytes() if metadata_name else None
    except OSError as exc:
        return None, f"bad_caption_file: cannot read the caption of {image_path.name}: {exc}"
    return _caption_from_sidecars(text, metadata, text_name or "", metadata_name or "")


def _read_local(
    key: str, uri: str, caption: str | None, caption_issue: str | None = None
) -> RawRecord:
    def failed(error: str) -> RawRecord:
        return RawRecord(key, uri, caption, None, error, caption_issue)

    not_a_file = _not_a_regular_file(uri)
    if not_a_file is not None:
        # Checked before reading: opening a FIFO would block the step forever.
        return failed(_not_a_file_error(uri, not_a_file))
    try:
        data = read_uri_bytes(uri)
    except ImageRejected as exc:
        return failed(str(exc))
    except OSError as exc:
        return failed(f"read_error: {exc}")
    return RawRecord(key, uri, caption, data, None, caption_issue)


def _not_a_file_error(uri: str, what: str) -> str:
    return f"not_a_file: {uri} is {what}, not an image file"


def _local_file_state(uri: str) -> tuple[str | None, os.stat_result | None]:
    """(why `_read_local` would fail on a local file, in its record's words; the file's stat
    when it is a regular file), from one stat and without reading it. (None, None) for a tar
    member, whose bytes only a read finds."""
    if split_tar_member(uri) is not None:
        return None, None
    try:
        status = os.stat(uri)
    except (FileNotFoundError, NotADirectoryError):
        return f"missing_file: {uri} does not exist", None  # as `read_uri_bytes` says it
    except OSError as exc:
        return f"read_error: {uri}: {exc.strerror or type(exc).__name__}", None
    if not S_ISREG(status.st_mode):
        return _not_a_file_error(uri, _entry_kind(Path(uri))), None
    return None, status


def _not_a_regular_file(uri: str) -> str | None:
    """What a local uri names when that is something other than a file, None otherwise."""
    if is_remote(uri) or split_tar_member(uri) is not None:
        return None
    path = Path(uri)
    if path.is_file() or not path.exists():
        return None
    return _entry_kind(path)


# --- manifest -----------------------------------------------------------------------------


def _scan_manifest(spec: SourceSpec) -> pl.LazyFrame:
    manifest_path = Path(spec.path)
    suffix = manifest_path.suffix.lower()
    if suffix == ".parquet":
        manifest = _parquet_manifest(manifest_path)
    elif suffix in {".jsonl", ".ndjson"}:
        manifest = _jsonl_manifest(manifest_path).rows.lazy()
    else:
        raise ConfigurationError(f"manifest {manifest_path} must be .parquet or .jsonl")
    columns = manifest.collect_schema()
    bad = _jsonl_manifest(manifest_path).bad_lines if suffix != ".parquet" else []
    if not bad and _collect(manifest.select(pl.len()), manifest_path).item() == 0:
        raise ConfigurationError(f"manifest {manifest_path} is empty: it has no rows")
    if "path" not in columns and "url" not in columns:
        unreadable = (
            f" ({len(bad)} lines are not JSON objects, first line {bad[0][0]})" if bad else ""
        )
        raise ConfigurationError(
            f"manifest {manifest_path} needs a 'path' or 'url' column{unreadable}"
        )
    if spec.shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {spec.shard_size}")
    if _ROW not in columns:
        manifest = manifest.with_row_index(_ROW)
    return manifest.with_columns(_shard_id_expr(columns, spec.shard_size))


def _parquet_manifest(path: Path) -> pl.LazyFrame:
    try:
        # The footer holds the schema: a cut-off file or another format fails here, at once.
        pl.read_parquet_schema(path)
    except (pl.exceptions.PolarsError, OSError) as error:
        raise _unreadable_manifest(path, error) from error
    return pl.scan_parquet(path)


def _unreadable_manifest(path: Path, error: Exception) -> ConfigurationError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if path.suffix.lower() == ".parquet":
        return ConfigurationError(
            f"manifest {path} is not a readable Parquet file ({first_line}): it may be cut off "
            "or be another format (CSV, JSON) under a .parquet name; rewrite it as Parquet"
        )
    return ConfigurationError(f"manifest {path} cannot be read ({first_line})")


def _collect(frame: pl.LazyFrame, path: Path) -> pl.DataFrame:
    """`frame.collect()`; a manifest whose data pages are corrupt is a ConfigurationError."""
    try:
        return frame.collect()
    except (pl.exceptions.PolarsError, OSError) as error:
        raise _unreadable_manifest(path, error) from error


@dataclass(frozen=True)
class _JsonlManifest:
    """A JSON-lines manifest's objects, and its lines that are not JSON objects."""

    rows: pl.DataFrame
    bad_lines: list[tuple[int, str]]  # (line number from 1, why)


def _jsonl_manifest(path: Path) -> _JsonlManifest:
    """Read a JSON-lines manifest; a malformed line or value is set aside, not fatal.

    polars reads a well-formed file; when it refuses one, or when a column the source reads
    holds values of mixed JSON types (polars would turn a list or a number into text), the
    lines are parsed one by one, so a single broken line costs a slow read instead of the
    whole corpus. Cached per file version: every shard's step reads the same manifest.
    """
    return _read_jsonl_manifest(str(path), _file_version(path))


@lru_cache(maxsize=4)
def _read_jsonl_manifest(path: str, _version: tuple[int, ...]) -> _JsonlManifest:
    with open(path, "rb") as head:
        start = head.read(len(_UTF8_BOM))
    if start.startswith(_UTF16_BOMS):
        raise ConfigurationError(
            f"manifest {path} is UTF-16 text; save it as UTF-8 (one JSON object per line)"
        )
    if not start.startswith(_UTF8_BOM):
        try:
            rows = pl.read_ndjson(path, infer_schema_length=None)
        except pl.exceptions.PolarsError:
            rows = None
        if rows is not None:
            with open(path, "rb") as raw:
                text = raw.read()
            # polars skips blank lines: with none, a row's line is its index + 1; with some,
            # the line-by-line parse counts them.
            if not _has_coerced_values(text, rows.schema) and not _has_blank_lines(text):
                rows = rows.with_row_index(_ROW)
                return _JsonlManifest(rows.with_columns((pl.col(_ROW) + 1).alias(_LINE)), [])
    return _parse_jsonl_lines(path)


# A whitespace-only line ending in a newline, or a whitespace-only last line without one.
_BLANK_LINE = re.compile(rb"(?:\A|\n)[ \t\r\f\v]*\n|\n[ \t\r\f\v]+\Z")


def _has_blank_lines(text: bytes) -> bool:
    return _BLANK_LINE.search(text) is not None


def _has_coerced_values(text: bytes, schema: pl.Schema) -> bool:
    """Whether polars may have turned a non-text value of a column the source reads into text.

    polars gives a column of mixed JSON types the type String, writing `["a"]` or `5` as text.
    A read column typed String that holds an unquoted value (not null) in the raw file needs
    the exact, line-by-line parse. A false alarm (the pattern inside another string) only costs
    that slower parse.
    """
    columns = [name for name in _MANIFEST_COLUMNS if schema.get(name) == pl.String]
    if not columns:
        return False
    names = "|".join(re.escape(name) for name in columns).encode()
    unquoted_value = re.compile(rb'"(?:' + names + rb')"\s*:\s*[^\s"n]')
    return unquoted_value.search(text) is not None


def _parse_jsonl_lines(path: str) -> _JsonlManifest:
    rows: list[dict] = []
    bad: list[tuple[int, str]] = []
    # utf-8-sig: a leading byte-order mark (as Windows editors write) is not part of line 1.
    with open(path, encoding="utf-8-sig", errors="replace") as lines:
        non_blank = ((number, line) for number, line in enumerate(lines, start=1) if line.strip())
        # A bad line keeps its row number, so fixing it later shifts no other row's key.
        for row, (number, line) in enumerate(non_blank):
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                bad.append((number, f"not JSON ({error.msg} at column {error.colno})"))
                continue
            if not isinstance(value, dict):
                bad.append((number, f"a JSON {_json_type(value)}, not an object"))
                continue
            rows.append(_typed_manifest_row(value, row) | {_LINE: number})
    present = [name for name in _MANIFEST_COLUMNS if any(name in row for row in rows)]
    schema = {name: pl.String for name in present}
    schema.update({_ROW: pl.UInt32, _CAPTION_ISSUE: pl.String, _ROW_ISSUE: pl.String})
    schema[_LINE] = pl.UInt32
    return _JsonlManifest(pl.DataFrame(rows, schema=schema), bad)


def _typed_manifest_row(value: dict, row: int) -> dict:
    """The columns the source reads, as text; a value of the wrong JSON type becomes null and
    is named in the row's issue columns. Columns the source does not read are left out."""
    typed: dict[str, object] = {_ROW: row}
    caption_issue: str | None = None
    row_issues: list[str] = []
    for name in _MANIFEST_COLUMNS:
        if name not in value:
            continue
        cell = value[name]
        if cell is None or isinstance(cell, str):
            typed[name] = cell
        elif name in _ID_COLUMNS and isinstance(cell, int) and not isinstance(cell, bool):
            # Integer shard numbers get the zero padding `_shard_id_expr` gives an int column.
            typed[name] = str(cell).zfill(_SHARD_ID_DIGITS) if name == "shard" else str(cell)
        else:
            typed[name] = None
            issue = f"{name!r} is {_describe_value(cell)}"
            if name == "caption":
                caption_issue = f"bad_caption_value: {issue}"
            else:
                row_issues.append(issue)
    typed[_CAPTION_ISSUE] = caption_issue
    typed[_ROW_ISSUE] = "; ".join(row_issues) or None
    return typed


def _shard_id_expr(columns: pl.Schema, shard_size: int) -> pl.Expr:
    """The shard id of each manifest row: its `shard` value, else `<row // shard_size>`.

    Rows without a `shard` column are cut by position, unlike a folder's loose images
    (`cut_loose_images`), on purpose: a manifest grows by appending rows, which changes only its
    last shard and adds new ones, and a row without a `key` is keyed by its row number, so a
    row inserted in the middle renumbers every later image anyway (no cut could keep their
    tables). A user who edits a manifest in the middle can give `key` and `shard` columns.
    """
    if "shard" not in columns:
        by_row = (pl.col(_ROW) // shard_size).cast(pl.String)
        return by_row.str.zfill(_SHARD_ID_DIGITS).alias(_SHARD_ID)
    if not (columns["shard"].is_integer() or columns["shard"] == pl.String):
        # A list or float shard column cannot name shards; its rows are reported in `unassigned`.
        return pl.lit(UNASSIGNED_SHARD).alias(_SHARD_ID)
    shard = pl.col("shard").cast(pl.String)
    # Integer shard numbers get the same zero padding as row-based ids so they sort numerically.
    if columns["shard"].is_integer():
        shard = shard.str.zfill(_SHARD_ID_DIGITS)
    return shard.fill_null(UNASSIGNED_SHARD).alias(_SHARD_ID)


def _scan_manifest_shards(spec: SourceSpec) -> SourceScan:
    manifest = _scan_manifest(spec)
    manifest_path = Path(spec.path)
    shard_ids = _collect(manifest.select(pl.col(_SHARD_ID).unique()), manifest_path)
    shard_ids = shard_ids[_SHARD_ID].to_list()
    unsafe = [shard_id for shard_id in shard_ids if not is_safe_partition_key(shard_id)]
    unread: list[RawRecord] = []
    if manifest_path.suffix.lower() in {".jsonl", ".ndjson"}:
        for number, why in _jsonl_manifest(manifest_path).bad_lines:
            unread.append(
                _unread(
                    f"{spec.path}:{number}",
                    "bad_manifest_line",
                    f"manifest {spec.path} line {number} is {why}; fix it to have it read",
                )
            )
    if unsafe:
        rows = _collect(manifest.filter(pl.col(_SHARD_ID).is_in(unsafe)).sort(_ROW), manifest_path)
        for row in _manifest_rows(rows, manifest.collect_schema(), _manifest_dir(spec)):
            where = f"manifest {spec.path} {row.place}"
            unread.append(_unsafe_shard_id(row.uri, row.shard_id, where, key=row.key))
    return SourceScan(sorted(set(shard_ids) - set(unsafe)), unread)


@dataclass(frozen=True)
class _ManifestRow:
    """One manifest row as parsed. `place`: where a user finds it in the file, `line N` (from
    1) in a jsonl manifest, `row N` (the row index, from 0) in a parquet one."""

    index: int
    place: str
    shard_id: str
    key: str
    location: str | None
    uri: str
    caption: str | None
    caption_issue: str | None = None
    row_issue: str | None = None  # a path, url, key or shard value of the wrong type


def _manifest_dir(spec: SourceSpec) -> Path:
    return Path(spec.path).resolve().parent


def _manifest_rows(
    rows: pl.DataFrame, columns: pl.Schema, manifest_dir: Path
) -> Iterator[_ManifestRow]:
    key_column = next((name for name in ("key", "id") if name in columns), None)
    resolved_folders: dict[str, str] = {}  # for this pass only: never reused by a later read
    for row in rows.iter_rows(named=True):
        row_issues = [row[_ROW_ISSUE]] if row.get(_ROW_ISSUE) else []
        key = row[key_column] if key_column else None
        if key is not None and not _is_id_value(key):
            row_issues.append(f"{key_column!r} is {_describe_value(key)}")
            key = None
        key = f"{row[_ROW]:0{_ROW_KEY_DIGITS}d}" if key is None or key == "" else str(key)
        shard = row.get("shard")
        if shard is not None and not _is_id_value(shard):
            row_issues.append(f"'shard' is {_describe_value(shard)}")
        location = row.get("path") or row.get("url")
        if location is not None and not isinstance(location, str):
            column = "path" if row.get("path") is not None else "url"
            row_issues.append(f"{column!r} is {_describe_value(location)}")
            location = None
        if not location:
            uri = ""
        elif is_remote(location):
            uri = location
        else:
            uri = _manifest_local_uri(location, manifest_dir, resolved_folders)
        caption, caption_issue = row.get("caption"), row.get(_CAPTION_ISSUE)
        if caption is not None and not isinstance(caption, str):
            caption_issue = f"bad_caption_value: 'caption' is {_describe_value(caption)}"
            caption = None
        line = row.get(_LINE)
        yield _ManifestRow(
            index=row[_ROW],
            place=f"line {line}" if line is not None else f"row {row[_ROW]}",
            shard_id=row[_SHARD_ID],
            key=key,
            location=location or None,
            uri=uri,
            caption=caption,
            caption_issue=caption_issue,
            row_issue="; ".join(row_issues) or None,
        )


def _manifest_local_uri(
    location: str, manifest_dir: Path, resolved_folders: dict[str, str] | None = None
) -> str:
    """The `source_uri` of a manifest's local path. A relative path written on Windows
    (`images\\a.jpg`) names `images/a.jpg` unless a file with the backslash in its name exists.
    `resolved_folders`: see `resolve_local`."""
    uri = resolve_local(location, manifest_dir, resolved_folders)
    if "\\" not in location or _windows_absolute(location) or Path(uri).exists():
        return uri
    return resolve_local(location.replace("\\", "/"), manifest_dir, resolved_folders)


def _windows_absolute(location: str) -> str | None:
    """What makes `location` an absolute Windows path (`drive C:`, `network share`), else None."""
    drive = _WINDOWS_DRIVE.match(location)
    if drive:
        return f"drive {drive.group(1).upper()}:"
    if location.startswith("\\\\"):
        return "network share"
    return None


def _is_id_value(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _iter_manifest_records(spec: SourceSpec, shard_id: str) -> Iterator[RawRecord]:
    rows, columns = _manifest_shard_rows(spec, shard_id)
    if rows.is_empty():
        raise ShardReadError("missing_shard", f"manifest {spec.path} has no rows in {shard_id}")
    for row in _manifest_rows(rows, columns, _manifest_dir(spec)):
        yield _manifest_record(row)


def _manifest_shard_rows(spec: SourceSpec, shard_id: str) -> tuple[pl.DataFrame, pl.Schema]:
    """One shard's manifest rows in row order, and the manifest's columns.

    Cached per file version: finding a shard's rows scans the whole manifest (a second or so
    at tens of millions of rows), and counting a shard for its progress total and then reading
    it must not pay that twice.
    """
    return _read_manifest_shard_rows(spec, shard_id, _file_version(Path(spec.path)))


@lru_cache(maxsize=2)
def _read_manifest_shard_rows(
    spec: SourceSpec, shard_id: str, _version: tuple[int, ...]
) -> tuple[pl.DataFrame, pl.Schema]:
    manifest = _scan_manifest(spec)
    try:
        rows = manifest.filter(pl.col(_SHARD_ID) == shard_id).sort(_ROW).collect()
    except (pl.exceptions.PolarsError, OSError) as error:
        raise ShardReadError(
            "unreadable_manifest", str(_unreadable_manifest(Path(spec.path), error))
        ) from error
    return rows, manifest.collect_schema()


def _manifest_record(row: _ManifestRow) -> RawRecord:
    problem = _manifest_row_problem(row)
    if problem is not None:
        return RawRecord(row.key, row.uri, row.caption, None, problem, row.caption_issue)
    return _read_local(row.key, row.uri, row.caption, row.caption_issue)


def _manifest_row_problem(row: _ManifestRow) -> str | None:
    """Why a row names no file the corpus can read ("reason: detail"), from the row alone."""
    if row.row_issue is not None:
        return f"bad_manifest_value: {row.place}: {row.row_issue}"
    if row.location is None:
        return f"missing_file: {row.place} has no path or url"
    if is_remote(row.location):
        return f"remote_uri: download shards first (e.g. with img2dataset): {row.location}"
    windows = _windows_absolute(row.location)
    if windows is not None and not Path(row.uri).exists():
        return (
            f"missing_file: {row.location} is a Windows path ({windows}), which this machine "
            "cannot open: write paths relative to the manifest (images/a.jpg) or absolute here"
        )
    return None


@dataclass(frozen=True)
class ManifestEntry:
    """One manifest row as `iter_shard_records` reads it, without its image's bytes.

    `shard` and `key` make its image id (`<shard>/<key>`); `uri` is its `source_uri` ("" for a
    row without path or url); `caption` (as written, not yet cleaned) and `caption_issue` are
    its record's. `problem`: why the corpus could not read the row's image, in the words of
    its record's `error` ("reason: detail": a bad value, no path, a remote URL, a Windows path,
    a missing file, something that is not a regular file), None when the file is there (its
    bytes may still fail to read or decode). `size_bytes` and `mtime_ns`: the file's size and
    modification time from its stat, None with a problem or for a tar member.
    """

    shard: str
    key: str
    uri: str
    caption: str | None
    caption_issue: str | None
    problem: str | None
    size_bytes: int | None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class ManifestListing:
    """A manifest's rows (`entries`, in the order the shards read them: shard id, then row),
    and the entries no shard reads (`unread`, as `scan_source` reports them: lines that are not
    JSON objects, rows of a shard id that is unsafe as a file name)."""

    entries: list[ManifestEntry]
    unread: list[RawRecord]


def list_manifest_rows(spec: SourceSpec) -> ManifestListing:
    """Every row of a manifest source, as its shards' records would hold it, reading no image.

    What the corpus's reader knows of a row before it reads the file (its parse, the same one
    `iter_shard_records` uses, and one stat of the file), for listing a manifest cheaply, such
    as `megapairs search --gallery manifest.jsonl` on every search. The manifest is parsed
    once for all shards. Raises `ConfigurationError` as `scan_source` does (no such file, empty,
    no `path`/`url` column, not readable).
    """
    if spec.kind != "manifest":
        raise ValueError(f"list_manifest_rows reads a manifest source, not {spec.kind!r}")
    scan = scan_source(spec)
    manifest = _scan_manifest(spec)
    listed = manifest.filter(pl.col(_SHARD_ID).is_in(scan.shards)).sort([_SHARD_ID, _ROW])
    rows = _collect(listed, Path(spec.path))
    entries: list[ManifestEntry] = []
    for row in _manifest_rows(rows, manifest.collect_schema(), _manifest_dir(spec)):
        problem, status = _manifest_row_problem(row), None
        if problem is None:
            problem, status = _local_file_state(row.uri)
        entries.append(
            ManifestEntry(
                row.shard_id,
                row.key,
                row.uri,
                row.caption,
                row.caption_issue,
                problem,
                size_bytes=status.st_size if status else None,
                mtime_ns=status.st_mtime_ns if status else None,
            )
        )
    return ManifestListing(entries, scan.unread)

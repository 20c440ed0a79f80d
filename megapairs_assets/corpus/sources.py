"""Where corpus images come from, read shard by shard.

Three layouts are understood, each named by a `SourceSpec`:

- `webdataset`: a folder of `*.tar` shards as written by img2dataset (`000000012.jpg` next to
  `000000012.txt` / `000000012.json`); one tar is one shard, read as a stream. img2dataset's
  own bookkeeping beside a shard (`<shard>.parquet`, `<shard>_stats.json`) is recognised and
  skipped: the tar holds the same captions.
- `folder`: a folder of images with optional sidecar captions (`<stem>.txt` or `<stem>.json`);
  each immediate subfolder holding images is a shard, images at the top level form `root`.
- `manifest`: a parquet or jsonl table with a `path` or `url` column, a `caption` column and
  optional `key`/`id` and `shard` columns.

Every entry is either read or reported. `scan_source` lists the shards and, as `unread`
records, every entry no shard reads: a name that is not safe as a shard id (shard ids become
file names, see `megapairs_assets.lib.storage.is_safe_partition_key`), a compressed tar or any
other file the layout does not use. Inside a shard, reading never raises for a single bad item:
it yields a `RawRecord` whose `error` says what is wrong (links, FIFOs and unknown members of a
tar included), so the table builder can quarantine it. Only a shard that cannot be read at all
raises `ShardReadError`. Nothing is ever downloaded: remote URLs are reported, not fetched.
Tar directory members carry no data and are passed over.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import polars as pl

from megapairs_assets.corpus.images import ImageRejected, read_uri_bytes
from megapairs_assets.corpus.uris import TAR_SUFFIX, is_remote, resolve_local, tar_member_uri
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.storage import (
    SAFE_PARTITION_KEY_RULE,
    check_partition_key,
    is_safe_partition_key,
)

SourceKind = Literal["webdataset", "folder", "manifest"]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
ROOT_SHARD = "root"
UNASSIGNED_SHARD = "unassigned"
_SHARD_ID_DIGITS = 5
_ROW_KEY_DIGITS = 9
_ROW = "__row_index"
_SHARD_ID = "__shard_id"
_CAPTION_SIDECARS = ("txt", "json")
# img2dataset writes these next to each <shard>.tar; they repeat what the tar holds.
_IMG2DATASET_COMPANIONS = (".parquet", "_stats.json")
_COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")


@dataclass(frozen=True)
class SourceSpec:
    """One image source: its layout, where it lives and (manifest only) rows per shard."""

    kind: SourceKind
    path: str
    shard_size: int = 1000


@dataclass(frozen=True)
class RawRecord:
    """One item as the source holds it, before any validation.

    `uri` is a plain path, `"<tar path>#<member name>"` for a tar member, or the remote URL.
    When the bytes could not be read, `data` is None and `error` reads `"reason_code: detail"`.
    """

    key: str
    uri: str
    caption: str | None
    data: bytes | None
    error: str | None = None


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


def scan_source(spec: SourceSpec) -> SourceScan:
    """Sorted shard ids of a source, plus every entry of it that no shard reads.

    Only safe shard ids are listed, so no name in the source can become a path outside the data
    root; existing ids do not change as data is added.
    """
    root = Path(spec.path)
    if not root.exists():
        raise FileNotFoundError(f"{spec.kind} source {spec.path} does not exist")
    if spec.kind == "webdataset":
        return _scan_webdataset(root)
    if spec.kind == "folder":
        return _scan_folder(root)
    if spec.kind == "manifest":
        return _scan_manifest_shards(spec)
    raise ValueError(f"unknown source kind {spec.kind!r}")


def list_shards(spec: SourceSpec) -> list[str]:
    """Sorted ids of the shards a source holds (see `scan_source` for what is left out)."""
    return scan_source(spec).shards


def shard_uri(spec: SourceSpec, shard_id: str) -> str:
    """Where a whole shard lives: the tar, the subfolder, or the manifest file."""
    if spec.kind == "webdataset":
        return str(Path(spec.path) / f"{shard_id}{TAR_SUFFIX}")
    if spec.kind == "folder" and shard_id != ROOT_SHARD:
        return str(Path(spec.path) / shard_id)
    return spec.path


def iter_shard_records(spec: SourceSpec, shard_id: str) -> Iterator[RawRecord]:
    """Yield every item of one shard in source order.

    `ShardReadError` is raised while iterating (at the first item) when the shard cannot be
    read at all: missing, or not a tar. A `shard_id` that `scan_source` could never list (not
    safe as a file name) raises ValueError at once.
    """
    check_partition_key(shard_id, f"shard of {spec.kind} source {spec.path}")
    root = Path(spec.path)
    if spec.kind == "webdataset":
        return _iter_tar_records(root / f"{shard_id}{TAR_SUFFIX}")
    if spec.kind == "folder":
        if shard_id == ROOT_SHARD:
            return _iter_folder_records(root, is_root=True)
        return _iter_folder_records(root / shard_id, is_root=False)
    if spec.kind == "manifest":
        return _iter_manifest_records(spec, shard_id)
    raise ValueError(f"unknown source kind {spec.kind!r}")


def is_image_name(name: str) -> bool:
    """Whether a file name carries one of the image extensions the corpus reads."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def _unread(uri: str, reason: str, detail: str, key: str = "") -> RawRecord:
    return RawRecord(key=key, uri=uri, caption=None, data=None, error=f"{reason}: {detail}")


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
    """The members of one sample key inside a tar (image, .txt caption, .json metadata)."""

    key: str
    tar_uri: str
    image_name: str | None = None
    image: bytes | None = None
    text: bytes | None = None
    metadata: bytes | None = None
    member_names: list[str] = field(default_factory=list)

    def holds(self, slot: str) -> bool:
        return getattr(self, slot) is not None

    def put(self, slot: str, member_name: str, data: bytes) -> None:
        setattr(self, slot, data)
        self.member_names.append(member_name)
        if slot == "image":
            self.image_name = member_name

    def record(self) -> RawRecord:
        caption = _caption_from_sidecars(self.text, self.metadata)
        if self.image is None:
            return RawRecord(
                key=self.key,
                uri=tar_member_uri(self.tar_uri, self.member_names[0]),
                caption=caption,
                data=None,
                error=f"missing_image: key {self.key} has only {', '.join(self.member_names)}",
            )
        return RawRecord(
            key=self.key,
            uri=tar_member_uri(self.tar_uri, self.image_name or ""),
            caption=caption,
            data=self.image,
        )


def _scan_webdataset(root: Path) -> SourceScan:
    entries = sorted(root.iterdir(), key=lambda entry: entry.name)
    tar_stems = {
        entry.name[: -len(TAR_SUFFIX)]
        for entry in entries
        if entry.name.endswith(TAR_SUFFIX) and entry.is_file()
    }
    shards: list[str] = []
    unread: list[RawRecord] = []
    root_uri = root.resolve()
    for entry in entries:
        uri = str(root_uri / entry.name)
        stem = entry.name[: -len(TAR_SUFFIX)] if entry.name.endswith(TAR_SUFFIX) else None
        if stem is not None and entry.is_file():
            if is_safe_partition_key(stem):
                shards.append(stem)
            else:
                unread.append(_unsafe_shard_id(uri, stem, f"tar file {entry.name!r}"))
        elif _is_img2dataset_companion(entry, tar_stems):
            continue
        else:
            unread.append(_unsupported_webdataset_entry(entry, uri))
    return SourceScan(shards=sorted(shards), unread=unread)


def _is_img2dataset_companion(entry: Path, tar_stems: set[str]) -> bool:
    return entry.is_file() and any(
        entry.name.endswith(suffix) and entry.name[: -len(suffix)] in tar_stems
        for suffix in _IMG2DATASET_COMPANIONS
    )


def _unsupported_webdataset_entry(entry: Path, uri: str) -> RawRecord:
    name = entry.name.lower()
    if entry.is_file() and name.endswith(_COMPRESSED_TAR_SUFFIXES):
        detail = "is a compressed tar; only plain .tar shards are read (decompress it first)"
    elif entry.is_file():
        detail = "is not a .tar shard"
    else:
        detail = f"is {_entry_kind(entry)}, not a .tar shard"
    return _unread(uri, "unsupported_file", f"{entry.name} {detail}; it is not read")


def _iter_tar_records(tar_path: Path) -> Iterator[RawRecord]:
    tar_uri = str(tar_path.resolve())
    with _open_tar_stream(tar_path) as tar:
        group: _KeyGroup | None = None
        member_being_read: str | None = None
        failure: Exception | None = None
        try:
            for member in tar:
                if member.isdir():
                    continue
                slot = _member_slot(member)
                if slot is None:
                    yield _unsupported_member(tar_uri, member)
                    continue
                key = _member_key(member.name)
                # A key seen again (or a second image for one key) starts a new sample, so
                # repeated keys reach the table builder, which quarantines the later ones.
                if group is None or group.key != key or group.holds(slot):
                    if group is not None:
                        yield group.record()
                    group = _KeyGroup(key=key, tar_uri=tar_uri)
                member_being_read = member.name
                data = _read_member(tar, member)
                member_being_read = None
                group.put(slot, member.name, data)
        except (tarfile.TarError, OSError, EOFError) as exc:
            failure = exc
        # tarfile ends quietly when a file stops at a header; only the missing end-of-archive
        # marker tells an interrupted download from a complete shard.
        if failure is None and not _has_end_marker(tar_path, tar.offset):
            failure = tarfile.ReadError("no end-of-archive marker")
    if failure is None:
        if group is not None:
            yield group.record()
        return
    # The sample whose member broke is incomplete; one whose members all arrived is kept.
    if member_being_read is None and group is not None and group.image is not None:
        yield group.record()
    yield _truncated_record(tar_path, tar_uri, member_being_read, failure)


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
    tar_path: Path, tar_uri: str, member_being_read: str | None, exc: Exception
) -> RawRecord:
    return RawRecord(
        key=_member_key(member_being_read) if member_being_read else "",
        uri=tar_uri,
        caption=None,
        data=None,
        error=f"truncated_shard: {tar_path.name} breaks off"
        f"{f' in {member_being_read}' if member_being_read else ''} ({exc}); "
        "later members are lost",
    )


def _unsupported_member(tar_uri: str, member: tarfile.TarInfo) -> RawRecord:
    if member.issym():
        what = f"a symbolic link to {member.linkname!r}"
    elif member.islnk():
        what = f"a hard link to {member.linkname!r}"
    elif member.isfifo():
        what = "a FIFO"
    elif member.ischr() or member.isblk():
        what = "a device"
    elif member.isfile():
        what = "a file of a kind the corpus does not read (image, .txt or .json)"
    else:
        what = f"a tar entry of type {member.type!r}"
    return _unread(
        tar_member_uri(tar_uri, member.name),
        "unsupported_member",
        f"{member.name} is {what}; only regular image and caption files are read",
        key=_member_key(member.name),
    )


def _member_slot(member: tarfile.TarInfo) -> str | None:
    if not member.isfile():
        return None
    if is_image_name(member.name):
        return "image"
    extension = member.name.rsplit(".", 1)[-1].lower()
    return {"txt": "text", "json": "metadata"}.get(extension)


def _member_key(member_name: str) -> str:
    return member_name.rsplit("/", 1)[-1].split(".", 1)[0]


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    extracted = tar.extractfile(member)
    return extracted.read() if extracted is not None else b""


def _caption_from_sidecars(text: bytes | None, metadata: bytes | None) -> str | None:
    if text is not None:
        return text.decode("utf-8", errors="replace")
    if metadata is None:
        return None
    try:
        caption = json.loads(metadata).get("caption")
    except (ValueError, AttributeError):
        return None
    return caption if isinstance(caption, str) else None


# --- folder -------------------------------------------------------------------------------


@dataclass
class _FolderEntries:
    """One folder's entries sorted by name: images, subfolders, and what neither reads."""

    images: list[Path] = field(default_factory=list)
    subfolders: list[Path] = field(default_factory=list)
    unread: list[RawRecord] = field(default_factory=list)


def _folder_entries(folder: Path) -> _FolderEntries:
    entries = sorted(folder.iterdir(), key=lambda entry: entry.name)
    found = _FolderEntries()
    found.images = [
        entry
        for entry in entries
        if entry.is_file() and not entry.name.startswith(".") and is_image_name(entry.name)
    ]
    sidecars = {
        f"{image.stem}.{extension}" for image in found.images for extension in _CAPTION_SIDECARS
    }
    image_names = {image.name for image in found.images}
    folder_uri = folder.resolve()
    for entry in entries:
        uri = str(folder_uri / entry.name)
        if entry.name in image_names or (entry.name in sidecars and entry.is_file()):
            continue
        if entry.is_dir():
            found.subfolders.append(entry)
        elif entry.is_file() and _is_caption_name(entry.name):
            found.unread.append(
                _unread(uri, "missing_image", f"{entry.name} is a caption file without an image")
            )
        elif entry.is_file():
            detail = "is a hidden file" if entry.name.startswith(".") else "is not an image"
            found.unread.append(
                _unread(uri, "unsupported_file", f"{entry.name} {detail}; it is not read")
            )
        else:
            found.unread.append(
                _unread(uri, "unsupported_file", f"{entry.name} is {_entry_kind(entry)}; not read")
            )
    return found


def _is_caption_name(name: str) -> bool:
    return not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in _CAPTION_SIDECARS


def _scan_folder(root: Path) -> SourceScan:
    top = _folder_entries(root)
    shards: list[str] = []
    unread = list(top.unread)
    root_uri = root.resolve()
    for subfolder in top.subfolders:
        uri = str(root_uri / subfolder.name)
        if not _folder_entries(subfolder).images:
            unread.append(
                _unread(uri, "unsupported_file", f"folder {subfolder.name} holds no images")
            )
        elif is_safe_partition_key(subfolder.name):
            shards.append(subfolder.name)
        else:
            unread.append(_unsafe_shard_id(uri, subfolder.name, f"folder {subfolder.name!r}"))
    if top.images:
        if ROOT_SHARD in shards:
            raise ValueError(
                f"{root} has images at the top level and a subfolder named {ROOT_SHARD!r}; "
                f"both would be shard {ROOT_SHARD!r}: move the top-level images into a subfolder"
            )
        shards.append(ROOT_SHARD)
    return SourceScan(shards=sorted(shards), unread=sorted(unread, key=lambda r: r.uri))


def _iter_folder_records(folder: Path, is_root: bool) -> Iterator[RawRecord]:
    if not folder.is_dir():
        raise ShardReadError("missing_shard", f"{folder} is not a folder")
    found = _folder_entries(folder)
    for image_path in found.images:
        yield _read_local(image_path.stem, str(image_path.resolve()), _folder_caption(image_path))
    if is_root:
        return  # the top level's other entries are reported by scan_source
    yield from found.unread
    folder_uri = folder.resolve()
    for subfolder in found.subfolders:
        yield _unread(
            str(folder_uri / subfolder.name),
            "unsupported_file",
            f"{subfolder.name} is a folder inside shard {folder.name}; only one level is read",
        )


def _folder_caption(image_path: Path) -> str | None:
    text_path = image_path.with_suffix(".txt")
    metadata_path = image_path.with_suffix(".json")
    try:
        text = text_path.read_bytes() if text_path.is_file() else None
        metadata = metadata_path.read_bytes() if metadata_path.is_file() else None
    except OSError:
        return None
    return _caption_from_sidecars(text, metadata)


def _read_local(key: str, uri: str, caption: str | None) -> RawRecord:
    try:
        data = read_uri_bytes(uri)
    except ImageRejected as exc:
        return RawRecord(key=key, uri=uri, caption=caption, data=None, error=str(exc))
    except OSError as exc:
        return RawRecord(key=key, uri=uri, caption=caption, data=None, error=f"read_error: {exc}")
    return RawRecord(key=key, uri=uri, caption=caption, data=data)


# --- manifest -----------------------------------------------------------------------------


def _scan_manifest(spec: SourceSpec) -> pl.LazyFrame:
    manifest_path = Path(spec.path)
    suffix = manifest_path.suffix.lower()
    if suffix == ".parquet":
        manifest = pl.scan_parquet(manifest_path)
    elif suffix in {".jsonl", ".ndjson"}:
        manifest = _jsonl_manifest(manifest_path).rows.lazy()
    else:
        raise ConfigurationError(f"manifest {manifest_path} must be .parquet or .jsonl")
    columns = manifest.collect_schema()
    if "path" not in columns and "url" not in columns:
        bad = _jsonl_manifest(manifest_path).bad_lines if suffix != ".parquet" else []
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


@dataclass(frozen=True)
class _JsonlManifest:
    """A JSON-lines manifest's objects, and its lines that are not JSON objects."""

    rows: pl.DataFrame
    bad_lines: list[tuple[int, str]]  # (line number from 1, why)


def _jsonl_manifest(path: Path) -> _JsonlManifest:
    """Read a JSON-lines manifest; a malformed line is set aside, not fatal.

    polars reads a well-formed file; only when it refuses one are the lines parsed one by one,
    so a single broken line costs a slow read instead of the whole corpus. Cached per file
    version: every shard's step reads the same manifest.
    """
    stat = path.stat()
    return _read_jsonl_manifest(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _read_jsonl_manifest(path: str, _mtime_ns: int, _size: int) -> _JsonlManifest:
    try:
        return _JsonlManifest(pl.read_ndjson(path, infer_schema_length=None), [])
    except pl.exceptions.PolarsError:
        pass
    objects: list[dict] = []
    bad: list[tuple[int, str]] = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        non_blank = ((number, line) for number, line in enumerate(lines, start=1) if line.strip())
        # A bad line keeps its row number, so fixing it later shifts no other row's key.
        for row, (number, line) in enumerate(non_blank):
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                bad.append((number, f"not JSON ({error.msg} at column {error.colno})"))
                continue
            if not isinstance(value, dict):
                bad.append((number, f"a JSON {type(value).__name__}, not an object"))
                continue
            objects.append({**value, _ROW: row})
    frame = pl.DataFrame(objects, infer_schema_length=None)
    return _JsonlManifest(
        frame.with_columns(pl.col(_ROW).cast(pl.UInt32)) if objects else frame, bad
    )


def _shard_id_expr(columns: pl.Schema, shard_size: int) -> pl.Expr:
    if "shard" not in columns:
        by_row = (pl.col(_ROW) // shard_size).cast(pl.String)
        return by_row.str.zfill(_SHARD_ID_DIGITS).alias(_SHARD_ID)
    shard = pl.col("shard").cast(pl.String)
    # Integer shard numbers get the same zero padding as row-based ids so they sort numerically.
    if columns["shard"].is_integer():
        shard = shard.str.zfill(_SHARD_ID_DIGITS)
    return shard.fill_null(UNASSIGNED_SHARD).alias(_SHARD_ID)


def _scan_manifest_shards(spec: SourceSpec) -> SourceScan:
    manifest = _scan_manifest(spec)
    shard_ids = manifest.select(pl.col(_SHARD_ID).unique()).collect()[_SHARD_ID].to_list()
    unsafe = [shard_id for shard_id in shard_ids if not is_safe_partition_key(shard_id)]
    unread: list[RawRecord] = []
    if Path(spec.path).suffix.lower() in {".jsonl", ".ndjson"}:
        for number, why in _jsonl_manifest(Path(spec.path)).bad_lines:
            unread.append(
                _unread(
                    f"{spec.path}:{number}",
                    "bad_manifest_line",
                    f"manifest {spec.path} line {number} is {why}; fix it to have it read",
                )
            )
    if unsafe:
        rows = manifest.filter(pl.col(_SHARD_ID).is_in(unsafe)).sort(_ROW).collect()
        for row in _manifest_rows(rows, manifest.collect_schema(), _manifest_dir(spec)):
            where = f"manifest {spec.path} row {row.index}"
            unread.append(_unsafe_shard_id(row.uri, row.shard_id, where, key=row.key))
    return SourceScan(sorted(set(shard_ids) - set(unsafe)), unread)


@dataclass(frozen=True)
class _ManifestRow:
    index: int
    shard_id: str
    key: str
    location: str | None
    uri: str
    caption: str | None


def _manifest_dir(spec: SourceSpec) -> Path:
    return Path(spec.path).resolve().parent


def _manifest_rows(
    rows: pl.DataFrame, columns: pl.Schema, manifest_dir: Path
) -> Iterator[_ManifestRow]:
    key_column = next((name for name in ("key", "id") if name in columns), None)
    for row in rows.iter_rows(named=True):
        key = row[key_column] if key_column else None
        key = f"{row[_ROW]:0{_ROW_KEY_DIGITS}d}" if key is None or key == "" else str(key)
        location = row.get("path") or row.get("url")
        location = str(location) if location else None
        if location is None:
            uri = ""
        elif is_remote(location):
            uri = location
        else:
            uri = resolve_local(location, manifest_dir)
        yield _ManifestRow(
            index=row[_ROW],
            shard_id=row[_SHARD_ID],
            key=key,
            location=location,
            uri=uri,
            caption=None if row.get("caption") is None else str(row["caption"]),
        )


def _iter_manifest_records(spec: SourceSpec, shard_id: str) -> Iterator[RawRecord]:
    manifest = _scan_manifest(spec)
    rows = manifest.filter(pl.col(_SHARD_ID) == shard_id).sort(_ROW).collect()
    if rows.is_empty():
        raise ShardReadError("missing_shard", f"manifest {spec.path} has no rows in {shard_id}")
    for row in _manifest_rows(rows, manifest.collect_schema(), _manifest_dir(spec)):
        yield _manifest_record(row)


def _manifest_record(row: _ManifestRow) -> RawRecord:
    if row.location is None:
        return RawRecord(
            row.key, "", row.caption, None, f"missing_file: row {row.key} has no path or url"
        )
    if is_remote(row.location):
        return RawRecord(
            row.key,
            row.uri,
            row.caption,
            None,
            f"remote_uri: download shards first (e.g. with img2dataset): {row.location}",
        )
    return _read_local(row.key, row.uri, row.caption)

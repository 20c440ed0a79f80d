"""Where corpus images come from, read shard by shard.

Three layouts are understood, each named by a `SourceSpec`:

- `webdataset`: a folder of `*.tar` shards as written by img2dataset (`000000012.jpg` next to
  `000000012.txt` / `000000012.json`); one tar is one shard, read as a stream.
- `folder`: a folder of images with optional sidecar captions (`<stem>.txt` or `<stem>.json`);
  each immediate subfolder holding images is a shard, images at the top level form `root`.
- `manifest`: a parquet or jsonl table with a `path` or `url` column, a `caption` column and
  optional `key`/`id` and `shard` columns.

Reading never raises for a single bad item: it yields a `RawRecord` whose `error` says what is
wrong, so the table builder can quarantine it. Only a shard that cannot be read at all raises
`ShardReadError`. Nothing is ever downloaded: remote URLs are reported, not fetched.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from megapairs_assets.corpus.images import ImageRejected, read_uri_bytes

SourceKind = Literal["webdataset", "folder", "manifest"]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
ROOT_SHARD = "root"
UNASSIGNED_SHARD = "unassigned"
_SHARD_ID_DIGITS = 5
_ROW_KEY_DIGITS = 9
_ROW = "__row_index"
_REMOTE_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_TAR_MEMBER_SEPARATOR = ".tar#"


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


class ShardReadError(Exception):
    """A whole shard cannot be read (for example the file is not a tar); `reason` is a code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def list_shards(spec: SourceSpec) -> list[str]:
    """Sorted ids of the shards a source holds; existing ids do not change as data is added."""
    root = Path(spec.path)
    if not root.exists():
        raise FileNotFoundError(f"{spec.kind} source {spec.path} does not exist")
    if spec.kind == "webdataset":
        return sorted(tar_path.stem for tar_path in root.glob("*.tar") if tar_path.is_file())
    if spec.kind == "folder":
        return _folder_shards(root)
    if spec.kind == "manifest":
        return _manifest_shards(spec)
    raise ValueError(f"unknown source kind {spec.kind!r}")


def iter_shard_records(spec: SourceSpec, shard_id: str) -> Iterator[RawRecord]:
    """Yield every item of one shard in source order.

    `ShardReadError` is raised while iterating (at the first item) when the shard cannot be
    read at all: missing, or not a tar.
    """
    root = Path(spec.path)
    if spec.kind == "webdataset":
        return _iter_tar_records(root / f"{shard_id}.tar")
    if spec.kind == "folder":
        return _iter_folder_records(root if shard_id == ROOT_SHARD else root / shard_id)
    if spec.kind == "manifest":
        return _iter_manifest_records(spec, shard_id)
    raise ValueError(f"unknown source kind {spec.kind!r}")


def is_image_name(name: str) -> bool:
    """Whether a file name carries one of the image extensions the corpus reads."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


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
                uri=f"{self.tar_uri}#{self.member_names[0]}",
                caption=caption,
                data=None,
                error=f"missing_image: key {self.key} has only {', '.join(self.member_names)}",
            )
        return RawRecord(
            key=self.key, uri=f"{self.tar_uri}#{self.image_name}", caption=caption, data=self.image
        )


def _iter_tar_records(tar_path: Path) -> Iterator[RawRecord]:
    tar_uri = str(tar_path.resolve())
    with _open_tar_stream(tar_path) as tar:
        group: _KeyGroup | None = None
        member_being_read: str | None = None
        failure: Exception | None = None
        try:
            for member in tar:
                slot = _member_slot(member)
                if slot is None:
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


def _folder_shards(root: Path) -> list[str]:
    shards = [
        child.name
        for child in root.iterdir()
        if child.is_dir() and not child.name.startswith(".") and _image_files(child)
    ]
    if _image_files(root):
        if ROOT_SHARD in shards:
            raise ValueError(
                f"{root} has images at the top level and a subfolder named {ROOT_SHARD!r}; "
                f"both would be shard {ROOT_SHARD!r}: move the top-level images into a subfolder"
            )
        shards.append(ROOT_SHARD)
    return sorted(shards)


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and is_image_name(entry.name)
    )


def _iter_folder_records(folder: Path) -> Iterator[RawRecord]:
    if not folder.is_dir():
        raise ShardReadError("missing_shard", f"{folder} is not a folder")
    for image_path in _image_files(folder):
        yield _read_local(image_path.stem, str(image_path.resolve()), _folder_caption(image_path))


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
        manifest = pl.scan_ndjson(manifest_path, infer_schema_length=None)
    else:
        raise ValueError(f"manifest {manifest_path} must be .parquet or .jsonl")
    columns = manifest.collect_schema()
    if "path" not in columns and "url" not in columns:
        raise ValueError(f"manifest {manifest_path} needs a 'path' or 'url' column")
    if spec.shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {spec.shard_size}")
    return manifest.with_row_index(_ROW).with_columns(_shard_id_expr(columns, spec.shard_size))


def _shard_id_expr(columns: pl.Schema, shard_size: int) -> pl.Expr:
    if "shard" not in columns:
        by_row = (pl.col(_ROW) // shard_size).cast(pl.String)
        return by_row.str.zfill(_SHARD_ID_DIGITS).alias("__shard_id")
    shard = pl.col("shard").cast(pl.String)
    # Integer shard numbers get the same zero padding as row-based ids so they sort numerically.
    if columns["shard"].is_integer():
        shard = shard.str.zfill(_SHARD_ID_DIGITS)
    return shard.fill_null(UNASSIGNED_SHARD).alias("__shard_id")


def _manifest_shards(spec: SourceSpec) -> list[str]:
    shard_ids = _scan_manifest(spec).select(pl.col("__shard_id").unique()).collect()
    return sorted(shard_ids["__shard_id"].to_list())


def _iter_manifest_records(spec: SourceSpec, shard_id: str) -> Iterator[RawRecord]:
    manifest = _scan_manifest(spec)
    columns = manifest.collect_schema()
    rows = manifest.filter(pl.col("__shard_id") == shard_id).sort(_ROW).collect()
    if rows.is_empty():
        raise ShardReadError("missing_shard", f"manifest {spec.path} has no rows in {shard_id}")
    manifest_dir = Path(spec.path).resolve().parent
    key_column = next((name for name in ("key", "id") if name in columns), None)
    for row in rows.iter_rows(named=True):
        key = row[key_column] if key_column else None
        key = f"{row[_ROW]:0{_ROW_KEY_DIGITS}d}" if key is None or key == "" else str(key)
        caption = None if row.get("caption") is None else str(row["caption"])
        location = row.get("path") or row.get("url")
        yield _manifest_record(key, location, caption, manifest_dir)


def _manifest_record(
    key: str, location: str | None, caption: str | None, manifest_dir: Path
) -> RawRecord:
    if not location:
        return RawRecord(key, "", caption, None, f"missing_file: row {key} has no path or url")
    location = str(location)
    if _REMOTE_URI.match(location) and not location.startswith("file://"):
        return RawRecord(
            key,
            location,
            caption,
            None,
            f"remote_uri: download shards first (e.g. with img2dataset): {location}",
        )
    return _read_local(key, _absolute_uri(location.removeprefix("file://"), manifest_dir), caption)


def _absolute_uri(location: str, manifest_dir: Path) -> str:
    # Keep a "<tar>#<member>" suffix intact while resolving the file part.
    split_at = location.find(_TAR_MEMBER_SEPARATOR)
    file_part = location if split_at < 0 else location[: split_at + len(".tar")]
    member_suffix = "" if split_at < 0 else location[split_at + len(".tar") :]
    return str((manifest_dir / file_part).resolve()) + member_suffix

"""Where every artifact lives under the data root, and how it is written safely.

Layout under `$MEGAPAIRS_HOME` (default `./megapairs_home`); the `data/` tree may instead live
under a separate data root (`DataLayout.data_root`: a local folder, or any fsspec URL such as
`s3://bucket/prefix` or `gs://bucket/prefix`), with the same relative paths:

    data/image_corpus/<shard>/images.parquet       one row per valid image
    data/image_corpus/<shard>/quarantine.parquet   one row per rejected input, with a reason
    data/image_corpus/source_report.parquet        entries of the source that no shard reads
    data/<embedding asset>/<shard>.parquet          image_id + float16 unit vector
    data/<knn asset>/<shard>.parquet                query_id, rank, neighbor_id, score
    data/mined_image_pairs/<shard>.parquet          pairs with sources, scores, hard negatives
    models/                                         demo models built on first use (local)
    catalog.duckdb                                  lineage catalog (local; see .lineage)
    dagster/                                        the Dagster instance of `megapairs demo` (local)

Partition keys and asset names become path components, so `DataLayout` accepts only safe ones
(`is_safe_partition_key`) and refuses any path that would resolve outside its asset's folder.

Every table is written to a temporary file in the same folder and moved into place with
`os.replace`, which is atomic on POSIX: a reader sees the old table or the new one, never half
of one. The temporary file's name says which machine and process writes it
(`.<name>.tmp-<machine>-<pid>-<random>`), so the first write into a folder after a crash (a
`kill -9`, an out-of-memory kill) removes what a dead writer left there, and never a live
writer's file, and is never longer than a file name may be (`temporary_name`). A write that
fails (disk full, permission denied) removes its temporary file, leaves the previous table in
place, and raises `TableWriteError` naming the table and the cause; when the target's file
system is (nearly) full, whatever the writer raised (torch.save says "unexpected pos"), the
error says the disk is full and how many bytes are free. The file gets the mode a plain
`open()` would give it (0666 minus the umask, so 0644 by default), so a trainer or web server
running as another user can read what the pipeline wrote.

Parquet tables are written by pyarrow with a CRC-32 on every page and read back by pyarrow
with each page verified (`read_parquet` / `read_arrow_table`): a flipped bit or a damaged
page is a `TableReadError` naming the file, never other values that pass every check, nor a
panic of polars' own reader (which no `except Exception` catches). Reuse of a kept table
(embeddings, KNN) treats such an error as "not reusable" and computes the shard again.

On an object store there is no rename (a "move" is a copy), so a table is written to a local
temporary file and published with one upload of the finished object (`put_file`: one PUT, or a
multipart upload that becomes visible only when it completes). A reader sees the old object or
the new one, never half of one; a failed or killed write leaves no new object and no temporary
key. Objects have no permission bits. Readers go through `read_parquet` / `table_source`, which
read a local file in place and an object with one GET. The lineage catalog, the Dagster
instance and the models stay on local disk under `home` (DuckDB cannot lock a file on S3; on a
cluster the catalog is DuckLake).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from megapairs_assets.lib.errors import DataRootError, TableWriteError, first_line
from megapairs_assets.lib.processes import machine_tag, process_alive

if TYPE_CHECKING:  # upath (and fsspec) are imported only when a data root is a URL
    from upath import UPath

DataPath: TypeAlias = "Path | UPath"
"""A path under the data root: a `pathlib.Path` on local disk, a `UPath` on an object store.

Both support `/`, `.name`, `.parent`, `.exists()` and `str()`; read and write tables with the
helpers below, which take either."""

DEFAULT_HOME_DIRNAME = "megapairs_home"
MAX_PARTITION_KEY_CHARS = 128
# One path component made of letters, digits, '.', '_' and '-', starting with a letter or digit:
# never empty, '.', '..', hidden, absolute, or holding a separator.
_SAFE_PARTITION_KEY = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_PARTITION_KEY_CHARS - 1}}}")
SAFE_PARTITION_KEY_RULE = (
    f"1 to {MAX_PARTITION_KEY_CHARS} letters, digits, '.', '_' or '-', "
    "starting with a letter or digit"
)
# A plain open() creates files 0666 minus the umask; tables get the same.
_OPEN_DEFAULT_MODE = 0o666
# `scheme://...`: a URL for fsspec. A Windows drive (`C:\\`) or a plain path never matches.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_LOCAL_PROTOCOLS = frozenset({"file", "local"})
# Stores without folders: nothing to create before a PUT (and s3fs's makedirs would create a
# missing bucket, a side effect a pipeline should never have).
_OBJECT_STORE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "r2"}
)
# A temporary file of `write_atomic`: `.<name>.tmp-<machine tag>-<pid>-<random>`; older releases
# wrote `.<name>.tmp-<random>`, without the writer.
_TEMPORARY_NAME = re.compile(
    r"\.(?P<target>.+)\.tmp-(?:(?P<machine>[0-9a-f]{8})-(?P<pid>[0-9]+)-)?[0-9a-f]{8}"
)
# A temporary file whose writer cannot be asked (another machine, an older name) is removed once
# it is this old: no table takes a day to write.
ABANDONED_TEMPORARY_AGE_S = 24 * 3600
# Folders this process has already cleared of dead writers' temporary files (one scan each).
_SWEPT_FOLDERS: set[str] = set()
_SWEPT_LOCK = threading.Lock()
# polars reports an I/O failure as a ComputeError whose text ends in "(os error <errno>)".
_POLARS_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def default_home() -> Path:
    """The data root: `$MEGAPAIRS_HOME`, else `./megapairs_home` under the working directory."""
    return Path(os.environ.get("MEGAPAIRS_HOME") or Path.cwd() / DEFAULT_HOME_DIRNAME).resolve()


def is_safe_partition_key(key: object) -> bool:
    """Whether `key` may name a partition (and so a file or folder): see SAFE_PARTITION_KEY_RULE."""
    return isinstance(key, str) and _SAFE_PARTITION_KEY.fullmatch(key) is not None


def check_partition_key(key: object, what: str = "partition key") -> str:
    """Return `key` when it is safe as a path component, else raise a ValueError naming it."""
    if not is_safe_partition_key(key):
        raise ValueError(
            f"{what} {key!r} is not safe as a file name: use {SAFE_PARTITION_KEY_RULE}"
        )
    return key  # type: ignore[return-value]


def new_file_mode() -> int:
    """The permission bits a plain `open(path, "w")` would give a new file right now."""
    return _OPEN_DEFAULT_MODE & ~_current_umask()


def _current_umask() -> int:
    # Linux reports the umask without changing it; os.umask can only read it by setting it,
    # which would race with other threads creating files.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def data_root_path(
    root: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> DataPath:
    """The data root as a path object: a `Path` for a local path or `file://` URL, else a `UPath`.

    `storage_options` go to the fsspec filesystem of a URL (for s3fs: `endpoint_url`,
    `client_kwargs`, ...); credentials are left to the filesystem's own environment lookup.
    """
    text = os.fspath(root)
    match = _URL.fullmatch(text)
    if match is None or match.group(1).lower() in _LOCAL_PROTOCOLS:
        return Path(match.group(2) if match else text)
    from upath import UPath

    try:
        return UPath(text, **dict(storage_options or {}))
    except (ValueError, ImportError) as error:
        # fsspec has no such protocol, or its package (s3fs, gcsfs, ...) is not installed.
        raise DataRootError(
            f"cannot open the data root {text!r}: {error}. Use a local path or a URL of a "
            "filesystem fsspec has installed here (s3:// needs the `cluster` extra: s3fs)"
        ) from error


def check_writable_folder(path: DataPath, what: str) -> None:
    """Make sure a local folder exists (created if need be) and takes files; DataRootError
    saying what is wrong otherwise. A URL is left to its filesystem (checked on first write)."""
    if not is_local(path):
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".megapairs-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise DataRootError(
            f"{what} {path} cannot hold files ({reason}); point it at a folder you can write"
        ) from error


def is_local(path: DataPath) -> bool:
    """Whether `path` is on local disk (a `pathlib.Path`), rather than behind fsspec."""
    return isinstance(path, Path)


def table_source(path: DataPath) -> Path | io.BytesIO:
    """What `pl.read_parquet` / `pq.read_table` should read: the local file itself, or the
    object's bytes fetched with one GET (shard tables are small enough to hold in memory)."""
    if is_local(path):
        return path  # type: ignore[return-value]
    return io.BytesIO(path.fs.cat_file(path.path))


class TableReadError(OSError):
    """A table exists but cannot be read back: damaged (a page fails its checksum or does not
    decode), cut short, not Parquet, or without a column the reader needs. The message names
    the file and says what to do."""


def read_parquet(path: DataPath, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a Parquet table from local disk or the object store, every page checked.

    See `read_arrow_table`; a missing file raises FileNotFoundError, a damaged one
    `TableReadError` naming it.
    """
    table = read_arrow_table(path, columns)
    try:
        return pl.from_arrow(table)  # type: ignore[return-value]  # a Table gives a DataFrame
    except BaseException as error:  # a Rust panic is a BaseException: never let one escape
        if not _is_rust_panic(error) and not isinstance(error, Exception):
            raise
        raise _read_error(path, error) from error


def read_arrow_table(path: DataPath, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet table into Arrow, verifying every page that carries a checksum.

    Tables written by `write_parquet_atomic` / `write_arrow_atomic` carry a CRC-32 on each
    page, so a flipped bit is an error here instead of different data (a table written before
    that, or by another program, is read unverified). pyarrow decodes it: a damaged page is an
    error, where polars' own reader can panic (a BaseException no `except Exception` catches).
    Raises FileNotFoundError when there is no file and `TableReadError` naming the file when it
    is damaged, cut short, not Parquet or lacks one of `columns`.
    """
    source = table_source(path)  # a missing file, an unreachable store: raised as they are
    try:
        with pq.ParquetFile(
            str(source) if isinstance(source, Path) else source, page_checksum_verification=True
        ) as parquet:
            if columns is not None:
                # ParquetFile.read ignores a column it does not hold; a caller needs each one.
                missing = [name for name in columns if name not in parquet.schema_arrow.names]
                if missing:
                    raise TableReadError(
                        f"{path} has no column {', '.join(map(repr, missing))} (it has "
                        f"{', '.join(parquet.schema_arrow.names)}): it is not the table this "
                        "step expects; materialize its shard again"
                    )
            return parquet.read(columns=columns)
    except (FileNotFoundError, PermissionError, IsADirectoryError, TableReadError):
        raise
    except BaseException as error:
        if not _is_rust_panic(error) and not isinstance(error, Exception):
            raise  # KeyboardInterrupt, SystemExit
        raise _read_error(path, error) from error


def _read_error(path: DataPath, error: BaseException) -> TableReadError:
    return TableReadError(
        f"cannot read the table {path}: it is damaged (a page fails its checksum or does not "
        "decode), cut short, or not Parquet. Delete it and materialize its shard again. "
        f"Cause: {first_line(error)}"
    )


def _is_rust_panic(error: BaseException) -> bool:
    """A panic inside a Rust extension (polars): pyo3 raises it as a BaseException subclass
    named PanicException, from a module each extension creates, so it is known by name."""
    return type(error).__name__ == "PanicException"


def write_atomic(path: DataPath, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_path)` then publish the result at `path` in one atomic step.

    The one writer for every table: the file appears whole or not at all, with the permission
    bits of a plain `open()` (writers that create private temporary files, such as
    `tempfile.mkstemp`, would otherwise leave it readable by its owner only). On an object
    store `tmp_path` is a local file, uploaded in one piece when `write` returns (see the
    module docstring). A failed write leaves the previous version of `path` as it was and
    raises `TableWriteError` (an OSError) for an I/O failure, or for any failure on a (nearly)
    full disk (saying so, with the free bytes); any other error keeps its type, with a note
    naming the table.
    """
    try:
        if is_local(path):
            _replace_atomic(path, write)
        else:
            _put_atomic(path, write)
    except Exception as error:
        wrapped = _write_error(path, error)
        if wrapped is error:
            raise
        raise wrapped from error


def _replace_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write a temporary file beside `path` and rename it over `path`."""
    tmp = path.with_name(temporary_name(path.name))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_abandoned_temporaries(path.parent, once_per_process=True)
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except Exception as error:
        # Asked while the partial file still holds its space: once it is removed, the disk
        # that just filled up has room again.
        full = _disk_full_error(path, path.parent, error)
        if full is not None:
            raise full from error
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


# The longest file name (in bytes) Linux and macOS file systems take.
MAX_FILE_NAME_BYTES = 255


def temporary_name(name: str) -> str:
    """The name of a temporary file for the table `name`, saying who writes it.

    Never longer than MAX_FILE_NAME_BYTES: a long `name` is cut (at a byte count, its
    encoding being UTF-8) and ends with a hash of the whole name instead, so any table whose
    own name fits can be written.
    """
    suffix = f".tmp-{machine_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    room = MAX_FILE_NAME_BYTES - len(".") - len(suffix.encode())
    encoded = os.fsencode(name)
    if len(encoded) > room:
        digest = hashlib.blake2b(encoded, digest_size=4).hexdigest()
        # A character split by the cut is dropped whole: every writer can encode the name.
        name = f"{encoded[: room - len(digest) - 1].decode('utf-8', 'ignore')}~{digest}"
    return f".{name}{suffix}"


# A write that fails with less than this free on its file system is reported as a full disk:
# a writer fails when its next buffer (kilobytes to a few megabytes) no longer fits, whatever
# error its library makes of that (torch.save: "unexpected pos ...", no errno).
DISK_FULL_MARGIN_BYTES = 16 << 20
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def free_bytes(folder: Path) -> int | None:
    """Bytes this process may still write on the file system of `folder` (or of its nearest
    existing parent); None where the system cannot say."""
    for candidate in (folder, *folder.parents):
        try:
            stats = os.statvfs(candidate)
        except FileNotFoundError:
            continue
        except (OSError, AttributeError):  # no statvfs (Windows), or unreadable
            return None
        # root may also fill the blocks the file system keeps for it; others may not.
        blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail
        return blocks * stats.f_frsize
    return None


def _disk_full_error(path: DataPath, folder: Path, error: BaseException) -> TableWriteError | None:
    """The TableWriteError of a write that failed on a full disk: `error` says so (ENOSPC,
    EDQUOT) or `folder`'s file system has less than DISK_FULL_MARGIN_BYTES left. None when
    the disk has room (the failure is something else)."""
    if isinstance(error, TableWriteError):
        return None
    free = free_bytes(folder)
    said_full = isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS
    if not said_full and (free is None or free >= DISK_FULL_MARGIN_BYTES):
        return None
    left = "" if free is None else f", {free} bytes free on the file system of {folder}"
    return TableWriteError(
        errno.ENOSPC,
        f"could not write {path}: the disk is full ({os.strerror(errno.ENOSPC)}{left}); "
        "nothing was replaced (the previous file, if any, is unchanged). Free some space and "
        f"run the step again. Cause: {type(error).__name__}: {error}",
    )


def sweep_abandoned_temporaries(folder: Path, once_per_process: bool = False) -> list[Path]:
    """Remove the temporary files that killed writers left in `folder`; returns them.

    A file of a process of this machine that no longer runs goes at once; one written
    elsewhere (a shared folder) or under an older name only after ABANDONED_TEMPORARY_AGE_S.
    A live writer's file is never touched. `once_per_process`: scan each folder once per
    process (the writes of one step into one folder then cost one listing, not one each).
    """
    if once_per_process:
        with _SWEPT_LOCK:
            if str(folder) in _SWEPT_FOLDERS:
                return []
            _SWEPT_FOLDERS.add(str(folder))
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # gone, or unreadable: the write itself will say what is wrong
        return []
    now = time.time()
    for entry in entries:
        match = _TEMPORARY_NAME.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        if _abandoned(match, entry, now):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:  # its writer finished (or another sweep got it) meanwhile
                continue
            removed.append(Path(entry.path))
    return removed


def _abandoned(match: re.Match[str], entry: os.DirEntry[str], now: float) -> bool:
    try:
        stat = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return False
    if match["machine"] == machine_tag() and match["pid"] is not None:
        # Its writer ran when it last changed the file (ctime: no copy can set it back), so a
        # process with the id that started later is another one.
        return not process_alive(int(match["pid"]), seen_at=stat.st_ctime)
    return now - stat.st_mtime > ABANDONED_TEMPORARY_AGE_S


def _write_error(path: DataPath, error: Exception) -> Exception:
    """The error a failed write raises: an I/O failure becomes a TableWriteError that names the
    table and says the previous file is untouched; anything else keeps its type (a bug in a
    writer is not an I/O problem), with a note naming the table."""
    if isinstance(error, TableWriteError):
        return error
    errno: int | None = None
    if isinstance(error, OSError):
        errno = error.errno
    else:
        match = _POLARS_OS_ERROR.search(str(error))
        if match is None:
            error.add_note(f"while writing {path} (the previous file, if any, is unchanged)")
            return error
        errno = int(match.group(1))
    cause = os.strerror(errno) if errno else str(error)
    message = (
        f"could not write {path}: {cause}; nothing was replaced (the previous file, if any, is "
        f"unchanged). Cause: {type(error).__name__}: {error}"
    )
    return TableWriteError(errno, message) if errno else TableWriteError(message)


def _put_atomic(path: UPath, write: Callable[[Path], None]) -> None:
    """Write to a local temporary folder, then upload the finished file as one object.

    The object store never holds a partial or temporary object: the upload is a single PUT (or
    a multipart upload, which s3fs aborts on failure and S3 shows only once complete). The
    stored size is checked against the local file, so a truncated upload fails the step, and
    the catalog then marks the materialization failed and readers refuse the table.
    """
    fs, key = path.fs, path.path
    if not set(_protocols(fs)) & _OBJECT_STORE_PROTOCOLS:
        fs.makedirs(path.parent.path, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="megapairs-put-") as folder:
        # The table's own name, so content-type guessing and writers see a normal file name.
        tmp = Path(folder) / path.name
        try:
            write(tmp)
        except Exception as error:  # the local disk the object is staged on may be full
            full = _disk_full_error(path, Path(folder), error)
            if full is not None:
                raise full from error
            raise
        local_size = tmp.stat().st_size
        fs.put_file(str(tmp), key)
    stored_size = fs.size(key)
    if stored_size != local_size:
        raise OSError(
            f"{path}: the store holds {stored_size} bytes after uploading {local_size}; "
            "another writer replaced it, or the upload was cut short"
        )


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


# Files up to this size are hashed whole for `file_fingerprint`; a larger one (a multi-GB
# training checkpoint) is named by its size and modification time instead.
FINGERPRINT_MAX_BYTES = 1 << 30


def file_fingerprint(path: DataPath) -> str:
    """A short string that changes when the file's content changes.

    Local files: the sha256 of their bytes (up to FINGERPRINT_MAX_BYTES; larger ones by size
    and modification time); a folder: its files' fingerprints. Objects: what the store says
    about the content (ETag / MD5) and the size, from one HEAD. A missing path is "missing".
    """
    if not is_local(path):
        try:
            info = path.fs.info(path.path)
        except FileNotFoundError:
            return "missing"
        named = {k: str(info[k]) for k in ("ETag", "etag", "md5Hash", "size") if info.get(k)}
        return hashlib.sha256(repr(sorted(named.items())).encode()).hexdigest()[:32]
    local = Path(path)
    if local.is_dir():
        inner = sorted(p for p in local.rglob("*") if p.is_file())
        lines = [f"{p.relative_to(local)}={file_fingerprint(p)}" for p in inner]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]
    try:
        stat = local.stat()
    except FileNotFoundError:
        return "missing"
    if stat.st_size > FINGERPRINT_MAX_BYTES:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with open(local, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


# Every table is written by pyarrow with a CRC-32 on each page (`read_arrow_table` checks
# them): without them a flipped bit in a page reads back as other values that pass every check.
# The cost, measured by benchmarks/bench_table_checksums.py, is in benchmarks/README.md.
PARQUET_COMPRESSION = "zstd"


def parquet_write_options() -> dict[str, Any]:
    """pyarrow's `write_table` options of every table (a fresh dict: callers may add to it)."""
    return {"compression": PARQUET_COMPRESSION, "write_page_checksum": True}


def write_parquet_atomic(
    frame: pl.DataFrame, path: DataPath, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a polars frame as Parquet, atomically, with a checksum on every page.

    metadata: key-value entries for the table's footer (a reuse key), written in the same
    atomic write as the rows.
    """
    if metadata:
        table = frame.to_arrow()
        write_arrow_atomic(table, path, metadata=metadata)
        return
    # polars' own pyarrow route keeps polars' type mapping and stays the one call that writes.
    write_atomic(
        path,
        lambda tmp: frame.write_parquet(
            tmp,
            compression=PARQUET_COMPRESSION,
            use_pyarrow=True,
            pyarrow_options={"write_page_checksum": True},
        ),
    )


def write_arrow_atomic(
    table: pa.Table,
    path: DataPath,
    metadata: Mapping[str, str] | None = None,
    **options: Any,
) -> None:
    """Write an Arrow table as Parquet, atomically, with a checksum on every page.

    metadata: footer entries added to the table's own schema metadata. options: more
    `pyarrow.parquet.write_table` options (`use_dictionary=False`, ...).
    """
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    settings = {**parquet_write_options(), **options}
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, **settings))


@dataclass(frozen=True)
class DataLayout:
    """Paths of every artifact under one data root (the only place that knows them).

    home: the local folder of the models, the lineage catalog file and the Dagster instance.
    data_root: where `data/` lives when not under `home`: a local folder, or an fsspec URL
    (`s3://bucket/prefix`, `gs://...`); `None` keeps it under `home`. storage_options: the
    URL's filesystem settings (see `data_root_path`); never credentials.

    Every per-partition path is checked: the key must be safe (`check_partition_key`) and the
    path must resolve inside its asset's folder, else a ValueError is raised and nothing is
    written.
    """

    home: Path
    data_root: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @cached_property
    def data_dir(self) -> DataPath:
        """The `data/` folder (or prefix) that holds every table."""
        if self.data_root is None:
            return self.home / "data"
        return data_root_path(self.data_root, self.storage_options) / "data"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    def asset_dir(self, asset_name: str) -> DataPath:
        """The folder that holds every file of one asset."""
        return _inside(self.data_dir, check_partition_key(asset_name, "asset name"))

    def corpus_images(self, shard: str) -> DataPath:
        return self._corpus_file(shard, "images.parquet")

    def corpus_quarantine(self, shard: str) -> DataPath:
        return self._corpus_file(shard, "quarantine.parquet")

    def corpus_source_report(self) -> DataPath:
        """Entries of the corpus source that no shard reads (unsafe names, unsupported files).

        A file, not a folder, so it can never collide with a shard's folder.
        """
        return self.asset_dir("image_corpus") / "source_report.parquet"

    def shard_table(self, asset_name: str, shard: str) -> DataPath:
        """Per-shard table of a downstream asset (embeddings, KNN graphs, pairs)."""
        return _inside(self.asset_dir(asset_name), f"{check_partition_key(shard, 'shard')}.parquet")

    def shared_cache_file(self, kind: str, shard: str, file_name: str) -> DataPath | None:
        """A cache file kept beside the tables, for steps on other machines to find.

        Only where the tables live apart from `home` (`data_root` set: a shared folder or an
        object store); None otherwise, since the local cache under `home` is then the only one.
        """
        if self.data_root is None:
            return None
        folder = _inside(self.asset_dir("cache"), check_partition_key(kind, "cache kind"))
        return _inside(_inside(folder, check_partition_key(shard, "shard")), file_name)

    def _corpus_file(self, shard: str, file_name: str) -> DataPath:
        shard_dir = _inside(self.asset_dir("image_corpus"), check_partition_key(shard, "shard"))
        return shard_dir / file_name


def _inside(folder: DataPath, name: str) -> DataPath:
    """`folder / name`, refused when it resolves outside `folder` (a symlink pointing away).

    An object store has no symlinks, and `name` is one checked path component, so a key under
    a URL root needs no resolving.
    """
    path = folder / name
    if not is_local(folder):
        return path
    resolved, root = path.resolve(), folder.resolve()
    if resolved.parent != root:
        raise ValueError(f"{path} resolves to {resolved}, outside {root}; refusing to use it")
    return path

"""Gallery embeddings, computed once per (retriever weights, benchmark gallery, its images).

Embedding CIRCO's 123,403 images is by far the most expensive part of scoring it, and the
gallery does not change between runs; re-scoring a retriever (or scoring it again after a code
change elsewhere) reuses the stored raw image projections. The cache key hashes everything that
shapes them: the retriever's id and weights fingerprint, the precision it ran in, the benchmark,
the gallery's name (the split's, or one shared by splits ranking one gallery: CIRCO val and
test, or a searched folder), the images' version (ids, crop boxes, image files; not the
annotation files, which shape only the queries), how the images are decoded (the benchmarks'
official way or the corpus's), the batch size and device of the forward passes (they change an
embedding's last bits: see `CacheKey`) and CACHE_FORMAT. A change to any of them is a new key.

Layout: `<cache root>/<retriever id>/<benchmark>-<gallery>/<key>/{projections.npy, meta.json,
last_used}`; meta.json is written last, so an entry without it is incomplete and ignored.
`last_used` is touched each time the entry is read (its modification time is the entry's last
use) and is the entry's lock file. `<retriever id>/retriever.json`, when a caller recorded it
(`record_retriever`), names where that retriever's weights live.

What is kept (the bounds), as a package or model cache keeps its downloads:
- one entry per retriever id and gallery: storing an entry removes the entries of the same
  `<retriever id>/<benchmark>-<gallery>/` folder completed no later than it (other weights,
  precision or gallery versions: they can never be hit again unless that version comes back);
- a budget for the whole cache, `max_bytes` and `max_entries`: after each store (and at each
  `prune`) the least recently used entries are evicted until both hold; the entry just stored
  or read is never the one evicted, even when it alone is over the budget;
- entries of a retriever whose weights are gone (every path of its `retriever.json` deleted)
  are removed by the next `prune` (the search command prunes on each search).

Safe with several processes at once. A reader holds a shared `flock` on the entry's
`last_used` while it reads; a remover takes the exclusive lock without waiting, so an entry
being read by another process is skipped (it is tried again on a later store or prune), never
deleted under its reader. Removal is one rename to a hidden `.removing-*` folder first (a reader
sees the whole entry or none, and a reader that loses the race recomputes), an entry another
process completed later than ours is kept, and a folder without meta.json (perhaps another
process's write in progress) is removed only once nothing in it has changed for
INCOMPLETE_ENTRY_AGE_S. Deleting the whole cache folder by hand is always safe.

Messages go to `notice` (the search command: stderr), only when they explain something the
user would otherwise wonder about: entries evicted by the budget, entries of deleted
retrievers removed, and a gallery embedded again because its cached version was superseded
(its images or the retriever's weights changed) or unreadable. A first embedding, a hit and
the routine removal of superseded versions say nothing here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megapairs_assets.evaluation.benchmark import CORPUS_DECODING
from megapairs_assets.lib.storage import write_atomic

# Bump when what is stored changes meaning (e.g. normalised instead of raw projections).
CACHE_FORMAT = "raw-projections-float32-v1"
_PROJECTIONS = "projections.npy"
# numpy parses a .npy header with ast.literal_eval, and CPython 3.11's AST constructor is not
# safe across threads ("SystemError: AST constructor recursion depth mismatch" when two threads
# load at once, seen once in the concurrency test): one load at a time per process. A process
# loads an entry once per search or split, so nothing real waits on another here.
_NPY_HEADER_LOCK = threading.Lock()

_META = "meta.json"
_LAST_USED = "last_used"
_RETRIEVER_RECORD = "retriever.json"
# A folder without meta.json that changed within this many seconds may be another process's
# write in progress, so it is left alone; older, it is a crashed write and is removed.
INCOMPLETE_ENTRY_AGE_S = 3600.0
_REMOVING_PREFIX = ".removing-"
# The whole cache's budget. CIRCO's gallery is 123,403 x 768 float32 = 0.38 GB per ViT-L
# retriever; 20 GB keeps dozens of benchmark galleries and searched folders.
DEFAULT_MAX_BYTES = 20 * 1024**3
DEFAULT_MAX_ENTRIES = 256
# Weight paths remembered per retriever id (one id can be several folders with one name).
_RECORDED_PATHS = 8
_NAMES_SHOWN = 3


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines a gallery's embeddings.

    split: the gallery's name (`BenchmarkSplit.cache_name`); gallery_version: its images'
    version (`BenchmarkSplit.images_version`); image_decoding: how its images were decoded
    (`BenchmarkSplit.image_decoding`; a searched gallery is decoded as the corpus is).
    batch_size: images per forward pass; device: where the forward passes ran
    (`evaluation.run.device_kind`). Both change the last bits of an embedding (a kernel picks
    its blocking by batch shape and device), and a near-tie at a ranking's cut-off turns on
    those bits; keyed, a score depends on the settings it ran with, never on which earlier run
    filled the cache. None: not recorded (the search command's galleries).
    """

    retriever_id: str
    weights_fingerprint: str
    benchmark: str
    split: str
    gallery_version: str
    image_count: int
    precision: str = "float32"
    image_decoding: str = CORPUS_DECODING
    batch_size: int | None = None
    device: str | None = None
    cache_format: str = CACHE_FORMAT

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class CachedEntry:
    """One complete entry as the budget sees it: where, its size, its last use (epoch s)."""

    path: Path
    size_bytes: int
    last_used_s: float


class GalleryCache:
    """Stored raw image projections under `root`, keyed by `CacheKey`, within a budget.

    max_bytes / max_entries: the whole cache's budget (least recently used entries are evicted
    past it). notice: where evictions and rebuilds are told (default: this module's logger).
    """

    def __init__(
        self,
        root: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        if max_bytes < 0 or max_entries < 1:
            raise ValueError(f"bad gallery cache budget: {max_bytes} bytes, {max_entries} entries")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.notice = notice or logging.getLogger(__name__).info

    def entry_dir(self, key: CacheKey) -> Path:
        return self.root / key.retriever_id / f"{key.benchmark}-{key.split}" / key.digest

    def load(self, key: CacheKey) -> np.ndarray | None:
        """The stored projections for `key`, or None when there is no complete entry. The
        entry is read under its shared lock (no remover deletes it meanwhile) and marked used."""
        entry = self.entry_dir(key)
        if not (entry / _META).is_file():
            return None
        with _entry_lock(entry, shared=True) as locked:
            if locked is None:  # gone meanwhile (evicted, superseded)
                return None
            try:
                meta = json.loads((entry / _META).read_text())
                with _NPY_HEADER_LOCK:
                    projections = np.load(entry / _PROJECTIONS)
            except (OSError, ValueError):
                return None  # damaged entry: recompute and overwrite
            if meta.get("key") != asdict(key) or projections.shape[0] != key.image_count:
                return None
            if locked:
                _touch(entry / _LAST_USED)
        return projections

    def store(self, key: CacheKey, projections: np.ndarray) -> Path:
        """Write an entry atomically (projections first, meta last), then remove the older
        entries of the same retriever and gallery and keep the whole cache within its budget
        (the rules in the module docstring)."""
        if projections.shape[0] != key.image_count:
            raise ValueError(
                f"{projections.shape[0]} projections for a gallery of {key.image_count} images"
            )
        entry = self.entry_dir(key)
        write_atomic(
            entry / _PROJECTIONS,
            lambda tmp: _save_npy(tmp, projections.astype(np.float32, copy=False)),
        )
        meta = {"key": asdict(key), "shape": list(projections.shape)}
        write_atomic(entry / _META, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
        _touch(entry / _LAST_USED)
        self._remove_older_entries(entry)
        self.enforce_budget(keep=entry)
        return entry

    def _remove_older_entries(self, entry: Path) -> list[Path]:
        """Remove the siblings of `entry` completed no later than it, crashed writes and
        abandoned removals; returns the entries removed. Never raises for a sibling that
        another process removes or completes meanwhile."""
        try:
            completed_ns = (entry / _META).stat().st_mtime_ns
            siblings = list(os.scandir(entry.parent))
        except OSError:  # removed meanwhile by a newer store: nothing of ours to prune
            return []
        removed = []
        for sibling in siblings:
            if sibling.name == entry.name or not sibling.is_dir(follow_symlinks=False):
                continue
            path = Path(sibling.path)
            if sibling.name.startswith(_REMOVING_PREFIX):  # a removal that was cut short
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                older = (path / _META).stat().st_mtime_ns <= completed_ns
            except FileNotFoundError:
                older = time.time() - _newest_change_s(path) > INCOMPLETE_ENTRY_AGE_S
            except OSError:
                continue
            if older and _remove_entry(path):
                removed.append(path)
        return removed

    def entries(self) -> list[CachedEntry]:
        """Every complete entry, least recently used first (one scandir per folder, one stat
        per file)."""
        found = []
        for gallery_folder in self._gallery_folders():
            for item in _scandir(gallery_folder):
                if item.name.startswith(".") or not item.is_dir(follow_symlinks=False):
                    continue
                files = {f.name: f.stat(follow_symlinks=False) for f in _scandir(Path(item.path))}
                if _META not in files:
                    continue  # incomplete: the sibling rule handles it
                stamp = files.get(_LAST_USED, files[_META])
                size = sum(stat.st_size for stat in files.values())
                found.append(CachedEntry(Path(item.path), size, stamp.st_mtime))
        return sorted(found, key=lambda entry: (entry.last_used_s, str(entry.path)))

    def enforce_budget(self, keep: Path | None = None) -> list[CachedEntry]:
        """Evict least recently used entries until the cache holds at most `max_entries`
        entries and `max_bytes` bytes; `keep` (the entry just stored or read) and entries in
        use by another process stay. Tells `notice` what was evicted; returns it."""
        try:
            entries = self.entries()
        except OSError:  # the root is not a folder (a cache that cannot be written)
            return []
        total_bytes = sum(entry.size_bytes for entry in entries)
        count = len(entries)
        evicted: list[CachedEntry] = []
        for entry in entries:
            if total_bytes <= self.max_bytes and count <= self.max_entries:
                break
            if keep is not None and entry.path == keep:
                continue
            if _remove_entry(entry.path):
                evicted.append(entry)
                total_bytes -= entry.size_bytes
                count -= 1
        if evicted:
            self._remove_empty_folders(entry.path.parent for entry in evicted)
            self.notice(
                f"gallery cache: evicted {_plural(len(evicted), 'least recently used entry')} "
                f"({_mb(sum(e.size_bytes for e in evicted))}: {self._names(evicted)}) to stay "
                f"within {_mb(self.max_bytes)} and {self.max_entries} entries; a later search "
                "of those galleries embeds them again"
            )
        return evicted

    def record_retriever(self, retriever_id: str, weights: Iterable[Path]) -> None:
        """Remember where `retriever_id`'s weights live, so its entries are removed once they
        are all deleted (`prune`). A retriever with no local weights (a hub tag) is not
        recorded. Never raises: the record is a convenience, the search goes on without it."""
        paths = [str(Path(path).expanduser().absolute()) for path in weights]
        if not paths:
            return
        record = self.root / retriever_id / _RETRIEVER_RECORD
        try:
            known = json.loads(record.read_text()).get("weights", [])
        except (OSError, ValueError, AttributeError):
            known = []
        merged = paths + [path for path in known if path not in paths]
        if merged == known:
            return  # nothing new: no write on every search
        with contextlib.suppress(OSError):
            write_atomic(
                record,
                lambda tmp: tmp.write_text(json.dumps({"weights": merged[:_RECORDED_PATHS]})),
            )

    def keep_tidy(self, retriever_id: str, spec: object) -> None:
        """Record where `spec`'s weights live, then `prune`: the one call every user of the
        cache (search, evaluation) makes before embedding a gallery."""
        self.record_retriever(retriever_id, weights_location(spec))
        self.prune()

    def prune(self) -> None:
        """Remove the entries of retrievers whose weights are all deleted, then keep the
        cache within its budget. Never raises (a cache that cannot be cleaned is still used)."""
        gone: list[str] = []
        freed_bytes = 0
        entries = self.entries()
        for retriever_folder in _scandir(self.root):
            record = Path(retriever_folder.path) / _RETRIEVER_RECORD
            try:
                weights = json.loads(record.read_text()).get("weights", [])
            except (OSError, ValueError, AttributeError):
                continue  # no record (a benchmark's base model, a hub tag): kept by the budget
            if not weights or any(os.path.lexists(path) for path in weights):
                continue
            owned = [e for e in entries if e.path.is_relative_to(record.parent)]
            removed = [entry for entry in owned if _remove_entry(entry.path)]
            freed_bytes += sum(entry.size_bytes for entry in removed)
            if len(removed) < len(owned):
                continue  # one is being read: the rest goes at a later prune
            for incomplete in record.parent.glob("*/*"):  # crashed writes, abandoned removals
                if time.time() - _newest_change_s(incomplete) > INCOMPLETE_ENTRY_AGE_S:
                    shutil.rmtree(incomplete, ignore_errors=True)
            record.unlink(missing_ok=True)
            self._remove_empty_folders(Path(item.path) for item in _scandir(record.parent))
            gone.append(retriever_folder.name)
        if gone:
            self.notice(
                f"gallery cache: removed the cached embeddings ({_mb(freed_bytes)}) of "
                f"{_plural(len(gone), 'retriever')} whose weights are deleted: "
                f"{', '.join(gone[:_NAMES_SHOWN])}{' ...' if len(gone) > _NAMES_SHOWN else ''}"
            )
        self.enforce_budget()

    def miss_reason(self, key: CacheKey) -> str | None:
        """Why `key` has no usable entry although its gallery was cached for this retriever
        before (another version of its images or weights, a damaged entry); None for a gallery
        never cached with it (nothing worth telling)."""
        entry = self.entry_dir(key)
        if (entry / _META).is_file():
            return "its cached entry could not be read"
        reasons = []
        for sibling in _scandir(entry.parent):
            try:
                old = json.loads((Path(sibling.path) / _META).read_text())["key"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            reasons.append(_what_changed(old, asdict(key)))
        return reasons[0] if reasons else None

    def try_store(self, key: CacheKey, projections: np.ndarray) -> str | None:
        """`store`, for a caller that goes on without the cache: None when stored, else why
        not (a full disk, a read-only home). The embeddings just computed are never lost to a
        cache that cannot be written."""
        try:
            self.store(key, projections)
        except OSError as error:
            return (
                f"gallery embeddings not cached ({error}); going on without the cache, so the "
                "next run embeds this gallery again"
            )
        return None

    def get_or_compute(
        self,
        key: CacheKey,
        compute: Callable[[], np.ndarray],
        log: Callable[[str], None] | None = None,
    ) -> tuple[np.ndarray, bool]:
        """(projections, reused): the cached entry, or `compute()` stored under `key` (when
        the entry cannot be written, the projections still come back: `log`, else a logging
        warning, says why). A gallery embedded again because its cached version is outdated
        is told to `notice` first (`miss_reason`)."""
        cached = self.load(key)
        if cached is not None:
            return cached, True
        why = self.miss_reason(key)
        if why is not None:
            self.notice(
                f"gallery cache: embedding {key.benchmark}-{key.split} with {key.retriever_id} "
                f"again: {why}"
            )
        projections = compute()
        problem = self.try_store(key, projections)
        if problem is not None:
            (log or logging.getLogger(__name__).warning)(problem)
        return projections, False

    def _gallery_folders(self) -> Iterator[Path]:
        for retriever_folder in _scandir(self.root):
            if retriever_folder.is_dir(follow_symlinks=False):
                for gallery_folder in _scandir(Path(retriever_folder.path)):
                    if gallery_folder.is_dir(follow_symlinks=False):
                        yield Path(gallery_folder.path)

    def _remove_empty_folders(self, folders: Iterable[Path]) -> None:
        """rmdir each gallery folder, then its retriever folder, when empty (a retriever's
        record keeps its folder), so searching many folders leaves no trail of empty ones.

        A writer whose brand-new parent folder is removed in the instant between its two
        `mkdir`s fails its store, which costs that one run the cache and says so (`try_store`).
        """
        for folder in set(folders):
            for candidate in (folder, folder.parent):
                if candidate == self.root or not candidate.is_relative_to(self.root):
                    break
                try:
                    candidate.rmdir()
                except OSError:  # not empty, gone, or not ours to remove
                    break

    def _names(self, entries: list[CachedEntry]) -> str:
        names = [str(e.path.parent.relative_to(self.root)) for e in entries[:_NAMES_SHOWN]]
        more = len(entries) - len(names)
        return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _what_changed(old: dict, new: dict) -> str:
    """Why an older entry of the same retriever and gallery does not serve `new`."""
    if old.get("weights_fingerprint") != new["weights_fingerprint"]:
        return "the retriever's weights changed since it was cached"
    if old.get("image_count") != new["image_count"]:
        return (
            f"the gallery changed since it was cached ({old.get('image_count')} -> "
            f"{new['image_count']} images)"
        )
    if old.get("gallery_version") != new["gallery_version"]:
        return "the gallery's image files changed since it was cached"
    if old.get("precision") != new["precision"]:
        return f"it was cached in {old.get('precision')}, this run is in {new['precision']}"
    if "image_decoding" in old and old["image_decoding"] != new["image_decoding"]:
        return "its images are decoded differently since it was cached"
    if "batch_size" not in old and new["batch_size"] is not None:
        return "it was cached before the key recorded the batch size and device"
    if "device" in old and old["device"] != new["device"]:
        return f"it was embedded on {old['device']}, this run is on {new['device']}"
    if "batch_size" in old and old["batch_size"] != new["batch_size"]:
        return (
            f"it was embedded {old['batch_size']} images per forward pass, this run "
            f"{new['batch_size']} (the batch size changes an embedding's last bits)"
        )
    return "the cache format changed"


def _save_npy(path: Path, array: np.ndarray) -> None:
    # np.save appends ".npy" to a name without it; writing through a handle keeps the name.
    with open(path, "wb") as handle:
        np.save(handle, array)


def _scandir(folder: Path) -> list[os.DirEntry]:
    """The folder's entries, none when it is gone or not a folder (never raises)."""
    try:
        with os.scandir(folder) as items:
            return [item for item in items if not item.name.startswith(_REMOVING_PREFIX)]
    except OSError:
        return []


def _touch(path: Path) -> None:
    """Mark an entry used now (its `last_used` file); a read-only cache is used unmarked."""
    with contextlib.suppress(OSError):
        path.touch()


@contextlib.contextmanager
def _entry_lock(entry: Path, shared: bool) -> Iterator[bool | None]:
    """Hold `entry`'s lock (`last_used`): yields True when held, None when the entry is gone,
    False when the lock cannot be taken (a read-only cache: read unlocked, nothing removes it).
    `shared` waits for a remover to finish; exclusive never waits (see `_remove_entry`)."""
    try:
        handle = open(entry / _LAST_USED, "a")  # noqa: SIM115 (held across the yield)
    except FileNotFoundError:
        yield None
        return
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:  # a file system without locks: behave as before locks existed
            yield bool(shared)
            return
        # Taken after a remover renamed the entry away: there is nothing left to read.
        yield True if entry.is_dir() else None


def _newest_change_s(folder: Path) -> float:
    """The newest modification time (epoch seconds) of `folder` and the files in it."""
    newest = 0.0
    try:
        newest = folder.stat().st_mtime
        for item in os.scandir(folder):
            newest = max(newest, item.stat(follow_symlinks=False).st_mtime)
    except OSError:  # gone meanwhile: "just changed", so it is left alone
        return time.time()
    return newest


def _remove_entry(entry: Path) -> bool:
    """Take `entry` out of the cache in one rename, then delete it; False when another process
    is reading it (its shared lock), took it first, or it cannot be renamed: then it stays, and
    is tried again at the next store or prune. The exclusive lock is held across the rename, so
    a reader waiting for it finds the entry gone and recomputes."""
    with _entry_lock(entry, shared=False) as locked:
        if not locked:
            return False
        doomed = entry.with_name(f"{_REMOVING_PREFIX}{entry.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(entry, doomed)
        except OSError:
            return False
        shutil.rmtree(doomed, ignore_errors=True)
    return True


def _plural(count: int, noun: str) -> str:
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun[:-1] + 'ies' if noun.endswith('y') else noun + 's'}"


def _mb(size_bytes: int) -> str:
    return f"{size_bytes / 1e9:.1f} GB" if size_bytes >= 1e9 else f"{size_bytes / 1e6:.1f} MB"


def weights_location(spec: object) -> list[Path]:
    """Where a retriever's weights live on this machine: an export folder or a weights file;
    none for an open_clip tag (downloaded weights live in open_clip's own cache)."""
    from megapairs_assets.retriever.model import LOCAL_DIR_PREFIX

    model_name = getattr(spec, "model_name", "")
    if model_name.startswith(LOCAL_DIR_PREFIX):
        return [Path(model_name.removeprefix(LOCAL_DIR_PREFIX)).expanduser()]
    pretrained = getattr(spec, "pretrained", None)
    if pretrained and Path(pretrained).expanduser().is_file():
        return [Path(pretrained).expanduser()]
    return []

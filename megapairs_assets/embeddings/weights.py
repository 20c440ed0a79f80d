"""Model weights on disk: which bytes they are, and whether they fit the model, found cheaply.

Two questions an embedding step asks before any work:

- Which weights are these? `file_digest` / `folder_digest`: the sha256 of the bytes, so new
  weights copied over old ones at the same path count as a changed model (the reuse key of an
  embedding table holds the digest), while the same bytes anywhere (another machine, another
  folder, a fresh copy with a new mtime) give the same digest. A blob of the Hugging Face cache
  is named by the sha256 of its bytes (the LFS object id), so its name is its digest and
  nothing is read. Hashing reads the whole file once (a 2.5 GB checkpoint: about 2 s of one core
  at the 1.6 GB/s measured here, plus the read); the result is kept per (path, size, mtime,
  ctime, inode) in a small local file (`digest_cache_path`), so each version of a file is hashed
  once per machine. Only the content goes into a key: no path, no mtime, so a cluster sharing a
  data root agrees on it. A sample of the file (first and last MiB) would be cheaper, but two
  fine-tunes of one architecture can share their size, header and last tensors (a text-only or
  projection-only fine-tune), and reusing another model's vectors silently is the failure this
  exists to prevent.
- Can they load into the model? `checkpoint_shapes` reads tensor names and shapes without the
  data (a safetensors header; a PyTorch zip checkpoint loaded onto the meta device with
  `weights_only=True`), and `open_clip_fit` / `dinov2_fit` compare them with the model built
  on the meta device (no memory, under a second for EVA02-L-14), adapting names and shapes as
  each library's loader does. A damaged file, a file of another architecture, or an export
  whose weights do not match its config is then one configuration error naming the file, not a
  traceback from the middle of a step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megapairs_assets.lib.errors import ConfigurationError

# Files of a model folder that can change its outputs: weights, configs (model, preprocessing,
# tokenizer), vocabularies. Hidden files (a `.cache/` of download metadata) and READMEs do not.
FOLDER_FILE_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".json", ".txt", ".model")
# Files at least this large have their digest kept on disk; smaller ones are hashed each time.
DIGEST_CACHE_MIN_BYTES = 32 * 2**20
# Digests kept in the local cache file (a few hundred bytes each).
DIGEST_CACHE_ENTRIES = 256
# A file this large that is not in the cache is announced before it is hashed.
ANNOUNCE_HASHING_BYTES = 256 * 2**20
# Problems listed per kind in a mismatch message.
SHOWN_PER_KIND = 3

_HF_LFS_BLOB = re.compile(r"[0-9a-f]{64}")
_digests: dict[str, str] = {}  # this process's digests, by file state
_fits: set[tuple] = set()  # checks passed in this process, by model and file states


class WeightsError(ConfigurationError):
    """Weights that cannot be read, or do not fit the model; the message names the file."""


# --- which bytes ----------------------------------------------------------------------------


def digest_cache_path() -> Path:
    """The local file keeping digests of large weight files (`$XDG_CACHE_HOME` or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return Path(base).expanduser() / "megapairs" / "weight-digests.json"


def file_digest(path: Path, log: Any = None) -> str:
    """The sha256 (hex) of a file's bytes; `log` (a callable) hears of a long hash first."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and _HF_LFS_BLOB.fullmatch(real.name):
        # The hub cache stores an LFS file as blobs/<sha256 of its bytes>.
        return real.name
    state = _file_state(real)
    if state in _digests:
        return _digests[state]
    large = real.stat().st_size >= DIGEST_CACHE_MIN_BYTES
    digest = _cached_digests().get(state) if large else None
    if digest is None:
        if log is not None and real.stat().st_size >= ANNOUNCE_HASHING_BYTES:
            log(
                f"fingerprinting {real} ({real.stat().st_size / 2**30:.1f} GiB) so a changed "
                "file is never taken for the old one; once per file version on this machine"
            )
        with open(real, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if large:
            _remember_digest(state, digest)
    _digests[state] = digest
    return digest


def folder_digest(folder: Path, log: Any = None) -> str:
    """One sha256 over a model folder's relevant files (`FOLDER_FILE_SUFFIXES`): their paths
    inside the folder and their `file_digest`s. Moving or copying the folder keeps it."""
    folder = Path(folder)
    combined = hashlib.sha256()
    for relative, path in model_folder_files(folder):
        combined.update(f"{relative}\0{file_digest(path, log)}\n".encode())
    return combined.hexdigest()


def model_folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(path inside the folder, path) of the files that can change a model's outputs."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix in FOLDER_FILE_SUFFIXES and path.is_file():
            found.append((relative.as_posix(), path))
    return found


def _file_state(real: Path) -> str:
    # ctime and the inode change when a file is replaced or rewritten, even by a copy that
    # keeps the old mtime (`cp -p`, `rsync -t`); a user cannot set them back.
    stat = real.stat()
    return (
        f"{real}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}|{stat.st_dev}"
    )


def _cached_digests() -> dict[str, str]:
    try:
        entries = json.loads(digest_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _remember_digest(state: str, digest: str) -> None:
    """Add one digest to the cache file (best effort: a read-only home only costs a rehash)."""
    from megapairs_assets.lib.storage import write_atomic

    entries = _cached_digests()
    entries.pop(state, None)
    entries[state] = digest
    kept = dict(list(entries.items())[-DIGEST_CACHE_ENTRIES:])
    with suppress(OSError):
        write_atomic(digest_cache_path(), lambda tmp: tmp.write_text(json.dumps(kept, indent=0)))


# --- what the file holds ---------------------------------------------------------------------


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a weights file, without reading the tensors' data.

    `.safetensors` files are read as safetensors (their header), anything else as a PyTorch
    checkpoint (`weights_only=True`, onto the meta device), as open_clip and transformers
    choose by the name. A checkpoint holding {"state_dict": ...} (open_clip's training
    checkpoints) gives that state dict. Raises `WeightsError` saying what is wrong.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_shapes(path)
    return _torch_shapes(path)


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not iterable itself
            return {name: tuple(handle.get_slice(name).get_shape()) for name in names}
    except Exception as error:  # SafetensorError and OSError alike: the file is unusable
        raise WeightsError(
            f"{path} is not a readable safetensors file ({_reason(error)}): it is damaged or "
            "was cut short; copy it again"
        ) from None


def _torch_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if _looks_like_safetensors(path):
        raise WeightsError(
            f"{path} holds safetensors data, but a name not ending in .safetensors makes it "
            "read as a PyTorch checkpoint; rename it to end in .safetensors"
        )
    try:
        loaded = torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests loading with arbitrary code execution: never ours.
        raise WeightsError(
            f"{path} cannot be read as plain tensors: it is damaged, not a PyTorch checkpoint, "
            "or holds Python objects besides tensors (a full training checkpoint); save the "
            "model's state_dict() with torch.save, or as .safetensors"
        ) from None
    except Exception as error:
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint ({_reason(error)}): it is damaged or "
            "was cut short; copy it again"
        ) from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    shapes = (
        {str(k): tuple(v.shape) for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        if isinstance(loaded, Mapping)
        else {}
    )
    if not shapes:
        raise WeightsError(
            f"{path} holds no tensors by name (a {type(loaded).__name__}); give a file of the "
            "model's state_dict()"
        )
    return shapes


def _looks_like_safetensors(path: Path) -> bool:
    # 8 bytes of header length (little endian), then a JSON object.
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 2**30


def _reason(error: BaseException) -> str:
    """An error's first sentence, without torch's advice to load untrusted pickles."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    text = text.split(". ")[0].rstrip(".")
    if "weights_only" in text:
        return type(error).__name__
    return text[:200]


# --- does it fit ------------------------------------------------------------------------------


@dataclass
class Mismatch:
    """How a checkpoint's tensors differ from the model's (names after the loader's renames).

    strict: whether tensors the model does not have fail the load (open_clip loads strictly;
    transformers ignores them, a task head for one, and only fills missing ones randomly).
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    strict: bool = True

    def __bool__(self) -> bool:
        return bool(self.missing or self.wrong_shape or (self.strict and self.unexpected))

    def describe(self, model: str) -> str:
        """One sentence listing the first problems of each kind."""
        parts = []
        if self.wrong_shape:
            shown = ", ".join(
                f"{name} is {list(given)} where {model} has {list(expected)}"
                for name, given, expected in self.wrong_shape[:SHOWN_PER_KIND]
            )
            parts.append(f"{len(self.wrong_shape)} tensors have other shapes ({shown})")
        if self.missing:
            parts.append(
                f"{len(self.missing)} tensors of {model} are missing ("
                + ", ".join(self.missing[:SHOWN_PER_KIND])
                + (", ..." if len(self.missing) > SHOWN_PER_KIND else "")
                + ")"
            )
        if self.unexpected:
            parts.append(
                f"{len(self.unexpected)} are not {model}'s ("
                + ", ".join(self.unexpected[:SHOWN_PER_KIND])
                + (", ..." if len(self.unexpected) > SHOWN_PER_KIND else "")
                + ")"
            )
        return "; ".join(parts)


def compare_shapes(
    given: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    adaptable: Any = None,
) -> Mismatch:
    """Missing, unexpected and differently shaped tensors of `given` against `expected`.

    adaptable(name, given_shape, expected_shape) -> True when the loader adapts that
    difference itself (open_clip interpolates position embeddings, for one).
    """
    mismatch = Mismatch(
        missing=[name for name in expected if name not in given],
        unexpected=[name for name in given if name not in expected],
    )
    for name, shape in given.items():
        want = expected.get(name)
        if want is None or tuple(shape) == tuple(want):
            continue
        if adaptable is not None and adaptable(name, tuple(shape), tuple(want)):
            continue
        mismatch.wrong_shape.append((name, tuple(shape), tuple(want)))
    return mismatch


def open_clip_fit(target: str, checkpoint: Path) -> Mismatch | None:
    """How `checkpoint` fails to fit open_clip model `target` (a model name, or
    `local-dir:<export folder>`), the names adapted as open_clip's `load_checkpoint` adapts
    them; None when it fits, or when the model cannot be built without a download (a Hugging
    Face text tower), which leaves the check to the load. Raises `WeightsError` for a file
    that cannot be read."""
    key = ("open_clip", target, _path_state(checkpoint), _config_state(target))
    if key in _fits:
        return None
    shapes = checkpoint_shapes(checkpoint)
    model = _open_clip_meta_model(target)
    if model is None:
        return None
    mismatch = _open_clip_mismatch(model, shapes)
    if mismatch:
        return mismatch
    _fits.add(key)
    return None


def dinov2_fit(model_dir: Path, weight_files: list[Path]) -> Mismatch | None:
    """How the weight files of a DINOv2 folder fail to fit the model its config.json
    describes, with the names transformers writes and reads; None when they fit. Raises
    `WeightsError` for a file that cannot be read."""
    key = ("dinov2", _path_state(model_dir / "config.json"), *map(_path_state, weight_files))
    if key in _fits:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files:
        shapes.update(checkpoint_shapes(path))
    prefix = "dinov2."  # Dinov2PreTrainedModel.base_model_prefix: a task model's backbone
    if any(name.startswith(prefix) for name in shapes):
        shapes = {n.removeprefix(prefix): s for n, s in shapes.items() if n.startswith(prefix)}
    model = _dinov2_meta_model(model_dir)
    current = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    saved = _as_saved_by_transformers(model, current)
    # transformers reads either naming (it renames older checkpoints' keys when loading).
    best = min(
        (compare_shapes(shapes, names) for names in (saved, current)),
        key=lambda m: (len(m.missing) + len(m.wrong_shape), len(m.unexpected)),
    )
    best.strict = False
    if best:
        return best
    _fits.add(key)
    return None


def _open_clip_mismatch(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> Mismatch:
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    # The renames of open_clip's load_state_dict / load_checkpoint, on meta tensors.
    if next(iter(shapes)).startswith("module"):
        shapes = {name[7:]: shape for name, shape in shapes.items()}
    state = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    given = {name: tuple(tensor.shape) for name, tensor in state.items()}
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    position_ids = "text.transformer.embeddings.position_ids"
    if position_ids not in expected:
        given.pop(position_ids, None)
    if "logit_bias" in expected and "logit_bias" not in given:
        given["logit_bias"] = expected["logit_bias"]  # open_clip adds a zero bias

    def adaptable(name: str, have: tuple[int, ...], want: tuple[int, ...]) -> bool:
        if name in ("logit_scale", "logit_bias"):  # a scalar vs a 1-element vector
            return _numel(have) == _numel(want)
        # Position embeddings are interpolated to the model's length; the width must match.
        resized = ("visual.positional_embedding", "positional_embedding")
        return name.endswith(resized) and len(have) == len(want) == 2 and have[1] == want[1]

    return compare_shapes(given, expected, adaptable)


def _open_clip_meta_model(target: str) -> torch.nn.Module | None:
    import open_clip

    config = _open_clip_model_config(target)
    if config is None or "hf_model_name" in config.get("text_cfg", {}):
        return None  # its text tower's config would come from the hub
    with _quiet_open_clip(), torch.device("meta"):
        return open_clip.create_model(target, pretrained=None, load_weights=False, device="meta")


def _open_clip_model_config(target: str) -> dict | None:
    import open_clip

    if target.startswith("local-dir:"):
        path = Path(target.removeprefix("local-dir:")) / "open_clip_config.json"
        try:
            return json.loads(path.read_text())["model_cfg"]
        except (OSError, ValueError, KeyError):
            return None
    return open_clip.get_model_config(target)


def _dinov2_meta_model(model_dir: Path) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        return Dinov2Model(config)


def _as_saved_by_transformers(
    model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """The names and shapes `save_pretrained` would write for `model` (transformers renames
    some tensors between its modules and its files)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without renames: files hold the module names
        return shapes
    state = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    return {name: tuple(t.shape) for name, t in revert_weight_conversion(model, state).items()}


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warnings while building a meta model: nothing
    is meant to be loaded there. open_clip logs through the root logger."""
    package = str(Path(__import__("open_clip").__file__).parent)

    def keep(record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(package)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _path_state(path: Path) -> str:
    try:
        return _file_state(Path(path).resolve())
    except OSError:
        return str(path)


def _config_state(target: str) -> str:
    if target.startswith("local-dir:"):
        return _path_state(Path(target.removeprefix("local-dir:")) / "open_clip_config.json")
    return ""

"""A retriever: an open_clip model (a base model or a trained MMRet checkpoint) as embeddings.

Candidates are images: `encode_images` gives L2-normalised image projections. A composed query
(image + text) is MMRet's fusion of the *raw* projections (`fusion.fuse_query`); an image-only
or text-only query is that modality's normalised projection (method.md §7).

Where weights come from is open_clip's business, as everywhere in this project:

- `RetrieverSpec(model_name, pretrained)` with `pretrained` an open_clip tag (`openai`), a local
  checkpoint file (a state dict open_clip loads with `create_model(name, pretrained=path)`),
  or None with `model_name="local-dir:<dir>"` for a directory holding `open_clip_config.json`
  plus weights (open_clip's own export format).
  An export may add {"model_name": ...} to its config (open_clip ignores the key); the id then
  names the architecture instead of `local`.
- Nothing is downloaded at run time: a pretrained tag loads only from the local caches open_clip
  would fill (the Hugging Face hub cache, `~/.cache/clip`); a tag not cached there, or a file
  that is not a checkpoint, is a `RetrieverConfigError` saying what to give instead.
- `spec_from_argument("ViT-B-16@openai")`, `spec_from_argument("/ckpt/step-200.pt")`: what the
  CLI and the checkpoint sensor accept. A bare checkpoint file takes its architecture from a
  sidecar `<file stem>.json` holding {"model_name": ...}, else from `default_model`.
- Training's Lightning checkpoint (`<config>/lightning/last.ckpt`) loads too: its `state_dict`
  is the LightningModule's, whose open_clip model sits under `clip.` (training/module.py), and
  its hyper-parameters name the architecture.

`retriever_id` is the one name of a retriever in lineage, the CLI and the UI (it is the
`retrievers` partition key, so it keeps to the project's safe-key rule: letters, digits, '.',
'_' and '-'). `fingerprint` changes when the weights change, so cached gallery
embeddings are never reused for different weights under the same name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pickle
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.open_clip_weights import cached_pretrained_weights
from megapairs_assets.lib.storage import MAX_PARTITION_KEY_CHARS
from megapairs_assets.retriever.fusion import fuse_query, normalize

LOCAL_DIR_PREFIX = "local-dir:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# The folder of a training checkpoint that holds its open_clip export (training/train.py).
TRAINED_EXPORT_DIRNAME = "open_clip"
# What open_clip looks for as weights in a local-dir export.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")
ID_SEPARATOR = "__"
ACCEPTED_RETRIEVERS = (
    "a state dict saved with torch.save (.pt/.pth/.bin) or as .safetensors, open_clip's export "
    "folder (open_clip_config.json + weights), a training checkpoint's folder, or <open_clip "
    "name>@<pretrained tag> with the weights already in the local cache"
)
# open_clip's own download cache for weights published as plain URLs (pretrained.py).
# What torch.load / safetensors / numpy files start with (torch's zip archive, a pickle of
# protocol 2 or later as torch's legacy format writes, numpy's .npy).
_ZIP_MAGIC, _PICKLE_MAGIC, _NPY_MAGIC = b"PK\x03\x04", b"\x80", b"\x93NUMPY"
# What reading a file that is not a state dict raises inside torch.load and open_clip's loader
# (torch's unpickler reports garbage as KeyError/IndexError, an empty dict as StopIteration).
_UNREADABLE_CHECKPOINT = (
    RuntimeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    TypeError,
    EOFError,
    StopIteration,
    OSError,
    pickle.UnpicklingError,
)
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# What Lightning's ModelCheckpoint writes, and where MMRetCLIP keeps its open_clip model.
LIGHTNING_SUFFIX = ".ckpt"
# Where training writes Lightning's checkpoints (`<config>/lightning/last.ckpt`, training/train.py).
LIGHTNING_DIRNAME, LIGHTNING_LAST = "lightning", "last.ckpt"
# File stems and folder names that say nothing about which checkpoint they hold: an id of such
# a file names the folder above too, so `run-a/final/model.pt` and `run-b/final/model.pt` differ.
_GENERIC_STEMS = frozenset(
    {
        "last",
        "best",
        "final",
        "model",
        "checkpoint",
        "weights",
        "state_dict",
        "pytorch_model",
        "open_clip_model",
        "open_clip_pytorch_model",
    }
)
# Folders of one run's checkpoints (Lightning's `.../checkpoints/epoch=3-step=100.ckpt`); a
# shared folder of named models (`models/`) is not one.
_GENERIC_DIRS = frozenset({LIGHTNING_DIRNAME, "checkpoints", "checkpoint", "ckpt"})
_LIGHTNING_VERSION_KEY = "pytorch-lightning_version"
_LIGHTNING_CLIP_PREFIX = "clip."
# How many state-dict keys an error message names before it only counts them.
_KEYS_SHOWN = 3
_ERROR_DETAIL_CHARS = 400
_STATE_DICT_KEYS = re.compile(r"^(Missing|Unexpected) key\(s\) in state_dict: (.*?)\.?\s*$", re.S)


class RetrieverConfigError(ConfigurationError):
    """A retriever that cannot be loaded; the message says what to change."""


@dataclass(frozen=True)
class RetrieverSpec:
    """Which model a retriever is: an open_clip model name plus where its weights come from."""

    model_name: str
    pretrained: str | None = None

    @property
    def retriever_id(self) -> str:
        """A stable, machine-independent name, safe as a partition key and a folder name.

        `<model>__<tag>` for a pretrained tag, `<model>__<folder>.<file stem>` for local weights
        (`<model>` is `local` for an export that does not name its architecture). A training
        config's checkpoint is `<model>__<config>.open_clip` whichever form names it (the
        config's folder, its `open_clip/` export or a weights file in it, its Lightning
        `lightning/last.ckpt`); a file with a generic name (`last.ckpt`, `model.pt`) or in a
        generic folder (`checkpoints/`) is `<model>__<grandparent>.<folder>.<file stem>`.
        """
        if self.model_name.startswith(LOCAL_DIR_PREFIX):
            folder = Path(self.model_name.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
            label = f"{_exported_model_name(folder) or 'local'}{ID_SEPARATOR}{_tail(folder)}"
        elif self.pretrained is None:
            label = f"{self.model_name}{ID_SEPARATOR}random"
        elif _is_local(self.pretrained):
            label = f"{self.model_name}{ID_SEPARATOR}{_tail(Path(self.pretrained).expanduser())}"
        else:
            label = f"{self.model_name}{ID_SEPARATOR}{self.pretrained}"
        safe = _UNSAFE_ID_CHARS.sub("-", label).lstrip("._-")
        return safe[:MAX_PARTITION_KEY_CHARS]

    def fingerprint(self) -> str:
        """Changes whenever the weights behind this spec change (local files: size, mtime)."""
        digest = hashlib.sha256(f"{self.model_name}|{self.pretrained}".encode())
        for path in self._weight_files():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]

    def _weight_files(self) -> list[Path]:
        if self.model_name.startswith(LOCAL_DIR_PREFIX):
            folder = Path(self.model_name.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
            return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        if self.pretrained and _is_local(self.pretrained):
            path = Path(self.pretrained).expanduser()
            return [path] if path.is_file() else []
        return []


def spec_from_argument(argument: str, default_model: str | None = None) -> RetrieverSpec:
    """Read a retriever from the CLI / sensor form.

    - `<open_clip name>` or `<name>@<pretrained tag or checkpoint path>`;
    - a directory holding `open_clip_config.json` (open_clip's export): loaded as local-dir;
    - a training checkpoint's folder: its `open_clip/` export, as above;
    - a checkpoint file: its model name from `<stem>.json` ({"model_name": ...}) beside it,
      else `default_model`.
    """
    path = Path(argument).expanduser()
    if path.is_dir() and (path / TRAINED_EXPORT_DIRNAME / OPEN_CLIP_CONFIG).is_file():
        # A training checkpoint's folder (mmret_clip_checkpoint/<config>): its open_clip export.
        path = path / TRAINED_EXPORT_DIRNAME
    if path.is_dir():
        if not (path / OPEN_CLIP_CONFIG).is_file():
            raise RetrieverConfigError(
                f"{argument} is a directory without {OPEN_CLIP_CONFIG}; point at open_clip's "
                "export (config + weights) or at a checkpoint file"
            )
        return RetrieverSpec(f"{LOCAL_DIR_PREFIX}{path.resolve()}")
    if path.is_file():
        model_name = _sidecar_model_name(path) or _lightning_model_name(path) or default_model
        if model_name is None:
            raise RetrieverConfigError(
                f"{argument}: cannot tell the model architecture; write it as "
                f"<open_clip name>@{argument}, or put {path.stem}.json with "
                '{"model_name": ...} beside the file'
            )
        return RetrieverSpec(model_name, str(path.resolve()))
    name, _, pretrained = argument.partition("@")
    if not name:
        raise RetrieverConfigError(f"{argument!r}: expected <open_clip name>[@<pretrained>]")
    if pretrained and _is_local(pretrained):
        pretrained = str(Path(pretrained).expanduser().resolve())
    return RetrieverSpec(name, pretrained or None)


class Retriever:
    """An open_clip model in eval mode: image projections, text projections, fused queries.

    Every `encode_*` returns float32 numpy arrays; `project_*` return raw (un-normalised)
    projections, which is what fusion needs.
    """

    def __init__(
        self,
        spec: RetrieverSpec,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.spec = spec
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.input_side_px = _preprocessed_side_px(preprocess)

    @property
    def retriever_id(self) -> str:
        return self.spec.retriever_id

    @property
    def dim(self) -> int:
        """Embedding size (the model's joint projection width)."""
        return int(self.project_texts(["dim probe"]).shape[1])

    # -- raw projections ---------------------------------------------------------------------

    def project_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Raw image projections of preprocessed pixels (B, C, H, W)."""
        with torch.inference_mode():
            out = self.model.encode_image(pixels.to(self.device, dtype=self.dtype))
        return out.float().cpu().numpy()

    def project_images(
        self, images: Sequence[Image.Image | str | Path], batch_size: int = 64
    ) -> np.ndarray:
        """Raw image projections of PIL images or image file paths, in input order."""
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = [_as_image(item) for item in images[start : start + batch_size]]
            chunks.append(self.project_pixels(torch.stack([self.preprocess(i) for i in batch])))
        return _stack(chunks)

    def project_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Raw text projections, in input order."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            with torch.inference_mode():
                chunks.append(self.model.encode_text(tokens).float().cpu().numpy())
        return _stack(chunks)

    # -- embeddings --------------------------------------------------------------------------

    def encode_images(
        self, images: Sequence[Image.Image | str | Path], batch_size: int = 64
    ) -> np.ndarray:
        """Candidate (or image-only query) embeddings: normalised image projections."""
        return normalize_rows(self.project_images(images, batch_size))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Text-only query embeddings: normalised text projections."""
        return normalize_rows(self.project_texts(texts, batch_size))

    def encode_queries(
        self,
        images: Sequence[Image.Image | str | Path],
        texts: Sequence[str],
        batch_size: int = 64,
    ) -> np.ndarray:
        """Composed query embeddings: L2-normalise(image projection + text projection)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} query images for {len(texts)} texts")
        return fuse_projections(
            self.project_images(images, batch_size), self.project_texts(texts, batch_size)
        )


def fuse_projections(image_projections: np.ndarray, text_projections: np.ndarray) -> np.ndarray:
    """MMRet's fusion (retriever.fusion.fuse_query) on numpy arrays of raw projections."""
    fused = fuse_query(torch.from_numpy(image_projections), torch.from_numpy(text_projections))
    return fused.numpy().astype(np.float32, copy=False)


def normalize_rows(projections: np.ndarray) -> np.ndarray:
    """A single modality's embedding: its normalised projection (retriever.fusion.normalize)."""
    return normalize(torch.from_numpy(projections)).numpy().astype(np.float32, copy=False)


def load_retriever(
    model_name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype
) -> Retriever:
    """Load a retriever through open_clip's factory, in eval mode on `device` in `dtype`."""
    return load_retriever_spec(RetrieverSpec(model_name, pretrained), device, dtype)


def load_retriever_spec(spec: RetrieverSpec, device: torch.device, dtype: torch.dtype) -> Retriever:
    """`load_retriever` for a spec; refuses random weights and names what to fix."""
    import open_clip

    from megapairs_assets.embeddings.encoders import register_bundled_model_configs

    register_bundled_model_configs()
    local_dir = spec.model_name.startswith(LOCAL_DIR_PREFIX)
    if local_dir:
        folder = Path(spec.model_name.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
        weights = [p for s in WEIGHT_SUFFIXES for p in folder.glob(f"*{s}")]
        if not (folder / OPEN_CLIP_CONFIG).is_file() or not weights:
            # open_clip would build the architecture with random weights and only log it.
            raise RetrieverConfigError(
                f"{folder} needs {OPEN_CLIP_CONFIG} and a weights file "
                f"({', '.join(WEIGHT_SUFFIXES)}) to be loaded as a retriever"
            )
    else:
        if open_clip.get_model_config(spec.model_name) is None:
            if "/" in spec.model_name or spec.model_name.startswith((".", "~")):
                # A path that does not exist reads as a model name: say which one was meant.
                raise RetrieverConfigError(
                    f"no checkpoint directory at {spec.model_name} (and no open_clip model of "
                    "that name); give a trained checkpoint's directory or <name>@<pretrained>"
                )
            raise RetrieverConfigError(
                f"open_clip has no model named {spec.model_name!r}; use a built-in name or add "
                "its config (megapairs_assets/embeddings/model_configs/)"
            )
        if spec.pretrained is None:
            raise RetrieverConfigError(
                f"retriever {spec.model_name!r} has no pretrained weights (random embeddings "
                "score nothing); give a tag or a checkpoint path as <name>@<pretrained>"
            )
        if _is_local(spec.pretrained) and not Path(spec.pretrained).expanduser().is_file():
            raise RetrieverConfigError(f"checkpoint {spec.pretrained} does not exist")
    pretrained, preprocess_overrides = None, {}
    if not local_dir:
        pretrained, preprocess_overrides = _local_pretrained(spec.model_name, spec.pretrained)
    weight_files = weights if local_dir else [Path(pretrained)]
    for path in weight_files:
        check_weights_file(path)
    lightning_state = None if local_dir else _lightning_clip_state(Path(pretrained))
    try:
        if lightning_state is None:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.model_name, pretrained=pretrained, device=device, **preprocess_overrides
            )
        else:
            with _without_random_init_warning():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.model_name, device=device
                )
            model.load_state_dict(lightning_state)
    except torch.OutOfMemoryError:
        raise
    except _UNREADABLE_CHECKPOINT as error:
        files = ", ".join(str(p) for p in weight_files)
        raise RetrieverConfigError(
            f"cannot load retriever {spec.retriever_id} from {files}: "
            f"{load_error_summary(error)}; expected {ACCEPTED_RETRIEVERS}"
        ) from error
    model = model.to(dtype=dtype).eval()
    tokenizer = open_clip.get_tokenizer(spec.model_name)
    return Retriever(spec, model, preprocess, tokenizer, device, dtype)


def check_weights_file(path: Path) -> None:
    """Refuse a file that cannot hold weights before torch reads it (torch's unpickler reports
    a text file as a bare KeyError or IndexError that names neither the file nor the problem)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if path.suffix == ".safetensors":
                size = path.stat().st_size
                header_bytes = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                if 0 < header_bytes <= size - 8 and handle.read(1) == b"{":
                    return
                problem = "not a safetensors file (no JSON header)"
            elif head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)) or (
                path.suffix == ".npy" and head.startswith(_NPY_MAGIC)
            ):
                return
            else:
                problem = "neither a torch.save file (zip or pickle) nor a .safetensors file"
    except OSError as error:
        raise RetrieverConfigError(f"cannot read checkpoint {path}: {error.strerror}") from None
    raise RetrieverConfigError(
        f"{path} is not a retriever checkpoint: {problem}; expected {ACCEPTED_RETRIEVERS}"
    )


def load_error_summary(error: BaseException) -> str:
    """`error` in one line of bounded length: torch's state-dict mismatch (which lists every
    key, kilobytes for a real model) becomes counts with a few example keys each."""
    text = str(error)
    if "Error(s) in loading state_dict" not in text:
        text = " ".join(text.split())
        if len(text) > _ERROR_DETAIL_CHARS:
            text = text[:_ERROR_DETAIL_CHARS] + "..."
        return f"{type(error).__name__}: {text}"
    header, *parts = text.split("\n\t")
    keys: dict[str, list[str]] = {}
    size_mismatches = [p.strip() for p in parts if p.startswith("size mismatch for ")]
    for part in parts:
        match = _STATE_DICT_KEYS.match(part.strip())
        if match:
            keys[match.group(1).lower()] = re.findall(r'"([^"]+)"', match.group(2))
    summary = [
        f"{len(names)} {kind} keys ({_examples(names)})" for kind, names in keys.items() if names
    ]
    if size_mismatches:
        summary.append(
            f"{len(size_mismatches)} of a different shape ({size_mismatches[0].rstrip('.')}"
            f"{', ...' if len(size_mismatches) > 1 else ''})"
        )
    prefix = _extra_key_prefix(keys.get("missing", []), keys.get("unexpected", []))
    if prefix:
        summary.append(
            f"every checkpoint key has an extra {prefix!r} prefix: a training module's "
            "state, not open_clip weights; pass the training checkpoint's folder or its "
            "open_clip export"
        )
    return f"{header.strip().rstrip(':')}: {'; '.join(summary) or 'keys do not match'}"


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_KEYS_SHOWN])
    return f"{shown}, ..." if len(names) > _KEYS_SHOWN else shown


def _extra_key_prefix(missing: Sequence[str], unexpected: Sequence[str]) -> str | None:
    """The prefix (`clip.`, `model.`) that turns every missing key into an unexpected one."""
    if not missing or len(unexpected) < len(missing):
        return None
    first = next((u for u in unexpected if u.endswith("." + missing[0])), None)
    if first is None:
        return None
    prefix = first.removesuffix(missing[0])
    return prefix if {prefix + m for m in missing} <= set(unexpected) else None


def _read_lightning_checkpoint(path: Path) -> dict | None:
    """A Lightning checkpoint's contents (tensors memory-mapped), or None if `path` is not one."""
    if path.suffix != LIGHTNING_SUFFIX or not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except _UNREADABLE_CHECKPOINT:
        return None  # reported by the loader, with what to give instead
    if not isinstance(checkpoint, dict) or _LIGHTNING_VERSION_KEY not in checkpoint:
        return None
    return checkpoint


def _lightning_model_name(path: Path) -> str | None:
    """The architecture a Lightning checkpoint was trained as: its hyper-parameters', else the
    open_clip export beside it (`<config>/lightning/last.ckpt` next to `<config>/open_clip/`)."""
    checkpoint = _read_lightning_checkpoint(path)
    if checkpoint is None:
        return None
    hyper_parameters = checkpoint.get("hyper_parameters")
    name = hyper_parameters.get("model_name") if isinstance(hyper_parameters, dict) else None
    return str(name) if name else _exported_model_name(path.parent.parent / TRAINED_EXPORT_DIRNAME)


def _lightning_clip_state(path: Path) -> dict[str, torch.Tensor] | None:
    """The open_clip state dict inside a Lightning training checkpoint (the LightningModule's
    keys without `clip.`), or None when `path` is not a Lightning checkpoint."""
    checkpoint = _read_lightning_checkpoint(path)
    if checkpoint is None:
        return None
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise RetrieverConfigError(f"{path} is a Lightning checkpoint without a state_dict")
    others = [k for k in state if not k.startswith(_LIGHTNING_CLIP_PREFIX)]
    if others:
        raise RetrieverConfigError(
            f"{path} is a Lightning training checkpoint of a module other than MMRet-CLIP "
            f"({len(others)} keys outside {_LIGHTNING_CLIP_PREFIX!r}, e.g. {_examples(others)}); "
            f"pass the training checkpoint's folder or its exported open_clip weights"
        )
    return {k.removeprefix(_LIGHTNING_CLIP_PREFIX): v for k, v in state.items()}


class _RandomInitFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warning (logged on the root logger) while a
    model is built whose weights are loaded right after, from a Lightning checkpoint."""
    root, quiet = logging.getLogger(), _RandomInitFilter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _local_pretrained(model_name: str, pretrained: str) -> tuple[str, dict]:
    """(a local weights file, preprocessing overrides) for `<model_name>@<pretrained>`: a path
    as it is, a tag from the local caches only (`lib.open_clip_weights`)."""
    if _is_local(pretrained):
        return str(Path(pretrained).expanduser()), {}
    path, overrides = cached_pretrained_weights(model_name, pretrained)
    return str(path), overrides


def _sidecar_model_name(checkpoint: Path) -> str | None:
    sidecar = checkpoint.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        name = json.loads(sidecar.read_text(encoding="utf-8")).get("model_name")
    except (ValueError, AttributeError):
        raise RetrieverConfigError(f"{sidecar} is not a JSON object with a model_name") from None
    return str(name) if name else None


def _exported_model_name(folder: Path) -> str | None:
    """The architecture name an export records beside open_clip's keys, if it does."""
    try:
        config = json.loads((folder / OPEN_CLIP_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("model_name") if isinstance(config, dict) else None
    return str(name) if name else None


def _is_local(pretrained: str) -> bool:
    # An open_clip tag is a bare word (`openai`, `laion2b_s34b_b79k`); a path has a separator
    # or a file suffix, or exists.
    return (
        "/" in pretrained
        or pretrained.startswith((".", "~"))
        or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}
        or Path(pretrained).expanduser().exists()
    )


def _tail(path: Path) -> str:
    """The folder names and file stem that name a checkpoint on any machine (see `_id_label`).

    A training config's export, its weights file and its Lightning `last.ckpt` are one
    checkpoint, so all three read `<config>.open_clip`; a file or folder whose own name or
    folder says nothing (`last.ckpt`, `model.pt`, `checkpoints/`) also names the folder above.
    """
    stem = path.stem if path.suffix else path.name
    parent = path.parent
    if parent.name == LIGHTNING_DIRNAME and path.name == LIGHTNING_LAST:
        # training/train.py keeps `last.ckpt` at the exported weights' state (FinalCheckpoint).
        return f"{parent.parent.name}.{TRAINED_EXPORT_DIRNAME}"
    if path.suffix and parent.name == TRAINED_EXPORT_DIRNAME:
        return f"{parent.parent.name}.{TRAINED_EXPORT_DIRNAME}"  # the export's weights file
    if path.suffix and (stem.lower() in _GENERIC_STEMS or parent.name.lower() in _GENERIC_DIRS):
        return f"{parent.parent.name}.{parent.name}.{stem}"
    return f"{parent.name}.{stem}"


def _as_image(item: Image.Image | str | Path) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as image:
        return image.convert("RGB")


def _stack(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


def _preprocessed_side_px(preprocess: Callable[[Image.Image], torch.Tensor]) -> int:
    probe = Image.new("RGB", (97, 89), (127, 127, 127))
    return int(max(preprocess(probe).shape[-2:]))

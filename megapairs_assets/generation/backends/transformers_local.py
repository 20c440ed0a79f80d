"""Local transformers models, batched, on CPU or GPU.

Text-only models load with `AutoModelForCausalLM` and their tokenizer's chat template;
vision-language models (`kind="image_text_to_text"`) with `AutoModelForImageTextToText` and
their processor, which places the two images where the template puts them. Requests are
grouped by sampling settings and sorted by prompt length so a batch wastes little padding.

A GGUF file (such as the demo's SmolLM2) is dequantised by transformers on the first load,
which is slow (about 30 s); the result is saved once with `save_pretrained` into a per-user
cache shared by every home (see `ensure_converted_gguf`) and later loads read that copy.
Sampling (temperature > 0) seeds torch from the batch's request seeds, so a given batch is
reproducible; greedy decoding (the demo) is reproducible whatever the batching.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megapairs_assets.corpus.images import ImageRejected
from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationRequest,
    GenerationResult,
    ResultCallback,
    register_backend,
)
from megapairs_assets.generation.backends.images import has_images, load_image
from megapairs_assets.lib.progress import quiet_library_progress

TRANSFORMERS_BACKEND = "transformers"
KINDS = ("causal_lm", "image_text_to_text")
_CONVERTED_MARKER = "megapairs-converted.json"
# Part of the converted copy's cache key: bump it when `_convert_gguf` changes what it writes.
CONVERTER_VERSION = 1
logger = logging.getLogger(__name__)


@dataclass
class TransformersOptions:
    """Options of the `transformers` backend (BackendSpec.options).

    model_path: a local `save_pretrained` folder, or the folder holding `gguf_file`.
    converted_dir: where a dequantised GGUF model is saved when the per-user cache cannot be
        written (required with gguf_file; its folder name also names the cached copy).
    """

    model_path: str
    kind: str = "causal_lm"
    gguf_file: str | None = None
    converted_dir: str | None = None
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    image_side_px: int | None = 448
    num_threads: int | None = None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> TransformersOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"transformers: unknown options {unknown}; known: {sorted(known)}")
        parsed = cls(**dict(options))
        if parsed.kind not in KINDS:
            raise ValueError(f"transformers: kind must be one of {KINDS}, got {parsed.kind!r}")
        if parsed.gguf_file and not parsed.converted_dir:
            raise ValueError("transformers: gguf_file needs converted_dir (the saved copy)")
        if parsed.batch_size < 1:
            raise ValueError("transformers: batch_size must be >= 1")
        return parsed


@contextmanager
def _quiet_gguf_conversion() -> Iterator[None]:
    """transformers' GGUF loader draws its own tqdm bar (not behind its progress-bar switch);
    the one-time conversion is reported by our log line instead."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def converted_cache_root() -> Path:
    """The per-user folder of converted GGUF models, shared by every home of the user:
    `$XDG_CACHE_HOME/megapairs/converted`, else `~/.cache/megapairs/converted`."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return Path(base or Path.home() / ".cache").expanduser() / "megapairs" / "converted"


def ensure_converted_gguf(
    model_dir: Path, gguf_file: str, converted_dir: Path, cache_root: Path | None = None
) -> Path:
    """The folder of a GGUF model dequantised to float32 (`save_pretrained`), converting once.

    The copy lives in the per-user cache (`cache_root`, default `converted_cache_root()`),
    named by a digest of the GGUF file's bytes and of the converter (this code's
    `CONVERTER_VERSION` and the transformers version), so every home of the user shares one
    copy and a changed source or converter makes a new one. Where the cache cannot be written
    (a read-only home directory), the copy goes to `converted_dir` (the home's own folder).

    A copy is used only after it is verified: its marker names the same digest and every file
    it lists has the recorded size and sha256; a damaged or truncated copy is converted again.
    Conversion writes into a staging folder and renames it into place under a file lock, so
    processes converting at once never see, or leave, a partial copy.
    """
    source = (Path(model_dir) / gguf_file).resolve()
    key = _conversion_key(source)
    name = f"{Path(converted_dir).name}-{_digest(key)[:16]}"
    shared = Path(cache_root) if cache_root is not None else converted_cache_root()
    candidates = [shared / name, Path(converted_dir)]
    for candidate in candidates:
        if _verified(candidate, key):
            _remove_legacy_copy(Path(converted_dir), keep=candidate)
            return candidate

    def convert(staging: Path) -> None:
        _convert_gguf(Path(model_dir), gguf_file, staging)

    try:
        target = _convert_into(shared / name, key, convert)
    except OSError as error:  # no cache folder for this user: the home keeps its own copy
        logger.warning(
            "cannot write the converted model to the shared cache %s (%s); converting into %s",
            shared,
            error,
            converted_dir,
        )
        return _convert_into(Path(converted_dir), key, convert)
    _remove_legacy_copy(Path(converted_dir), keep=target)
    return target


def _conversion_key(source: Path) -> dict[str, Any]:
    """What the converted copy depends on: the GGUF bytes and the converter."""
    import transformers

    return {
        "source_sha256": _file_sha256(source),
        "gguf_file": source.name,
        "converter": CONVERTER_VERSION,
        "transformers": transformers.__version__,
        "dtype": "float32",
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, hashed once per file version on this machine (the embedding
    weights' digest cache, keyed by path, size, mtime, ctime and inode: a rewritten file,
    even one of the same size, is hashed again)."""
    from megapairs_assets.embeddings.weights import file_digest

    return file_digest(path)


def _file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under `folder` (but the marker): its size and sha256."""
    return {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": _file_sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != _CONVERTED_MARKER
    }


def _verified(folder: Path, key: Mapping[str, Any]) -> bool:
    """Whether `folder` holds a complete, undamaged conversion for `key` (see the marker)."""
    try:
        marker = json.loads((folder / _CONVERTED_MARKER).read_text())
        files = marker["files"]
        if marker.get("key") != key or not files:
            return False
        for relative, expected in files.items():
            path = folder / relative
            if path.stat().st_size != expected["size"] or _file_sha256(path) != expected["sha256"]:
                logger.warning("converted model %s is damaged (%s); converting again", folder, path)
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def _convert_into(target: Path, key: Mapping[str, Any], convert: Any) -> Path:
    """Convert into `target` unless another process did meanwhile (under a file lock)."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _verified(target, key):
            return target
        # Whoever holds the lock is the only converter: staging folders left now were
        # abandoned by killed processes (each ~0.5 GB).
        for leftover in target.parent.glob(f".{target.name}.*"):
            _remove_tree(leftover)
        # mkdir (not mkdtemp, which makes it private) so the copy gets the usual permissions.
        staging = target.parent / f".{target.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            started = time.perf_counter()
            logger.info("converting %s once (about 30 s) into %s", key["gguf_file"], target)
            convert(staging)
            marker = {"key": dict(key), "files": _file_manifest(staging)}
            (staging / _CONVERTED_MARKER).write_text(json.dumps(marker, indent=1))
            if target.exists():  # a damaged or out-of-date copy: out of the way first
                aside = target.with_name(f".{target.name}.damaged-{os.getpid()}")
                target.rename(aside)
                _remove_tree(aside)
            staging.rename(target)
            logger.info("converted %s in %.1f s", key["gguf_file"], time.perf_counter() - started)
        finally:
            if staging.exists():
                _remove_tree(staging)
        # Verified at its final path now, so the digests of its files are remembered under that
        # path and later processes check it without hashing 0.5 GB again.
        if not _verified(target, key):
            raise OSError(f"the converted copy at {target} did not verify after it was written")
    return target


def _convert_gguf(model_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantise the GGUF model and save the float32 copy (and its tokenizer) in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_library_progress(), _quiet_gguf_conversion():
        tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, gguf_file=gguf_file, dtype=torch.float32
        )
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although
    # its weights are already plain float tensors; drop the marks to save the float copy.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with quiet_library_progress():
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def _remove_legacy_copy(converted_dir: Path, keep: Path) -> None:
    """Remove a home's own converted copy written before the shared cache (its marker names
    the source file's path, size and mtime): the shared copy replaces it (about 0.5 GB)."""
    if converted_dir == keep or not converted_dir.is_dir():
        return
    try:
        marker = json.loads((converted_dir / _CONVERTED_MARKER).read_text())
    except (OSError, ValueError):
        return
    if isinstance(marker, dict) and {"source", "size", "mtime_ns"} <= set(marker):
        from filelock import FileLock

        with FileLock(str(converted_dir) + ".lock"):  # the lock the older code converted under
            _remove_tree(converted_dir)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@register_backend(TRANSFORMERS_BACKEND)
class TransformersBackend:
    """Batched local generation with transformers (model loads on first use)."""

    name = TRANSFORMERS_BACKEND

    def __init__(self, spec: BackendSpec) -> None:
        self.model_id = spec.model_id
        self.options = TransformersOptions.from_mapping(spec.options)
        self.accepts_images = self.options.kind == "image_text_to_text"
        self._model: Any = None
        self._processor: Any = None  # tokenizer (text) or processor (vision-language)
        self.load_s = 0.0

    @classmethod
    def from_loaded(
        cls, spec: BackendSpec, model: Any, processor: Any, device: str
    ) -> TransformersBackend:
        """A backend around a model already in memory (benchmarks on random weights)."""
        backend = cls(spec)
        backend._model = model.eval()
        backend._processor = processor
        backend._device = device
        return backend

    # -- loading ---------------------------------------------------------------------------

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        started = time.perf_counter()
        options = self.options
        if options.num_threads:
            torch.set_num_threads(options.num_threads)
        path = Path(options.model_path)
        if options.gguf_file:
            path = ensure_converted_gguf(path, options.gguf_file, Path(options.converted_dir))
        device = options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = _resolve_dtype(options.dtype, device)
        if options.kind == "causal_lm":
            self._processor = AutoTokenizer.from_pretrained(path)
            self._processor.padding_side = "left"
            if self._processor.pad_token is None:
                self._processor.pad_token = self._processor.eos_token
            with quiet_library_progress():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            self._processor = AutoProcessor.from_pretrained(path)
            self._processor.tokenizer.padding_side = "left"
            with quiet_library_progress():
                model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        self._model = model.to(device).eval()
        self._device = device
        self.load_s = time.perf_counter() - started

    @property
    def _tokenizer(self) -> Any:
        return getattr(self._processor, "tokenizer", self._processor)

    # -- generation ------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest], on_result: ResultCallback) -> None:
        """Generate in batches of `batch_size`; each batch's results are reported together."""
        if not requests:
            return
        runnable = []
        refused = []
        for request in requests:
            if has_images(request.messages) and not self.accepts_images:
                refused.append(self._failed(request, "model takes no image input", 0.0))
            else:
                runnable.append(request)
        if refused:
            on_result(refused)
        if not runnable:
            return
        self._load()
        for batch in self._batches(runnable):
            started = time.perf_counter()
            try:
                results = self._generate_batch(batch)
            except ImageRejected as error:
                results = [self._failed(r, f"image: {error}", 0.0) for r in batch]
            except (RuntimeError, ValueError) as error:  # OOM, shape errors: fail this batch
                logger.warning("transformers batch failed: %s", error)
                results = [self._failed(r, f"{type(error).__name__}: {error}", 0.0) for r in batch]
            latency = (time.perf_counter() - started) / max(len(batch), 1)
            on_result([_with_latency(result, latency) for result in results])

    def _batches(self, requests: Sequence[GenerationRequest]) -> list[list[GenerationRequest]]:
        groups: dict[tuple[Any, ...], list[GenerationRequest]] = {}
        for request in requests:
            groups.setdefault(tuple(sorted(request.sampling.as_dict().items())), []).append(request)
        batches = []
        for group in groups.values():
            group.sort(key=_prompt_size)
            size = self.options.batch_size
            batches += [group[i : i + size] for i in range(0, len(group), size)]
        return batches

    def _encode(self, batch: Sequence[GenerationRequest]) -> Any:
        if self.options.kind == "causal_lm":
            texts = [
                self._tokenizer.apply_chat_template(
                    _text_messages(r.messages), tokenize=False, add_generation_prompt=True
                )
                for r in batch
            ]
            return self._tokenizer(
                texts, return_tensors="pt", padding=True, add_special_tokens=False
            )
        conversations = [
            _vision_messages(r.messages, r.images, self.options.image_side_px) for r in batch
        ]
        return self._processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        )

    def _generate_batch(self, batch: Sequence[GenerationRequest]) -> list[GenerationResult]:
        import torch

        encoded = self._encode(batch).to(self._device)
        sampling = batch[0].sampling
        tokenizer = self._tokenizer
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_tokens,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if sampling.temperature > 0:
            torch.manual_seed(sum(r.seed for r in batch) % (2**31 - 1))
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            output = self._model.generate(**encoded, **kwargs)
        prompt_width = encoded["input_ids"].shape[1]
        generated = output[:, prompt_width:].cpu()
        stop_ids = _stop_token_ids(self._model, tokenizer)
        prompt_tokens = encoded["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, request in enumerate(batch):
            tokens = generated[row].tolist()
            end = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
            kept = tokens if end is None else tokens[:end]
            results.append(
                GenerationResult(
                    key=request.key,
                    text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                    prompt_tokens=int(prompt_tokens[row]),
                    completion_tokens=len(kept) + (0 if end is None else 1),
                    finish_reason="length" if end is None else "stop",
                    model_id=self.model_id,
                )
            )
        return results

    def _failed(self, request: GenerationRequest, message: str, latency: float) -> GenerationResult:
        return GenerationResult(
            key=request.key, error=message, latency_s=latency, model_id=self.model_id
        )

    def close(self) -> None:
        self._model = None
        self._processor = None


def _with_latency(result: GenerationResult, latency: float) -> GenerationResult:
    from dataclasses import replace

    return replace(result, latency_s=latency)


def _resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return getattr(torch, name)
    except AttributeError:
        raise ValueError(f"transformers: unknown dtype {name!r}") from None


def _stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if tokenizer.pad_token_id is not None:
        ids.add(int(tokenizer.pad_token_id))
    return ids


def _prompt_size(request: GenerationRequest) -> int:
    return sum(len(json.dumps(m["content"])) for m in request.messages)


def _text_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rendered = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = "\n".join(p["text"] for p in content if p.get("type") == "text")
        rendered.append({"role": message["role"], "content": content})
    return rendered


def _vision_messages(
    messages: Sequence[Mapping[str, Any]], images: Mapping[str, Any], side_px: int | None
) -> list[dict[str, Any]]:
    rendered = []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        if not isinstance(content, str):
            for part in content:
                if part.get("type") == "image":
                    parts.append(
                        {"type": "image", "image": load_image(images[part["ref"]], side_px)}
                    )
                else:
                    parts.append({"type": "text", "text": part["text"]})
        rendered.append({"role": message["role"], "content": parts})
    return rendered

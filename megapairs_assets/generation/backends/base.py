"""What every generation backend takes and gives, and the registry they are found in by name.

A backend turns `GenerationRequest`s (chat messages, symbolic image parts, sampling settings)
into `GenerationResult`s, handing each finished batch to `on_result` as soon as it is done, in
any order (a batch may be a single result).
Transient trouble (a 429, a timeout) is the backend's to retry; what is still failing when it
gives up comes back as a result with `error` set, never as an exception, so one bad request
never costs the others. Construction must be cheap: models load on the first `generate`, so a
fully cached run never loads one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

ResultCallback = Callable[[Sequence["GenerationResult"]], None]
"""Receives finished results, one call per batch the backend completed (often one result)."""


@dataclass(frozen=True)
class RetryEvent:
    """One failed try that a backend is about to retry (after `wait_s` seconds).

    `attempt` is the try that failed, of `max_attempts`; `kind` groups errors for a summary
    ("connection", "timeout", "HTTP 503", "malformed response"); `error` is the full message.
    """

    attempt: int
    max_attempts: int
    wait_s: float
    kind: str
    error: str
    url: str


RetryCallback = Callable[[RetryEvent], None]
"""Told about every retry; a backend that retries has an `on_retry` attribute the caller sets."""


@dataclass(frozen=True)
class ImageInput:
    """An image a request refers to: where its bytes are and what they hash to."""

    uri: str
    content_hash: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings sent with every request (part of its key). temperature 0 = greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling: temperature={self.temperature}, top_p={self.top_p}")

    def as_dict(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}


@dataclass(frozen=True)
class GenerationRequest:
    """One model call.

    `messages` are OpenAI-shaped chat messages whose image parts are symbolic
    (`{"type": "image", "ref": name}`), resolved through `images`; they may be left empty with
    a `render` function that builds them, called only if the request is actually sent.
    `inputs` are the structured values the prompt was rendered from (they, not the rendered
    text, enter the key, together with the template hash); rule-based backends read them.
    """

    key: str
    step: str
    messages: Sequence[Mapping[str, Any]]
    sampling: SamplingParams
    seed: int
    images: Mapping[str, ImageInput] = field(default_factory=dict)
    inputs: Mapping[str, Any] = field(default_factory=dict)
    # Builds `messages` when they are left empty: rendering prompts (five demonstrations each)
    # is skipped for the requests the cache answers.
    render: Callable[[], Sequence[Mapping[str, Any]]] | None = field(
        default=None, compare=False, repr=False
    )

    def rendered(self) -> GenerationRequest:
        """This request with its messages built (itself if they already are)."""
        if self.messages or self.render is None:
            return self
        return replace(self, messages=self.render(), render=None)


@dataclass(frozen=True)
class GenerationResult:
    """What came back for one request: text and token counts, or the last error."""

    key: str
    text: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    latency_s: float = 0.0
    model_id: str | None = None


def request_key(
    model_id: str,
    template_hash: str,
    inputs: Mapping[str, Any],
    sampling: SamplingParams,
    seed: int,
    served_model: str | None = None,
) -> str:
    """sha256 over (model id, template hash, inputs, sampling parameters, seed), canonical JSON,
    and the served model name when it differs from the model id (`BackendSpec.served_model`).

    The served name is what a server is asked for, so it is what answers: a stand-in model
    served under another name for a rehearsal gets keys of its own, and its answers are never
    reused for the real model (the cache is mirrored to the data root). Without a served name
    the key is what it always was, so existing caches stay valid. Where the server runs (URLs,
    replicas) and its API key are not in the key.
    """
    payload: dict[str, Any] = {
        "model_id": model_id,
        "template_hash": template_hash,
        "inputs": inputs,
        "sampling": sampling.as_dict(),
        "seed": seed,
    }
    if served_model and served_model != model_id:
        payload["served_model"] = served_model
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class GenerationBackend(Protocol):
    """The one interface of every backend (see the module docstring)."""

    name: str
    model_id: str
    accepts_images: bool

    def generate(self, requests: Sequence[GenerationRequest], on_result: ResultCallback) -> None:
        """Run the requests; pass every result to `on_result` exactly once, as batches finish."""
        ...

    def close(self) -> None:
        """Release models, pools and processes (idempotent)."""
        ...


@dataclass(frozen=True)
class BackendSpec:
    """Which backend, which model, and the backend's own options (from the profile).

    `model_id` is the one id used in request keys, lineage and the UI (a request key also
    holds `served_model`, the name a server is asked for, when that differs); `label` is what
    rows name as their generator ("SmolLM2-135M-Instruct"); `options` are backend-specific
    (base URLs, batch size, local model path...), documented on each backend class.
    """

    backend: str
    model_id: str
    label: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        return self.label or self.model_id

    @property
    def served_model(self) -> str | None:
        """The name the backend asks its server for when that is not `model_id` (the
        `served_model` option of `openai_http`); None when it asks for `model_id` itself."""
        served = str(self.options.get("served_model") or "").strip()
        return served if served and served != self.model_id else None


BackendFactory = Callable[[BackendSpec], GenerationBackend]
_REGISTRY: dict[str, BackendFactory] = {}


class UnknownBackendError(KeyError):
    """A profile named a backend that is not registered."""


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Class or function decorator adding a backend factory to the registry under `name`."""

    def decorate(factory: BackendFactory) -> BackendFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"backend {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def registered_backends() -> list[str]:
    """Names of the registered backends (after `backends` has been imported)."""
    return sorted(_REGISTRY)


_SHARED: dict[str, GenerationBackend] = {}


def shared_backend(spec: BackendSpec) -> GenerationBackend:
    """One backend per spec per process: a step covering many shards loads its model once.

    Backends hold no per-shard state (results go to the caller's callback), so sharing is
    safe within a process; `close_shared_backends` releases them.
    """
    key = json.dumps(
        [spec.backend, spec.model_id, spec.label, dict(spec.options)], sort_keys=True, default=str
    )
    if key not in _SHARED:
        _SHARED[key] = create_backend(spec)
    return _SHARED[key]


def close_shared_backends() -> None:
    """Release every shared backend (models, processes)."""
    for backend in _SHARED.values():
        backend.close()
    _SHARED.clear()


def create_backend(spec: BackendSpec) -> GenerationBackend:
    """Build the backend a spec names (cheap: no model is loaded yet)."""
    try:
        factory = _REGISTRY[spec.backend]
    except KeyError:
        raise UnknownBackendError(
            f"unknown generation backend {spec.backend!r}; known: {registered_backends()}"
        ) from None
    return factory(spec)

"""Generation backends behind one interface, found by name in a registry.

Importing this package registers the built-in backends: `openai_http`, `transformers`,
`vllm` and `heuristic`. Another backend registers itself with `@register_backend("name")`.
Heavy libraries (torch, transformers) load only when a backend first generates.
"""

from megapairs_assets.generation.backends import (  # noqa: F401  (imported to register)
    heuristic,
    openai_http,
    transformers_local,
    vllm_subprocess,
)
from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    ImageInput,
    SamplingParams,
    UnknownBackendError,
    close_shared_backends,
    create_backend,
    register_backend,
    registered_backends,
    request_key,
    shared_backend,
)

__all__ = [
    "BackendSpec",
    "GenerationBackend",
    "GenerationRequest",
    "GenerationResult",
    "ImageInput",
    "SamplingParams",
    "UnknownBackendError",
    "close_shared_backends",
    "create_backend",
    "register_backend",
    "registered_backends",
    "request_key",
    "shared_backend",
]

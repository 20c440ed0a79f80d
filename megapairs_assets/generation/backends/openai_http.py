"""Any OpenAI-compatible chat server: `vllm serve`, `transformers serve`, a hosted API.

Connection pooling and HTTP come from httpx2 (the maintained successor of httpx, already
installed with huggingface_hub; httpx 0.28's pool spends most of the client's CPU on
bookkeeping with many connections open), retries from tenacity; this module only says what is
worth retrying and for how long:

- many requests in flight (`max_in_flight`, bounded by a semaphore and the pool size), spread
  round-robin over `base_urls` (one per replica; a retry moves on to the next replica);
- a total deadline per request (`request_timeout_s`) on top of httpx's per-phase timeouts;
- retried, with exponential backoff and full jitter: 429, any 5xx, timeouts, connection
  errors and resets, and bodies that are not a chat completion. A `Retry-After` header
  (seconds or an HTTP date) replaces the backoff for that wait, capped at `retry_after_max_s`;
- not retried: other 4xx (a bad request stays bad), unreadable images;
- the API key is read from the environment variable named by `api_key_env`, never from config.

Images travel as base64 JPEG data URLs, longer side resized to `image_side_px`; encoding
runs in worker threads so the event loop keeps every connection busy.

`probe_servers` asks each server for its model list (`GET <base_url>/models`) before any
request, so a server that is down, a URL missing `/v1`, a refused key or a model served under
another name is one clear error at the start of a step, not every request failing.
`probe_image_input` then asks a server that must see images whether it does: a text-only
model behind an OpenAI-compatible server may drop image parts without an error (`transformers
serve` does) and describe pictures it never saw. A server that does not answer that in time
(one loading its model on a CPU) is checked on its first answer instead, before any answer
with pictures is handed on (`ImageCheckOnFirstAnswer`).

The model asked for is `served_model` (default: the spec's model id); when it differs from
the model id it is part of every request key (`base.request_key`), so answers of one served
model are never reused for another. Base URLs and the API key are not: moving a server or
changing its key keeps every cached answer.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cache
from typing import Any

import httpx2
import tenacity
from PIL import Image

from megapairs_assets.corpus.images import ImageRejected
from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationRequest,
    GenerationResult,
    ResultCallback,
    RetryCallback,
    RetryEvent,
    register_backend,
)
from megapairs_assets.generation.backends.images import has_images, openai_messages
from megapairs_assets.lib.errors import ConfigurationError

OPENAI_HTTP_BACKEND = "openai_http"
# ServerProblem.kind of a picture check that cannot be made: the server reports no token
# counts (a warning, never a failure).
IMAGE_CHECK_SKIPPED = "image_check_skipped"
# ServerProblem.kind of a picture check the server did not answer in time: it is made on the
# step's first answer instead (`ImageCheckOnFirstAnswer`).
IMAGE_CHECK_DEFERRED = "image_check_deferred"
_BODY_SNIPPET_CHARS = 200
# How a failed connection's message starts (`failed_calls_fix` looks for it in a step's last
# error to name the setting that holds the URL).
_CONNECTION_TO = "connection to"
# Pause between tries of the picture check's first request (a server still starting or
# loading its model refuses connections or answers 5xx).
_PROBE_RETRY_PAUSE_S = 2.0


class RetryableError(Exception):
    """A failure worth another try; `retry_after_s` is the server's requested wait, if any.

    `kind` groups it for the retry log ("connection", "timeout", "HTTP 503", "malformed
    response"); `url` is where the try went.
    """

    def __init__(
        self,
        message: str,
        retry_after_s: float | None = None,
        kind: str = "error",
        url: str = "",
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.kind = kind
        self.url = url


class PermanentError(Exception):
    """A failure that another try would repeat (4xx other than 429, bad image)."""


class ImageInputError(ConfigurationError):
    """A server's model drops the pictures a step sends it, found on its first answer (see
    `ImageCheckOnFirstAnswer`); the message says what to change."""


@dataclass(frozen=True)
class ImageCheckOnFirstAnswer:
    """The picture check that `probe_image_input` could not make in time, made instead on each
    listed server's first answer to a request with pictures.

    That request is sent again without its pictures (one token): a model that reads them
    counted more prompt tokens with them. Until a server's verdict is in, its answers with
    pictures wait (none is handed on); when it drops them, `generate` raises `ImageInputError`
    with `error(problem)` as its message and none of them is handed on, so no description of
    pictures the model never saw is cached. A server whose answers carry no token counts
    cannot be judged: `warn(problem)` is told, and its answers go on.
    """

    base_urls: frozenset[str]
    error: Callable[[ServerProblem], str]
    warn: Callable[[ServerProblem], None]


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class _RetryAfterOrBackoff(tenacity.wait.wait_base):
    """tenacity wait: the server's Retry-After when it sent one, else the fallback backoff."""

    def __init__(self, fallback: tenacity.wait.wait_base, max_retry_after_s: float) -> None:
        self.fallback = fallback
        self.max_retry_after_s = max_retry_after_s

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, RetryableError) and error.retry_after_s is not None:
            return min(error.retry_after_s, self.max_retry_after_s)
        return self.fallback(retry_state)


@dataclass
class HttpOptions:
    """Options of the `openai_http` backend (BackendSpec.options)."""

    base_urls: list[str]
    served_model: str | None = None
    api_key_env: str | None = None
    max_in_flight: int = 32
    request_timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    max_retries: int = 6
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0
    image_side_px: int | None = 448
    extra_body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> HttpOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"openai_http: unknown options {unknown}; known: {sorted(known)}")
        parsed = cls(**dict(options))
        if isinstance(parsed.base_urls, str):
            parsed.base_urls = [parsed.base_urls]
        if not parsed.base_urls:
            raise ValueError("openai_http needs at least one base URL")
        if parsed.max_in_flight < 1 or parsed.max_retries < 0:
            raise ValueError("openai_http: max_in_flight >= 1 and max_retries >= 0 required")
        return parsed


@register_backend(OPENAI_HTTP_BACKEND)
class OpenAIHttpBackend:
    """Chat completions over HTTP against one or more OpenAI-compatible servers.

    `retries` counts every retry since construction; `on_retry`, when set (the runner sets
    it for each `generate`), is told about each one as it is scheduled. A result's `model_id`
    is the model the server says answered (the response's `model` field), so rows can record
    what actually wrote them even when `served_model` names something other than `model_id`.
    `image_check`, when set (by the generation resource, after a picture probe that got no
    answer in time), checks the first answers with pictures (`ImageCheckOnFirstAnswer`).
    `wait_target` and `request_timeout_s` say what a run waits on (the runner's heartbeat).
    """

    name = OPENAI_HTTP_BACKEND
    accepts_images = True

    def __init__(self, spec: BackendSpec) -> None:
        self.model_id = spec.model_id
        self.options = HttpOptions.from_mapping(spec.options)
        self.served_model = spec.served_model or spec.model_id
        self._urls = [url.rstrip("/") + "/chat/completions" for url in self.options.base_urls]
        self._next_start = itertools.count()
        self.retries = 0
        self.on_retry: RetryCallback | None = None
        self.image_check: ImageCheckOnFirstAnswer | None = None
        self.wait_target = ", ".join(url.rstrip("/") for url in self.options.base_urls)
        self.request_timeout_s = self.options.request_timeout_s
        self._api_key = self._read_api_key()

    def _read_api_key(self) -> str | None:
        name = self.options.api_key_env
        if not name:
            return None
        key = os.environ.get(name)
        if not key:
            raise ValueError(f"openai_http: environment variable {name} (api_key_env) is not set")
        return key

    def generate(self, requests: Sequence[GenerationRequest], on_result: ResultCallback) -> None:
        """Run all requests with up to `max_in_flight` at once; results as they complete."""
        if requests:
            asyncio.run(self._run_all(requests, on_result))

    def close(self) -> None:
        return None

    async def _run_all(
        self, requests: Sequence[GenerationRequest], on_result: ResultCallback
    ) -> None:
        options = self.options
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        limits = httpx2.Limits(
            max_connections=options.max_in_flight, max_keepalive_connections=options.max_in_flight
        )
        timeout = httpx2.Timeout(options.request_timeout_s, connect=options.connect_timeout_s)
        in_flight = asyncio.Semaphore(options.max_in_flight)
        verdicts: dict[str, asyncio.Task[ServerProblem | None]] = {}
        async with httpx2.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:

            async def run_one(request: GenerationRequest) -> None:
                async with in_flight:
                    result = await self._one(client, request, verdicts)
                on_result([result])

            try:
                # A task group, not gather: when one request raises (a server found to drop
                # pictures), the others are cancelled before their answers are handed on.
                async with asyncio.TaskGroup() as group:
                    for request in requests:
                        group.create_task(run_one(request))
            except BaseExceptionGroup as errors:
                raise errors.exceptions[0] from None

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.served_model,
            "messages": openai_messages(
                request.messages, request.images, self.options.image_side_px
            ),
            "max_tokens": request.sampling.max_tokens,
            "temperature": request.sampling.temperature,
            "top_p": request.sampling.top_p,
            "seed": request.seed,
            "stream": False,
        }
        body.update(self.options.extra_body)
        return body

    async def _one(
        self,
        client: httpx2.AsyncClient,
        request: GenerationRequest,
        verdicts: dict[str, asyncio.Task[ServerProblem | None]] | None = None,
    ) -> GenerationResult:
        started = time.perf_counter()

        def failed(message: str) -> GenerationResult:
            return GenerationResult(
                key=request.key,
                error=message,
                latency_s=time.perf_counter() - started,
                model_id=self.model_id,
            )

        try:
            if has_images(request.messages):
                body = await asyncio.to_thread(self._body, request)
            else:
                body = self._body(request)
        except ImageRejected as error:
            return failed(f"image: {error}")
        options = self.options
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(options.max_retries + 1),
            wait=_RetryAfterOrBackoff(
                tenacity.wait_random_exponential(
                    multiplier=options.backoff_initial_s, max=options.backoff_max_s
                ),
                options.retry_after_max_s,
            ),
            retry=tenacity.retry_if_exception_type(RetryableError),
            before_sleep=self._count_retry,
            reraise=True,
        )
        # Requests start on successive replicas; each retry moves on to the next one, so a dead
        # replica costs a request at most one try per round.
        start = next(self._next_start)
        try:
            async for attempt in retrying:
                with attempt:
                    replica = (start + attempt.retry_state.attempt_number - 1) % len(self._urls)
                    data = await self._post(client, body, self._urls[replica])
        except RetryableError as error:
            return failed(f"gave up after {options.max_retries + 1} tries: {error}")
        except PermanentError as error:
            return failed(str(error))
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        result = GenerationResult(
            key=request.key,
            text=choice["message"].get("content") or "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choice.get("finish_reason"),
            latency_s=time.perf_counter() - started,
            # What the server says answered; the name asked for when it does not say.
            model_id=str(data.get("model") or self.served_model),
        )
        check = self.image_check
        base_url = options.base_urls[replica].rstrip("/")
        if (
            check is not None
            and verdicts is not None
            and base_url in check.base_urls
            and has_images(request.messages)
        ):
            if base_url not in verdicts:
                verdicts[base_url] = asyncio.create_task(
                    self._images_counted(client, base_url, self._urls[replica], body, result)
                )
            # Shielded: a cancelled waiter must not cancel the check the others wait on.
            problem = await asyncio.shield(verdicts[base_url])
            if problem is not None:
                raise ImageInputError(check.error(problem))
        return result

    async def _images_counted(
        self,
        client: httpx2.AsyncClient,
        base_url: str,
        url: str,
        body: dict[str, Any],
        answered: GenerationResult,
    ) -> ServerProblem | None:
        """`ImageCheckOnFirstAnswer` for one server: `answered` (a request with pictures) sent
        again without them; the `no_images` problem when they were not counted, else None
        (the server is then taken off the check, or warned about when it cannot tell)."""
        check = self.image_check
        assert check is not None
        text_only = {
            **body,
            "messages": _without_images(body["messages"]),
            "max_tokens": 1,
            "stream": False,
        }
        try:
            data = await self._post(client, text_only, url)
            tokens_text = int((data.get("usage") or {}).get("prompt_tokens") or 0)
            why = "its answers carry no usage.prompt_tokens to compare"
        except (RetryableError, PermanentError) as error:
            tokens_text, why = 0, f"the request without its pictures failed ({error})"
        if answered.prompt_tokens and tokens_text and answered.prompt_tokens <= tokens_text:
            return _drops_images(
                base_url,
                self.served_model,
                tokens_text,
                answered.prompt_tokens,
                what="its pictures (the step's first answer)",
            )
        remaining = check.base_urls - {base_url}
        self.image_check = (
            ImageCheckOnFirstAnswer(remaining, check.error, check.warn) if remaining else None
        )
        if not (answered.prompt_tokens and tokens_text):
            check.warn(
                ServerProblem(
                    base_url,
                    IMAGE_CHECK_SKIPPED,
                    f"could not check on the first answer whether {self.served_model!r} reads "
                    f"pictures: {why}",
                    self.served_model,
                )
            )
        return None

    def _count_retry(self, retry_state: tenacity.RetryCallState) -> None:
        """tenacity's before_sleep: count the retry and tell `on_retry` about it."""
        self.retries += 1
        if self.on_retry is None:
            return
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        self.on_retry(
            RetryEvent(
                attempt=retry_state.attempt_number,
                max_attempts=self.options.max_retries + 1,
                wait_s=float(retry_state.upcoming_sleep),
                kind=getattr(error, "kind", type(error).__name__),
                error=str(error),
                url=getattr(error, "url", ""),
            )
        )

    async def _post(
        self, client: httpx2.AsyncClient, body: dict[str, Any], url: str
    ) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.options.request_timeout_s):
                response = await client.post(url, json=body)
        except (TimeoutError, httpx2.TimeoutException) as error:
            # A server that answers one request at a time (`transformers serve` without
            # --continuous-batching) queues the rest: the last of max_in_flight waits for all.
            raise RetryableError(
                f"timeout from {url} ({type(error).__name__}) after request_timeout_s="
                f"{self.options.request_timeout_s:g} with up to max_in_flight="
                f"{self.options.max_in_flight} requests at once (a server that answers one at a "
                "time needs a lower max_in_flight or a longer request_timeout_s)",
                kind="timeout",
                url=url,
            ) from error
        except httpx2.TransportError as error:
            raise RetryableError(
                f"{_CONNECTION_TO} {url}: {type(error).__name__}: {_transport_reason(error)}",
                kind="connection",
                url=url,
            ) from error
        status = response.status_code
        snippet = response.text[:_BODY_SNIPPET_CHARS]
        if status == 429 or status >= 500:
            raise RetryableError(
                f"HTTP {status} from {url}: {snippet}",
                retry_after_s=parse_retry_after(response.headers.get("retry-after")),
                kind=f"HTTP {status}",
                url=url,
            )
        if status >= 400:
            raise PermanentError(f"HTTP {status} from {url}: {snippet}")
        try:
            data = response.json()
            message = data["choices"][0]["message"]
            if not isinstance(message, dict):
                raise TypeError("message is not an object")
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise RetryableError(
                f"malformed response from {url}: {snippet!r}", kind="malformed response", url=url
            ) from error
        return data


def _without_images(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages with their image parts left out (text parts kept in order)."""
    kept = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [part for part in content if part.get("type") != "image_url"]
        kept.append({**message, "content": content})
    return kept


def _transport_reason(error: BaseException) -> str:
    """Why a connection failed, from the operating system when it said: httpx reports a refused
    connection only as "All connection attempts failed", with the errno buried in its causes."""
    cause: BaseException | None = error
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno:
            return f"[Errno {cause.errno}] {os.strerror(cause.errno)}"
        cause = cause.__cause__ or cause.__context__
    return str(error)


# -- the server probe -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerProblem:
    """Why one server cannot serve a step's requests, from its answer to `GET /models`.

    kind: "unreachable" (no connection), "missing_v1" (the base URL lacks `/v1`: its `/models`
    is 404 but `<base_url>/v1/models` lists models), "key" (HTTP 401/403), "other_name" (the
    server lists models, not this one), "no_images" (the model drops or refuses image input;
    see `probe_image_input`), `IMAGE_CHECK_SKIPPED` (that cannot be told: a warning, not a
    reason to stop) or `IMAGE_CHECK_DEFERRED` (the server did not answer the check in time:
    it is made on the step's first answer instead).
    """

    base_url: str
    kind: str
    detail: str
    served_model: str


@dataclass(frozen=True)
class ServerSettingNames:
    """The settings a user changes to fix each kind of problem, named in the error message.

    The defaults name the backend's own options; a profile that reads them from environment
    variables passes the variables' names instead.
    """

    base_urls: str = "the backend's base_urls option"
    served_model: str = "the backend's served_model option"
    api_key: str = "the environment variable named by api_key_env"
    captions_template: str = "describe_template to describe_captions"

    def fix(self, problem: ServerProblem) -> str:
        """What to change for `problem`, in one clause."""
        served = problem.served_model
        return {
            "unreachable": f"start the server, or set {self.base_urls} to its URL",
            "missing_v1": f"set {self.base_urls} to the server's OpenAI base URL (ending /v1)",
            "key": f"set {self.api_key} to the server's API key",
            "other_name": f"set {self.served_model} to the name the server uses, or serve it "
            f"as {served!r} (with vLLM: vllm serve <weights> --served-model-name {served})",
            "no_images": "serve a vision-language model there, or set "
            f"{self.captions_template} (caption-based: the model reads the two captions instead "
            "of the pictures)",
            IMAGE_CHECK_SKIPPED: "the step goes on unchecked; if the model there reads text "
            f"only, its descriptions would not come from the pictures: then set "
            f"{self.captions_template}",
            IMAGE_CHECK_DEFERRED: "the step checks it on the server's first answer instead (the "
            "same request without its pictures must count fewer prompt tokens) and stops there "
            f"if the model reads text only (then set {self.captions_template})",
        }[problem.kind]

    def failed_calls_fix(self, last_error: str | None, served_model: str) -> str | None:
        """What to change after a step's model calls failed, judged from the last error: the
        setting that holds the URL after a failed connection, the key after HTTP 401/403;
        None when the error itself says it (a timeout) or nothing would help."""
        text = last_error or ""
        if _CONNECTION_TO in text:
            kind = "unreachable"
        elif "HTTP 401 " in text or "HTTP 403 " in text:
            kind = "key"
        else:
            return None
        return self.fix(ServerProblem("", kind, "", served_model))


def failed_calls_fix(
    spec: BackendSpec, setting_names: Mapping[str, str], last_error: str | None
) -> str | None:
    """For a step whose `openai_http` calls failed: what to change, naming the setting (as
    the checks before a step do: `ServerSettingNames.failed_calls_fix`); None for another
    backend, or when the error says it itself."""
    if spec.backend != OPENAI_HTTP_BACKEND:
        return None
    names = ServerSettingNames(**setting_names)
    return names.failed_calls_fix(last_error, spec.served_model or spec.model_id)


def probe_server(
    base_url: str,
    served_model: str,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
) -> ServerProblem | None:
    """Ask one OpenAI-compatible server for its models; the problem, or None when it is fine.

    Fine means: it lists `served_model`, or it answers without a model list at all (an API
    without `/models`, a proxy that hides it): such a server is not refused on a guess, its
    requests will say what is wrong. A 404 on a base URL without `/v1` is a problem only when
    `<base_url>/v1/models` does list models.
    """
    base = base_url.rstrip("/")
    url = base + "/models"

    def problem(kind: str, detail: str) -> ServerProblem:
        return ServerProblem(base_url, kind, detail, served_model)

    try:
        response = httpx2.get(url, headers=dict(headers or {}), timeout=timeout_s)
    except (httpx2.HTTPError, httpx2.InvalidURL) as error:
        reason = _transport_reason(error)
        return problem("unreachable", f"not reachable ({type(error).__name__}: {reason})")
    if response.status_code in (401, 403):
        return problem("key", f"GET {url} answered HTTP {response.status_code}")
    if response.status_code == 404 and not base.endswith("/v1"):
        if _listed_at(base + "/v1/models", headers, timeout_s):
            return problem(
                "missing_v1", f"GET {url} answered HTTP 404, but {base}/v1/models lists models"
            )
        return None
    served_ids = _model_ids(response)
    if served_ids and served_model not in served_ids:
        return problem("other_name", f"serves {served_ids}, not {served_model!r}")
    return None


def _model_ids(response: httpx2.Response) -> list[str]:
    """The model ids of an OpenAI model list; [] when the answer is not one."""
    if response.status_code != 200:
        return []
    try:
        return [str(model["id"]) for model in response.json().get("data", [])]
    except (ValueError, AttributeError, KeyError, TypeError):
        return []


def _listed_at(url: str, headers: Mapping[str, str] | None, timeout_s: float) -> list[str]:
    """The model ids `url` lists; [] when it lists none or cannot be reached."""
    try:
        return _model_ids(httpx2.get(url, headers=dict(headers or {}), timeout=timeout_s))
    except httpx2.HTTPError:
        return []


def _probe_headers(options: HttpOptions) -> dict[str, str]:
    """The API key header a probe sends (none when no key is configured or set)."""
    key = os.environ.get(options.api_key_env, "") if options.api_key_env else ""
    return {"Authorization": f"Bearer {key}"} if key else {}


def probe_servers(spec: BackendSpec, timeout_s: float = 5.0) -> list[ServerProblem]:
    """`probe_server` for every base URL of an `openai_http` spec (in parallel), with its
    served model name and API key; [] for any other backend."""
    return _probe_every_url(spec, probe_server, timeout_s)


# A text that a model reads the same with or without a picture beside it.
_IMAGE_PROBE_TEXT = "What colour is this picture? Answer in one word."


@cache
def _probe_image_url() -> str:
    """A small plain JPEG as a data URL (the probe's picture; its content does not matter)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def probe_image_input(
    base_url: str,
    served_model: str,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
) -> ServerProblem | None:
    """Whether a server's model reads images: None when it does, a `no_images` problem when
    it drops or refuses them, an `image_check_skipped` one when its answers cannot tell, an
    `image_check_deferred` one when it did not answer in time.

    Two one-token chat requests with the same text, the second with a picture added. A model
    that takes images counts the picture's tokens in `usage.prompt_tokens`; equal counts mean
    the server dropped the picture. A refused picture (HTTP 4xx while the text alone is
    answered) is a problem too. `timeout_s` is the whole check's time: a server that loads
    its model on the first request (`transformers serve` does, minutes on a CPU) is waited
    for, and a refused connection or a 5xx/429 answer to the text-only request (a server still
    starting) is tried again until the time is spent. A server that reports no
    `usage.prompt_tokens` (some proxies) is `image_check_skipped`: without usage figures there
    is no sound signal (a model that sees the picture may answer the same words as one that
    does not). A server that still did not answer is `image_check_deferred`: the backend then
    makes the same comparison on that server's first real answer (`ImageCheckOnFirstAnswer`).
    """
    url = base_url.rstrip("/") + "/chat/completions"
    deadline = time.monotonic() + timeout_s
    # Once the text alone is answered the model is loaded: the picture request then gets
    # what is left of the time, but never less than this.
    floor_s = min(timeout_s, 30.0)

    def ask(content: str | list[dict[str, Any]], retry: bool) -> httpx2.Response | str:
        """One request; with `retry`, tried again after a refused connection or a 5xx/429
        until the check's time is spent (without, it still gets `floor_s` at least)."""
        body = {
            "model": served_model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 1,
            "temperature": 0.0,
            "stream": False,
        }
        tries = 0
        while True:
            tries += 1
            remaining = max(deadline - time.monotonic(), 0.001 if retry else floor_s)
            try:
                answer: httpx2.Response | str = httpx2.post(
                    url, json=body, headers=dict(headers or {}), timeout=remaining
                )
            except httpx2.TimeoutException:
                return (
                    f"no answer within {timeout_s:g} s; a server that loads its model on the "
                    "first request may need a longer image_check_timeout_s"
                )
            except httpx2.HTTPError as error:
                answer = f"{type(error).__name__}: {_transport_reason(error)}"
            transient = isinstance(answer, str) or answer.status_code in (429, *range(500, 600))
            if not (retry and transient) or time.monotonic() + _PROBE_RETRY_PAUSE_S >= deadline:
                if transient and tries > 1:
                    return f"{_outcome(answer)}; {tries} tries in {timeout_s:g} s"
                return answer
            time.sleep(_PROBE_RETRY_PAUSE_S)

    def not_told(kind: str, why: str) -> ServerProblem:
        return ServerProblem(
            base_url,
            kind,
            f"could not check whether {served_model!r} reads pictures: {why}",
            served_model,
        )

    text_only = ask(_IMAGE_PROBE_TEXT, retry=True)
    if isinstance(text_only, str) or text_only.status_code != 200:
        why = f"the text-only request failed ({_outcome(text_only)})"
        return not_told(IMAGE_CHECK_DEFERRED, why)
    with_image = ask(
        [
            {"type": "text", "text": _IMAGE_PROBE_TEXT},
            {"type": "image_url", "image_url": {"url": _probe_image_url()}},
        ],
        retry=False,
    )
    if isinstance(with_image, str):
        return not_told(IMAGE_CHECK_DEFERRED, f"the request with a picture failed ({with_image})")
    if 400 <= with_image.status_code < 500 and with_image.status_code != 429:
        snippet = with_image.text[:_BODY_SNIPPET_CHARS]
        return ServerProblem(
            base_url,
            "no_images",
            f"{served_model!r} refused a request with an image (HTTP {with_image.status_code}: "
            f"{snippet})",
            served_model,
        )
    if with_image.status_code != 200:
        why = f"the request with a picture failed ({_outcome(with_image)})"
        return not_told(IMAGE_CHECK_DEFERRED, why)
    tokens_text, tokens_image = _prompt_tokens(text_only), _prompt_tokens(with_image)
    if not (tokens_text and tokens_image):
        why = "the server's answers carry no usage.prompt_tokens to compare"
        return not_told(IMAGE_CHECK_SKIPPED, why)
    if tokens_image <= tokens_text:
        return _drops_images(base_url, served_model, tokens_text, tokens_image)
    return None


def _drops_images(
    base_url: str, served_model: str, tokens_text: int, tokens_image: int, what: str = "a picture"
) -> ServerProblem:
    """The `no_images` problem of a server whose request with pictures counted no more prompt
    tokens than the same request without them."""
    return ServerProblem(
        base_url,
        "no_images",
        f"{served_model!r} drops images: a request with {what} counted {tokens_image} prompt "
        f"tokens, the same text alone {tokens_text}, so its descriptions would not come from "
        "the pictures",
        served_model,
    )


def _outcome(answer: httpx2.Response | str) -> str:
    """A failed probe request in a few words: its error, or its status and body's start."""
    if isinstance(answer, str):
        return answer
    return f"HTTP {answer.status_code}: {answer.text[:_BODY_SNIPPET_CHARS]}"


def _prompt_tokens(response: httpx2.Response) -> int:
    """`usage.prompt_tokens` of a chat completion; 0 when the answer has none."""
    if response.status_code != 200:
        return 0
    try:
        return int(response.json()["usage"]["prompt_tokens"] or 0)
    except (ValueError, KeyError, TypeError):
        return 0


def image_input_problems(spec: BackendSpec, timeout_s: float = 120.0) -> list[ServerProblem]:
    """`probe_image_input` for every base URL of an `openai_http` spec (in parallel); [] for
    any other backend (the transformers backend refuses images itself when its model has no
    image input)."""
    return _probe_every_url(spec, probe_image_input, timeout_s)


def _probe_every_url(
    spec: BackendSpec,
    probe: Callable[[str, str, Mapping[str, str], float], ServerProblem | None],
    timeout_s: float,
) -> list[ServerProblem]:
    """`probe(url, served model, headers, timeout)` for every base URL of an `openai_http`
    spec, in parallel; [] for any other backend."""
    if spec.backend != OPENAI_HTTP_BACKEND:
        return []
    options = HttpOptions.from_mapping(spec.options)
    served, headers = spec.served_model or spec.model_id, _probe_headers(options)
    urls = list(options.base_urls)
    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
        found = pool.map(lambda url: probe(url, served, headers, timeout_s), urls)
        return [problem for problem in found if problem is not None]

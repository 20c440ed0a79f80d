"""Cache first, then the model: the loop every generation step runs its requests through.

1. Look every request key up in the shard's `ResponseStore`: finished ones are cache hits,
   quarantined ones are skipped, failed ones (under the attempt limit) are sent again. A
   finished answer that the model gave moments before, in the prefetch that sent several
   shards' requests as one stream (`prefetch_shards`), is counted and logged as the model's
   (`RunStats.prefetched`), not as an earlier run's cache hit.
2. Send the rest to the backend, with progress (rate and ETA) over these calls alone: cache
   hits and caption-heuristic answers take no time, and counting them in would promise a
   finish hours early or late. Results are written to the store as they arrive, at least
   every `flush_every` results or `flush_interval_s` seconds (each transformers batch, each
   vLLM chunk), so a killed run resumes where it stopped. The writes happen on a writer
   thread: an HTTP backend's event loop never waits for the disk (each commit is fsynced).
3. Read back every key and report what happened (`RunStats`).

A backend that retries (the HTTP one) tells the run about each retry; the run's warning log
gets the first retry of each kind of error in full (try n of max, the wait, the error and
its URL) and then at most one summary line every `RETRY_LOG_EVERY_S` seconds, so a server
that restarts is visible without a line per request at hundreds of requests in flight.
While calls are outstanding and none has finished for `HEARTBEAT_S` seconds, the log gets a
line saying what the run waits on (`waiting on 19 requests to http://host:8000/v1 for 2 min
(timeout 600 s each)`), so a server that hangs or is dying is not a silent progress line.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import polars as pl

from megapairs_assets.generation.backends.base import (
    GenerationBackend,
    GenerationRequest,
    GenerationResult,
    RetryEvent,
)
from megapairs_assets.generation.store import (
    STATUS_OK,
    STATUS_QUARANTINED,
    ResponseStore,
    StoredResponse,
)
from megapairs_assets.lib.preview import markdown_table
from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.words import plural
from megapairs_assets.lineage.catalog import IncompleteCommitError, NotMaterializedError

# After the first retry of each kind of error, retries are summed up at most this often.
RETRY_LOG_EVERY_S = 10.0
# With calls outstanding and none finished for this long, the log says what the run waits on.
HEARTBEAT_S = 60.0


@dataclass
class RunStats:
    """What one step's requests cost: cache hits, calls made, failures, tokens, time.

    `cache_hits`: answers an earlier run stored. `prefetched`: answers the model gave in this
    process's prefetch just before the step (see `prefetch_shards`); `calls`, `succeeded`,
    `retries` and the token counts are this run's own, and the prefetch's work on this run's
    requests is `prefetched` (one successful call each), `prefetched_tokens` (prompt and
    completion) and `prefetched_s` (their share of the prefetch's time). `retries`: tries the
    backend repeated after a transient error (a call that succeeded on its third try counts
    2); a call that failed every try counts its retries here and itself in `failed`.
    """

    requests: int = 0
    cache_hits: int = 0
    prefetched: int = 0
    calls: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped_quarantined: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefetched_tokens: int = 0
    elapsed_s: float = 0.0
    prefetched_s: float = 0.0
    # The error of the most recent failed call (the backend's message names the server), so a
    # failing step can say why without anyone opening the response store.
    last_error: str | None = None

    def add(self, other: RunStats) -> RunStats:
        """Sum of two runs' figures (e.g. model and heuristic requests of one step); the later
        run's last error wins."""
        merged = {key: value + getattr(other, key) for key, value in self._counts().items()}
        return RunStats(**merged, last_error=other.last_error or self.last_error)

    def _counts(self) -> dict[str, int | float]:
        return {key: value for key, value in asdict(self).items() if key != "last_error"}

    @property
    def rows_per_s(self) -> float:
        """Requests settled (hits and calls) per second of this run, the prefetch's time on
        them included (a step whose answers all came from the prefetch took no time itself)."""
        seconds = self.elapsed_s + self.prefetched_s
        return self.requests / seconds if seconds > 0 else 0.0

    def as_metadata(self) -> dict[str, int | float]:
        values = self._counts()
        values["rows_per_s"] = round(self.rows_per_s, 2)
        values["elapsed_s"] = round(self.elapsed_s, 3)
        values["prefetched_s"] = round(self.prefetched_s, 3)
        return values


@dataclass(frozen=True)
class _Prefetched:
    """What a prefetch left for one store: the keys the model answered, with the tokens of each
    answer, and the prefetch's seconds per answer (its time, shared out over its answers)."""

    tokens: dict[str, int]
    seconds_per_answer: float = 0.0


class _PrefetchedAnswers:
    """The keys a prefetch in this process had the model answer (with what each cost), per
    store file, until the shard's own step has counted them (it takes them: a later run calls
    them cache hits).

    The prefetch and the steps that follow it run in one process (one Dagster step), so
    process memory is where "answered just now" can be known without a column in the store
    (whose rows may come from other machines through the mirror).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, dict[str, int]] = {}
        self._seconds_per_answer: dict[str, float] = {}

    def start(self, stores: Iterable[ResponseStore]) -> None:
        """Forget what an earlier prefetch left for these stores (its step never ran)."""
        with self._lock:
            for store in stores:
                self._tokens.pop(str(store.path), None)
                self._seconds_per_answer.pop(str(store.path), None)

    def add(self, store: ResponseStore, answers: Iterable[GenerationResult]) -> None:
        """Successful answers of the prefetch that belong to `store`."""
        with self._lock:
            tokens = self._tokens.setdefault(str(store.path), {})
            tokens.update((a.key, a.prompt_tokens + a.completion_tokens) for a in answers)

    def finish(self, stores: Iterable[ResponseStore], seconds_per_answer: float) -> None:
        """The prefetch is over: each of its answers cost this share of its time."""
        with self._lock:
            for store in stores:
                self._seconds_per_answer[str(store.path)] = seconds_per_answer

    def take(self, store: ResponseStore) -> _Prefetched:
        with self._lock:
            return _Prefetched(
                self._tokens.pop(str(store.path), {}),
                self._seconds_per_answer.pop(str(store.path), 0.0),
            )


_PREFETCHED = _PrefetchedAnswers()


class _StoreWriter:
    """Commits batches of results to the store on its own thread, in submission order."""

    def __init__(self, store: ResponseStore) -> None:
        self._store = store
        self._batches: queue.Queue[list[GenerationResult] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="response-store-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: list[GenerationResult]) -> None:
        if self._error is not None:
            raise RuntimeError(f"response store write failed: {self._error}") from self._error
        self._batches.put(batch)

    def _run(self) -> None:
        while (batch := self._batches.get()) is not None:
            if self._error is None:
                try:
                    self._store.record(batch)
                except BaseException as error:  # reported to the caller on close()
                    self._error = error

    def close(self) -> None:
        """Wait until everything submitted is committed; raise if a write failed."""
        self._batches.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"response store write failed: {self._error}") from self._error


class RetryLog:
    """The retry lines of one run (see the module docstring) and its retry count.

    Called with each `RetryEvent`: the first retry of a kind of error ("connection", "HTTP
    503") is one line in full; later ones are counted and summed up in one line at most every
    `every_s` seconds, and once more by `close` for what is left.
    """

    def __init__(
        self,
        label: str,
        warn: Callable[[str], None] | None,
        every_s: float = RETRY_LOG_EVERY_S,
    ) -> None:
        self.label = label
        self.count = 0
        self._warn = warn
        self._every_s = every_s
        self._kinds_told: set[str] = set()
        self._untold: dict[str, int] = {}  # kind -> retries not yet in a line
        self._latest: RetryEvent | None = None
        self._last_line = time.monotonic()

    def __call__(self, event: RetryEvent) -> None:
        self.count += 1
        if self._warn is None:
            return
        if event.kind not in self._kinds_told:
            self._kinds_told.add(event.kind)
            self._warn(
                f"{self.label}: retrying: {_retry_clause(event)}: {_with_url(event)} "
                f"(later retries are summed up at most every {self._every_s:g} s)"
            )
            return
        self._untold[event.kind] = self._untold.get(event.kind, 0) + 1
        self._latest = event
        if time.monotonic() - self._last_line >= self._every_s:
            self.flush()

    def flush(self) -> None:
        """One line on the retries not yet told, if any."""
        if self._warn is None or not self._untold or self._latest is None:
            return
        now = time.monotonic()
        total = sum(self._untold.values())
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self._untold.items()))
        latest = self._latest
        self._warn(
            f"{self.label}: {plural(total, 'more retry')} in the last "
            f"{now - self._last_line:.0f} s ({kinds}); latest: {_retry_clause(latest)}: "
            f"{_with_url(latest)}"
        )
        self._untold.clear()
        self._last_line = now

    def close(self) -> None:
        self.flush()


class Heartbeat:
    """A line every `every_s` seconds in which no call finished, while calls are outstanding
    (see the module docstring); a daemon thread, started and stopped around `generate`.

    What the run waits on comes from the backend: its `wait_target` (the HTTP backend's base
    URLs) and `request_timeout_s`, when it has them, else its name.
    """

    def __init__(
        self,
        label: str,
        log: Callable[[str], None],
        backend: GenerationBackend,
        outstanding: Callable[[], int],
        every_s: float = HEARTBEAT_S,
    ) -> None:
        self._label = label
        self._log = log
        self._target = getattr(backend, "wait_target", None) or f"the {backend.name} backend"
        self._timeout_s: float | None = getattr(backend, "request_timeout_s", None)
        self._outstanding = outstanding
        self._every_s = every_s
        self._last_progress = self._last_line = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="generation-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def progress(self) -> None:
        """A call finished (called from the backend's thread: one float written)."""
        self._last_progress = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        # Checked a few times per interval, so a line comes at most a quarter late.
        while not self._stop.wait(min(self._every_s / 4, 5.0)):
            now = time.monotonic()
            idle_s = now - self._last_progress
            waiting = self._outstanding()
            if idle_s < self._every_s or now - self._last_line < self._every_s or waiting <= 0:
                continue
            self._last_line = now
            timeout = f" (timeout {self._timeout_s:g} s each)" if self._timeout_s else ""
            self._log(
                f"{self._label}: waiting on {plural(waiting, 'request')} to {self._target} "
                f"for {_idle_text(idle_s)}{timeout}"
            )


def _idle_text(seconds: float) -> str:
    """`45 s` under two minutes, else `9 min`."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _retry_clause(event: RetryEvent) -> str:
    """`try 2/7 failed (connection), next in 1.3 s`."""
    wait = f"{event.wait_s:.1f}" if event.wait_s >= 1 else f"{event.wait_s:.2f}"
    return f"try {event.attempt}/{event.max_attempts} failed ({event.kind}), next in {wait} s"


def _with_url(event: RetryEvent) -> str:
    """The error, with the URL it came from when its message does not name it."""
    if event.url and event.url not in event.error:
        return f"{event.error} ({event.url})"
    return event.error


def run_requests(
    requests: Sequence[GenerationRequest],
    backend: GenerationBackend | Callable[[], GenerationBackend],
    store: ResponseStore,
    *,
    flush_every: int = 64,
    flush_interval_s: float = 1.0,
    label: str | None = None,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> tuple[dict[str, StoredResponse], RunStats]:
    """Settle every request from the cache or the backend; see the module docstring.

    `backend` may be a factory, called only when something must actually be generated, so a
    fully cached run never builds (or loads) a model. Duplicate keys are sent once. Returns
    what the store holds for every key afterwards, and the run's figures.
    """
    stats = run_routed(
        [(request, store) for request in requests],
        backend,
        flush_every=flush_every,
        flush_interval_s=flush_interval_s,
        label=label,
        log=log,
        warn=warn,
        heartbeat_s=heartbeat_s,
    )
    return store.get(request.key for request in requests), stats


def run_routed(
    routed: Sequence[tuple[GenerationRequest, ResponseStore]],
    backend: GenerationBackend | Callable[[], GenerationBackend],
    *,
    flush_every: int = 64,
    flush_interval_s: float = 1.0,
    label: str | None = None,
    log: Callable[[str], None] | None = None,
    record_failures: bool = True,
    prefetch: bool = False,
    warn: Callable[[str], None] | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> RunStats:
    """`run_requests` for requests that belong to different stores (several shards at once).

    All uncached requests go to the backend as one stream, so a local model batches across
    shards; each result is committed to the store(s) its key belongs to. With
    `record_failures=False` only successes are stored (a prefetch leaves failures to the
    shard's own step, so one run counts one attempt). With `prefetch=True` the keys the model
    answers are remembered for the shard steps that follow, which count them as the model's
    (`RunStats.prefetched`). With a `label`, `log` gets one line on what was already answered
    (by the prefetch, or by an earlier run), progress lines over the calls and, every
    `heartbeat_s` seconds without a finished call, what the run waits on (`Heartbeat`); `warn`
    (default: `log`) gets the retry lines (`RetryLog`).
    """
    started = time.perf_counter()
    stores_of: dict[str, list[ResponseStore]] = {}
    first: dict[str, GenerationRequest] = {}
    for request, store in routed:
        first.setdefault(request.key, request)
        if store not in stores_of.setdefault(request.key, []):
            stores_of[request.key].append(store)
    stats = RunStats(requests=len(first))
    by_store: dict[int, tuple[ResponseStore, list[str]]] = {}
    for key, stores in stores_of.items():
        for store in stores:
            by_store.setdefault(id(store), (store, []))[1].append(key)
    if prefetch:
        _PREFETCHED.start(store for store, _ in by_store.values())
    statuses: dict[str, list[str | None]] = {}
    # What the model answered in this process's prefetch, per store (taken: counted once).
    answered_now: dict[int, _Prefetched] = {}
    for store, keys in by_store.values():
        found = store.get(keys)
        answered_now[id(store)] = _PREFETCHED.take(store)
        for key in keys:
            statuses.setdefault(key, []).append(found[key].status if key in found else None)
    todo = []
    for key, request in first.items():
        # Settled only when every store the key belongs to has it settled.
        seen = statuses[key]
        if all(status == STATUS_OK for status in seen):
            if all(key in answered_now[id(store)].tokens for store in stores_of[key]):
                prefetched = answered_now[id(stores_of[key][0])]
                stats.prefetched += 1
                stats.prefetched_tokens += prefetched.tokens[key]
                stats.prefetched_s += prefetched.seconds_per_answer
            else:
                stats.cache_hits += 1
        elif all(status in (STATUS_OK, STATUS_QUARANTINED) for status in seen):
            stats.skipped_quarantined += 1
        else:
            todo.append(request.rendered())
    if label is not None and log is not None and len(todo) < len(first):
        log(f"{label}: {_settled_line(stats, len(first), len(todo))}")

    if todo:
        model = backend if hasattr(backend, "generate") else backend()  # type: ignore[operator]
        progress = Progress(len(todo), label, unit="requests", log=log) if label else None
        buffer: list[GenerationResult] = []
        last_flush = time.perf_counter()
        writers = {id(store): _StoreWriter(store) for store, _ in by_store.values()}
        retry_log = RetryLog(label or "generation", (warn or log) if label else None)
        # A shared backend serves one run at a time; its retries are this run's while it runs.
        tells_retries = hasattr(model, "on_retry")
        if tells_retries:
            model.on_retry = retry_log  # type: ignore[union-attr]

        def flush() -> None:
            nonlocal last_flush
            batches: dict[int, list[GenerationResult]] = {}
            failed = 0
            for result in buffer:
                if result.error is None:
                    stats.succeeded += 1
                    stats.prompt_tokens += result.prompt_tokens
                    stats.completion_tokens += result.completion_tokens
                else:
                    stats.failed += 1
                    failed += 1
                    stats.last_error = result.error
                    if not record_failures:
                        continue
                for store in stores_of[result.key]:
                    batches.setdefault(id(store), []).append(result)
            for store_id, batch in batches.items():
                writers[store_id].submit(batch)
                if prefetch:
                    store = by_store[store_id][0]
                    _PREFETCHED.add(store, (r for r in batch if r.error is None))
            if progress is not None and buffer:
                progress.update(len(buffer), failed=failed)
            buffer.clear()
            last_flush = time.perf_counter()

        heartbeat = (
            Heartbeat(label, log, model, lambda: len(todo) - stats.calls, heartbeat_s).start()
            if label is not None and log is not None
            else None
        )

        def on_result(results: Sequence[GenerationResult]) -> None:
            buffer.extend(results)
            stats.calls += len(results)
            if heartbeat is not None:
                heartbeat.progress()
            if len(buffer) >= flush_every or time.perf_counter() - last_flush >= flush_interval_s:
                flush()

        try:
            model.generate(todo, on_result)
        finally:
            if heartbeat is not None:
                heartbeat.stop()
            if tells_retries:
                model.on_retry = None  # type: ignore[union-attr]
            stats.retries = retry_log.count
            retry_log.close()
            try:
                flush()  # whatever finished before an error (or Ctrl-C) is kept
            finally:
                if progress is not None:
                    progress.close()
                errors = []
                for writer in writers.values():
                    try:
                        writer.close()
                    except RuntimeError as error:
                        errors.append(error)
                if errors:
                    raise errors[0]
    stats.elapsed_s = time.perf_counter() - started
    if prefetch and stats.succeeded:
        # Failed calls are retried (and timed) by the shard's own step; the answers carry all.
        _PREFETCHED.finish(
            (store for store, _ in by_store.values()), stats.elapsed_s / stats.succeeded
        )
    return stats


def _settled_line(stats: RunStats, requests: int, to_send: int) -> str:
    """What was settled before any call, e.g. `2 of 2 requests answered by the model just now
    (sent with this step's other shards); 0 to send` or `3 of 5 requests answered from an
    earlier run's cache, 1 given up on earlier (quarantined); 1 to send` (a zero part left out,
    except the cache's when nothing else was settled)."""
    parts = []
    if stats.prefetched:
        parts.append(
            f"{stats.prefetched} of {requests} requests answered by the model just now "
            "(sent with this step's other shards)"
        )
    if stats.cache_hits or not parts:
        counted = f"{stats.cache_hits}" if parts else f"{stats.cache_hits} of {requests} requests"
        parts.append(f"{counted} answered from an earlier run's cache")
    if stats.skipped_quarantined:
        parts.append(f"{stats.skipped_quarantined} given up on earlier (quarantined)")
    return f"{', '.join(parts)}; {to_send} to send"


BackendFactory = Callable[[], GenerationBackend]


@dataclass
class SettledStep:
    """What one shard's generation step got back: the model's and the heuristic's answers."""

    model: dict[str, StoredResponse]
    heuristic: dict[str, StoredResponse]
    model_stats: RunStats
    heuristic_stats: RunStats

    @property
    def stats(self) -> RunStats:
        return self.model_stats.add(self.heuristic_stats)

    def accepted_rows(
        self,
        model_plans: Sequence[PlannedRequest],
        heuristic_plans: Sequence[PlannedRequest],
        accept: Callable[[Any, StoredResponse | None], dict[str, Any] | None],
    ) -> list[dict[str, Any]]:
        """Each plan's row from its answer, model plans first; `accept` returns None for a
        plan it rejects (and quarantines it)."""
        return [
            row
            for plans, answers in ((model_plans, self.model), (heuristic_plans, self.heuristic))
            for plan in plans
            if (row := accept(plan, answers.get(plan.request.key))) is not None
        ]

    def stats_metadata(self) -> dict[str, Any]:
        """The few figures worth a plot across materializations (Dagster plots numeric
        metadata); the full breakdown is `stats_markdown`.

        `model_calls` and `model_tokens` are the model's work on this shard's requests,
        wherever it ran: the calls of the run-wide prefetch that answered them
        (`model_prefetched` of the calls) and this step's own. `rows_per_s` counts the
        prefetch's share of time too."""
        model, every = self.model_stats, self.stats
        return {
            "model_calls": model.calls + model.prefetched,
            "model_prefetched": model.prefetched,
            "model_cache_hits": model.cache_hits,
            "model_failed": model.failed,
            "model_retries": model.retries,
            "model_tokens": model.prompt_tokens + model.completion_tokens + model.prefetched_tokens,
            "rows_per_s": round(every.rows_per_s, 2),
        }

    def stats_markdown(self) -> str:
        """Every request figure of the model, the heuristic and both, as one table."""
        return stats_table(
            {"model": self.model_stats, "heuristic": self.heuristic_stats, "all": self.stats}
        )


def stats_table(runs: dict[str, RunStats]) -> str:
    """Request figures side by side, one row per figure and one column per named run, so the
    table stays a few columns wide however many figures there are (Markdown for the UI)."""
    figures = {name: stats.as_metadata() for name, stats in runs.items()}
    names = list(next(iter(figures.values()), {}))
    columns = {run: [str(values[n]) for n in names] for run, values in figures.items()}
    return markdown_table(pl.DataFrame({"figure": names, **columns}), max_rows=len(names))


class PlannedRequest(Protocol):
    """A step's plan for one row: the request, plus whatever the step keeps beside it."""

    @property
    def request(self) -> GenerationRequest: ...


def settle_shard_requests(
    model_requests: Sequence[GenerationRequest],
    heuristic_requests: Sequence[GenerationRequest],
    store: ResponseStore,
    model_backend: BackendFactory,
    heuristic_backend: BackendFactory,
    *,
    flush_every: int,
    retry_quarantined: bool,
    label: str,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> SettledStep:
    """Settle a shard's model-sampled and heuristic requests in its store (the part every
    generation step shares); each part reports its own progress, `<label> (model)` and
    `<label> (heuristic)`, so the model's rate and ETA count model calls only."""
    if retry_quarantined:
        store.release_quarantined()
    model, model_stats = run_requests(
        model_requests,
        model_backend,
        store,
        flush_every=flush_every,
        label=f"{label} (model)",
        log=log,
        warn=warn,
    )
    heuristic, heuristic_stats = run_requests(
        heuristic_requests,
        heuristic_backend,
        store,
        flush_every=flush_every,
        label=f"{label} (heuristic)",
        log=log,
        warn=warn,
    )
    store.mirror_now()
    return SettledStep(model, heuristic, model_stats, heuristic_stats)


def prefetch_shards(
    shards: Sequence[str],
    plan_shard: Callable[[str], tuple[Sequence[GenerationRequest], ResponseStore]],
    backend: BackendFactory,
    *,
    flush_every: int,
    label: str,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RunStats:
    """Send the model requests of several shards as one stream before their own steps run.

    A local model then batches across shards (a shard may hold only a few sampled pairs), and
    an HTTP backend keeps more requests in flight. Answers land in each shard's store, so the
    per-shard steps that follow find them there. Only successes are stored: a failure is
    retried, and counted, by the shard's own step. `plan_shard` returns a shard's model
    requests and its store; a shard whose input cannot be read (it raises) is left to its own
    step, which reports why.
    """
    routed: list[tuple[GenerationRequest, ResponseStore]] = []
    for shard in shards:
        try:
            requests, store = plan_shard(shard)
        except (
            OSError,
            IncompleteCommitError,
            NotMaterializedError,
            pl.exceptions.PolarsError,
        ) as error:
            if log is not None:
                log(f"prefetch skips {shard}: {error}")
            continue
        routed += [(request, store) for request in requests]
    stats = run_routed(
        routed,
        backend,
        flush_every=flush_every,
        label=label,
        log=log,
        record_failures=False,
        prefetch=True,
        warn=warn,
    )
    for store in {id(store): store for _, store in routed}.values():
        store.mirror_now()
    return stats

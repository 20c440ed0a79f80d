"""Progress for long steps: done / total, rate and ETA in the run log, and a bar in a terminal.

One reporter serves every stage. In a Dagster step the log function is `context.log.info`;
in the CLI a tqdm bar is drawn on stderr as well. Log lines are rate-limited so a 20M-row
step does not flood the event log.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


# Below this many items per second, one decimal place would round the rate to "0.0".
_SLOW_RATE = 0.1


def _fmt_rate(rate: float, unit: str) -> str:
    """`2.5 images/s`; a slow rate keeps two significant digits and says how long one item
    takes (`0.029 requests/s, one every 35 s`), so a slow server does not read as stalled."""
    if rate <= 0 or rate >= _SLOW_RATE:
        return f"{rate:.1f} {unit}/s"
    return f"{rate:.2g} {unit}/s, one every {_fmt_seconds(1.0 / rate)}"


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else _fmt_duration(seconds)


class Progress:
    """Counts work done against a total and reports it.

    `log` receives a formatted line at most every `log_every_s` seconds and once at the end.
    A tqdm bar is shown when stderr is a terminal (or `bar=True`). `total=None` is for streams
    whose length is unknown until read (a tar shard): rate is shown, ETA is not.

    Items that finished without a result (a model call that failed) still count as done;
    `update(n, failed=k)` says how many of them failed, and the line then shows it
    (`6/6 requests (100%), 2 failed`). Lines without failures read as before.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "items",
        log: Callable[[str], None] | None = None,
        log_every_s: float = 10.0,
        bar: bool | None = None,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.done = 0
        self.failed = 0
        self._log = log
        self._log_every_s = log_every_s
        self._start = time.perf_counter()
        self._last_log = self._start
        self._logged_done: int | None = None  # `done` when the last line was logged
        show_bar = sys.stderr.isatty() if bar is None else bar
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr) if show_bar else None

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start

    @property
    def rate(self) -> float:
        """Items per second so far."""
        elapsed = self.elapsed_s
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        elapsed = _fmt_duration(self.elapsed_s)
        failed = f", {self.failed} failed" if self.failed else ""
        if self.total is None:
            return (
                f"{self.desc}: {self.done} {self.unit}{failed}, {_fmt_rate(rate, self.unit)}, "
                f"elapsed {elapsed}"
            )
        remaining = max(self.total - self.done, 0)
        eta = _fmt_duration(remaining / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%){failed}, "
            f"{_fmt_rate(rate, self.unit)}, elapsed {elapsed}, ETA {eta}"
        )

    def update(self, n: int, failed: int = 0) -> None:
        """Count `n` more items done, `failed` of them without a result."""
        self.done += n
        self.failed += failed
        if self._bar is not None:
            if self.failed:
                self._bar.set_postfix(failed=self.failed, refresh=False)
            self._bar.update(n)
        now = time.perf_counter()
        if self._log is not None and now - self._last_log >= self._log_every_s:
            self._last_log = now
            self._logged_done = self.done
            self._log(self.line())

    def close(self) -> None:
        """Close the bar and log the final line, unless the last update already logged it."""
        if self._bar is not None:
            self._bar.close()
        if self._log is not None and self._logged_done != self.done:
            self._logged_done = self.done
            self._log(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ProgressCallback = Callable[[int], None]
"""What plain-Python logic accepts: called with the number of items just finished."""


@contextmanager
def quiet_library_progress() -> Iterator[None]:
    """No progress bars from Hugging Face libraries while loading or converting models: they
    interleave with Dagster's log lines, and our own `Progress` reports the work that matters."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

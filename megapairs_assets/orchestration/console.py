"""What a run prints to the terminal when the user presses Ctrl-C: the one-line story, no stacks.

Two Dagster defaults make an interrupted in-process run (`megapairs demo`) print ~100 lines of
tracebacks that say nothing the user can act on:

- The console logger appends every error event's full stack, and an interrupted run has two or
  three of them (the step's failure, the run's failure). `interrupt_quiet_console_logger` is
  Dagster's colored console logger (same config: `log_level`, `name`) that leaves the stack out
  of an event whose error was caused by the interrupt; a real failure keeps its stack, and the
  run's event log (`megapairs ui`) keeps every stack.
- `LocalComputeLogManager` copies a step's captured output to the terminal with a `tail`
  process and a Python watcher (`watch_orphans.py`). Both are in the terminal's process group,
  so Ctrl-C reaches them too: the watcher dies with a KeyboardInterrupt traceback, and the tail
  dies before the step has said where it stopped. `InterruptQuietComputeLogManager` starts them
  with SIGINT blocked, so they keep copying until the step ends and Dagster stops them
  (SIGTERM), as it does after every step. The captured files, and so the UI, are unchanged.

And one Python default loses the Ctrl-C itself: Dagster's SIGINT handler raises at once, and
when that happens inside a finalizer (a `__del__` or weakref callback run by the garbage
collector, often while a model loads), Python prints "Exception ignored in ..." with a traceback
and carries on, so the run goes on to the end. `interrupts_survive_finalizers` sends such a
swallowed interrupt again, a moment later, outside the finalizer.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Generator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import dagster as dg
from dagster import Field, StringSource
from dagster._core.storage.compute_log_manager import CapturedLogContext
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager

# What an interruption is called in a Dagster error chain: Dagster's own error (its SIGINT
# handler raises it inside the step) and Python's.
INTERRUPT_ERROR_CLASSES = frozenset({"DagsterExecutionInterruptedError", "KeyboardInterrupt"})

# The attribute Dagster's log handler puts on every record it passes to a run's loggers (a
# dict with the record's `dagster_event`); Dagster's JSON console logger reads it too.
DAGSTER_RECORD_METADATA = "dagster_meta"


def is_interrupt(error: Any) -> bool:
    """Whether a Dagster error (a SerializableErrorInfo) is, or was caused by, an interrupt.

    A step interrupted inside a library often fails with that library's own error (DuckDB's
    "RuntimeError: Query interrupted", wrapped in Dagster's step execution error); the
    interrupt is then further down the chain, as its cause or context.
    """
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.cls_name in INTERRUPT_ERROR_CLASSES:
            return True
        pending.extend([getattr(current, "cause", None), getattr(current, "context", None)])
    return False


def event_error(event: Any) -> Any:
    """The error a Dagster event carries (step or run failure), or None."""
    return getattr(getattr(event, "event_specific_data", None), "error", None)


class _InterruptStackFilter(logging.Filter):
    """Replaces an interrupt's error text (Dagster appends it after a blank line: the error, its
    stack and its causes) with "(interrupted)". What the stopped step said last (training: where
    its state is saved) is in its own log lines, which `megapairs demo` repeats at the end."""

    def filter(self, record: logging.LogRecord) -> bool:
        metadata = getattr(record, DAGSTER_RECORD_METADATA, None) or {}
        if is_interrupt(event_error(metadata.get("dagster_event"))):
            headline = record.getMessage().split("\n\n", 1)[0]
            record.msg, record.args = f"{headline} (interrupted)", ()
        return True


@dg.logger(
    {
        "log_level": Field(str, is_required=False, default_value="INFO"),
        "name": Field(str, is_required=False, default_value="dagster"),
    },
    description="Dagster's colored console logger, without the stack of an interrupt's errors.",
)
def interrupt_quiet_console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    """Dagster's console logger, printing an interrupted run's errors as their headline only."""
    console = dg.colored_console_logger.logger_fn(init_context)
    console.addFilter(_InterruptStackFilter())
    return console


@contextmanager
def sigint_blocked() -> Generator[None, None, None]:
    """Within this block, processes this thread starts do not get SIGINT (Ctrl-C).

    A blocked signal stays blocked across fork and exec, so the children never see the
    terminal's Ctrl-C; one that reaches this thread meanwhile waits, and is delivered as soon
    as the block ends, so no Ctrl-C is lost. (Ignoring SIGINT instead would drop one.)
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: Dagster tails differently there
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class InterruptQuietComputeLogManager(LocalComputeLogManager):
    """Dagster's local compute log manager whose terminal copiers outlive a Ctrl-C.

    Same files and config as LocalComputeLogManager; `base_dir` defaults to the instance's
    `storage/` folder (Dagster's own default), so dagster.yaml needs no absolute path.
    """

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {
            "base_dir": Field(StringSource, is_required=False),
            "polling_timeout": Field(float, is_required=False),
        }

    @classmethod
    def from_config_value(
        cls, inst_data: Any, config_value: dict[str, Any]
    ) -> InterruptQuietComputeLogManager:
        return cls(inst_data=inst_data, **{"base_dir": None, **config_value})

    def register_instance(self, instance: Any) -> None:
        """Dagster hands the manager its instance; an unset base_dir becomes its storage/."""
        super().register_instance(instance)
        if self._base_dir is None:
            self._base_dir = os.path.join(instance.root_directory, "storage")

    @contextmanager
    def capture_logs(self, log_key: Sequence[str]) -> Generator[CapturedLogContext, None, None]:
        with ExitStack() as stack:
            # Entering starts the `tail` and watcher processes; the block ends before the step.
            with sigint_blocked():
                context = stack.enter_context(super().capture_logs(log_key))
            yield context


# How long after a finalizer swallowed an interrupt it is sent again: long enough for the
# finalizer (and the garbage collection that ran it) to have returned.
RESEND_INTERRUPT_AFTER_S = 0.05


@contextmanager
def interrupts_survive_finalizers() -> Generator[None, None, None]:
    """Within this block an interrupt raised inside a finalizer is not lost: SIGINT is sent
    to this process again, from a short-lived thread, instead of printing the traceback Python
    prints for an error a finalizer cannot raise. Other such errors print as before."""
    previous = sys.unraisablehook

    def resend_interrupts(unraisable: Any) -> None:
        if getattr(unraisable.exc_type, "__name__", None) not in INTERRUPT_ERROR_CLASSES:
            previous(unraisable)
            return
        resend = threading.Timer(RESEND_INTERRUPT_AFTER_S, os.kill, (os.getpid(), signal.SIGINT))
        resend.daemon = True
        resend.start()

    sys.unraisablehook = resend_interrupts
    try:
        yield
    finally:
        sys.unraisablehook = previous

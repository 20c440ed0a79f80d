"""Lightning callbacks: the loss-curve log, progress reporting, the checkpoints written at the
end of training and on SIGTERM, the stop on a non-finite loss, and a checkpoint writer that
publishes `last.ckpt` atomically."""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl_lightning
import polars as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.storage import write_atomic
from megapairs_assets.training.resume import ResumePointMirror

LOSS_CURVE_COLUMNS = (
    "step",
    "loss",
    "learning_rate",
    "step_s",
    "failed_images",
    "dropped_queries",
    "image_reads",
)


class TrainingLog(pl_lightning.Callback):
    """Appends one CSV row per optimizer step (global rank 0 only).

    A file survives the process (a kill, or `ddp_spawn` children), so the curve of a resumed
    run is whole: on start, rows past the restored step (logged after the last checkpoint by
    the killed run, and about to be redone) are dropped. `step_s` is the wall time from the end
    of the previous step, data loading included; the first step of a process has none.
    `learning_rate` is the one the step's update used, read before the step (by the end of the
    step Lightning has already moved the schedule on to the next one).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last_end: float | None = None
        self._step_learning_rate = float("nan")

    def on_train_start(self, trainer: pl_lightning.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        kept = read_loss_curve(self.path).filter(pl.col("step") <= trainer.global_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(LOSS_CURVE_COLUMNS)
            writer.writerows(kept.rows())
        self._last_end = None

    def on_train_batch_start(
        self, trainer: pl_lightning.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_global_zero:
            self._step_learning_rate = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(
        self,
        trainer: pl_lightning.Trainer,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.is_global_zero:
            return
        now = time.perf_counter()
        step_s = now - self._last_end if self._last_end is not None else float("nan")
        self._last_end = now
        stats = pl_module.last_step_stats
        learning_rate = self._step_learning_rate
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow(
                [
                    trainer.global_step,
                    stats.get("loss", float("nan")),
                    learning_rate,
                    step_s,
                    int(stats.get("failed_images", 0)),
                    int(stats.get("dropped_queries", 0)),
                    int(stats.get("image_reads", 0)),
                ]
            )


def read_loss_curve(path: Path) -> pl.DataFrame:
    """The loss-curve CSV as a frame (empty with the right columns when there is none)."""
    schema = {
        "step": pl.Int64,
        "loss": pl.Float64,
        "learning_rate": pl.Float64,
        "step_s": pl.Float64,
        "failed_images": pl.Int64,
        "dropped_queries": pl.Int64,
        "image_reads": pl.Int64,
    }
    if not path.is_file():
        return pl.DataFrame(schema=schema)
    frame = pl.read_csv(path, schema_overrides=schema)
    # A curve written before a column existed (a run resumed across versions): nulls there.
    frame = frame.with_columns(
        pl.lit(None, dtype=dtype).alias(name)
        for name, dtype in schema.items()
        if name not in frame.columns
    ).select(list(schema))
    # A step redone after a resume appears once: the later (resumed) row wins.
    return frame.unique(subset="step", keep="last").sort("step")


class StepProgress(pl_lightning.Callback):
    """Steps done / total, rate and ETA through the project's `Progress` (rank 0 only)."""

    def __init__(self, desc: str, log: Callable[[str], None] | None) -> None:
        self.desc = desc
        self._log = log
        self._progress: Progress | None = None

    def __getstate__(self) -> dict[str, Any]:
        # `ddp_spawn` pickles callbacks into its rank processes, and a run's logger (Dagster's
        # context.log) does not pickle; a rank prints its progress instead (captured as the
        # step's stdout).
        return {**self.__dict__, "_log": print, "_progress": None}

    def on_train_start(self, trainer: pl_lightning.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            self._progress = Progress(
                total=trainer.max_steps - trainer.global_step,
                desc=f"{self.desc} (from step {trainer.global_step})",
                unit="steps",
                log=self._log,
            )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self._progress is not None:
            self._progress.update(1)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None


class FinalCheckpoint(pl_lightning.Callback):
    """Writes `last.ckpt` at the end of training too, so it always holds the final state.

    (`ModelCheckpoint` writes it every `every_n_steps`; a run whose last step is not a multiple
    of n would otherwise leave a `last.ckpt` that is behind the exported weights.) When the
    last step is a multiple, or this process trained no step (a finished run materialized
    again), the checkpoint on disk already is the final state: writing it again would only
    re-upload gigabytes to an object store. Both tests give every rank the same answer (a
    save is collective). It is also what saves the step at which several devices stopped on a
    signal (`StopCheckpoint`): their training ends there like a finished one.
    """

    def __init__(self, path: Path, every_n_steps: int) -> None:
        self.path = path
        self.every_n_steps = every_n_steps
        self._start_step: int | None = None

    def on_train_start(self, trainer: pl_lightning.Trainer, pl_module: Any) -> None:
        self._start_step = trainer.global_step

    def on_train_end(self, trainer: pl_lightning.Trainer, pl_module: Any) -> None:
        step = trainer.global_step
        if step == self._start_step or step % self.every_n_steps == 0:
            return
        trainer.save_checkpoint(self.path, weights_only=False)


class RunRecord(pl_lightning.Callback):
    """Stores in every checkpoint the fingerprint of the run it belongs to and the fit time
    spent reaching it, over every process that trained it (a killed run resumed twice has
    three); a resumed run goes on counting from the checkpoint's figure.

    The time between a checkpoint and a kill (steps trained again after the resume) counts
    in the process that trains them again, not twice.
    """

    def __init__(self, fingerprint: str, started_at: float | None = None) -> None:
        self.fingerprint = fingerprint
        self.earlier_fit_s = 0.0
        # Wall-clock start of this process's fit as the step measures it (`time.time()`: the
        # same clock in `ddp_spawn`'s rank processes), so the figures agree; else the fit start.
        self.started_at = started_at

    def on_fit_start(self, trainer: pl_lightning.Trainer, pl_module: Any) -> None:
        if self.started_at is None:
            self.started_at = time.time()

    def state_dict(self) -> dict[str, Any]:
        running = time.time() - self.started_at if self.started_at is not None else 0.0
        return {"fingerprint": self.fingerprint, "fit_s": self.earlier_fit_s + max(running, 0.0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Which checkpoint may be resumed is decided before the fit (`train._prepare_output_dir`
        # compares this fingerprint too); here only the time carries over.
        self.earlier_fit_s = float(state_dict.get("fit_s", 0.0))


class TrainingImagesMissing(RuntimeError):
    """More of the training images than allowed could not be read; the run stopped."""


class ImageReadGuard(pl_lightning.Callback):
    """Stops the run once more than `max_fraction` of this process's image reads have failed.

    A failed image costs its query (or its slot as a negative) and training goes on; but a
    corpus moved or deleted after the triplets were made, or a wrong image root, would
    otherwise "train" for hours on zeroed images that the loss leaves out. Every rank sees
    the global counts (`MMRetCLIP.last_step_stats`), so all ranks stop together; the paths
    named are this rank's. Lightning runs `ModelCheckpoint` after every other callback, so
    the failing step is not saved over the resume point.
    """

    EXAMPLES = 5

    def __init__(self, config_name: str, max_fraction: float) -> None:
        self.config_name = config_name
        self.max_fraction = max_fraction
        self.reads = 0
        self.failed = 0
        self.examples: list[str] = []

    def on_train_batch_end(self, trainer: pl_lightning.Trainer, pl_module: Any, *args: Any) -> None:
        stats = pl_module.last_step_stats
        self.reads += int(stats.get("image_reads", 0))
        self.failed += int(stats.get("failed_images", 0))
        for uri in getattr(pl_module, "last_failed_images", ()):
            if len(self.examples) < self.EXAMPLES and uri not in self.examples:
                self.examples.append(uri)
        if self.failed and self.failed > self.max_fraction * self.reads:
            raise TrainingImagesMissing(
                f"training {self.config_name!r} stopped at step {trainer.global_step}: "
                f"{self.failed} of {self.reads} image reads failed ({self.failed / self.reads:.0%}"
                f"; max_unreadable_image_fraction allows {self.max_fraction:.0%}); first: "
                f"{', '.join(self.examples) or '(none on this device)'}. The images the "
                "triplets name are missing or unreadable where this step runs (a corpus moved "
                "or deleted, a wrong image root): restore them and materialize again, which "
                "resumes from the last checkpoint; nothing was exported"
            )


class TrainingInterrupted(RuntimeError):
    """Training stopped on a signal after saving its state; materializing again resumes it."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the weights are ruined, so nothing may be exported."""


class StopOnNonFiniteLoss(pl_lightning.Callback):
    """Stops training at the first step whose (global) loss is not finite.

    A NaN step turns every weight NaN, and the run would go on for hours, export NaN weights
    and leave the evaluation to score them. Every rank sees the same global loss
    (`MMRetCLIP.last_step_stats`), so all ranks stop together. Put after `TrainingLog`, so the
    curve on disk shows the bad step; `ModelCheckpoint` runs after every other callback, so
    the ruined state of this step is never saved.
    """

    def __init__(self, config_name: str, learning_rate: float, temperature: float) -> None:
        self.config_name = config_name
        self.learning_rate = learning_rate
        self.temperature = temperature

    def on_train_batch_end(self, trainer: pl_lightning.Trainer, pl_module: Any, *args: Any) -> None:
        loss = pl_module.last_step_stats.get("loss", 0.0)
        if math.isfinite(loss):
            return
        raise TrainingDiverged(
            f"training {self.config_name!r} diverged: the loss was {loss} at step "
            f"{trainer.global_step} (learning_rate={self.learning_rate:g}, "
            f"temperature={self.temperature:g}); nothing was exported. Lower learning_rate (or "
            "lengthen warmup_steps), then materialize again: a changed setting starts over"
        )


class StopRequested(Exception):
    """Raised at the end of the step during which the stop was asked for, once it is saved."""


class StopCheckpoint(pl_lightning.Callback):
    """Saves `last.ckpt` at a step boundary when the run is asked to stop (SIGTERM, SIGINT).

    Without it every step since the last periodic checkpoint (up to
    `checkpoint_every_n_steps`: minutes of a GPU node) is lost and trained again.

    One device. SIGTERM (a `kill`, a scheduler's pre-emption, Kubernetes' pod eviction):
    Lightning notices it and stops after the current step, but saves nothing; the checkpoint
    is written at the end of the step, where `ModelCheckpoint` writes its own, so the resumed
    run is exactly the uninterrupted one. SIGINT (Ctrl-C; Dagster's "terminate run"), and
    SIGTERM where the host handles it in Python (Dagster maps SIGTERM to its SIGINT handler,
    which raises at once, mid-step; Lightning calls it after its own): while training runs in
    the main thread, the handlers in place are replaced. The first signal lets the step finish,
    saves it and raises `StopRequested`; `raise_interrupt` then raises what the replaced handler
    would have (KeyboardInterrupt, Dagster's interruption), carrying the caller's message.

    Several devices (`ddp_spawn`: every hook runs in the rank processes, none in the process
    that started them, which only waits for them). The signal reaches that parent process
    (what `kill`, Kubernetes and Dagster hit); Lightning gives it no handler there, and its
    Ctrl-C path exits while multiprocessing waits for the ranks, which train on to `max_steps`.
    So the parent's SIGINT and SIGTERM handlers are replaced too (`forward_to_ranks`): the
    first signal only writes the request into memory shared with the ranks. Each rank reads it
    at the end of every step (with any signal the rank received itself, e.g. a terminal's
    Ctrl-C, which reaches the whole process group, and the parent having died), and the ranks
    agree with one all-reduce (`reduce_boolean_decision`), so all of them stop after the same
    step: they set `trainer.should_stop`, training ends there, the state of that step is
    saved collectively at the end of training (`FinalCheckpoint`, or `ModelCheckpoint` when
    the step is one of its own) and the ranks exit; the parent's fit returns and `raise_interrupt`
    fails the run as on one device. Lightning's own SIGTERM handler in the ranks is replaced as
    well: it broadcasts from inside the signal handler (Lightning-AI/pytorch-lightning#20825),
    which can pair with another collective of the step.

    Repeats: Dagster's multiprocess executor forwards the interrupt it receives to its step
    processes, which a terminal's Ctrl-C (or `timeout -s INT`, which signals the whole process
    group) has already reached, so one Ctrl-C arrives twice. A repeat within `REPEAT_GRACE_S`
    of the first is therefore the same request. A later one, while the step still computes,
    stops at once (mid-step, as before: the resume point is the last one saved; with several
    devices the rank processes are killed first). From the moment the stop's save begins,
    repeats are only counted (`deferred_signals`): the save is not cut short before
    `last.ckpt` is renamed into place, and the stop that follows honours them (the run fails
    with the host's interruption either way).
    """

    REPEAT_GRACE_S = 3.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved_step: int | None = None
        self.stop_requested = False
        self.stopped_at_once = False
        self.deferred_signals = 0
        self._stop_signal: int | None = None
        self._requested_at = 0.0
        self._stopping = False  # the stop's save has begun: later signals wait
        self._replaced: dict[int, Any] = {}
        # The host's SIGTERM handler before Lightning wraps it (read in the main thread when
        # the callback is made, i.e. before the fit; Lightning restores it after).
        self._host_sigterm = (
            signal.getsignal(signal.SIGTERM)
            if threading.current_thread() is threading.main_thread()
            else None
        )
        # Several devices: [signal asked for (0: none), 1 once the ranks stop and save], in
        # memory shared with the ranks (`forward_to_ranks`); the parent's id and its ranks.
        self._shared: Any = None
        self._parent_pid: int | None = None
        self._launcher: Any = None
        self._rank_signal = 0  # a signal a rank process received itself

    def __getstate__(self) -> dict[str, Any]:
        # `ddp_spawn` pickles callbacks into its ranks; signal handlers need not pickle, and
        # the shared request travels as shared memory (allowed while processes are spawned).
        return {**self.__dict__, "_replaced": {}, "_host_sigterm": None, "_launcher": None}

    def forward_to_ranks(self, launcher: Any) -> None:
        """In the process that spawns the ranks (`ddp_spawn`), before the fit: SIGINT and
        SIGTERM become a stop request the ranks read after their current step; a repeat more
        than `REPEAT_GRACE_S` later kills them (`launcher.kill`) and stops at once."""
        if threading.current_thread() is not threading.main_thread():
            return
        self._shared = multiprocessing.get_context("spawn").RawArray("i", 2)
        self._parent_pid = os.getpid()
        self._launcher = launcher
        for signum in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(signum)
            if current not in (signal.SIG_IGN, None):  # else ignored, or not ours to handle
                self._replaced[signum] = current
                signal.signal(signum, self._on_signal)

    def on_train_start(self, trainer: pl_lightning.Trainer, pl_module: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if trainer.world_size != 1:
            self._listen_in_rank()
            return
        current = signal.getsignal(signal.SIGINT)
        if current not in (signal.SIG_IGN, None):  # else ignored, or not ours to handle
            self._replaced[signal.SIGINT] = current
            signal.signal(signal.SIGINT, self._on_signal)
        if callable(self._host_sigterm):
            # A host handler (Dagster's) that Lightning calls after its own notice: it would
            # raise mid-step. Without one, Lightning's SIGTERM path below applies.
            # Put back as the host's own: Lightning's teardown restores that one too.
            self._replaced[signal.SIGTERM] = self._host_sigterm
            signal.signal(signal.SIGTERM, self._on_signal)

    def _listen_in_rank(self) -> None:
        """A rank process: a SIGINT or SIGTERM it receives itself only asks for the stop, which
        the ranks agree on after the step (`_agree_on_stop`)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(signum)
            if current not in (signal.SIG_IGN, None):
                self._replaced[signum] = current
                signal.signal(signum, self._on_rank_signal)

    def _on_rank_signal(self, signum: int, frame: FrameType | None) -> None:
        self._rank_signal = self._rank_signal or signum
        if self._shared is not None and not self._shared[0]:
            self._shared[0] = signum  # the parent raises what this signal would have

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stop_requested:
            self.stop_requested, self._stop_signal = True, signum
            self._requested_at = time.monotonic()
            if self._shared is not None and not self._shared[0]:
                self._shared[0] = signum  # the ranks read it after their current step
            return
        saving = self._stopping or (self._shared is not None and self._shared[1])
        if saving or time.monotonic() - self._requested_at < self.REPEAT_GRACE_S:
            self.deferred_signals += 1  # the same request delivered twice, or the save runs
            return
        # A second request while the step computes: stop now, as the replaced handler would.
        self.stopped_at_once = True
        if self._launcher is not None:
            self._launcher.kill(signal.SIGKILL)  # else multiprocessing waits for them at exit
        self.raise_interrupt(None, frame)

    def on_train_batch_end(self, trainer: pl_lightning.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.world_size != 1:
            self._agree_on_stop(trainer)
            return
        if trainer.received_sigterm or self.stop_requested:
            self._save(trainer, stopping=self.stop_requested)
        if self.stop_requested:
            raise StopRequested(f"stopped on a signal after step {trainer.global_step}")

    def _agree_on_stop(self, trainer: pl_lightning.Trainer) -> None:
        """Every rank, after every step: stop here when any rank was asked to (one all-reduce,
        so all ranks stop after the same step and save it together at the end of training)."""
        parent_gone = self._parent_pid is not None and os.getppid() != self._parent_pid
        asked = (
            bool(self._rank_signal)
            or parent_gone
            or (self._shared is not None and bool(self._shared[0]))
        )
        if not trainer.strategy.reduce_boolean_decision(asked, all=False):
            return
        self.stop_requested = True
        if self._shared is not None:
            if not self._shared[0]:  # asked on another node, or the parent is gone
                self._shared[0] = signal.SIGTERM if parent_gone else signal.SIGINT
            self._shared[1] = 1  # the parent defers repeats from now on: the save runs
        # What the process that raises the stop (a `ddp` rank 0, launched by torchrun) raises.
        self._stop_signal = self._stop_signal or self._rank_signal or None
        trainer.should_stop = True

    def collect_rank_stop(self) -> None:
        """After a several-device fit, in the parent: take over a stop the ranks agreed on
        without this process having been signalled (a signal sent to a rank only)."""
        if self._shared is not None and self._shared[0] and not self.stop_requested:
            self.stop_requested, self._stop_signal = True, int(self._shared[0])

    def on_exception(
        self, trainer: pl_lightning.Trainer, pl_module: Any, exception: BaseException
    ) -> None:
        if not isinstance(exception, StopRequested):
            self.restore_handler()  # on a stop, repeats stay deferred until it is raised
        if isinstance(exception, SIGTERMException):
            self._save(trainer)

    def on_train_end(self, trainer: pl_lightning.Trainer, pl_module: Any) -> None:
        # A stop after the last step is raised by the caller, which restores the handlers then;
        # a rank process has nothing more to raise.
        if not self.stop_requested or trainer.world_size != 1:
            self.restore_handler()

    def restore_handler(self) -> None:
        """Put the replaced signal handlers back (idempotent)."""
        for signum, handler in self._replaced.items():
            signal.signal(signum, handler)
        self._replaced = {}

    def raise_interrupt(self, message: str | None = None, frame: FrameType | None = None) -> None:
        """Raise what the replaced handler of the stop's signal raises (KeyboardInterrupt if it
        raises none), with `message` as its text; the handlers are restored first."""
        signum = self._stop_signal or signal.SIGINT
        host = self._host_sigterm if signum == signal.SIGTERM else None
        handler = self._replaced.get(signum, host)
        self.restore_handler()
        error: BaseException = (
            KeyboardInterrupt() if signum == signal.SIGINT else TrainingInterrupted()
        )
        if callable(handler):
            try:
                handler(signum, frame)
            except BaseException as raised:  # re-raised below, with the message
                error = raised
        if message is not None:
            error.args = (message,)
        raise error

    def _save(self, trainer: pl_lightning.Trainer, stopping: bool = False) -> None:
        self._stopping = self._stopping or stopping
        if self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_step = trainer.global_step


class UploadsFinished(pl_lightning.Callback):
    """Waits for the background uploads of the resume point (`ResumePointMirror`) when a fit
    ends or stops, in the process that queued them (a `ddp_spawn` rank as well). Put last, so
    the checkpoints written at the end or on a stop are queued before it waits."""

    def __init__(self, mirror: ResumePointMirror) -> None:
        self.mirror = mirror

    def on_train_end(self, trainer: pl_lightning.Trainer, pl_module: Any) -> None:
        self.mirror.wait()

    def on_exception(
        self, trainer: pl_lightning.Trainer, pl_module: Any, exception: BaseException
    ) -> None:
        self.mirror.wait()


class SameFolderCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, then renames it into place; with
    a `mirror` (`resume.ResumePointMirror`, the data root on an object store) each `last.ckpt`
    is then queued for upload in the background, whichever callback wrote it (periodic,
    SIGTERM/Ctrl-C, final); `UploadsFinished` and the training step wait for it.

    Lightning's own writer serialises the whole checkpoint in memory, writes it to the system
    temporary folder and moves it over: across file systems (a small /tmp, a data disk) that
    move is a copy, and a kill during it leaves a truncated `last.ckpt`, the resume point. A
    rename within one folder is atomic, and a writer killed mid-file leaves only a temporary
    that the next write sweeps away (`lib.storage.write_atomic`).
    """

    def __init__(self, mirror: ResumePointMirror | None = None) -> None:
        super().__init__()
        self.mirror = mirror

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        write_atomic(Path(path), lambda tmp: torch.save(checkpoint, tmp))
        if self.mirror is not None and Path(path).name == "last.ckpt":
            self.mirror.upload(Path(path), int(checkpoint["global_step"]))

"""The resume point kept under the data root, so a step retried on another machine goes on.

With the data root on an object store, training runs in a local work folder under
`$MEGAPAIRS_HOME/training/<config>/` (Lightning needs a file system), and a retried step often
runs in a fresh pod or on another machine whose disk holds nothing of the first attempt. So
every time `lightning/last.ckpt` is written (every `checkpoint_every_n_steps`, on SIGTERM or
Ctrl-C, at the end) `ResumePointMirror.upload` copies it to the config's published folder, in a
background thread (training goes on meanwhile; a stop or the end waits for it):

    <data>/mmret_clip_checkpoint/<config>/loss_curve.csv        the curve up to that step
    <data>/mmret_clip_checkpoint/<config>/lightning/last.ckpt   one PUT (never half an object)
    <data>/mmret_clip_checkpoint/<config>/run.json              fingerprint + "resume_step"

in that order, so `run.json` never names a step its checkpoint has not reached. On start,
`fetch_resume_point` brings the checkpoint (and the curve) back when this machine has none of
the same fingerprint, or an older one. The start-over rule is the local one: only a
`run.json` with the run's fingerprint is fetched (and the fingerprint stored inside the
checkpoint, `callbacks.RunRecord`, must agree); results of other settings are withdrawn
(`train._withdraw_stale_publication`), the stale resume point with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megapairs_assets.lib.storage import DataPath, is_local, write_atomic

RESUME_POINT = "lightning/last.ckpt"
STATE_FILE = "run.json"
CURVE_FILE = "loss_curve.csv"
# Frozen copies (hard links) of checkpoints queued for upload, inside the work folder.
UPLOAD_SNAPSHOTS = ".uploading"


@dataclass(frozen=True)
class CheckpointRecord:
    """What a Lightning checkpoint says about itself: its step, the fingerprint of the run it
    belongs to and the fit time spent reaching it (None for checkpoints older than the record)."""

    step: int
    fingerprint: str | None
    fit_s: float


def read_checkpoint_record(path: Path) -> CheckpointRecord | None:
    """The record of a local checkpoint file; None when it cannot be read."""
    import torch

    from megapairs_assets.training.callbacks import RunRecord

    try:
        # mmap: only the small header is read, not gigabytes of weights.
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        step = int(checkpoint["global_step"])
        record = checkpoint.get("callbacks", {}).get(RunRecord.__qualname__) or {}
        return CheckpointRecord(step, record.get("fingerprint"), float(record.get("fit_s", 0.0)))
    except Exception:  # any unreadable checkpoint is handled the same way by the callers
        return None


class ResumePointMirror:
    """Uploads `last.ckpt` of a work folder to the published folder each time it is written,
    in the background, so training never waits for the object store.

    One worker thread uploads; at most one upload waits behind the one in flight, and a newer
    resume point replaces a waiting older one (only the newest is worth having: each upload
    replaces the same keys). Being one worker, two uploads of the same key never race. The
    checkpoint is hard-linked into `<work>/.uploading/` when queued (no copy; a file system
    without hard links gets a copy), so the next save's rename over `last.ckpt` never changes
    the bytes under an upload; the curve, a few kilobytes, is copied.

    `wait()` blocks until the queue is empty: training calls it at the end of a fit and on
    every stop (SIGTERM, Ctrl-C, an error), before it says where the state is saved. A failed
    upload never loses the local checkpoint and never stops training: it is told to `warn`,
    counted in `failed_uploads`, and the next checkpoint tries again (`upload_if_behind`
    catches up at the end). `ddp_spawn` pickles the mirror into its rank processes without its
    thread (a new one starts there) and with `print` as its log (a run's logger does not
    pickle).
    """

    def __init__(
        self,
        published: DataPath,
        work: Path,
        state: dict[str, Any],
        log: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.published = published
        self.work = work
        self.state = state
        self._log = log or print
        self._warn = warn or self._log
        self._uploaded_step: int | None = None
        self.failed_uploads = 0
        self._init_worker()
        # Snapshots a killed process left behind: nothing will upload them now.
        shutil.rmtree(self._snapshots, ignore_errors=True)

    @property
    def _snapshots(self) -> Path:
        return self.work / UPLOAD_SNAPSHOTS

    def _init_worker(self) -> None:
        self._condition = threading.Condition()
        self._pending: _Upload | None = None
        self._running: _Upload | None = None
        self._worker: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        skipped = ("_condition", "_pending", "_running", "_worker")
        return {
            **{k: v for k, v in self.__dict__.items() if k not in skipped},
            "_log": print,
            "_warn": print,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_worker()

    def upload(self, checkpoint: Path, step: int) -> None:
        """Queue `checkpoint` (of step `step`) for upload with the curve so far; returns at
        once. The same step again (the final save after a periodic one) is not queued."""
        with self._condition:
            queued = [u.step for u in (self._running, self._pending) if u is not None]
            if step == self._uploaded_step or step in queued:
                return
        try:
            snapshot = self._snapshot(checkpoint, step)
        except OSError as error:  # a full disk: this upload is lost, the checkpoint is not
            self.failed_uploads += 1
            self._warn(
                f"warning: could not queue the resume point of step {step} for upload "
                f"({error}); training goes on and the next checkpoint tries again"
            )
            return
        with self._condition:
            replaced, self._pending = self._pending, snapshot
            if self._worker is None or not self._worker.is_alive():
                # Not a daemon: a process that ends without `wait()` (a `ddp_spawn` rank that
                # raised) still finishes the upload in flight before it exits.
                self._worker = threading.Thread(target=self._work, name="resume-point-upload")
                self._worker.start()
        if replaced is not None:
            replaced.discard()

    def wait(self) -> None:
        """Block until every queued upload has finished (or failed, counted and told)."""
        with self._condition:
            while self._pending is not None or self._running is not None:
                self._condition.wait()
        # Called by the thread that queues (the training loop), so no snapshot is being made.
        with contextlib.suppress(OSError):
            self._snapshots.rmdir()

    def upload_now(self, checkpoint: Path, step: int) -> bool:
        """Upload and wait; whether the store now holds the resume point of `step`."""
        self.upload(checkpoint, step)
        self.wait()
        return self._uploaded_step == step

    def upload_if_behind(self, step: int) -> bool:
        """Upload the work folder's `last.ckpt` unless the published one is already at `step`
        (asked of the store: under `ddp_spawn` the rank processes did the uploads), and wait;
        whether the store now holds the resume point of `step`."""
        self.wait()
        published = _read_json(self.published / STATE_FILE)
        fingerprint = self.state["fingerprint"]
        if published.get("fingerprint") == fingerprint and published.get("resume_step") == step:
            self._uploaded_step = step
            return True
        return self.upload_now(self.work / RESUME_POINT, step)

    def _snapshot(self, checkpoint: Path, step: int) -> _Upload:
        folder = self._snapshots / f"step-{step}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        frozen = folder / checkpoint.name
        try:
            os.link(checkpoint, frozen)
        except OSError:  # no hard links here (or across devices): a copy, slower but safe
            shutil.copyfile(checkpoint, frozen)
        curve = self.work / CURVE_FILE
        frozen_curve = folder / CURVE_FILE if curve.is_file() else None
        if frozen_curve is not None:
            shutil.copyfile(curve, frozen_curve)
        return _Upload(step, frozen, frozen_curve, folder)

    def _work(self) -> None:
        while True:
            with self._condition:
                self._running, self._pending = self._pending, None
                upload = self._running
                if upload is None:
                    self._worker = None
                    self._condition.notify_all()
                    return
            try:
                self._publish(upload)
            finally:
                upload.discard()
                with self._condition:
                    self._running = None
                    self._condition.notify_all()

    def _publish(self, upload: _Upload) -> None:
        """Curve, checkpoint, then run.json: `run.json` never names a step its checkpoint has
        not reached."""
        started = time.perf_counter()
        try:
            if upload.curve is not None:
                upload_file(upload.curve, self.published / CURVE_FILE)
            upload_file(upload.checkpoint, self.published / RESUME_POINT)
            _write_json(
                self.published / STATE_FILE,
                {**self.state, "complete": False, "resume_step": upload.step},
            )
        except Exception as error:  # any store failure: the local checkpoint is still there
            self.failed_uploads += 1
            self._warn(
                f"warning: could not upload the resume point of step {upload.step} to "
                f"{self.published} ({type(error).__name__}: {error}); training goes on and the "
                f"checkpoint stays in {self.work / RESUME_POINT} (the next one tries again)"
            )
            return
        self._uploaded_step = upload.step
        size_mb = upload.checkpoint.stat().st_size / 1e6
        self._log(
            f"resume point of step {upload.step} ({size_mb:.0f} MB) uploaded to "
            f"{self.published / RESUME_POINT} in {time.perf_counter() - started:.1f} s"
        )


@dataclass
class _Upload:
    """One queued upload: its step and the frozen files (removed once uploaded or replaced)."""

    step: int
    checkpoint: Path
    curve: Path | None
    folder: Path

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def fetch_resume_point(
    published: DataPath, work: Path, state: dict[str, Any], say: Callable[[str], None]
) -> int | None:
    """Copy the published resume point into `work` when it belongs to this run (the same
    fingerprint) and is ahead of the local one; returns its step, or None when nothing was
    fetched. Stale local results of other settings are cleared first."""
    fingerprint = state["fingerprint"]
    remote = _read_json(published / STATE_FILE)
    remote_step = remote.get("resume_step")
    if remote.get("fingerprint") != fingerprint or not isinstance(remote_step, int):
        return None
    local_state = _read_json(work / STATE_FILE)
    local = work / RESUME_POINT
    if local_state.get("fingerprint") == fingerprint and local.is_file():
        record = read_checkpoint_record(local)
        if record is not None and record.step >= remote_step:
            return None  # this machine's own checkpoint is as far on
    source = published / RESUME_POINT
    if not source.exists():
        return None
    started = time.perf_counter()
    incoming = work / "last.ckpt.fetched"  # beside lightning/, which may be cleared below
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(incoming, lambda tmp: source.fs.get_file(source.path, str(tmp)))
    record = read_checkpoint_record(incoming)
    if record is None or record.fingerprint != fingerprint:
        incoming.unlink()
        found = "unreadable" if record is None else f"of fingerprint {record.fingerprint}"
        say(f"{source} is {found}, not this run's {fingerprint}; not resuming from it")
        return None
    if local_state.get("fingerprint") != fingerprint:
        clear_work_folder(work)
    curve = published / CURVE_FILE
    if curve.exists():
        write_atomic(work / CURVE_FILE, lambda tmp: curve.fs.get_file(curve.path, str(tmp)))
    local.parent.mkdir(parents=True, exist_ok=True)
    incoming.replace(local)
    _write_json(work / STATE_FILE, {**state, "complete": False})
    say(
        f"fetched the resume point of step {record.step} from {source} "
        f"({local.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s)"
    )
    return record.step


def clear_work_folder(work: Path) -> None:
    """Remove what a run of other settings left in a work folder (checkpoints, export, curve)."""
    for stale in ("lightning", "open_clip"):
        shutil.rmtree(work / stale, ignore_errors=True)
    (work / CURVE_FILE).unlink(missing_ok=True)


def upload_file(source: Path, target: DataPath) -> None:
    """Upload a local file to an object store in one atomic step (`write_atomic`: a single PUT
    with its size check). The temporary file it uploads is a link to `source`, so gigabytes of
    checkpoint or export are not copied on local disk first; a link is never moved into place,
    which is why a local target is refused."""
    if is_local(target):
        raise ValueError(f"upload_file is for object-store targets, not {target}")
    write_atomic(target, lambda tmp: tmp.symlink_to(source.resolve()))


def _read_json(path: DataPath) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_json(path: DataPath, value: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))

"""The resume point kept under the data root, so a step retried on another machine goes on.

With the data root on an object store, training runs in a local work folder under
`$MEGAPAIRS_HOME/training/<config>/` (Lightning needs a file system), and a retried step often
runs in a fresh pod or on another machine whose disk holds nothing of the first attempt. So
every time `lightning/last.ckpt` is written (every `checkpoint_every_n_steps`, on SIGTERM or
Ctrl-C, at the end) `ResumePointMirror.upload` copies it to the config's published folder:

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

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megapairs_assets.lib.storage import DataPath, is_local, write_atomic

RESUME_POINT = "lightning/last.ckpt"
STATE_FILE = "run.json"
CURVE_FILE = "loss_curve.csv"


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
    """Uploads `last.ckpt` of a work folder to the published folder each time it is written.

    A failed upload is logged and training goes on (the next checkpoint tries again): losing
    the object store for a minute must not cost hours of training. `log` is replaced by
    `print` when `ddp_spawn` pickles the mirror into its rank processes (a run's logger does
    not pickle).
    """

    def __init__(
        self,
        published: DataPath,
        work: Path,
        state: dict[str, Any],
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.published = published
        self.work = work
        self.state = state
        self._log = log or print
        self._uploaded_step: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_log": print}

    def upload(self, checkpoint: Path, step: int) -> bool:
        """Publish `checkpoint` (of step `step`) with the curve so far; whether it was."""
        if step == self._uploaded_step:
            return True  # the same state again (the final save after a periodic one)
        started = time.perf_counter()
        try:
            curve = self.work / CURVE_FILE
            if curve.is_file():
                upload_file(curve, self.published / CURVE_FILE)
            upload_file(checkpoint, self.published / RESUME_POINT)
            _write_json(
                self.published / STATE_FILE,
                {**self.state, "complete": False, "resume_step": step},
            )
        except OSError as error:
            self._log(
                f"could not upload the resume point of step {step} to {self.published}: "
                f"{error}; training goes on (the next checkpoint tries again)"
            )
            return False
        self._uploaded_step = step
        size_mb = checkpoint.stat().st_size / 1e6
        self._log(
            f"resume point of step {step} ({size_mb:.0f} MB) uploaded to "
            f"{self.published / RESUME_POINT} in {time.perf_counter() - started:.1f} s"
        )
        return True

    def upload_if_behind(self, step: int) -> None:
        """Upload the work folder's `last.ckpt` unless the published one is already at `step`
        (asked of the store: under `ddp_spawn` the rank processes did the uploads)."""
        published = _read_json(self.published / STATE_FILE)
        fingerprint = self.state["fingerprint"]
        if published.get("fingerprint") == fingerprint and published.get("resume_step") == step:
            return
        self.upload(self.work / RESUME_POINT, step)


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
    import shutil

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

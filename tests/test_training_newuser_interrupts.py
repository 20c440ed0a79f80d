"""A training run that is stopped, diverges or writes its checkpoint where /tmp is unusable.

What a user meets after `megapairs demo` when a run is pre-empted (SIGTERM), a learning rate is
far too high, or the machine's temporary folder is small or missing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl_lightning
import polars as pl
import pytest
import torch
from test_training_support import OneThread, tiny_config, write_triplets

from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.callbacks import (
    StopCheckpoint,
    TrainingDiverged,
    read_loss_curve,
)
from megapairs_assets.training.train import train_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]

# No periodic checkpoint (every 100 steps of 8): only the SIGTERM one can exist.
_RUN = """
import sys, time
import lightning.pytorch as pl_lightning
import torch
sys.path.insert(0, {tests!r})
from test_training_support import tiny_config
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.train import train_checkpoint
from pathlib import Path

class Slow(pl_lightning.Callback):
    def on_train_batch_end(self, *args):
        time.sleep(0.25)

torch.set_num_threads(1)
config = tiny_config(Path({models!r}), max_steps=8, checkpoint_every_n_steps=100)
train_checkpoint("preempted", config, [Path({triplets!r})], DataLayout(Path({home!r})),
                 extra_callbacks=[Slow()])
"""


def _last_logged_step(curve_path: Path) -> int:
    try:
        return int(read_loss_curve(curve_path)["step"].max() or 0)
    except (pl.exceptions.PolarsError, OSError):
        return 0  # not written yet, or caught mid-line


def test_sigterm_saves_the_step_it_stopped_at_fails_the_run_and_resumes_exactly(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=24, images=12)
    home = tmp_path / "home"
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(_RUN).format(
            tests=str(REPO_ROOT / "tests"),
            models=str(demo_models_dir),
            triplets=str(triplets),
            home=str(home),
        )
    )
    out = home / "data" / "mmret_clip_checkpoint" / "preempted"
    process = subprocess.Popen(
        [sys.executable, str(script)], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while _last_logged_step(out / "loss_curve.csv") < 3:
            assert process.poll() is None, "the training process ended before it was stopped"
            assert time.monotonic() < deadline, "the training process made no progress"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # what a scheduler or `kill` sends
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()

    # Not exit status 0: the run did not finish, and whoever started it must know.
    assert process.returncode != 0
    assert "stopped on SIGTERM" in stderr and "materialize it again to resume" in stderr
    stopped_at = _last_logged_step(out / "loss_curve.csv")
    assert 3 <= stopped_at < 8
    saved = torch.load(out / "lightning" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == stopped_at  # no step is trained twice
    assert not (out / "open_clip").exists()  # nothing half-trained for the evaluation to score

    config = tiny_config(demo_models_dir, max_steps=8, checkpoint_every_n_steps=100)
    with OneThread():
        resumed = train_checkpoint("preempted", config, [triplets], DataLayout(home))
        reference = train_checkpoint(
            "preempted", config, [triplets], DataLayout(tmp_path / "uninterrupted")
        )
    assert resumed.metadata["resumed_from_step"] == stopped_at
    got = read_loss_curve(resumed.outputs["loss_curve"])
    want = read_loss_curve(reference.outputs["loss_curve"])
    assert got["step"].to_list() == list(range(1, 9))
    assert got["loss"].to_list() == pytest.approx(want["loss"].to_list(), rel=1e-5)


def test_a_diverging_run_stops_at_the_first_nan_step_and_exports_nothing(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=8, images=10)
    # A learning rate far too high: the first update ruins the weights.
    config = tiny_config(demo_models_dir, learning_rate=1e8, max_steps=6)
    with OneThread(), pytest.raises(TrainingDiverged, match=r"diverged.*step 2.*learning_rate"):
        train_checkpoint("too-hot", config, [triplets], DataLayout(tmp_path / "home"))
    out = tmp_path / "home" / "data" / "mmret_clip_checkpoint" / "too-hot"
    assert not (out / "open_clip").exists()
    curve = read_loss_curve(out / "loss_curve.csv")
    assert curve["step"].to_list() == [1, 2]  # it stopped there, not after 6 NaN steps
    assert not curve["loss"].is_finite().all()
    last = out / "lightning" / "last.ckpt"
    if last.exists():  # a resume point, if any, holds no ruined weights
        state = torch.load(last, weights_only=False)
        assert state["global_step"] < 2
        assert all(t.isfinite().all() for t in state["state_dict"].values())


def test_checkpoints_are_written_beside_last_ckpt_not_in_the_temporary_folder(
    tmp_path: Path, demo_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint staged in /tmp and moved over `last.ckpt` is a copy across file systems,
    not atomic: a kill mid-copy leaves a truncated resume point. Here /tmp does not exist."""
    triplets = write_triplets(tmp_path, rows=8, images=10)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-temporary-folder"))
    config = tiny_config(demo_models_dir, max_steps=4, checkpoint_every_n_steps=2)
    with OneThread():
        result = train_checkpoint("local-temp", config, [triplets], DataLayout(tmp_path / "home"))
    last = result.outputs["lightning_checkpoint"]
    assert torch.load(last, weights_only=False)["global_step"] == 4
    assert os.listdir(last.parent) == ["last.ckpt"]  # no temporaries left behind


class _Interrupted(Exception):
    """Stands in for Dagster's DagsterExecutionInterruptedError (its SIGINT handler raises it)."""


class _CtrlC(pl_lightning.Callback):
    """Presses Ctrl-C `times` times as step `at_step` starts (the signal lands mid-step)."""

    def __init__(self, at_step: int, times: int = 1) -> None:
        self.at_step, self.times = at_step, times

    def on_train_batch_start(self, trainer: pl_lightning.Trainer, *args: object) -> None:
        if trainer.global_step == self.at_step - 1:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted


def test_ctrl_c_finishes_the_step_saves_it_and_raises_what_the_host_expects(
    tmp_path: Path, demo_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    triplets = write_triplets(tmp_path, rows=24, images=12)
    home = tmp_path / "home"
    config = tiny_config(demo_models_dir, max_steps=8, checkpoint_every_n_steps=100)
    previous = signal.signal(signal.SIGINT, _raise_interrupted)  # as Dagster's step does
    try:
        with OneThread(), pytest.raises(_Interrupted, match=r"stopped at step 3 of 8; saved"):
            train_checkpoint(
                "ctrl-c", config, [triplets], DataLayout(home), extra_callbacks=[_CtrlC(3)]
            )
        assert signal.getsignal(signal.SIGINT) is _raise_interrupted  # the host's is back
        out = home / "data" / "mmret_clip_checkpoint" / "ctrl-c"
        assert torch.load(out / "lightning" / "last.ckpt", weights_only=False)["global_step"] == 3
        assert read_loss_curve(out / "loss_curve.csv")["step"].to_list() == [1, 2, 3]

        # Twice, the second past the grace for a forwarded copy of the first: stop at once,
        # mid-step, as before (nothing saved: no periodic checkpoint yet).
        monkeypatch.setattr(StopCheckpoint, "REPEAT_GRACE_S", 0.0)
        with OneThread(), pytest.raises(_Interrupted, match="before any checkpoint was saved"):
            train_checkpoint(
                "twice", config, [triplets], DataLayout(home), extra_callbacks=[_CtrlC(3, 2)]
            )
        assert not (home / "data" / "mmret_clip_checkpoint" / "twice" / "lightning").exists()
    finally:
        signal.signal(signal.SIGINT, previous)

    with OneThread():
        resumed = train_checkpoint("ctrl-c", config, [triplets], DataLayout(home))
        reference = train_checkpoint(
            "ctrl-c", config, [triplets], DataLayout(tmp_path / "uninterrupted")
        )
    assert resumed.metadata["resumed_from_step"] == 3
    got = read_loss_curve(resumed.outputs["loss_curve"])["loss"].to_list()
    want = read_loss_curve(reference.outputs["loss_curve"])["loss"].to_list()
    assert got == pytest.approx(want, rel=1e-5)

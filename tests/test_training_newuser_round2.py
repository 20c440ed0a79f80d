"""Training, new-user round 2: a stop under Dagster saves the step it stopped at and says how
to resume; a moved image folder resumes, changed image bytes start over.

The stop tests deliver real signals: to a child process that trains under Dagster's own
interrupt handling (`capture_interrupts` + `raise_execution_interrupts`, what a step process
runs under), and to this process during the stop's save.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl_lightning
import polars as pl
import pytest
import torch
from test_training_support import OneThread, tiny_config, write_triplets

from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.callbacks import StopCheckpoint, read_loss_curve
from megapairs_assets.training.train import train_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]

# No periodic checkpoint (every 100 steps of 8): only the stop's can exist.
_RUN_UNDER_DAGSTER = """
import sys, time
import lightning.pytorch as pl_lightning
import torch
sys.path.insert(0, {tests!r})
from dagster._core.errors import DagsterExecutionInterruptedError, raise_execution_interrupts
from dagster._utils.interrupts import capture_interrupts
from test_training_support import tiny_config
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.train import train_checkpoint
from pathlib import Path

class Slow(pl_lightning.Callback):
    def on_train_batch_end(self, *args):
        time.sleep(0.2)

torch.set_num_threads(1)
config = tiny_config(Path({models!r}), max_steps=8, checkpoint_every_n_steps=100)
# As a Dagster step process runs a step: interrupts captured, raised inside the step's code
# (SIGTERM mapped to the same handler).
with capture_interrupts():
    try:
        with raise_execution_interrupts():
            train_checkpoint("stopped", config, [Path({triplets!r})],
                             DataLayout(Path({home!r})), extra_callbacks=[Slow()],
                             log=lambda line: print("LOG", line, flush=True))
    except DagsterExecutionInterruptedError as error:
        print(f"FAILED {{type(error).__name__}}: {{error}}", file=sys.stderr)
        sys.exit(3)
"""


def _last_logged_step(curve_path: Path) -> int:
    try:
        return int(read_loss_curve(curve_path)["step"].max() or 0)
    except (pl.exceptions.PolarsError, OSError):
        return 0  # not written yet, or caught mid-line


def test_ctrl_c_under_dagster_saves_the_step_it_stopped_at_and_says_how_to_resume(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=24, images=12)
    home = tmp_path / "home"
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(_RUN_UNDER_DAGSTER).format(
            tests=str(REPO_ROOT / "tests"),
            models=str(demo_models_dir),
            triplets=str(triplets),
            home=str(home),
        )
    )
    out = home / "data" / "mmret_clip_checkpoint" / "stopped"
    process = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while _last_logged_step(out / "loss_curve.csv") < 3:
            assert process.poll() is None, "the training process ended before it was stopped"
            assert time.monotonic() < deadline, "the training process made no progress"
            time.sleep(0.05)
        # `timeout -s INT` (or a terminal's Ctrl-C) reaches the step process, then Dagster's
        # multiprocess executor forwards the interrupt it got too: two, moments apart.
        process.send_signal(signal.SIGINT)
        time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()

    assert process.returncode == 3, stderr[-3000:]  # Dagster's interruption, raised by the step
    stopped_at = _last_logged_step(out / "loss_curve.csv")
    assert 3 <= stopped_at < 8
    last = out / "lightning" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == stopped_at  # nothing lost
    line = (
        f"stopped: stopped at step {stopped_at} of 8; saved {last}; "
        f"materialize it again to resume from step {stopped_at}"
    )
    assert f"LOG {line}" in stdout.splitlines()  # the run's log says it
    # ... and so does the failure itself (what `megapairs status` shows), not an empty message.
    assert f"FAILED DagsterExecutionInterruptedError: {line}" in stderr


class _CtrlCAtStep(pl_lightning.Callback):
    """Ctrl-C as step `at_step` starts, and again while the stop's checkpoint is being saved."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self.saves_interrupted = 0

    def on_train_batch_start(self, trainer: pl_lightning.Trainer, *args: object) -> None:
        if trainer.global_step == self.at_step - 1:
            os.kill(os.getpid(), signal.SIGINT)

    def on_save_checkpoint(self, trainer: pl_lightning.Trainer, *args: object) -> None:
        # Inside `trainer.save_checkpoint`, before the file is written and renamed.
        self.saves_interrupted += 1
        os.kill(os.getpid(), signal.SIGINT)


class _Interrupted(Exception):
    """Stands in for Dagster's DagsterExecutionInterruptedError (its SIGINT handler raises it)."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted


def test_a_second_ctrl_c_during_the_stop_save_waits_until_the_checkpoint_is_in_place(
    tmp_path: Path, demo_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No grace for a forwarded copy: the second Ctrl-C counts as a user's second press.
    monkeypatch.setattr(StopCheckpoint, "REPEAT_GRACE_S", 0.0)
    triplets = write_triplets(tmp_path, rows=24, images=12)
    home = tmp_path / "home"
    config = tiny_config(demo_models_dir, max_steps=8, checkpoint_every_n_steps=100)
    presses = _CtrlCAtStep(3)
    previous = signal.signal(signal.SIGINT, _raise_interrupted)  # as Dagster's step does
    try:
        with OneThread(), pytest.raises(_Interrupted) as raised:
            train_checkpoint(
                "save-cut", config, [triplets], DataLayout(home), extra_callbacks=[presses]
            )
        assert signal.getsignal(signal.SIGINT) is _raise_interrupted  # the host's is back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert presses.saves_interrupted == 1
    last = home / "data" / "mmret_clip_checkpoint" / "save-cut" / "lightning" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert str(raised.value) == (
        f"save-cut: stopped at step 3 of 8; saved {last}; materialize it again to resume from "
        "step 3"
    )


class _SigtermAtStep(pl_lightning.Callback):
    """SIGTERM (a pod's eviction) as step `at_step` starts."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer: pl_lightning.Trainer, *args: object) -> None:
        if trainer.global_step == self.at_step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_where_the_host_raises_on_it_finishes_the_step_and_saves_it(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    """Dagster maps SIGTERM to its SIGINT handler, which raises at once; Lightning calls it
    after its own notice, so the step was cut short and nothing saved."""
    triplets = write_triplets(tmp_path, rows=24, images=12)
    home = tmp_path / "home"
    config = tiny_config(demo_models_dir, max_steps=8, checkpoint_every_n_steps=100)
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        with OneThread(), pytest.raises(_Interrupted, match="stopped at step 3 of 8; saved"):
            train_checkpoint(
                "evicted",
                config,
                [triplets],
                DataLayout(home),
                extra_callbacks=[_SigtermAtStep(3)],
            )
        assert signal.getsignal(signal.SIGTERM) is _raise_interrupted  # the host's is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = home / "data" / "mmret_clip_checkpoint" / "evicted"
    assert torch.load(out / "lightning" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert read_loss_curve(out / "loss_curve.csv")["step"].to_list() == [1, 2, 3]


def _triplets_under(images: Path, rows: pl.DataFrame, path: Path) -> Path:
    """The triplet rows with their image folder replaced by `images` (absolute paths)."""

    def moved(expr: pl.Expr) -> pl.Expr:
        return pl.lit(str(images) + "/") + expr.str.split("/").list.last()

    rows.with_columns(
        moved(pl.col("q_img")).alias("q_img"),
        moved(pl.col("t_img")).alias("t_img"),
        pl.col("hns").list.eval(moved(pl.element())).alias("hns"),
    ).write_parquet(path)
    return path


def test_a_moved_image_folder_resumes_and_changed_image_bytes_start_over(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=24, images=12)
    rows = pl.read_parquet(triplets)
    home = DataLayout(tmp_path / "home")
    config = tiny_config(demo_models_dir, max_steps=4, checkpoint_every_n_steps=2)
    said: list[str] = []
    with OneThread():
        first = train_checkpoint("moves", config, [triplets], home, log=said.append)
    assert first.metadata["resumed_from_step"] == 0

    # The corpus remounted elsewhere, byte for byte: the finished run is kept, not retrained.
    moved = tmp_path / "remounted" / "images"
    moved.parent.mkdir()
    (tmp_path / "images").rename(moved)
    moved_triplets = _triplets_under(moved, rows, tmp_path / "moved.parquet")
    said.clear()
    with OneThread():
        again = train_checkpoint("moves", config, [moved_triplets], home, log=said.append)
    assert again.metadata["resumed_from_step"] == 4, said
    assert again.metadata["fingerprint"] == first.metadata["fingerprint"]
    assert any("images moved since the last run (same contents)" in line for line in said)
    assert not any("training from scratch" in line for line in said)

    # One image's bytes changed (same path): that is other data, so training starts over.
    changed = sorted(moved.iterdir())[0]
    changed.write_bytes(changed.read_bytes() + b"\0")  # a JPEG/PNG reader ignores the tail
    said.clear()
    with OneThread():
        redone = train_checkpoint("moves", config, [moved_triplets], home, log=said.append)
    assert redone.metadata["resumed_from_step"] == 0
    assert redone.metadata["fingerprint"] != first.metadata["fingerprint"]
    assert any(
        "the training rows changed (triplets, held-out split or image contents)" in line
        and "training from scratch" in line
        for line in said
    ), said

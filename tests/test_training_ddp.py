"""Two-process DDP on the CPU (gloo, `ddp_spawn`): the same losses as one device, same batch;
SIGINT and SIGTERM to the process that started the ranks stop all of them at one step, saved.

Opt-in (`MEGAPAIRS_TEST_DDP=1`): the spawned processes import torch and Lightning again, about
25 s on a loaded 2-core box, too slow for the default suite. The default suite checks the same
maths without processes (`test_gathered_loss_over_two_devices_equals_the_single_device_loss`).
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
from safetensors.torch import load_file
from test_training_support import OneThread, tiny_config, write_triplets

from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.callbacks import read_loss_curve
from megapairs_assets.training.train import train_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("MEGAPAIRS_TEST_DDP") != "1", reason="set MEGAPAIRS_TEST_DDP=1 (spawns ranks)"
)


def test_two_cpu_ranks_gather_candidates_and_match_one_device(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=16, images=12)
    results = {}
    with OneThread():
        for devices in (1, 2):
            config = tiny_config(demo_models_dir, batch_size=8, max_steps=4, devices=devices)
            results[devices] = train_checkpoint(
                f"ranks{devices}", config, [triplets], DataLayout(tmp_path / "home")
            )
    two = results[2]
    assert two.config["resolved_strategy"] == "ddp_spawn"
    assert two.metadata["steps"] == 4
    assert all(outcome.passed for outcome in two.outcomes)
    # Each rank scores its 4 queries against all 8 x 4 images of both ranks: the same loss as
    # one device with the whole batch (a rank seeing only its own images would differ).
    one_curve = read_loss_curve(results[1].outputs["loss_curve"])["loss"].to_list()
    two_curve = read_loss_curve(two.outputs["loss_curve"])["loss"].to_list()
    assert two_curve == pytest.approx(one_curve, rel=1e-5)
    # The export holds the ranks' trained weights, not the parent process's untouched copy.
    exported = load_file(two.outputs["open_clip_weights"])
    state = torch.load(two.outputs["lightning_checkpoint"], weights_only=False)["state_dict"]
    for name, tensor in exported.items():
        assert torch.equal(tensor, state[f"clip.{name}"])


# Far more steps than the test waits for, and no periodic checkpoint: only the stop saves one.
_STOPPED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_training_support import tiny_config
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.train import train_checkpoint

if __name__ == "__main__":  # ddp_spawn's ranks import this file again
    config = tiny_config(Path({models!r}), batch_size=8, max_steps=400, devices=2,
                         checkpoint_every_n_steps=1000)
    train_checkpoint("stopped", config, [Path({triplets!r})], DataLayout(Path({home!r})))
"""


class _Enough(Exception):
    """Ends a run after a few steps (a resumed run need not train to the end here)."""


class _StopAt(pl_lightning.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl_lightning.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            raise _Enough


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _logged_steps(curve: Path) -> int:
    try:
        return int(read_loss_curve(curve)["step"].max() or 0)
    except (pl.exceptions.PolarsError, OSError):
        return 0  # not written yet, or caught mid-line


@pytest.mark.parametrize(
    "signum",
    [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
    ids=["SIGINT", "SIGTERM", "SIGKILL"],
)
def test_a_signal_to_the_parent_stops_every_rank_at_one_saved_step_that_resumes(
    tmp_path: Path, demo_models_dir: Path, signum: int
) -> None:
    """Ctrl-C / Dagster's terminate (SIGINT) and `kill` / pre-emption (SIGTERM) reach the
    process that spawned the ranks, not the ranks: before the fix the ranks trained on to
    max_steps after a SIGINT, and a SIGTERM killed the parent with nothing saved. A SIGKILL
    of the parent says nothing, but its ranks save their step and exit all the same."""
    triplets = write_triplets(tmp_path, rows=24, images=14)
    home = tmp_path / "home"
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(_STOPPED_RUN).format(
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
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while _logged_steps(out / "loss_curve.csv") < 3:
            assert process.poll() is None, "the training process ended before it was stopped"
            assert time.monotonic() < deadline, "the ranks made no progress"
            time.sleep(0.1)
        ranks = _children(process.pid)
        process.send_signal(signum)  # the parent only, as Dagster and `kill` do
        _, stderr = process.communicate(timeout=120)
        gone_by = time.monotonic() + 5
        while any(Path(f"/proc/{pid}").exists() for pid in ranks):
            assert time.monotonic() < gone_by, "a rank process kept running after the stop"
            time.sleep(0.1)
    finally:
        process.kill()
        process.wait()
        for pid in ranks:  # never leave a runaway rank behind a failed assertion
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)

    assert len(ranks) >= 2  # the two ranks (and multiprocessing's resource tracker)
    assert process.returncode != 0  # the run did not finish, and whoever started it knows
    stopped_at = _logged_steps(out / "loss_curve.csv")
    assert 3 <= stopped_at < 400
    if signum != signal.SIGKILL:
        assert f"stopped: stopped at step {stopped_at} of 400; saved " in stderr
        assert f"materialize it again to resume from step {stopped_at}" in stderr
    saved = torch.load(out / "lightning" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == stopped_at  # every rank stopped after the same step
    assert not (out / "open_clip").exists()  # nothing half-trained is exported

    # Resumed on one device (hardware is no science setting) it goes on from that step with
    # the losses an uninterrupted run has there.
    config = tiny_config(
        demo_models_dir, batch_size=8, max_steps=400, checkpoint_every_n_steps=1000
    )
    with OneThread():
        with pytest.raises(_Enough):
            train_checkpoint(
                "stopped", config, [triplets], DataLayout(home),
                extra_callbacks=[_StopAt(stopped_at + 2)],
            )  # fmt: skip
        with pytest.raises(_Enough):
            train_checkpoint(
                "stopped", config, [triplets], DataLayout(tmp_path / "straight"),
                extra_callbacks=[_StopAt(stopped_at + 2)],
            )  # fmt: skip
    resumed = read_loss_curve(out / "loss_curve.csv")
    straight = read_loss_curve(
        tmp_path / "straight" / "data" / "mmret_clip_checkpoint" / "stopped" / "loss_curve.csv"
    )
    assert resumed["step"].to_list() == list(range(1, stopped_at + 3))
    assert resumed["loss"].to_list() == pytest.approx(straight["loss"].to_list(), rel=1e-4)

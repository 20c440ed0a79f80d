"""Two-process DDP on the CPU (gloo, `ddp_spawn`): the same losses as one device, same batch.

Opt-in (`MEGAPAIRS_TEST_DDP=1`): the spawned processes import torch and Lightning again, about
25 s on a loaded 2-core box, too slow for the default suite. The default suite checks the same
maths without processes (`test_gathered_loss_over_two_devices_equals_the_single_device_loss`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training_support import OneThread, tiny_config, write_triplets

from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.callbacks import read_loss_curve
from megapairs_assets.training.train import train_checkpoint

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
    assert two.row_counts["steps"] == 4
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

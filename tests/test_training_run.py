"""Training runs through the Lightning Trainer on the demo's tiny model (CPU, seconds each)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning.pytorch as pl_lightning
import open_clip
import polars as pl
import pytest
import torch
from test_training_support import OneThread, tiny_config, write_triplets

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.embeddings.encoders import register_bundled_model_configs
from megapairs_assets.lib.storage import DataLayout, read_parquet
from megapairs_assets.training.callbacks import TrainingImagesMissing, read_loss_curve
from megapairs_assets.training.data import TripletDataError
from megapairs_assets.training.train import train_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def _probe_embeddings(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn((3, 3, 64, 64), generator=generator)
    tokens = open_clip.get_tokenizer(DEMO_CLIP_MODEL)(["make it red", "a dog", "at night"])
    with torch.no_grad():
        return model.eval().encode_image(pixels), model.encode_text(tokens)


def test_overfits_a_small_batch_and_open_clip_reloads_the_export(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=4, images=8)
    config = tiny_config(demo_models_dir, max_steps=24, checkpoint_every_n_steps=100)
    with OneThread():
        result = train_checkpoint(
            "overfit",
            config,
            [triplets],
            DataLayout(tmp_path / "home"),
            input_versions={"triplets/00000": "m-1"},
        )

    curve = read_loss_curve(result.outputs["loss_curve"])
    assert curve["step"].to_list() == list(range(1, 25))
    first, last = curve["loss"].head(3).mean(), curve["loss"].tail(3).mean()
    assert last < 0.25 * first, f"loss {first:.3f} -> {last:.3f}: did not fit 4 fixed rows"
    assert {o.name: o.passed for o in result.outcomes} == {
        "open_clip_export_identical": True,
        "loss_decreased": True,
        "images_loaded": True,
    }
    assert result.input_versions == {"triplets/00000": "m-1"}
    assert result.metadata["steps"] == 24 and result.metadata["samples_per_s"] > 0

    # The export loads through open_clip both ways, and gives exactly the trained weights'
    # embeddings (taken here from the Lightning checkpoint, independently of the export).
    register_bundled_model_configs()
    weights = result.outputs["open_clip_weights"]
    by_name = open_clip.create_model(DEMO_CLIP_MODEL, pretrained=str(weights))
    by_dir = open_clip.create_model(f"local-dir:{weights.parent}")
    state = torch.load(result.outputs["lightning_checkpoint"], weights_only=False)["state_dict"]
    from_lightning = open_clip.create_model(DEMO_CLIP_MODEL)
    from_lightning.load_state_dict({k.removeprefix("clip."): v for k, v in state.items()})
    base = open_clip.create_model(DEMO_CLIP_MODEL, pretrained=config.pretrained)
    expected = _probe_embeddings(from_lightning)
    for loaded in (by_name, by_dir):
        for got, want in zip(_probe_embeddings(loaded), expected, strict=True):
            assert torch.equal(got, want)
    assert not torch.allclose(_probe_embeddings(base)[1], expected[1])  # training moved it


_KILLABLE_RUN = """
import sys, time
import lightning.pytorch as pl_lightning
import torch
sys.path.insert(0, {tests!r})
from test_training_support import tiny_config
from megapairs_assets.lib.storage import DataLayout, read_parquet
from megapairs_assets.training.train import train_checkpoint
from pathlib import Path

class Slow(pl_lightning.Callback):
    # Long enough steps that the test can kill the run between two checkpoints.
    def on_train_batch_end(self, *args):
        time.sleep(0.25)

torch.set_num_threads(1)
config = tiny_config(Path({models!r}), max_steps=8, checkpoint_every_n_steps=2)
train_checkpoint("resume", config, [Path({triplets!r})], DataLayout(Path({home!r})),
                 input_versions={{"triplets/00000": "m-1"}}, extra_callbacks=[Slow()])
"""


def _steps_logged(curve_path: Path) -> int:
    try:
        return int(read_loss_curve(curve_path)["step"].max() or 0)
    except (pl.exceptions.PolarsError, OSError):
        return 0  # not written yet, or caught mid-line


def test_run_killed_mid_epoch_resumes_at_the_checkpointed_step(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=24, images=12)  # 6 steps an epoch
    home = tmp_path / "home"
    config = tiny_config(demo_models_dir, max_steps=8, checkpoint_every_n_steps=2)
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(_KILLABLE_RUN).format(
            tests=str(REPO_ROOT / "tests"),
            models=str(demo_models_dir),
            triplets=str(triplets),
            home=str(home),
        )
    )
    out = home / "data" / "mmret_clip_checkpoint" / "resume"
    process = subprocess.Popen([sys.executable, str(script)], cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        # Past the step-2 checkpoint, in the middle of the first epoch (steps 1-6).
        while _steps_logged(out / "loss_curve.csv") < 3:
            assert process.poll() is None, "the training process ended before it was killed"
            assert time.monotonic() < deadline, "the training process made no progress"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    killed_at = _steps_logged(out / "loss_curve.csv")
    assert killed_at < 8
    checkpoint = torch.load(out / "lightning" / "last.ckpt", weights_only=False)
    saved_step = checkpoint["global_step"]
    assert saved_step in (2, 4, 6) and saved_step <= killed_at

    with OneThread():
        resumed = train_checkpoint(
            "resume", config, [triplets], DataLayout(home), input_versions={"triplets/00000": "m-1"}
        )
        reference = train_checkpoint(
            "resume",
            config,
            [triplets],
            DataLayout(tmp_path / "uninterrupted"),
            input_versions={"triplets/00000": "m-1"},
        )

    assert resumed.metadata["resumed_from_step"] == saved_step
    assert resumed.metadata["steps"] == 8
    curve = read_loss_curve(resumed.outputs["loss_curve"])
    assert curve["step"].to_list() == list(range(1, 9))
    # Same batches, same optimizer state: the interrupted run ends where an uninterrupted one does.
    reference_curve = read_loss_curve(reference.outputs["loss_curve"])
    assert curve["loss"].to_list() == pytest.approx(reference_curve["loss"].to_list(), rel=1e-5)
    from safetensors.torch import load_file

    got = load_file(resumed.outputs["open_clip_weights"])
    want = load_file(reference.outputs["open_clip_weights"])
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6)


def test_finished_run_is_not_trained_again_and_new_data_starts_over(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=8, images=10)
    config = tiny_config(demo_models_dir, max_steps=4)
    layout = DataLayout(tmp_path / "home")
    with OneThread():
        first = train_checkpoint("again", config, [triplets], layout, input_versions={"t/0": "a"})
        # The same rows under a new materialization (a re-run upstream): nothing to train.
        again = train_checkpoint("again", config, [triplets], layout, input_versions={"t/0": "b"})
        changed = pl.read_parquet(triplets).reverse()  # other data order: other training
        changed.write_parquet(triplets)
        fresh = train_checkpoint("again", config, [triplets], layout, input_versions={"t/0": "c"})
    assert again.metadata["resumed_from_step"] == 4
    assert again.input_versions == {"t/0": "b"}  # lineage still names what was read
    assert read_loss_curve(again.outputs["loss_curve"]).height == 4
    assert fresh.metadata["resumed_from_step"] == 0
    assert first.metadata["fingerprint"] != fresh.metadata["fingerprint"]

    # The checkpoint of a finished run deleted (to save space): said, then trained again.
    fresh.outputs["lightning_checkpoint"].unlink()
    said: list[str] = []
    with OneThread():
        again = train_checkpoint("again", config, [triplets], layout, log=said.append)
    assert any("last.ckpt is gone" in line for line in said), said
    assert again.metadata["steps"] == 4 and again.metadata["resumed_from_step"] == 0


def test_with_the_data_root_on_an_object_store_results_are_uploaded(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=8, images=10)
    layout = DataLayout(tmp_path / "home", data_root="memory://bucket/megapairs")
    with OneThread():
        result = train_checkpoint(
            "remote", tiny_config(demo_models_dir, max_steps=2), [triplets], layout
        )
    weights = result.outputs["open_clip_weights"]
    assert str(weights).startswith("memory://") and weights.exists()
    assert (weights.parent / "open_clip_config.json").exists()
    assert read_parquet(result.outputs["quarantine"]).height == 0
    # Training itself ran on local disk; the resume point is uploaded beside the export.
    assert (tmp_path / "home" / "training" / "remote" / "lightning" / "last.ckpt").is_file()
    assert str(result.outputs["lightning_checkpoint"]).startswith("memory://")
    assert result.outputs["lightning_checkpoint"].exists()


def test_unreadable_images_cost_their_queries_not_the_run(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=8, images=10)
    (tmp_path / "images" / "img003.png").write_bytes(b"not a png")  # a target and a query
    (tmp_path / "images" / "img007.png").unlink()
    with OneThread():
        result = train_checkpoint(
            "bad-images",
            tiny_config(demo_models_dir, max_steps=4),
            [triplets],
            DataLayout(tmp_path / "home"),
        )
    outcomes = {o.name: o for o in result.outcomes}
    assert outcomes["open_clip_export_identical"].passed
    assert not outcomes["images_loaded"].passed and outcomes["images_loaded"].failing_rows > 0
    # How many of how many (4 steps x 4 queries x target + 3 negatives), and which.
    assert re.match(r"\d+ of 64 \([\d.]+%\) image reads failed", outcomes["images_loaded"].detail)
    assert {Path(p).name for p in outcomes["images_loaded"].examples} <= {
        "img003.png",
        "img007.png",
    }
    assert outcomes["images_loaded"].examples
    curve = read_loss_curve(result.outputs["loss_curve"])
    assert curve["dropped_queries"].sum() > 0
    assert curve["loss"].is_finite().all()


class _CorpusVanishes(pl_lightning.Callback):
    """The corpus images are deleted once training has started (past the sampled preflight)."""

    def __init__(self, images: Path) -> None:
        self.images = images

    def on_train_start(self, *args: object) -> None:
        for image in self.images.iterdir():
            image.unlink()


def test_a_run_whose_images_vanish_stops_naming_how_many_and_which(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=8, images=10)
    config = tiny_config(demo_models_dir, max_steps=4, image_cache_items=0)
    layout = DataLayout(tmp_path / "home")
    with OneThread(), pytest.raises(TrainingImagesMissing) as stopped:
        train_checkpoint(
            "vanished",
            config,
            [triplets],
            layout,
            extra_callbacks=[_CorpusVanishes(tmp_path / "images")],
        )
    # 4 queries x (target + 3 negatives) at step 1, every one gone.
    message = str(stopped.value)
    assert "stopped at step 1: 16 of 16 image reads failed (100%" in message
    assert "allows 50%" in message and str(tmp_path / "images" / "img") in message
    out = layout.asset_dir("mmret_clip_checkpoint") / "vanished"
    assert not (out / "open_clip").exists()  # nothing exported

    # Most images gone before the run: refused before the model is even loaded, the same rule.
    triplets = write_triplets(tmp_path, rows=8, images=10)
    for index in range(7):
        (tmp_path / "images" / f"img{index:03d}.png").unlink()
    with pytest.raises(TripletDataError, match=r"7 of 9 sampled query and target images .*img000"):
        train_checkpoint("vanished", config, [triplets], layout)

"""Training under the `paper` profile on the machine a new user has: fewer than 8 GPUs (or
none), weights not downloaded. Settings errors come before any work and name the variable;
`MEGAPAIRS_TRAIN_DEVICES` fits the run to the node while the global batch stays 2048."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
from test_training_support import tiny_config

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.assets import TRAINING_CONFIG_PARTITIONS_NAME, mmret_clip_checkpoint
from megapairs_assets.training.config import ALL_VISIBLE_GPUS, TrainingConfigError, resolve_config
from megapairs_assets.training.train import train_on_triplets
from resources.environment import ProfileError
from resources.profiles import (
    TRAIN_DEVICES_VARIABLE,
    VIT_B16_WEIGHTS_VARIABLE,
    VIT_L14_WEIGHTS_VARIABLE,
    build_resources,
)
from resources.storage import LineageCatalogResource, StorageResource
from resources.training import PAPER_BASE_CONFIG_NAME, PAPER_LARGE_CONFIG_NAME


@pytest.fixture
def paper_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The paper profile with no variable set and no weights in any cache."""
    import huggingface_hub.constants

    from megapairs_assets.lib import open_clip_weights

    for name in (TRAIN_DEVICES_VARIABLE, VIT_B16_WEIGHTS_VARIABLE, VIT_L14_WEIGHTS_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(open_clip_weights, "OPEN_CLIP_URL_CACHE", tmp_path / "clip-cache")
    return tmp_path / "home"


# --- devices ----------------------------------------------------------------------------------


def test_several_devices_without_a_gpu_are_refused_unless_the_cpu_is_asked_for(
    demo_models_dir: Path,
) -> None:
    gpu_config = tiny_config(demo_models_dir, accelerator="auto", devices=2)
    with pytest.raises(TrainingConfigError, match="no GPU is visible") as refused:
        resolve_config(gpu_config, gpu_count=0)
    assert refused.value.problems[0][0] == "devices"
    with pytest.raises(TrainingConfigError, match="2 GPUs per node were asked for but 0"):
        resolve_config(dataclasses.replace(gpu_config, accelerator="gpu"), gpu_count=0)
    # Several CPU processes on purpose (the DDP tests do this) stay allowed.
    on_cpu = resolve_config(dataclasses.replace(gpu_config, accelerator="cpu"), gpu_count=0)
    assert (on_cpu.devices, on_cpu.strategy) == (2, "ddp_spawn")
    # One device, no GPU: the CPU, as before.
    assert resolve_config(tiny_config(demo_models_dir, accelerator="auto"), 0).accelerator == "cpu"


def test_all_visible_gpus_is_decided_on_the_machine_that_trains(demo_models_dir: Path) -> None:
    config = tiny_config(
        demo_models_dir, accelerator="auto", devices=ALL_VISIBLE_GPUS, batch_size=8
    )
    four = resolve_config(config, gpu_count=4)
    assert (four.accelerator, four.devices, four.per_device_batch_size) == ("gpu", 4, 2)
    assert four.trainer_kwargs()["devices"] == 4
    none = resolve_config(config, gpu_count=0)
    assert (none.accelerator, none.devices, none.per_device_batch_size) == ("cpu", 1, 8)
    with pytest.raises(TrainingConfigError, match="devices must be >= 1, or -1"):
        resolve_config(dataclasses.replace(config, devices=0), gpu_count=0)


@pytest.mark.parametrize(("value", "devices"), [("", 8), ("4", 4), (" auto ", ALL_VISIBLE_GPUS)])
def test_train_devices_variable_sets_every_paper_config(
    paper_home: Path, monkeypatch: pytest.MonkeyPatch, value: str, devices: int
) -> None:
    monkeypatch.setenv(TRAIN_DEVICES_VARIABLE, value)
    training = build_resources("paper", paper_home)["training"]
    for name in (PAPER_BASE_CONFIG_NAME, PAPER_LARGE_CONFIG_NAME):
        config = training.config_for(name)
        assert (config.devices, config.batch_size) == (devices, 2048)  # the global batch stays


@pytest.mark.parametrize("value", ["0", "eight", "-1"])
def test_a_bad_train_devices_value_is_a_profile_error(
    paper_home: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(TRAIN_DEVICES_VARIABLE, value)
    with pytest.raises(ProfileError, match=f"{TRAIN_DEVICES_VARIABLE} must be a number"):
        build_resources("paper", paper_home)


def test_four_gpus_keep_the_batch_and_split_it(
    paper_home: Path, monkeypatch: pytest.MonkeyPatch, demo_models_dir: Path
) -> None:
    weights = paper_home.parent / "ViT-B-16.pt"  # any file: resolving reads no weights
    weights.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(demo_models_dir / f"{DEMO_CLIP_MODEL}.pt", weights)
    monkeypatch.setenv(VIT_B16_WEIGHTS_VARIABLE, str(weights))
    monkeypatch.setenv(TRAIN_DEVICES_VARIABLE, "4")
    resolved = build_resources("paper", paper_home)["training"].resolve(
        PAPER_BASE_CONFIG_NAME, gpu_count=4
    )
    assert (resolved.world_size, resolved.per_device_batch_size) == (4, 512)
    monkeypatch.setenv(TRAIN_DEVICES_VARIABLE, "3")  # 2048 does not split over 3
    with pytest.raises(TrainingConfigError) as uneven:
        build_resources("paper", paper_home)["training"].resolve(PAPER_BASE_CONFIG_NAME, 4)
    assert "does not split evenly over 3 devices" in str(uneven.value)
    assert f"set {TRAIN_DEVICES_VARIABLE} to the number of GPUs" in str(uneven.value)


# --- every problem at once, each with its variable --------------------------------------------


def test_no_gpu_and_no_weights_are_said_together_each_with_its_variable(paper_home: Path) -> None:
    training = build_resources("paper", paper_home)["training"]
    with pytest.raises(TrainingConfigError) as error:
        training.resolve(PAPER_LARGE_CONFIG_NAME, gpu_count=0)
    message = str(error.value)
    devices, weights = message.split("; also, ")
    assert "no GPU is visible" in devices and TRAIN_DEVICES_VARIABLE in devices
    assert "ViT-L-14-quickgelu@openai are not in the local cache" in weights
    assert VIT_L14_WEIGHTS_VARIABLE in weights and VIT_B16_WEIGHTS_VARIABLE not in message


def test_the_training_step_names_the_weights_variable_before_reading_triplets(
    paper_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TRAIN_DEVICES_VARIABLE, "1")  # only the weights are missing
    resources = build_resources("paper", paper_home)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TRAINING_CONFIG_PARTITIONS_NAME, [PAPER_BASE_CONFIG_NAME])
    result = dg.materialize(
        [mmret_clip_checkpoint],
        partition_key=PAPER_BASE_CONFIG_NAME,
        resources={
            "training": resources["training"],
            "evaluation": resources["evaluation"],
            "storage": StorageResource(home=str(paper_home)),
            "catalog": LineageCatalogResource(path=str(paper_home / "catalog.duckdb")),
        },
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.event_specific_data.error.to_string()
    assert "backbone weights missing" in message and VIT_B16_WEIGHTS_VARIABLE in message
    assert "no complete `triplets` shard" not in message  # failed before reading any


# --- what the run says and loads ---------------------------------------------------------------


def test_the_log_says_how_the_global_batch_splits(demo_models_dir: Path, tmp_path: Path) -> None:
    said: list[str] = []
    config = tiny_config(demo_models_dir, accelerator="cpu", devices=2, batch_size=8)
    one_row = pl.DataFrame({"q_img": ["a"], "q_text": [["x"]], "t_img": ["b"], "hns": [["a"]]})
    with pytest.raises(Exception, match="fewer than one batch"):  # stops before any training
        train_on_triplets("c", config, one_row, DataLayout(tmp_path), log=said.append)
    assert "c: global batch 8 queries over 2 CPU device(s)" in said[0]
    assert "4 per device" in said[0]


def test_a_tag_trains_from_its_cached_file(
    demo_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import open_clip

    from megapairs_assets.training.module import MMRetCLIP

    checkpoint = demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"
    # A pretrained tag whose weights lie in a local cache (open_clip's `file` entry).
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED, DEMO_CLIP_MODEL, {"cachedtag": {"file": str(checkpoint)}}
    )
    config = tiny_config(demo_models_dir, pretrained="cachedtag")
    assert resolve_config(config, gpu_count=0).embed_dim > 0

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("open_clip was asked to fetch a tag (the hub first, on a GPU node)")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_download)
    module = MMRetCLIP(DEMO_CLIP_MODEL, "cachedtag", 0.02, 1e-3, 0.0, 0, 6)
    expected = torch.load(checkpoint, map_location="cpu")
    name = next(iter(expected))
    assert torch.equal(module.clip.state_dict()[name], expected[name])

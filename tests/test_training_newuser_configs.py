"""Adding a training config of one's own, and loading what it trained, as a new user does.

The README's recipe: add a `TrainingSettings` entry; `training_configs_sensor` (or `megapairs
demo`) registers its name as a partition; the export loads with open_clip.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import dagster as dg
import open_clip
import pytest
from test_training_support import tiny_config

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.embeddings.encoders import register_bundled_model_configs
from megapairs_assets.training.assets import (
    TRAINING_CONFIG_PARTITIONS_NAME,
    build_training_configs_sensor,
    register_training_configs,
)
from megapairs_assets.training.config import TrainingConfigError
from megapairs_assets.training.export import export_open_clip
from resources.training import TrainingResource, TrainingSettings

BAD_NAME = "my model/v2"  # a space and a slash: not a folder name, not a partition key


def _resource(demo_models_dir: Path) -> TrainingResource:
    settings = TrainingSettings(**dataclasses.asdict(tiny_config(demo_models_dir)))
    return TrainingResource(configs={"tiny": settings, BAD_NAME: settings})


def test_a_bad_config_name_fails_the_readiness_check_before_any_work(
    demo_models_dir: Path,
) -> None:
    training = _resource(demo_models_dir)
    training.resolve("tiny", gpu_count=0)  # the good one is ready
    # `megapairs demo` resolves every config before mining: the bad name is said there.
    with pytest.raises(TrainingConfigError, match=r"'my model/v2' must be 1-64 letters"):
        training.resolve(BAD_NAME, gpu_count=0)


def test_a_bad_config_name_never_becomes_a_partition_nor_blocks_the_good_configs(
    demo_models_dir: Path,
) -> None:
    training = _resource(demo_models_dir)
    # The resource still starts: the good config's runs are not failed by a sibling's name.
    training.setup_for_execution(dg.build_init_resource_context())

    instance = dg.DagsterInstance.ephemeral()
    sensor = build_training_configs_sensor(dg.DefaultSensorStatus.RUNNING)
    result = sensor(dg.build_sensor_context(instance=instance, resources={"training": training}))
    (request,) = result.dynamic_partitions_requests
    assert list(request.partition_keys) == ["tiny"]

    with pytest.raises(TrainingConfigError, match=r"'my model/v2'"):
        register_training_configs(instance, training)
    assert instance.get_dynamic_partitions(TRAINING_CONFIG_PARTITIONS_NAME) == []


def test_the_sensor_removes_the_partition_of_a_config_taken_out_of_the_resource(
    demo_models_dir: Path,
) -> None:
    training = _resource(demo_models_dir)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TRAINING_CONFIG_PARTITIONS_NAME, ["tiny", "retired"])
    sensor = build_training_configs_sensor(dg.DefaultSensorStatus.RUNNING)
    result = sensor(dg.build_sensor_context(instance=instance, resources={"training": training}))
    (request,) = result.dynamic_partitions_requests
    assert type(request).__name__ == "DeleteDynamicPartitionsRequest"
    assert list(request.partition_keys) == ["retired"]
    instance.delete_dynamic_partition(TRAINING_CONFIG_PARTITIONS_NAME, "retired")
    again = sensor(dg.build_sensor_context(instance=instance, resources={"training": training}))
    assert isinstance(again, dg.SkipReason)


def test_the_load_snippet_works_in_a_fresh_python_with_only_open_clip(tmp_path: Path) -> None:
    """The asset page's `load_with` is what a user pastes: it must run without project code,
    also for a model open_clip does not know by name (the demo's tiny CLIP)."""
    register_bundled_model_configs()
    trained = open_clip.create_model(DEMO_CLIP_MODEL)
    exported = export_open_clip(trained, DEMO_CLIP_MODEL, tmp_path / "open_clip")
    program = (
        "import open_clip, torch\n"
        f"{exported.load_snippet()}\n"
        "with torch.no_grad():\n"
        "    text = model.encode_text(tokenizer(['a red car']))\n"
        "print(tuple(text.shape))\n"
    )
    # cwd outside the repository: nothing of the project is importable or registered.
    run = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str((1, trained.text_projection.shape[1]))

"""Evaluation under the `paper` profile on a machine without the base model's weights: the
scoring step and the retriever sensor name `MEGAPAIRS_VIT_B16_WEIGHTS` instead of launching a
run that is certain to fail; benchmark roots given relative are stored absolute."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import torch

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation.assets import (
    RETRIEVER_PARTITIONS_NAME,
    benchmark_scores,
    build_checkpoint_sensor,
    score_partition_key,
)
from resources.device import DeviceResource
from resources.profiles import VIT_B16_WEIGHTS_VARIABLE, build_resources
from resources.storage import LineageCatalogResource, StorageResource


@pytest.fixture
def paper_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The paper profile with no weights anywhere: an empty Hugging Face cache and an empty
    open_clip URL cache."""
    import huggingface_hub.constants

    from megapairs_assets.lib import open_clip_weights

    for name in (VIT_B16_WEIGHTS_VARIABLE, "MEGAPAIRS_DEPLOYMENT", "MEGAPAIRS_DATA_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(open_clip_weights, "OPEN_CLIP_URL_CACHE", tmp_path / "clip-cache")
    home = tmp_path / "home"
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    return home


def _trained_export(home: Path, checkpoint: Path) -> str:
    """A complete `mmret_clip_checkpoint` export of the demo model; its retriever id."""
    import open_clip
    from safetensors.torch import save_file

    export = StorageResource(home=str(home)).layout().data_dir / "mmret_clip_checkpoint"
    export = export / "demo" / "open_clip"
    export.mkdir(parents=True)
    state = torch.load(checkpoint, map_location="cpu")
    save_file({k: v.contiguous() for k, v in state.items()}, export / "open_clip_model.safetensors")
    config = {
        "model_cfg": open_clip.get_model_config(DEMO_CLIP_MODEL),
        "model_name": DEMO_CLIP_MODEL,
    }
    (export / "open_clip_config.json").write_text(json.dumps(config))
    return "megapairs-tiny-clip__demo.open_clip"


def test_the_sensor_skips_a_base_model_whose_weights_are_not_here(
    paper_home: Path, demo_models_dir: Path
) -> None:
    resources = build_resources("paper", paper_home)
    evaluation, storage = resources["evaluation"], resources["storage"]
    base_id = evaluation.base_spec().retriever_id
    sensor = build_checkpoint_sensor(dg.DefaultSensorStatus.RUNNING)
    instance = dg.DagsterInstance.ephemeral()

    def tick() -> dg.SensorResult | dg.SkipReason:
        context = dg.build_sensor_context(
            instance=instance, resources={"evaluation": evaluation, "storage": storage}
        )
        return sensor(context)

    skipped = tick()
    assert isinstance(skipped, dg.SkipReason)
    assert VIT_B16_WEIGHTS_VARIABLE in skipped.skip_message
    assert "hf download timm/vit_base_patch16_clip_224.openai" in skipped.skip_message
    # Not registered either: once the weights are here it is a new retriever again.
    assert instance.get_dynamic_partitions(RETRIEVER_PARTITIONS_NAME) == []

    # A trained checkpoint does not wait for the base model's weights.
    trained = _trained_export(paper_home, demo_models_dir / f"{DEMO_CLIP_MODEL}.pt")
    result = tick()
    assert isinstance(result, dg.SensorResult)
    assert result.dynamic_partitions_requests[0].partition_keys == [trained]
    requested = {r.partition_key.keys_by_dimension["retriever"] for r in result.run_requests}
    assert requested == {trained}

    # The weights arrive (a local file, as MEGAPAIRS_VIT_B16_WEIGHTS may name): the base is new.
    weights = paper_home.parent / "ViT-B-16.pt"
    shutil.copy(demo_models_dir / f"{DEMO_CLIP_MODEL}.pt", weights)
    fields = {name: getattr(evaluation, name) for name in type(evaluation).model_fields}
    here = type(evaluation)(**{**fields, "base_pretrained": str(weights)})
    assert here.base_weights_problem() is None
    context = dg.build_sensor_context(
        instance=instance, resources={"evaluation": here, "storage": storage}
    )
    arrived = sensor(context)
    assert here.base_spec().retriever_id in arrived.dynamic_partitions_requests[0].partition_keys
    assert base_id != here.base_spec().retriever_id  # the id names the weights it scores


def test_the_scoring_step_names_the_variable_before_reading_any_benchmark(
    paper_home: Path,
) -> None:
    resources = build_resources("paper", paper_home)
    evaluation = resources["evaluation"]
    base_id = evaluation.base_spec().retriever_id
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(RETRIEVER_PARTITIONS_NAME, [base_id])
    result = dg.materialize(
        [benchmark_scores],
        partition_key=str(score_partition_key(base_id, "heldout")),
        resources={
            "evaluation": evaluation,
            "device": DeviceResource(device="cpu"),
            "storage": StorageResource(home=str(paper_home)),
            "catalog": LineageCatalogResource(path=str(paper_home / "catalog.duckdb")),
        },
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    error = failure.event_specific_data.error
    message = error.to_string()  # the step error and its cause, the user's exception
    assert VIT_B16_WEIGHTS_VARIABLE in message and "not in the local cache" in message


def test_relative_benchmark_roots_are_stored_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bench" / "circo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEGAPAIRS_CIRCO_ROOT", "bench/circo")
    monkeypatch.setenv("MEGAPAIRS_CIRR_ROOT", "~/cirr")
    monkeypatch.setenv("MEGAPAIRS_GENECIS_ROOT", "  ")
    monkeypatch.delenv("MEGAPAIRS_FASHIONIQ_ROOT", raising=False)
    for profile in ("demo", "paper"):
        evaluation = build_resources(profile, tmp_path / "home")["evaluation"]
        assert evaluation.circo_root == str((tmp_path / "bench" / "circo").resolve())
        assert evaluation.cirr_root == str((Path.home() / "cirr").resolve())
        assert evaluation.genecis_root is None and evaluation.fashioniq_root is None

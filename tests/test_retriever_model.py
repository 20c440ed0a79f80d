"""The retriever interface on the demo's tiny open_clip model: fusion, ids, loading, errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from image_factory import picture

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.lib.storage import is_safe_partition_key
from megapairs_assets.retriever.discovery import discover_checkpoints
from megapairs_assets.retriever.model import (
    Retriever,
    RetrieverConfigError,
    RetrieverSpec,
    load_error_summary,
    load_retriever,
    load_retriever_spec,
    spec_from_argument,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(demo_models_dir: Path) -> Path:
    return demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"


@pytest.fixture(scope="module")
def retriever(checkpoint: Path) -> Retriever:
    return load_retriever(DEMO_CLIP_MODEL, str(checkpoint), CPU, torch.float32)


def test_composed_queries_fuse_raw_projections(retriever: Retriever, tmp_path: Path) -> None:
    images = [picture(n, (40, 30)) for n in range(3)]
    texts = ["make it red", "two of them", "at night"]
    raw_images = retriever.project_images(images)
    raw_texts = retriever.project_texts(texts)
    expected = raw_images + raw_texts
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    fused = retriever.encode_queries(images, texts)
    np.testing.assert_allclose(fused, expected, atol=1e-6)
    # Summing normalised vectors instead would give a different direction.
    unit_sum = raw_images / np.linalg.norm(raw_images, axis=1, keepdims=True) + (
        raw_texts / np.linalg.norm(raw_texts, axis=1, keepdims=True)
    )
    unit_sum /= np.linalg.norm(unit_sum, axis=1, keepdims=True)
    assert not np.allclose(fused, unit_sum, atol=1e-4)


def test_single_modality_embeddings_are_normalised_projections(
    retriever: Retriever, tmp_path: Path
) -> None:
    path = tmp_path / "one.png"
    picture(5, (40, 30)).save(path)
    from_path = retriever.encode_images([path])
    from_image = retriever.encode_images([picture(5, (40, 30))])
    np.testing.assert_allclose(from_path, from_image, atol=1e-6)
    assert from_path.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(from_path, axis=1), 1.0, atol=1e-5)
    raw = retriever.project_texts(["a cat"])
    np.testing.assert_allclose(
        retriever.encode_texts(["a cat"]), raw / np.linalg.norm(raw), atol=1e-6
    )
    assert retriever.dim == 128


def test_retriever_id_is_stable_across_machines_and_fingerprint_tracks_weights(
    checkpoint: Path, tmp_path: Path
) -> None:
    here, there = (tmp_path / root / "models" / checkpoint.name for root in ("home", "other"))
    for path in (here, there):
        path.parent.mkdir(parents=True)
        shutil.copy(checkpoint, path)
    ids = {RetrieverSpec(DEMO_CLIP_MODEL, str(path)).retriever_id for path in (here, there)}
    assert ids == {"megapairs-tiny-clip__models.megapairs-tiny-clip"}
    spec = RetrieverSpec(DEMO_CLIP_MODEL, str(there))
    before = spec.fingerprint()
    os.utime(there, ns=(10**18, 10**18))  # rewritten weights: a new modification time
    assert spec.fingerprint() != before
    assert RetrieverSpec("ViT-B-16", "openai").retriever_id == "ViT-B-16__openai"


def test_spec_from_argument_forms(checkpoint: Path, tmp_path: Path) -> None:
    assert spec_from_argument("ViT-B-16@openai") == RetrieverSpec("ViT-B-16", "openai")
    named = spec_from_argument(f"{DEMO_CLIP_MODEL}@{checkpoint}")
    assert named == RetrieverSpec(DEMO_CLIP_MODEL, str(checkpoint.resolve()))

    step = tmp_path / "demo" / "step-000010.pt"
    step.parent.mkdir()
    shutil.copy(checkpoint, step)
    assert spec_from_argument(str(step), default_model="ViT-B-32").model_name == "ViT-B-32"
    with pytest.raises(RetrieverConfigError, match="cannot tell the model architecture"):
        spec_from_argument(str(step))
    step.with_suffix(".json").write_text(json.dumps({"model_name": DEMO_CLIP_MODEL}))
    from_sidecar = spec_from_argument(str(step))
    assert from_sidecar.model_name == DEMO_CLIP_MODEL
    assert from_sidecar.retriever_id == "megapairs-tiny-clip__demo.step-000010"


def test_open_clip_export_directory_loads_as_local_dir(
    retriever: Retriever, checkpoint: Path, tmp_path: Path
) -> None:
    import open_clip

    export = tmp_path / "mmret_clip_checkpoint" / "demo"
    export.mkdir(parents=True)
    config = {"model_cfg": open_clip.get_model_config(DEMO_CLIP_MODEL), "preprocess_cfg": {}}
    (export / "open_clip_config.json").write_text(json.dumps(config))
    spec = spec_from_argument(str(export))
    with pytest.raises(RetrieverConfigError, match="weights file"):
        load_retriever_spec(spec, CPU, torch.float32)  # a config alone would be random weights
    shutil.copy(checkpoint, export / "open_clip_pytorch_model.bin")
    loaded = load_retriever_spec(spec, CPU, torch.float32)
    assert loaded.retriever_id == "local__mmret_clip_checkpoint.demo"
    assert is_safe_partition_key(loaded.retriever_id)
    image = [picture(1, (40, 30))]
    np.testing.assert_allclose(
        loaded.encode_images(image), retriever.encode_images(image), atol=1e-5
    )


def test_loading_errors_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(RetrieverConfigError, match="no model named"):
        load_retriever("no-such-clip", "openai", CPU, torch.float32)
    with pytest.raises(RetrieverConfigError, match="no pretrained weights"):
        load_retriever(DEMO_CLIP_MODEL, None, CPU, torch.float32)
    with pytest.raises(RetrieverConfigError, match="does not exist"):
        load_retriever(DEMO_CLIP_MODEL, str(tmp_path / "gone.pt"), CPU, torch.float32)
    with pytest.raises(RetrieverConfigError, match=r"without open_clip_config\.json"):
        spec_from_argument(str(tmp_path))


def test_discovery_lists_complete_exports_named_by_their_architecture(
    checkpoint: Path, tmp_path: Path
) -> None:
    import open_clip

    root = tmp_path / "mmret_clip_checkpoint"
    config = {
        "model_cfg": open_clip.get_model_config(DEMO_CLIP_MODEL),
        "preprocess_cfg": {},
        "model_name": DEMO_CLIP_MODEL,
    }
    for name in ("demo", "bigger-batch"):
        export = root / name / "open_clip"
        export.mkdir(parents=True)
        (export / "open_clip_config.json").write_text(json.dumps(config))
        shutil.copy(checkpoint, export / "open_clip_model.safetensors")
    (root / "half-written" / "open_clip").mkdir(parents=True)
    (root / "half-written" / "open_clip" / "open_clip_config.json").write_text(json.dumps(config))
    found = discover_checkpoints(root)
    assert list(found) == [
        "megapairs-tiny-clip__bigger-batch.open_clip",
        "megapairs-tiny-clip__demo.open_clip",
    ]
    assert discover_checkpoints(tmp_path / "absent") == {}


def test_a_training_checkpoint_folder_means_its_open_clip_export(tmp_path: Path) -> None:
    # What a user naturally passes: mmret_clip_checkpoint/<config>, not its open_clip/ inside.
    folder = tmp_path / "mmret_clip_checkpoint" / "demo"
    (folder / "open_clip").mkdir(parents=True)
    (folder / "open_clip" / "open_clip_config.json").write_text("{}")
    (folder / "run.json").write_text("{}")
    from_folder = spec_from_argument(str(folder))
    assert from_folder == spec_from_argument(str(folder / "open_clip"))
    assert from_folder.model_name.endswith(str((folder / "open_clip").resolve()))
    with pytest.raises(RetrieverConfigError, match=r"directory without open_clip_config\.json"):
        spec_from_argument(str(tmp_path / "mmret_clip_checkpoint"))


def test_a_state_dict_mismatch_is_summarised_as_counts_and_a_few_keys() -> None:
    model = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(40)))
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    state["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(state)
    assert len(str(error.value)) > 1500  # torch lists every key
    summary = load_error_summary(error.value)
    assert "\n" not in summary and len(summary) < 600, summary
    assert "79 missing keys (0.bias, 1.weight, 1.bias, ...)" in summary
    assert "80 unexpected keys (net.0.weight, net.0.bias, net.1.weight, ...)" in summary
    assert "1 of a different shape (size mismatch for 0.weight" in summary
    assert "every checkpoint key has an extra 'net.' prefix" in summary
    del state["net.3.bias"]  # no longer a pure prefix: no such claim
    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(state)
    assert "prefix" not in load_error_summary(error.value)
    # A generic error stays one line of bounded length.
    assert load_error_summary(ValueError("x\n" * 1000)).startswith("ValueError: x x")
    assert len(load_error_summary(ValueError("x\n" * 1000))) < 500

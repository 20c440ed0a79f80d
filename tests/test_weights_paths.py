"""Relative paths in the paper profile's settings are kept absolute, from the shell's folder.

`MEGAPAIRS_CLIP_WEIGHTS=weights/eva02.safetensors megapairs ui` must read the same file from a
run worker, a daemon or a pod whose working folder is elsewhere; so must a relative
`MEGAPAIRS_DINOV2_MODEL` and `MEGAPAIRS_CORPUS`, as the benchmark roots already are. Tags and
hub ids are not paths and stay as given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from resources.corpus import CorpusSourceResource
from resources.encoders import EncoderResource
from resources.profiles import (
    CLIP_WEIGHTS_VARIABLE,
    CORPUS_VARIABLE,
    DINOV2_MODEL_VARIABLE,
    build_resources,
)


@pytest.fixture
def shell_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder a user starts `megapairs` in, holding weights and a corpus."""
    import huggingface_hub.constants

    folder = tmp_path / "project"
    (folder / "weights" / "dinov2-large").mkdir(parents=True)
    (folder / "weights" / "eva02.safetensors").write_bytes(b"")
    (folder / "corpus" / "00000").mkdir(parents=True)
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(folder)
    return folder


def test_relative_weights_and_corpus_are_kept_absolute(
    shell_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CLIP_WEIGHTS_VARIABLE, "weights/eva02.safetensors")
    monkeypatch.setenv(DINOV2_MODEL_VARIABLE, "./weights/dinov2-large")
    monkeypatch.setenv(CORPUS_VARIABLE, "corpus")
    resources = build_resources("paper", shell_folder.parent / "home")

    assert resources["clip_image_encoder"].pretrained == str(
        shell_folder / "weights" / "eva02.safetensors"
    )
    assert (
        resources["caption_text_encoder"].pretrained == resources["clip_image_encoder"].pretrained
    )
    assert resources["dino_image_encoder"].model == str(shell_folder / "weights" / "dinov2-large")
    assert resources["corpus_source"].path == str(shell_folder / "corpus")
    assert resources["corpus_source"].kind == "folder"

    # A process started elsewhere (the UI's run worker, a pod) reads the same corpus.
    monkeypatch.chdir(shell_folder.parent)
    resources["corpus_source"].check_path()


def test_tags_hub_ids_and_absolute_paths_stay_as_given(
    shell_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = build_resources("paper", shell_folder.parent / "home")  # nothing set
    assert resources["clip_image_encoder"].pretrained == "merged2b_s4b_b131k"
    assert resources["dino_image_encoder"].model == "facebook/dinov2-large"

    link = shell_folder / "current-weights"
    link.symlink_to(shell_folder / "weights", target_is_directory=True)
    given = str(link / "eva02.safetensors")  # a symlink the user names stays that name
    encoder = EncoderResource(backend="open_clip_image", model="EVA02-L-14", pretrained=given)
    assert encoder.pretrained == given
    assert (
        EncoderResource(backend="open_clip_image", model="x", pretrained="hf-hub:org/m").pretrained
        == "hf-hub:org/m"
    )


def test_local_dir_and_home_relative_values_are_made_absolute(
    shell_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(shell_folder))
    encoder = EncoderResource(
        backend="open_clip_text", model="EVA02-L-14", pretrained="local-dir:weights/export"
    )
    assert encoder.pretrained == f"local-dir:{shell_folder / 'weights' / 'export'}"
    dino = EncoderResource(backend="dinov2", model="~/weights/dinov2-large")
    assert dino.model == str(shell_folder / "weights" / "dinov2-large")
    corpus = CorpusSourceResource(kind="folder", path="~/corpus")
    assert corpus.path == str(shell_folder / "corpus")

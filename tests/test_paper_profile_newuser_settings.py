"""A new user switches to the `paper` profile with weights and a corpus already on disk.

No model hub at run time: the stand-ins here are what such a user has, at tiny sizes with the
paper's output widths (an open_clip export folder giving 768-d embeddings, a DINOv2 folder
written by save_pretrained giving 1024-d ones, a Hugging Face cache in the hub client's
layout). Every setting is an environment variable of `resources.profiles`; every error about a
missing one names the variable that fixes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from megapairs_assets.lib.errors import ConfigurationError
from resources.profiles import (
    CLIP_WEIGHTS_VARIABLE,
    CORPUS_VARIABLE,
    DINOV2_MODEL_VARIABLE,
    VIT_B16_WEIGHTS_VARIABLE,
    VIT_L14_WEIGHTS_VARIABLE,
    build_resources,
    check_ready,
)

PAPER_VARIABLES = (
    CORPUS_VARIABLE,
    CLIP_WEIGHTS_VARIABLE,
    DINOV2_MODEL_VARIABLE,
    VIT_B16_WEIGHTS_VARIABLE,
    VIT_L14_WEIGHTS_VARIABLE,
    "MEGAPAIRS_DEPLOYMENT",
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random stand-ins for the paper's EVA-CLIP export and DINOv2-large folder."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    clip_cfg = {
        "embed_dim": 768,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    clip_dir = root / "eva02-export"
    clip_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": clip_cfg}))
    state = open_clip.CLIP(**clip_cfg).state_dict()
    save_file(
        {k: v.contiguous() for k, v in state.items()}, clip_dir / "open_clip_model.safetensors"
    )
    dino_dir = root / "dinov2-large"
    config = Dinov2Config(
        hidden_size=1024, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=1,
        image_size=28, patch_size=14,
    )  # fmt: skip
    Dinov2Model(config).save_pretrained(dino_dir)
    BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}
    ).save_pretrained(dino_dir)
    return {"clip": clip_dir, "dino": dino_dir}


@pytest.fixture
def paper_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean paper-profile environment: no variable set, an empty Hugging Face cache."""
    import huggingface_hub.constants

    for variable in PAPER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "paper")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return home


def _corpus(folder: Path) -> Path:
    """img2dataset's `files` layout: one folder per shard, an image and its caption."""
    shard = folder / "00000"
    shard.mkdir(parents=True)
    Image.new("RGB", (48, 40), (10, 120, 200)).save(shard / "000000000.jpg")
    (shard / "000000000.txt").write_text("a blue square")
    return folder


# --- weights ---------------------------------------------------------------------------------


def test_nothing_configured_lists_every_missing_setting_by_its_variable(paper_env: Path) -> None:
    resources = build_resources("paper", paper_env)
    with pytest.raises(ConfigurationError) as error:
        check_ready(resources, ("mine", "train", "evaluate"))
    message = str(error.value)
    lines = {line.split(":")[0].removeprefix("- "): line for line in message.splitlines()}
    assert CORPUS_VARIABLE in lines["corpus_source"]
    assert str(paper_env / "corpus") in lines["corpus_source"]
    assert CLIP_WEIGHTS_VARIABLE in lines["clip_image_encoder"]
    assert "hf download timm/eva02_large_patch14_clip_224" in lines["clip_image_encoder"]
    assert DINOV2_MODEL_VARIABLE in lines["dino_image_encoder"]
    # The caption encoder shares the image encoder's checkpoint: said once, referred to once.
    assert lines["caption_text_encoder"].endswith("the same as clip_image_encoder")
    assert VIT_B16_WEIGHTS_VARIABLE in lines["training config 'mmret-base'"]
    assert VIT_L14_WEIGHTS_VARIABLE in lines["training config 'mmret-large'"]
    assert VIT_B16_WEIGHTS_VARIABLE in lines["evaluation base model"]
    assert message.startswith("7 settings to fix")


def test_local_weights_from_the_environment_load_and_embed(
    paper_env: Path, weights: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plain folder (no `local-dir:` prefix) is read as the open_clip export it is.
    monkeypatch.setenv(CLIP_WEIGHTS_VARIABLE, str(weights["clip"]))
    monkeypatch.setenv(DINOV2_MODEL_VARIABLE, str(weights["dino"]))
    monkeypatch.setenv(CORPUS_VARIABLE, str(_corpus(paper_env.parent / "corpus")))
    resources = build_resources("paper", paper_env)
    check_ready(resources, ("mine",))
    cpu = torch.device("cpu")
    for name, dim in (("clip_image_encoder", 768), ("dino_image_encoder", 1024)):
        encoder = resources[name].load(cpu, torch.float32)
        pixels = torch.stack([encoder.preprocess(Image.new("RGB", (50, 40), (200, 30, 30)))])
        assert encoder.encode_images(pixels).shape == (1, dim)
    text = resources["caption_text_encoder"].load(cpu, torch.float32)
    assert text.encode_texts(["a red square", "a dog"]).shape == (2, 768)


def test_an_export_folder_without_its_weights_file_is_refused(
    paper_env: Path, weights: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # open_clip itself only warns and builds random weights from such a folder.
    config_only = paper_env.parent / "config-only"
    config_only.mkdir()
    shutil.copy(weights["clip"] / "open_clip_config.json", config_only)
    monkeypatch.setenv(CLIP_WEIGHTS_VARIABLE, f"local-dir:{config_only}")
    encoder = build_resources("paper", paper_env)["clip_image_encoder"]
    with pytest.raises(ConfigurationError, match=f"no weights file.*{CLIP_WEIGHTS_VARIABLE}"):
        encoder.validate()


def test_dinov2_hub_id_is_found_in_a_copied_hugging_face_cache(
    paper_env: Path, weights: dict[str, Path]
) -> None:
    import huggingface_hub.constants

    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--facebook--dinov2-large"
    commit = "0" * 40
    shutil.copytree(weights["dino"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    encoder = build_resources("paper", paper_env)["dino_image_encoder"]
    assert encoder.model == "facebook/dinov2-large"
    assert encoder.validate() == 1024
    assert encoder.load(torch.device("cpu"), torch.float32).dim == 1024


def test_backbone_variables_reach_training_and_evaluation(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b16, l14 = paper_env.parent / "ViT-B-16.pt", paper_env.parent / "ViT-L-14.pt"
    monkeypatch.setenv(VIT_B16_WEIGHTS_VARIABLE, str(b16))
    # A quoted `~/...` reaches the process unexpanded; it still means the home folder.
    monkeypatch.setenv("HOME", str(paper_env.parent))
    monkeypatch.setenv(VIT_L14_WEIGHTS_VARIABLE, "~/ViT-L-14.pt")
    resources = build_resources("paper", paper_env)
    assert resources["training"].config_for("mmret-base").pretrained == str(b16)
    assert resources["training"].config_for("mmret-large").pretrained == str(l14)
    assert resources["evaluation"].base_pretrained == str(b16)
    # Everything else of the paper's configs is untouched.
    assert resources["training"].config_for("mmret-large").max_steps == 25_000


# --- corpus ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "   "])
def test_unset_or_blank_corpus_means_home_corpus_not_the_working_directory(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is not None:
        monkeypatch.setenv(CORPUS_VARIABLE, value)
    source = build_resources("paper", paper_env)["corpus_source"]
    assert source.path == str(paper_env.resolve() / "corpus")
    with pytest.raises(ConfigurationError, match=f"does not exist; .*{CORPUS_VARIABLE}"):
        source.shard_ids()


def test_the_default_corpus_follows_megapairs_home_not_a_throwaway_home(
    paper_env: Path, tmp_path: Path
) -> None:
    # `megapairs check` builds the profile on a temporary home; the user's corpus stays put.
    source = build_resources("paper", tmp_path / "megapairs-check-xyz")["corpus_source"]
    assert source.path == str(paper_env.resolve() / "corpus")


def test_the_corpus_layout_is_detected_like_the_corpus_option(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _corpus(paper_env.parent / "images")
    monkeypatch.setenv(CORPUS_VARIABLE, str(folder))
    source = build_resources("paper", paper_env)["corpus_source"]
    assert (source.kind, source.shard_ids()) == ("folder", ["00000"])
    manifest = paper_env.parent / "manifest.jsonl"
    line = {"path": str(folder / "00000" / "000000000.jpg"), "caption": "a blue square"}
    manifest.write_text(json.dumps(line) + "\n")
    monkeypatch.setenv(CORPUS_VARIABLE, str(manifest))
    assert build_resources("paper", paper_env)["corpus_source"].kind == "manifest"


def test_a_folder_without_shards_names_the_variable(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = paper_env.parent / "empty"
    empty.mkdir()
    monkeypatch.setenv(CORPUS_VARIABLE, str(empty))
    with pytest.raises(ConfigurationError, match=CORPUS_VARIABLE):
        build_resources("paper", paper_env)["corpus_source"].shard_ids()


# --- device ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="says why the CPU only on a CPU machine")
def test_a_gpu_step_on_a_machine_without_a_gpu_says_so() -> None:
    from resources.device import DeviceResource

    assert DeviceResource().describe() == "cpu (no CUDA GPU visible), float32"
    assert DeviceResource(device="cpu").describe() == "cpu, float32"

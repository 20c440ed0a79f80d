"""The readiness check reads the weights cheaply: damaged or ill-fitting ones are one error.

Before a step starts (`megapairs check`, the preflight of `megapairs demo`, each step's resource
setup), the paper profile's encoders open their weights without reading the tensors (a
safetensors header, a PyTorch checkpoint onto the meta device) and compare names and shapes
with the model built on the meta device. Each failure is one configuration error naming the
variable that sets the weights and the file: never torch's advice to unpickle arbitrary code,
never a traceback from the middle of a step. Large architectures (EVA02-L-14, ViT-B-16) are
written as sparse safetensors files: a real header over zeros, a few KiB on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
from math import prod
from pathlib import Path

import pytest
import torch
from PIL import Image

from megapairs_assets.embeddings.encoders import (
    EncoderSpec,
    encoder_model_id,
    encoder_notes,
    validate_encoder_spec,
)
from megapairs_assets.lib.errors import ConfigurationError
from resources.profiles import (
    CLIP_WEIGHTS_VARIABLE,
    CORPUS_VARIABLE,
    DINOV2_MODEL_VARIABLE,
    build_resources,
)

TINY_CLIP = "megapairs-tiny-clip"
# The preprocessor_config.json of facebook/dinov2-large on the hub.
HUB_DINOV2_PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


@pytest.fixture
def paper_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The paper profile with nothing set and an empty Hugging Face cache."""
    import huggingface_hub.constants

    for variable in (CORPUS_VARIABLE, CLIP_WEIGHTS_VARIABLE, DINOV2_MODEL_VARIABLE):
        monkeypatch.delenv(variable, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return home


def _refusal(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: Path | str
) -> str:
    """The one error the paper profile's check gives for `variable` = `value`."""
    monkeypatch.setenv(variable, str(value))
    name = "clip_image_encoder" if variable == CLIP_WEIGHTS_VARIABLE else "dino_image_encoder"
    encoder = build_resources("paper", paper_env)[name]
    with pytest.raises(ConfigurationError) as error:
        encoder.validate()
    message = str(error.value)
    assert variable in message and str(value) in message
    assert "weights_only" not in message and "\n" not in message
    return message


def _meta_shapes(model_name: str) -> dict[str, tuple[int, ...]]:
    import open_clip

    with torch.device("meta"):
        model = open_clip.create_model(model_name, pretrained=None, device="meta")
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A valid float16 safetensors file of these shapes whose data is a hole (all zeros)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = prod(shape) * 2
        header[name] = {
            "dtype": "F16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        handle.truncate(8 + len(raw) + offset)
    return path


def _tiny_clip_state(config: dict | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of an untrained open_clip CLIP of `config` (default: the demo's)."""
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(**(config or _tiny_clip_config()))
    return {name: tensor.contiguous() for name, tensor in model.state_dict().items()}


def _export(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    save_file(state, folder / "open_clip_model.safetensors")
    return folder


def _tiny_clip_config(embed_dim: int | None = None) -> dict:
    """The demo's tiny open_clip config; `embed_dim` 768 makes it fit the paper profile."""
    import open_clip

    from megapairs_assets.embeddings.encoders import register_bundled_model_configs

    register_bundled_model_configs()
    config = open_clip.get_model_config(TINY_CLIP)
    return {**config, "embed_dim": embed_dim} if embed_dim else config


def _dinov2_folder(folder: Path, hidden_size: int = 1024, processor: bool = True) -> Path:
    """A tiny DINOv2 folder as save_pretrained writes it (1024-d, as the paper profile wants)."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=4, mlp_ratio=1,
        image_size=28, patch_size=14,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Dinov2Model(config).save_pretrained(folder)
    if processor:
        (folder / "preprocessor_config.json").write_text(json.dumps(HUB_DINOV2_PREPROCESSOR))
    return folder


# --- damaged files ----------------------------------------------------------------------------


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _cut_short(path: Path) -> None:
    torch.save({"w": torch.ones(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:1500])


def _training_checkpoint(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, path)


def _garbage_safetensors(path: Path) -> None:
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + os.urandom(200))


def _truncated_safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])


def _safetensors_named_pt(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4)}, path)


@pytest.mark.parametrize(
    ("name", "write", "says"),
    [
        ("random.pt", _random_bytes, "cannot be read as plain tensors"),
        ("cut-short.pt", _cut_short, "not a readable PyTorch checkpoint"),
        ("training.pt", _training_checkpoint, "Python objects besides tensors"),
        ("garbage.safetensors", _garbage_safetensors, "not a readable safetensors file"),
        ("truncated.safetensors", _truncated_safetensors, "not a readable safetensors file"),
        ("renamed.pt", _safetensors_named_pt, "rename it to end in .safetensors"),
    ],
)
def test_a_damaged_weights_file_is_one_error_naming_the_variable_and_the_file(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch, name: str, write, says: str
) -> None:
    path = paper_env.parent / name
    write(path)
    assert says in _refusal(paper_env, monkeypatch, CLIP_WEIGHTS_VARIABLE, path)


def test_an_export_folder_with_damaged_weights_names_the_weights_file(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _tiny_clip_config(embed_dim=768)
    folder = _export(paper_env.parent / "export", config, _tiny_clip_state(config))
    _garbage_safetensors(folder / "open_clip_model.safetensors")
    message = _refusal(paper_env, monkeypatch, CLIP_WEIGHTS_VARIABLE, folder)
    assert str(folder / "open_clip_model.safetensors") in message


def test_a_dinov2_folder_with_damaged_weights_is_refused(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _dinov2_folder(paper_env.parent / "dinov2")
    _garbage_safetensors(folder / "model.safetensors")
    message = _refusal(paper_env, monkeypatch, DINOV2_MODEL_VARIABLE, folder)
    assert "model.safetensors is not a readable safetensors file" in message


def test_a_dinov2_folder_without_weights_is_refused(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _dinov2_folder(paper_env.parent / "dinov2")
    (folder / "model.safetensors").unlink()
    message = _refusal(paper_env, monkeypatch, DINOV2_MODEL_VARIABLE, folder)
    assert "no weights" in message and "random" in message


# --- weights of another shape -----------------------------------------------------------------


def test_vit_b16_weights_given_as_eva02_l14_are_refused_with_the_first_mismatches(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _sparse_safetensors(paper_env.parent / "ViT-B-16.safetensors", _meta_shapes("ViT-B-16"))
    message = _refusal(paper_env, monkeypatch, CLIP_WEIGHTS_VARIABLE, path)
    assert "are not EVA02-L-14 weights" in message
    assert "text.positional_embedding is [77, 512] where EVA02-L-14 has [77, 768]" in message
    assert "visual.trunk.cls_token" in message  # the first tensor EVA02-L-14 misses


def test_eva02_l14_shaped_weights_pass_the_check(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _sparse_safetensors(paper_env.parent / "EVA02.safetensors", _meta_shapes("EVA02-L-14"))
    monkeypatch.setenv(CLIP_WEIGHTS_VARIABLE, str(path))
    resources = build_resources("paper", paper_env)
    assert resources["clip_image_encoder"].validate() == 768
    assert resources["caption_text_encoder"].validate() == 768


def test_an_export_whose_weights_do_not_match_its_config_is_refused(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _tiny_clip_config(embed_dim=768)
    state = _tiny_clip_state(config)
    partial = dict(list(state.items())[:5])  # a file cut down to its first tensors
    folder = _export(paper_env.parent / "export", config, partial)
    message = _refusal(paper_env, monkeypatch, CLIP_WEIGHTS_VARIABLE, folder)
    assert "do not fit the model that the open_clip_config.json" in message
    assert f"{len(state) - 5} tensors of that model are missing" in message


def test_an_export_holding_a_wrapped_training_state_dict_is_accepted(tmp_path: Path) -> None:
    # open_clip's training checkpoints: {"state_dict": {"module.<name>": tensor}, "epoch": n}.
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": _tiny_clip_config()}))
    state = {f"module.{name}": tensor for name, tensor in _tiny_clip_state().items()}
    torch.save({"state_dict": state, "epoch": 3}, folder / "open_clip_pytorch_model.bin")
    spec = EncoderSpec("open_clip_image", "EVA02-L-14", pretrained=str(folder), dim=128)
    assert validate_encoder_spec(spec) == 128


def test_a_dinov2_folder_whose_weights_do_not_fit_its_config_is_refused(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _dinov2_folder(paper_env.parent / "dinov2", hidden_size=512)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 1024}))
    message = _refusal(paper_env, monkeypatch, DINOV2_MODEL_VARIABLE, folder)
    assert "do not match its config.json" in message
    assert "embeddings.cls_token is [1, 1, 512] where the model has [1, 1, 1024]" in message


def test_dinov2_task_model_and_sharded_folders_pass_the_check(tmp_path: Path) -> None:
    from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=1,
        image_size=28, patch_size=14,
    )  # fmt: skip
    # A classifier's folder: the backbone under "dinov2.", a head the embedding never uses.
    Dinov2ForImageClassification(config).save_pretrained(tmp_path / "classifier")
    Dinov2Model(config).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for folder in ("classifier", "sharded"):
        assert validate_encoder_spec(EncoderSpec("dinov2", str(tmp_path / folder))) == 32


# --- a DINOv2 folder without its preprocessor config ----------------------------------------


def test_a_dinov2_folder_without_preprocessor_config_embeds_as_the_hub_processor(
    tmp_path: Path,
) -> None:
    saved_alone = _dinov2_folder(tmp_path / "saved-alone", hidden_size=64, processor=False)
    with_hub_processor = tmp_path / "with-processor"
    shutil.copytree(saved_alone, with_hub_processor)
    (with_hub_processor / "preprocessor_config.json").write_text(
        json.dumps(HUB_DINOV2_PREPROCESSOR)
    )
    spec = EncoderSpec("dinov2", str(saved_alone), dim=64)
    assert validate_encoder_spec(spec) == 64
    (note,) = encoder_notes(spec)
    assert "no preprocessor_config.json" in note and "256 px" in note and "224 px" in note
    assert encoder_notes(EncoderSpec("dinov2", str(with_hub_processor))) == []

    from megapairs_assets.embeddings.encoders import load_encoder

    picture = Image.new("RGB", (320, 240), (200, 60, 20))
    picture.paste((10, 90, 250), (40, 30, 200, 160))
    vectors = []
    for folder in (saved_alone, with_hub_processor):
        encoder = load_encoder(
            EncoderSpec("dinov2", str(folder)), torch.device("cpu"), torch.float32
        )
        pixels = torch.stack([encoder.preprocess(picture)])
        assert pixels.shape == (1, 3, 224, 224)
        vectors.append(encoder.encode_images(pixels))
    assert torch.allclose(vectors[0], vectors[1])


# --- an export folder's architecture and wording ------------------------------------------


def test_an_export_folder_names_its_architecture_and_records_it(tmp_path: Path) -> None:
    tiny = _export(tmp_path / "weights" / "tiny-export", _tiny_clip_config(), _tiny_clip_state())
    spec = EncoderSpec("open_clip_image", "EVA02-L-14", pretrained=str(tiny))
    (note,) = encoder_notes(spec)
    assert f"holds {TINY_CLIP}" in note and "not EVA02-L-14" in note
    assert encoder_model_id(spec) == f"open_clip_image:{TINY_CLIP}@weights/tiny-export"

    custom_config = _tiny_clip_config(embed_dim=96)
    custom = _export(
        tmp_path / "weights" / "custom-export", custom_config, _tiny_clip_state(custom_config)
    )
    spec = EncoderSpec("open_clip_text", "EVA02-L-14", pretrained=f"local-dir:{custom}")
    (note,) = encoder_notes(spec)
    assert "holds custom-" in note and "96-d" in note
    assert encoder_model_id(spec).startswith("open_clip_text:custom-")
    # The configured name stays where it is the export's own.
    same = EncoderSpec("open_clip_image", TINY_CLIP, pretrained=str(tiny))
    assert encoder_model_id(same) == f"open_clip_image:{TINY_CLIP}@weights/tiny-export"


def test_a_folder_without_open_clip_config_is_worded_as_the_user_gave_it(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _tiny_clip_config(embed_dim=768)
    folder = _export(paper_env.parent / "weights-only", config, _tiny_clip_state(config))
    (folder / "open_clip_config.json").unlink()
    message = _refusal(paper_env, monkeypatch, CLIP_WEIGHTS_VARIABLE, folder)
    assert "local-dir" not in message
    assert "given as the weights has no open_clip_config.json" in message
    assert "open_clip_model.safetensors" in message  # the file it could have meant
    message = _refusal(paper_env, monkeypatch, CLIP_WEIGHTS_VARIABLE, f"local-dir:{folder}")
    assert f"'local-dir:{folder}' has no open_clip_config.json" in message

"""`megapairs eval` on bad input: one `configuration error:` line (exit 2), never a traceback
or a network request; a benchmark asked for by name that is skipped exits 3."""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

import pytest
import torch
from test_training_support import OneThread, tiny_config, write_triplets

from megapairs_assets.cli.main import main
from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation.run import EvaluationSettings, Skipped
from megapairs_assets.lib import open_clip_weights
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.retriever.model import load_retriever, load_retriever_spec, spec_from_argument
from megapairs_assets.training.train import train_checkpoint


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty model caches, and any attempt to reach the network fails the test."""
    import huggingface_hub.constants
    import open_clip.factory

    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(open_clip_weights, "OPEN_CLIP_URL_CACHE", tmp_path / "clip-cache")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_network)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", no_network)
    return hub


def _eval(*argv: str) -> int:
    return main(["eval", *argv, "--device", "cpu", "--num-workers", "0"])


def _one_configuration_line(err: str, *expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("megapairs eval: configuration error: "), err
    for text in expected:
        assert text in lines[0], err


# --- 1. a file that is not a checkpoint --------------------------------------------------------


@pytest.mark.parametrize(
    "name, content",
    [
        ("x.pt", b"hello\n"),
        ("passwd", b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/bin/sh\n"),
        ("x.safetensors", b"\x05\x00\x00\x00\x00\x00\x00\x00junk!"),
        ("empty.pt", b""),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str, content: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert _eval("--retriever", str(path), "--benchmark", "heldout") == 2
    err = capsys.readouterr().err
    _one_configuration_line(err, f"{path} is not a retriever checkpoint", "torch.save")


def test_a_torch_file_that_is_not_a_state_dict_is_refused_by_name(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)  # a real torch.save file, but no weights in it
    assert _eval("--retriever", str(path), "--benchmark", "heldout") == 2
    _one_configuration_line(capsys.readouterr().err, str(path), "expected a state dict")


# --- 1b. training's Lightning checkpoint ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> dict[str, Path]:
    """A real (two-step) training run's outputs: its Lightning checkpoint and open_clip export."""
    root = tmp_path_factory.mktemp("trained")
    triplets = write_triplets(root, rows=4, images=8)
    config = tiny_config(demo_models_dir, max_steps=2, checkpoint_every_n_steps=100)
    with OneThread():
        result = train_checkpoint("demo", config, [triplets], DataLayout(root / "home"))
    return result.outputs


def test_a_lightning_training_checkpoint_loads_as_its_trained_open_clip_model(
    home: Path, trained: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    ckpt = trained["lightning_checkpoint"]
    # No default model: the architecture comes from the checkpoint itself.
    spec = spec_from_argument(str(ckpt))
    assert spec.model_name == DEMO_CLIP_MODEL
    cpu = torch.device("cpu")
    from_ckpt = load_retriever_spec(spec, cpu, torch.float32)
    exported = load_retriever_spec(
        spec_from_argument(str(trained["open_clip_dir"])), cpu, torch.float32
    )
    texts = ["a red chair", "two dogs"]
    assert torch.equal(
        torch.from_numpy(from_ckpt.encode_texts(texts)),
        torch.from_numpy(exported.encode_texts(texts)),
    )
    # Through the CLI it gets as far as the benchmark (no triplets here: skipped, exit 3).
    assert _eval("--retriever", str(ckpt), "--benchmark", "heldout") == 3
    err = capsys.readouterr().err
    assert "configuration error" not in err and "initialized randomly" not in err


def test_a_renamed_lightning_state_dict_is_one_short_line_naming_the_prefix(
    home: Path, tmp_path: Path, trained: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    state = torch.load(trained["lightning_checkpoint"], weights_only=True)["state_dict"]
    path = tmp_path / "weights.pt"
    torch.save(state, path)  # the module's keys (`clip.`...), without Lightning's wrapper
    assert _eval("--retriever", f"{DEMO_CLIP_MODEL}@{path}", "--benchmark", "heldout") == 2
    err = capsys.readouterr().err
    _one_configuration_line(
        err, f"{len(state)} missing keys", "extra 'clip.' prefix", "training checkpoint's folder"
    )
    assert len(err) < 1200 and err.count("clip.") <= 4, err


def test_a_lightning_checkpoint_of_another_architecture_lists_a_few_keys(
    home: Path, trained: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    checkpoint = torch.load(trained["lightning_checkpoint"], weights_only=True)
    state = checkpoint["state_dict"]
    dropped = sorted(state)[: len(state) // 2]
    for key in dropped:
        del state[key]
    path = trained["lightning_checkpoint"].with_name("half.ckpt")
    torch.save(checkpoint, path)
    assert _eval("--retriever", str(path), "--benchmark", "heldout") == 2
    err = capsys.readouterr().err
    _one_configuration_line(err, str(path), f"{len(dropped)} missing keys (", ", ...)")
    assert len(err) < 1200, err


# --- 2. pretrained tags come from the local cache only -----------------------------------------


def test_an_uncached_pretrained_tag_is_a_configuration_error_without_network(
    home: Path, offline: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert _eval("--retriever", "ViT-B-32@openai", "--benchmark", "heldout") == 2
    _one_configuration_line(
        capsys.readouterr().err,
        "ViT-B-32@openai are not in the local cache",
        "nothing is downloaded at run time",
        str(offline),
        "ViT-B-32@/path/to/weights",
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_unknown_tag_is_one_message_listing_the_tags(
    home: Path, offline: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert _eval("--retriever", "ViT-B-32@nosuchtag", "--benchmark", "heldout") == 2
    _one_configuration_line(
        capsys.readouterr().err, "'nosuchtag' is neither a pretrained tag of ViT-B-32", "openai"
    )
    assert not caplog.records  # open_clip's own `ERROR:root:` tag listing is never reached


def test_a_cached_pretrained_tag_loads_with_its_preprocessing(
    offline: Path, demo_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import open_clip.pretrained

    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED,
        DEMO_CLIP_MODEL,
        {
            "cachedtag": {
                "hf_hub": "megapairs-test/tiny-clip/",
                "mean": (0.5,) * 3,
                "std": (0.25,) * 3,
            }
        },
    )
    checkpoint = demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"
    cpu = torch.device("cpu")
    with pytest.raises(ConfigurationError, match="not in the local cache"):
        load_retriever(DEMO_CLIP_MODEL, "cachedtag", cpu, torch.float32)
    # The hub cache's layout: refs/main names the snapshot holding the file.
    repo = offline / "models--megapairs-test--tiny-clip"
    (repo / "snapshots/0123abcd").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text("0123abcd")
    shutil.copy(checkpoint, repo / "snapshots/0123abcd/open_clip_pytorch_model.bin")

    tagged = load_retriever(DEMO_CLIP_MODEL, "cachedtag", cpu, torch.float32)
    by_path = load_retriever(DEMO_CLIP_MODEL, str(checkpoint), cpu, torch.float32)
    assert tagged.retriever_id == f"{DEMO_CLIP_MODEL}__cachedtag"
    texts = ["a red chair", "two dogs"]
    assert torch.equal(
        torch.from_numpy(tagged.encode_texts(texts)), torch.from_numpy(by_path.encode_texts(texts))
    )
    normalize = tagged.preprocess.transforms[-1]
    assert tuple(normalize.mean) == (0.5,) * 3 and tuple(normalize.std) == (0.25,) * 3


# --- 3 and 5. skipped benchmarks: the path once, and a non-zero exit ----------------------------


def test_skipped_detail_names_the_path_once() -> None:
    path = Path("/data/cirr/captions/cap.rc2.val.json")
    assert Skipped("cirr", "val", path, f"captions not found at {path}").detail == (
        f"captions not found at {path}"
    )
    assert Skipped("cirr", "val", path, "no captions").detail == f"no captions (looked at {path})"
    assert Skipped("cirr", "val", None, "no cirr root configured").detail == (
        "no cirr root configured"
    )


def test_a_requested_benchmark_that_is_skipped_exits_3_naming_the_path_once(
    home: Path, tmp_path: Path, demo_models_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    retriever = f"{DEMO_CLIP_MODEL}@{demo_models_dir / (DEMO_CLIP_MODEL + '.pt')}"
    root = tmp_path / "no-cirr-here"
    root.mkdir()
    argv = ["--retriever", retriever, "--benchmark", "cirr-val", "--root", str(root)]
    assert _eval(*argv) == 3
    captured = capsys.readouterr()
    assert "- val: skipped (" in captured.out
    assert captured.out.count(str(root)) == 1
    assert "cirr-val: 1 split(s) skipped, not scored" in captured.err
    assert captured.err.count(str(root)) == 1

    assert _eval("--retriever", retriever, "--benchmark", "heldout") == 3
    assert "no triplets have been generated yet" in capsys.readouterr().err


@pytest.mark.parametrize("make", ["nothing", "file"])
def test_a_root_that_is_not_a_folder_is_a_configuration_error_naming_it(
    home: Path, tmp_path: Path, demo_models_dir: Path, capsys: pytest.CaptureFixture, make: str
) -> None:
    retriever = f"{DEMO_CLIP_MODEL}@{demo_models_dir / (DEMO_CLIP_MODEL + '.pt')}"
    root = tmp_path / "no" / "such-circo"
    if make == "file":
        root = tmp_path / "circo.zip"
        root.write_bytes(b"PK")
    assert _eval("--retriever", retriever, "--benchmark", "circo-val", "--root", str(root)) == 2
    problem = "is not a folder" if make == "file" else "does not exist"
    _one_configuration_line(capsys.readouterr().err, f"--root {root} {problem}")


# --- 4. batch sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--batch-size", "0", "must be a positive integer, got 0"),
        ("--batch-size", "-4", "must be a positive integer, got -4"),
        ("--num-workers", "-1", "must be 0 or more, got -1"),
    ],
)
def test_a_batch_size_below_one_is_a_usage_error(
    home: Path, capsys: pytest.CaptureFixture, option: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--retriever", "base", "--benchmark", "heldout", option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_evaluation_settings_refuse_empty_batches() -> None:
    with pytest.raises(ConfigurationError, match="batch_size must be a positive integer"):
        EvaluationSettings(batch_size=0)
    with pytest.raises(ConfigurationError, match="query_batch_size"):
        EvaluationSettings(query_batch_size=-1)


# --- 6. a bad profile or deployment --------------------------------------------------------------


@pytest.mark.parametrize(
    "variable, value, expected",
    [
        ("MEGAPAIRS_PROFILE", "nonsense", "unknown profile 'nonsense'"),
        ("MEGAPAIRS_DEPLOYMENT", "foo", "MEGAPAIRS_DEPLOYMENT"),
    ],
)
def test_a_bad_profile_or_deployment_is_a_configuration_error(
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    variable: str,
    value: str,
    expected: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert _eval("--retriever", "base", "--benchmark", "heldout") == 2
    _one_configuration_line(capsys.readouterr().err, expected)

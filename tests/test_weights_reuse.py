"""New weights at the same path embed the shard again; the same bytes anywhere do not.

The embedding tables' reuse keys hold the sha256 of the weights (embeddings/weights.py), not
only their file name: a user who copies a fine-tune over the old export keeps its path, its
size and (with `cp -p`) its mtime, and must still get new vectors. The digest itself is checked
here too: content-derived (a copy elsewhere has the same one), kept per file version in a small
local cache (a 2.5 GB checkpoint is hashed once per machine), and never stale after a rewrite
in place. Models are tiny and built here; the asset test runs the real Dagster assets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from megapairs_assets.embeddings import weights as weights_module
from megapairs_assets.embeddings.weights import digest_cache_path, file_digest, folder_digest

TINY_CLIP = "megapairs-tiny-clip"  # the demo's bundled open_clip config


@pytest.fixture(autouse=True)
def private_digest_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A digest cache of this test's own, and no digests remembered from earlier tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(weights_module, "_digests", {})
    return digest_cache_path()


def _tiny_export(folder: Path, seed: int) -> Path:
    """An open_clip export of the demo's tiny architecture: config + safetensors weights."""
    import open_clip
    from safetensors.torch import save_file

    from megapairs_assets.embeddings.encoders import register_bundled_model_configs

    register_bundled_model_configs()
    folder.mkdir(parents=True, exist_ok=True)
    config = open_clip.get_model_config(TINY_CLIP)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP, pretrained=None)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    return folder


# --- the digest ---------------------------------------------------------------------------


def test_a_file_digest_is_its_content_hash_wherever_the_bytes_are(tmp_path: Path) -> None:
    first = tmp_path / "a" / "weights.pt"
    first.parent.mkdir()
    first.write_bytes(os.urandom(4096))
    copy = tmp_path / "b" / "renamed.pt"
    copy.parent.mkdir()
    shutil.copy(first, copy)  # a new mtime, another folder and name: the same bytes

    assert file_digest(first) == hashlib.sha256(first.read_bytes()).hexdigest()
    assert file_digest(copy) == file_digest(first)


def test_a_rewrite_in_place_with_the_old_size_and_mtime_gets_a_new_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights_module, "DIGEST_CACHE_MIN_BYTES", 0)  # cache even tiny files
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x01" * 8192)
    before = file_digest(path)
    stat = path.stat()
    path.write_bytes(b"\x02" * 8192)  # what `cp -p new old` leaves: same size, old mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size

    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest() != before


def test_a_large_file_is_hashed_once_per_version_on_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_digest_cache: Path
) -> None:
    monkeypatch.setattr(weights_module, "DIGEST_CACHE_MIN_BYTES", 1024)
    path = tmp_path / "big.safetensors"
    path.write_bytes(os.urandom(2048))
    digest = file_digest(path)
    assert digest in json.loads(private_digest_cache.read_text()).values()

    # Another process (nothing in memory) takes it from the cache file without reading it.
    monkeypatch.setattr(weights_module, "_digests", {})

    def no_hashing(*_: object) -> None:
        raise AssertionError("hashed again")

    monkeypatch.setattr(weights_module.hashlib, "file_digest", no_hashing)
    assert file_digest(path) == digest
    # A small file is not worth a cache entry: it is hashed each time.
    small = tmp_path / "small.json"
    small.write_text("{}")
    with pytest.raises(AssertionError, match="hashed again"):
        file_digest(small)


def test_a_hub_cache_blob_is_named_by_its_digest_and_not_read(tmp_path: Path) -> None:
    sha = "ab" * 32
    blob = tmp_path / "models--org--m" / "blobs" / sha
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"not what the name says")  # never read: the name is the LFS sha256
    link = tmp_path / "models--org--m" / "snapshots" / ("0" * 40) / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert file_digest(link) == sha


def test_a_folder_digest_follows_its_model_files_only(tmp_path: Path) -> None:
    folder = tmp_path / "dinov2"
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    digest = folder_digest(folder)

    (folder / "README.md").write_text("notes")
    (folder / ".cache" / "huggingface" / "download.json").write_text("{}")
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(folder, moved)
    assert folder_digest(folder) == folder_digest(moved) == digest

    (folder / "model.safetensors").write_bytes(b"\x01" * 64)
    assert folder_digest(folder) != digest


# --- through the assets -------------------------------------------------------------------


def test_new_weights_at_the_same_path_embed_the_shard_again(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    import image_factory as factory
    from conftest import make_home

    from megapairs_assets.definitions import build_definitions
    from megapairs_assets.embeddings.compute import read_embedding_table
    from megapairs_assets.lib.storage import DataLayout
    from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
    from resources.corpus import CorpusSourceResource
    from resources.encoders import EncoderResource
    from resources.profiles import build_resources

    corpus = tmp_path / "corpus"
    factory.write_wds_shard(corpus / "00000.tar", factory.good_items(3))
    home = make_home(tmp_path, demo_models_dir)
    export = _tiny_export(tmp_path / "weights" / "clip-export", seed=1)
    clip = build_resources("demo", home)["clip_image_encoder"]
    fields = {name: getattr(clip, name) for name in EncoderResource.model_fields}
    fields.update(pretrained=str(export), demo_models_dir=None)
    defs = build_definitions(
        "demo",
        home,
        {
            "corpus_source": CorpusSourceResource(kind="webdataset", path=str(corpus)),
            "clip_image_encoder": EncoderResource(**fields),
        },
    )
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, ["00000"])
    job = defs.resolve_job_def("corpus_and_embeddings")
    clip_asset = dg.AssetKey("clip_image_embeddings")
    table = DataLayout(home).shard_table("clip_image_embeddings", "00000")

    def run() -> tuple[bool, list[str]]:
        result = job.execute_in_process(
            instance=instance,
            partition_key="00000",
            asset_selection=[dg.AssetKey("image_corpus"), clip_asset],
            raise_on_error=False,
        )
        assert result.success
        event = result.asset_materializations_for_node("clip_image_embeddings")[0]
        messages = [e.message or "" for e in instance.all_logs(result.run_id)]
        return event.metadata["reused"].value, messages

    reused, messages = run()
    assert reused is False
    # The export's architecture is said, and recorded (it is not the configured name).
    assert any(f"holds {TINY_CLIP}" in m for m in messages)
    first_ids, first_vectors = read_embedding_table(table)

    reused, _ = run()
    assert reused is True  # unchanged weights: the table stands

    # A fine-tune copied over the old one: same path, same size, and `cp -p` keeps the mtime.
    weights_file = export / "open_clip_model.safetensors"
    stat = weights_file.stat()
    _tiny_export(tmp_path / "fine-tune", seed=2)
    shutil.copyfile(tmp_path / "fine-tune" / "open_clip_model.safetensors", weights_file)
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_file.stat().st_size == stat.st_size

    reused, _ = run()
    assert reused is False
    ids, vectors = read_embedding_table(table)
    assert list(ids) == list(first_ids)
    assert not np.allclose(np.asarray(vectors, np.float32), np.asarray(first_vectors, np.float32))

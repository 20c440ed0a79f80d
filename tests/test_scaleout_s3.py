"""The data root on an S3-compatible server started here (moto in server mode, 127.0.0.1):

- the mining half of the demo graph (corpus -> 3 embeddings -> 3 KNN graphs -> pairs) runs
  with every table an object in the bucket, nothing under a local data folder, and every table
  reads back through the same readers the steps use;
- the whole demo loop (mine_and_generate, train, benchmark_scores of the base and the trained
  retriever on the held-out split), launched as `megapairs demo` launches it, runs with every
  table, export and checkpoint an object in the bucket; only caches, the catalog and the
  training work folder are local;
- a write that fails or is killed part-way leaves no new object and no temporary key (an old
  table stays whole), and an upload the store did not keep whole fails the step;
- local paths keep plain `pathlib.Path`s (the local tests cover byte-identical behaviour);
- credentials never go into the resource's config.

The bucket is observed with boto3, a client independent of the code under test (s3fs).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import image_factory as factory
import polars as pl
import pytest
from conftest import make_home, run_shards

from megapairs_assets.corpus.step import recheck_corpus_shard
from megapairs_assets.definitions import build_definitions
from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.embeddings.sources import SOURCES
from megapairs_assets.embeddings.step import recheck_embedding_shard
from megapairs_assets.evaluation.assets import register_retrievers, score_partition_key
from megapairs_assets.evaluation.step import known_retrievers
from megapairs_assets.generation.resource import GenerationResource
from megapairs_assets.generation.settings import demo_generation_settings
from megapairs_assets.knn.step import recheck_knn_shard
from megapairs_assets.lib.storage import (
    DataLayout,
    data_root_path,
    is_local,
    read_parquet,
    write_atomic,
    write_parquet_atomic,
)
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.lineage.report import lineage_report
from megapairs_assets.mining.pairs import MiningParams
from megapairs_assets.mining.step import recheck_pairs_shard
from megapairs_assets.training.assets import register_training_configs
from resources.corpus import CorpusSourceResource
from resources.evaluation import EvaluationResource
from resources.storage import StorageResource
from resources.training import DEMO_CONFIG_NAME, TrainingResource, demo_training_settings

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
pytest.importorskip("upath")

BUCKET = "megapairs-test"
SHARDS = ["00000", "00001"]
# Any value: moto accepts every key, and real credentials must never reach a test.
_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    client: object  # boto3 S3 client, the independent observer

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def pending_uploads(self) -> list[str]:
        listed = self.client.list_multipart_uploads(Bucket=BUCKET)
        return [upload["Key"] for upload in listed.get("Uploads", [])]

    def layout(self, home: Path, prefix: str) -> DataLayout:
        return StorageResource(
            home=str(home), data_root=f"s3://{BUCKET}/{prefix}", endpoint_url=self.endpoint_url
        ).layout()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with pytest.MonkeyPatch.context() as env:
        for name, value in _FAKE_AWS_ENV.items():
            env.setenv(name, value)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint_url = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            yield S3Server(endpoint_url, client)
        finally:
            server.stop()


@pytest.fixture(scope="module")
def s3_run(s3: S3Server, tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path):
    root = tmp_path_factory.mktemp("s3-run")
    corpus = root / "corpus"
    for index, shard in enumerate(SHARDS):
        factory.write_wds_shard(
            corpus / f"{shard}.tar", factory.good_items(5 + index, first_seed=30 * index)
        )
    home = make_home(root, demo_models_dir)
    storage = StorageResource(
        home=str(home), data_root=f"s3://{BUCKET}/home", endpoint_url=s3.endpoint_url
    )
    defs = build_definitions(
        "demo",
        home,
        {
            "corpus_source": CorpusSourceResource(kind="webdataset", path=str(corpus)),
            "storage": storage,
        },
    )
    result = run_shards(defs, dg.DagsterInstance.ephemeral(), SHARDS)
    return result, home, storage.layout()


def _expected_keys() -> list[str]:
    keys = ["home/data/image_corpus/source_report.parquet"]
    for shard in SHARDS:
        keys += [
            f"home/data/image_corpus/{shard}/images.parquet",
            f"home/data/image_corpus/{shard}/quarantine.parquet",
            f"home/data/mined_image_pairs/{shard}.parquet",
        ]
        for source in SOURCES:
            keys += [
                f"home/data/{source.embedding_asset}/{shard}.parquet",
                f"home/data/{source.knn_asset}/{shard}.parquet",
            ]
    return sorted(keys)


def test_every_table_of_the_mining_half_is_an_object_in_the_bucket(s3, s3_run) -> None:
    result, home, _ = s3_run
    assert result.success
    # Exactly the tables: no temporary keys, no leftover multipart uploads.
    assert s3.keys("home/") == _expected_keys()
    assert s3.pending_uploads() == []
    # Nothing went to local disk but the catalog (and the models the home links to).
    assert not (home / "data").exists()
    local_tables = [p for p in home.rglob("*.parquet") if "models" not in p.parts]
    assert local_tables == []


def test_the_catalog_records_object_urls_for_every_output(s3_run) -> None:
    result, home, _ = s3_run
    catalog = LineageCatalog(DataLayout(home).catalog_path)
    frame = catalog.query(
        "SELECT asset, partition, status, output_paths FROM materializations WHERE run_id = ?",
        [result.run_id],
    )
    assert frame.height == len(SHARDS) * 8  # corpus, 3 embeddings, 3 KNN graphs, pairs
    assert set(frame["status"]) == {"complete"}
    for paths in frame["output_paths"]:
        assert paths and all(
            url.startswith(f"s3://{BUCKET}/home/data/") for url in _json_values(paths)
        )


def test_tables_read_back_from_the_bucket_and_pass_their_checks(s3_run) -> None:
    _, home, layout = s3_run
    catalog = LineageCatalog(DataLayout(home).catalog_path)
    outcomes = []
    for shard in SHARDS:
        outcomes += recheck_corpus_shard(shard, layout, catalog)
        for source in SOURCES:
            outcomes += recheck_embedding_shard(source, shard, layout, catalog)
            outcomes += recheck_knn_shard(source, shard, layout, catalog)
        outcomes += recheck_pairs_shard(shard, layout, catalog, _mining_params(catalog, shard))
    assert outcomes and [o.name for o in outcomes if not o.passed] == []
    images = read_parquet(layout.corpus_images(SHARDS[1]))
    assert images.height == 6  # 5 + index good items in shard 1
    pairs = pl.concat([read_parquet(layout.shard_table("mined_image_pairs", s)) for s in SHARDS])
    assert pairs.height > 0, "the demo bands yield pairs on this corpus"


LOOP_PREFIX = "loop"
GENERATED_ASSETS = ("pair_descriptions", "pair_instructions", "triplets")


@pytest.fixture(scope="module")
def s3_loop(s3: S3Server, tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path):
    """The whole loop with the data root in the bucket, run as `megapairs demo` runs it: one
    mine_and_generate run over both shards, one train run for the demo config, one
    benchmark_scores run per retriever on the held-out split. Kept small: the heuristic writes
    every text (no model pair), two training steps."""
    root = tmp_path_factory.mktemp("s3-loop")
    corpus = root / "corpus"
    for index, shard in enumerate(SHARDS):
        factory.write_wds_shard(
            corpus / f"{shard}.tar", factory.good_items(8 + index, first_seed=40 * index)
        )
    home = make_home(root, demo_models_dir)
    models_dir = home / "models"
    storage = StorageResource(
        home=str(home), data_root=f"s3://{BUCKET}/{LOOP_PREFIX}", endpoint_url=s3.endpoint_url
    )
    demo_config = demo_training_settings(str(models_dir))[DEMO_CONFIG_NAME]
    tiny_config = type(demo_config)(
        **{
            **demo_config.model_dump(),
            "batch_size": 2,
            "max_steps": 2,
            "warmup_steps": 1,
            "checkpoint_every_n_steps": 1,
        }
    )
    resources = {
        "corpus_source": CorpusSourceResource(kind="webdataset", path=str(corpus)),
        "storage": storage,
        "generation": GenerationResource.from_settings(
            demo_generation_settings(models_dir, model_pairs_per_shard=0)
        ),
        "training": TrainingResource(
            configs={DEMO_CONFIG_NAME: tiny_config}, demo_models_dir=str(models_dir)
        ),
        "evaluation": EvaluationResource(
            base_model=DEMO_CLIP_MODEL,
            base_pretrained=str(models_dir / f"{DEMO_CLIP_MODEL}.pt"),
            heldout_fraction=0.3,
            batch_size=16,
            num_workers=0,
        ),
    }
    defs = build_definitions("demo", home, resources)
    instance = dg.DagsterInstance.ephemeral()
    results = {"mine_and_generate": run_shards(defs, instance, SHARDS, "mine_and_generate")}
    for config in register_training_configs(instance, resources["training"]):
        results[f"train {config}"] = defs.resolve_job_def("train").execute_in_process(
            instance=instance, partition_key=config, raise_on_error=False
        )
    layout = storage.layout()
    retrievers = list(known_retrievers(resources["evaluation"].base_spec(), layout))
    register_retrievers(instance, retrievers)
    for retriever_id in retrievers:
        results[f"evaluate {retriever_id}"] = defs.resolve_job_def("evaluate").execute_in_process(
            instance=instance,
            partition_key=str(score_partition_key(retriever_id, "heldout")),
            raise_on_error=False,
        )
    return results, home, layout, retrievers


def test_the_whole_loop_runs_with_every_table_and_export_in_the_bucket(s3, s3_loop) -> None:
    results, home, _, retrievers = s3_loop
    assert {name: r.success for name, r in results.items()} == dict.fromkeys(results, True)
    # The base model and the checkpoint trained from the bucket's triplets, both scored.
    assert len(retrievers) == 2
    assert retrievers[1] == f"{DEMO_CLIP_MODEL}__{DEMO_CONFIG_NAME}.open_clip"
    keys = set(s3.keys(f"{LOOP_PREFIX}/"))
    data = f"{LOOP_PREFIX}/data"
    expected = {f"{data}/image_corpus/source_report.parquet"}
    for shard in SHARDS:
        expected |= {
            f"{data}/image_corpus/{shard}/images.parquet",
            f"{data}/mined_image_pairs/{shard}.parquet",
            f"{data}/triplets/{shard}.jsonl",
            f"{data}/triplet_export/triplets/{shard}.jsonl",
            f"{data}/triplet_export/triplets/{shard}.parquet",
            f"{data}/triplet_export/shards/{shard}.json",
        }
        expected |= {f"{data}/{asset}/{shard}.parquet" for asset in GENERATED_ASSETS}
        expected |= {f"{data}/{s.knn_asset}/{shard}.parquet" for s in SOURCES}
    checkpoint = f"{data}/mmret_clip_checkpoint/{DEMO_CONFIG_NAME}"
    expected |= {
        f"{data}/triplet_export/README.md",
        f"{checkpoint}/open_clip/open_clip_config.json",
        f"{checkpoint}/open_clip/open_clip_model.safetensors",
        f"{checkpoint}/loss_curve.csv",
        f"{checkpoint}/run.json",
        # the resume point, for a retry on another machine
        f"{checkpoint}/lightning/last.ckpt",
    }
    expected |= {f"{data}/benchmark_scores/{r}/heldout/scores.parquet" for r in retrievers}
    # Each shard's response stores, mirrored beside the tables for steps on other machines.
    expected |= {
        f"{data}/cache/generation/{shard}/{step}.sqlite"
        for shard in SHARDS
        for step in ("describe", "instruct")
    }
    assert expected <= keys, sorted(expected - keys)
    exported_images = [k for k in keys if k.startswith(f"{data}/triplet_export/images/")]
    assert exported_images and all(k.endswith(".jpg") for k in exported_images)
    # No temporary objects, no unfinished uploads, and no table on local disk.
    assert [k for k in keys if ".tmp-" in k] == [] and s3.pending_uploads() == []
    assert not (home / "data").exists()
    local = [p for p in home.rglob("*") if p.suffix in (".parquet", ".jsonl", ".jpg")]
    assert [p for p in local if "models" not in p.parts and "training" not in p.parts] == []


def test_the_loop_reads_its_tables_back_from_the_bucket(s3_loop) -> None:
    _, home, layout, retrievers = s3_loop
    triplets = pl.concat([read_parquet(layout.shard_table("triplets", s)) for s in SHARDS])
    assert triplets.height > 0
    scores = pl.concat(
        [
            read_parquet(layout.asset_dir("benchmark_scores") / r / "heldout" / "scores.parquet")
            for r in retrievers
        ]
    )
    assert set(scores["retriever_id"]) == set(retrievers)
    scored = scores.filter(pl.col("status") == "scored")
    assert scored.height > 0 and scored["value"].is_between(0, 100).all()
    # The lineage report reads a triplet's texts from the object its record names.
    catalog = LineageCatalog(DataLayout(home).catalog_path)
    report = lineage_report(
        catalog, triplets["triplet_id"][0], storage_options=layout.storage_options
    )
    assert report is not None and triplets["description"][0] in report
    # The response store and the checkpoint copy are local caches under home.
    assert list((home / "cache" / "generation").glob("*/*.sqlite"))
    assert list((home / "cache" / "mmret_clip_checkpoint").rglob("open_clip_config.json"))


def test_a_failed_write_leaves_no_object_and_no_temporary_key(s3, tmp_path) -> None:
    layout = s3.layout(tmp_path, "failed-write")
    path = layout.shard_table("mined_image_pairs", "00000")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"PAR1 half a table")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert s3.keys("failed-write/") == []
    assert not path.exists()
    # Over an existing table: the old one stays whole.
    write_parquet_atomic(pl.DataFrame({"a": [1, 2]}), path)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half_then_fail)
    assert read_parquet(path)["a"].to_list() == [1, 2]
    assert s3.keys("failed-write/") == ["failed-write/data/mined_image_pairs/00000.parquet"]


# A writer in its own interpreter that dies (SIGKILL) after writing half of its table, before
# the upload: what a node loss or an OOM kill does to a step. It imports only the storage module.
_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from megapairs_assets.lib.storage import DataLayout, write_atomic

home, data_root, endpoint_url = sys.argv[1:4]
layout = DataLayout(Path(home), data_root=data_root, storage_options={"endpoint_url": endpoint_url})

def half_then_killed(tmp):
    tmp.write_bytes(b"PAR1 half a table")
    os.kill(os.getpid(), signal.SIGKILL)

write_atomic(layout.shard_table("clip_image_knn", "00000"), half_then_killed)
"""


def test_a_killed_writer_leaves_the_old_table_and_no_temporary_key(s3, tmp_path) -> None:
    layout = s3.layout(tmp_path, "killed-write")
    path = layout.shard_table("clip_image_knn", "00000")
    write_parquet_atomic(pl.DataFrame({"a": [7]}), path)
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_WRITER,
            str(tmp_path),
            f"s3://{BUCKET}/killed-write",
            s3.endpoint_url,
        ],
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    assert s3.keys("killed-write/") == ["killed-write/data/clip_image_knn/00000.parquet"]
    assert read_parquet(path)["a"].to_list() == [7]
    assert s3.pending_uploads() == []


def test_an_upload_the_store_did_not_keep_whole_fails(s3, tmp_path, monkeypatch) -> None:
    layout = s3.layout(tmp_path, "short-upload")
    path = layout.shard_table("dino_image_knn", "00000")
    fs = path.fs

    def cut_short(lpath: str, rpath: str, **kwargs) -> None:  # a fault: a truncating proxy
        with open(lpath, "rb") as whole:
            fs.pipe_file(rpath, whole.read()[:10])

    monkeypatch.setattr(fs, "put_file", cut_short)  # this filesystem instance only
    with pytest.raises(OSError, match="holds 10 bytes after uploading"):
        write_parquet_atomic(pl.DataFrame({"a": [1]}), path)


def test_local_roots_stay_plain_paths(tmp_path) -> None:
    default = DataLayout(tmp_path)
    assert default.data_dir == tmp_path / "data" and is_local(default.data_dir)
    shared = DataLayout(tmp_path / "home", data_root=str(tmp_path / "shared"))
    assert shared.shard_table("clip_image_knn", "00000") == (
        tmp_path / "shared" / "data" / "clip_image_knn" / "00000.parquet"
    )
    assert type(data_root_path(f"file://{tmp_path}")) is type(tmp_path)
    assert not is_local(data_root_path("s3://bucket/prefix"))
    # Paths the catalog, the models and the Dagster instance use stay local under home.
    remote = DataLayout(tmp_path, data_root="s3://bucket/prefix")
    assert remote.catalog_path == tmp_path / "catalog.duckdb"
    assert remote.models_dir == tmp_path / "models"


@pytest.mark.parametrize(
    "options",
    [
        {"key": "AKIA..."},
        {"secret": "..."},
        {"client_kwargs": {"aws_secret_access_key": "..."}},
        {"client_kwargs": {"aws_access_key_id": "..."}},
    ],
)
def test_credentials_are_refused_in_config(options: dict) -> None:
    with pytest.raises(ValueError, match="look like credentials"):
        StorageResource(home="/tmp/home", data_root="s3://b/p", storage_options=options)


def test_unsafe_keys_are_refused_under_a_url_root() -> None:
    layout = DataLayout(Path("/tmp/home"), data_root="s3://bucket/prefix")
    for key in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="not safe"):
            layout.shard_table("clip_image_knn", key)


def _mining_params(catalog: LineageCatalog, shard: str) -> MiningParams:
    from megapairs_assets.corpus.step import latest_config

    config = latest_config(catalog, "mined_image_pairs", shard)
    return MiningParams(
        bands={name: tuple(band) for name, band in config["bands"].items()},
        targets_per_source=config["targets_per_source"],
        hard_negatives=config["hard_negatives"],
        seed=config["seed"],
        query_fraction=config["query_fraction"],
    )


def _json_values(text: str) -> list[str]:
    import json

    return list(json.loads(text).values())


def test_checkpoint_exports_are_mirrored_only_when_they_change(s3, tmp_path) -> None:
    from megapairs_assets.retriever.discovery import discover_remote_checkpoints

    root = s3.layout(tmp_path, "mirror").asset_dir("mmret_clip_checkpoint")
    export = root / "cfg" / "open_clip"
    config = '{"model_name": "tiny", "model_cfg": {}}'
    write_atomic(export / "open_clip_model.safetensors", lambda tmp: tmp.write_bytes(b"w1"))
    write_atomic(export / "open_clip_config.json", lambda tmp: tmp.write_text(config))
    # An export still being written (no config yet) is not listed.
    write_atomic(root / "half" / "open_clip" / "x.safetensors", lambda t: t.write_bytes(b"w"))
    cache = tmp_path / "cache"
    listed = discover_remote_checkpoints(root, cache, download_weights=False)
    assert list(listed) == ["tiny__cfg.open_clip"]
    local = cache / "cfg" / "open_clip"
    assert (local / "open_clip_config.json").is_file()
    assert not (local / "open_clip_model.safetensors").exists()  # a listing moves no weights
    found = discover_remote_checkpoints(root, cache, download_weights=True)
    weights = local / "open_clip_model.safetensors"
    assert weights.read_bytes() == b"w1"
    fingerprint, mtime = found["tiny__cfg.open_clip"].fingerprint(), weights.stat().st_mtime_ns
    discover_remote_checkpoints(root, cache, download_weights=True)
    assert weights.stat().st_mtime_ns == mtime  # unchanged: not fetched again
    write_atomic(export / "open_clip_model.safetensors", lambda tmp: tmp.write_bytes(b"w2!"))
    again = discover_remote_checkpoints(root, cache, download_weights=True)
    assert weights.read_bytes() == b"w2!"
    assert again["tiny__cfg.open_clip"].fingerprint() != fingerprint
    # An export removed from the store loses its local copy.
    root.fs.rm(export.path, recursive=True)
    assert discover_remote_checkpoints(root, cache, download_weights=True) == {}
    assert not local.exists()


def test_check_existing_re_checks_the_tables_in_the_bucket(
    s3: S3Server, s3_loop, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from megapairs_assets.cli.main import main as megapairs

    _, home, _, _ = s3_loop
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    monkeypatch.setenv("MEGAPAIRS_DATA_ROOT", f"s3://{BUCKET}/{LOOP_PREFIX}")
    monkeypatch.setenv("MEGAPAIRS_STORAGE_ENDPOINT_URL", s3.endpoint_url)
    before = set(s3.keys(f"{LOOP_PREFIX}/"))
    assert megapairs(["check", "--existing", "--verbose", "--home", str(home)]) == 0
    checked = {tuple(line.split()[:3]) for line in capsys.readouterr().out.splitlines()}
    for shard in SHARDS:
        assert ("mined_image_pairs", "pairs_in_band", shard) in checked
        assert ("clip_image_knn", "knn_no_self_neighbors", shard) in checked
    assert set(s3.keys(f"{LOOP_PREFIX}/")) == before  # read-only

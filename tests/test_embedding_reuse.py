"""An embedding shard whose inputs did not change keeps its table; the model is not even loaded.

Shards are embedded with a fake encoder that counts its loads and the ids it embeds, over a
tiny corpus written as the corpus stage writes it (image_id, key, source_uri, caption,
caption_issue, content_hash). What is proved: identical inputs reuse every table without a
load; a changed picture, caption or model setting re-embeds exactly the shards it touches; a
damaged, keyless or failing table, a transient skip and the force switch embed again; and a
reused shard reports the same catalog record, quarantine rows and checks as a computed one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.embeddings.compute import read_embedding_table, write_embedding_table
from megapairs_assets.embeddings.encoders import LoadedEncoder
from megapairs_assets.embeddings.reuse import REUSE_KEY_FIELD, SKIPPED_FIELD, shard_reuse_key
from megapairs_assets.embeddings.sources import source_named
from megapairs_assets.embeddings.step import EmbeddingRun, LazyEncoder, embed_shards
from megapairs_assets.lib.step import StepResult, StepStream, content_version, run_recorded
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord, utc_now

CPU = torch.device("cpu")
LIMITS = ImageLimits()
DIM = 8
SHARDS = ["00000", "00001"]
CODE_VERSION = "embeddings-v1+s.aaaaaaaaaaaa"


class CountingEncoder:
    """A fake model factory: counts loads and records every id it embeds."""

    def __init__(self, modality: str) -> None:
        self.modality = modality
        self.loads = 0
        self.embedded: list[str] = []

    def lazy(self) -> LazyEncoder:
        return LazyEncoder(self.modality, self._load)  # type: ignore[arg-type]

    def _load(self) -> LoadedEncoder:
        self.loads += 1
        if self.modality == "image":
            return LoadedEncoder("fake:image", DIM, "image", _pixels, 4, self._images)
        return LoadedEncoder("fake:text", DIM, "text", None, None, _encode_texts=self._texts)

    def _images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.embedded.extend(["?"] * len(pixels))  # image ids are not seen; count them
        return pixels.flatten(1)[:, :DIM] + 0.5

    def _texts(self, texts: list[str]) -> torch.Tensor:
        self.embedded.extend(texts)
        lengths = torch.tensor([float(len(t)) for t in texts])
        return torch.stack([lengths + offset for offset in range(DIM)], dim=1)


def _pixels(image: Image.Image) -> torch.Tensor:
    small = np.asarray(image.resize((4, 4)), dtype=np.float32) / 255.0
    return torch.from_numpy(small).permute(2, 0, 1)


class Corpus:
    """Two corpus shards on disk and in the catalog, editable like a re-listed source."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = DataLayout(root / "home")
        self.catalog = LineageCatalog(self.layout.catalog_path)
        self.frames: dict[str, pl.DataFrame] = {}
        for number, shard in enumerate(SHARDS):
            images = [self._picture(shard, i, seed=10 * number + i) for i in range(3)]
            broken = root / f"{shard}-broken.jpg"
            broken.write_bytes(b"not a jpeg at all")  # quarantined as decode_error
            self.frames[shard] = pl.DataFrame(
                {
                    "image_id": [f"{shard}/{i}" for i in range(4)],
                    "key": [f"k{i}" for i in range(4)],
                    "source_uri": [*map(str, images), str(broken)],
                    "caption": [f"shard {shard} photo {i}" for i in range(3)] + [None],
                    "caption_issue": [None, None, None, "bad_caption_file: x.json"],
                }
            )
            self.write(shard)

    def _picture(self, shard: str, index: int, seed: int) -> Path:
        path = self.root / f"{shard}-{index}-{seed}.jpg"
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
        return path

    def write(self, shard: str) -> None:
        frame = self.frames[shard]
        hashes = [
            hashlib.sha256(Path(uri).read_bytes()).hexdigest() if Path(uri).exists() else "gone"
            for uri in frame["source_uri"]
        ]
        frame = frame.with_columns(pl.Series("content_hash", hashes))
        write_parquet_atomic(frame, self.layout.corpus_images(shard))
        self.catalog.record(
            MaterializationRecord("image_corpus", shard, "r", "v", "t", utc_now(), 0)
        )

    def replace_picture(self, shard: str, row: int) -> None:
        uris = self.frames[shard]["source_uri"].to_list()
        uris[row] = str(self._picture(shard, row, seed=999))
        self.frames[shard] = self.frames[shard].with_columns(pl.Series("source_uri", uris))
        self.write(shard)

    def set_caption(self, shard: str, row: int, caption: str) -> None:
        captions = self.frames[shard]["caption"].to_list()
        captions[row] = caption
        self.frames[shard] = self.frames[shard].with_columns(pl.Series("caption", captions))
        self.write(shard)

    def table(self, source: str, shard: str) -> Path:
        return self.layout.shard_table(source_named(source).embedding_asset, shard)


def _embed(
    corpus: Corpus,
    source: str,
    encoder: CountingEncoder,
    code_version: str | None = CODE_VERSION,
    reuse_unchanged: bool = True,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[StepResult]:
    run = EmbeddingRun(
        source_named(source),
        encoder.lazy(),
        2,
        0,
        CPU,
        torch.float32,
        LIMITS,
        code_version=code_version,
        reuse_unchanged=reuse_unchanged,
    )
    logged = log or (lambda _: None)
    return list(embed_shards(SHARDS, run, corpus.layout, corpus.catalog, logged, warn=warn))


def _comparable(result: StepResult) -> dict:
    """Everything a shard reports except how it got there (reused, rows kept, throughput)."""
    how = ("reused", "rows_reused", "rows_computed", "items_per_s")
    metadata = {k: v for k, v in result.metadata.items() if k not in how}
    return {
        "partition": result.partition,
        "outputs": result.outputs,
        "row_counts": result.row_counts,
        "config": result.config,
        "model_ids": result.model_ids,
        "input_versions": result.input_versions,
        "rows": {name: frame.to_dicts() for name, frame in result.rows.items()},
        "outcomes": result.outcomes,
        "metadata": metadata,
        "preview": None if result.preview is None else result.preview.to_dicts(),
    }


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    return Corpus(tmp_path)


@pytest.mark.parametrize("source", ["clip_image", "caption_text"])
def test_unchanged_shards_keep_their_tables_without_loading_the_model(
    corpus: Corpus, source: str
) -> None:
    first_encoder = CountingEncoder("image" if source == "clip_image" else "text")
    first = _embed(corpus, source, first_encoder)
    assert first_encoder.loads == 1 and len(first_encoder.embedded) == 6
    assert [r.metadata["reused"] for r in first] == [False, False]
    files = {shard: corpus.table(source, shard).read_bytes() for shard in SHARDS}

    logged: list[str] = []
    again = CountingEncoder(first_encoder.modality)
    second = _embed(corpus, source, again, log=logged.append)

    assert again.loads == 0 and again.embedded == []
    assert [r.metadata["reused"] for r in second] == [True, True]
    assert [_comparable(r) for r in second] == [_comparable(r) for r in first]
    assert {shard: corpus.table(source, shard).read_bytes() for shard in SHARDS} == files
    asset = source_named(source).embedding_asset
    assert f"{asset}[00001]: inputs unchanged, table reused" in logged
    # The skipped row (a broken picture / a missing caption) is quarantined again, as before.
    quarantine = second[0].rows["quarantine_log"]
    assert quarantine["key"].to_list() == ["k3"]
    assert all(o.passed for r in second for o in r.outcomes)


@pytest.mark.parametrize(
    ("source", "change", "recomputed", "rows_embedded"),
    [
        # One changed row of a shard: only it goes through the model (embedding/reuse.py's
        # per-row reuse; tests/test_embedding_row_reuse.py covers it in depth).
        ("clip_image", "picture", ["00001"], 1),
        ("caption_text", "picture", [], 0),  # the captions are the text table's only input
        ("caption_text", "caption", ["00001"], 1),
        ("clip_image", "caption", [], 0),  # images do not read captions
        ("clip_image", "model", SHARDS, 6),  # three embeddable rows per shard
        ("caption_text", "model", SHARDS, 6),
    ],
)
def test_a_change_reembeds_exactly_the_shards_it_touches(
    corpus: Corpus, source: str, change: str, recomputed: list[str], rows_embedded: int
) -> None:
    modality = "image" if source == "clip_image" else "text"
    _embed(corpus, source, CountingEncoder(modality))
    code_version = CODE_VERSION
    if change == "picture":
        corpus.replace_picture("00001", 1)
    elif change == "caption":
        corpus.set_caption("00001", 2, "a different caption")
    else:  # another model or dtype: another settings hash in the code version
        code_version = "embeddings-v1+s.bbbbbbbbbbbb"

    encoder = CountingEncoder(modality)
    results = _embed(corpus, source, encoder, code_version=code_version)

    assert [r.partition for r in results if not r.metadata["reused"]] == recomputed
    assert encoder.loads == (1 if recomputed else 0)
    assert len(encoder.embedded) == rows_embedded
    if change == "caption" and recomputed:
        assert "a different caption" in encoder.embedded
    # The recomputed table holds what a fresh embedding of the new corpus gives.
    for shard in recomputed:
        ids, vectors = read_embedding_table(corpus.table(source, shard))
        fresh_corpus = corpus.layout.corpus_images(shard)
        assert set(ids) == set(pl.read_parquet(fresh_corpus)["image_id"][:3])
        assert np.isfinite(vectors.astype(np.float32)).all()


def _first_vectors_nan(path: Path) -> None:
    table = pq.read_table(path)
    ids, vectors = read_embedding_table(path)
    vectors = vectors.copy()
    vectors[0] = np.nan
    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    model_id = metadata.pop("model_id")
    write_embedding_table(path, list(ids), vectors, model_id, metadata=metadata)


def _without_key(path: Path) -> None:
    ids, vectors = read_embedding_table(path)  # as written before reuse existed
    write_embedding_table(path, list(ids), vectors, "fake:image")


def _transient_skip(path: Path) -> None:
    # As if the broken picture had been missing that day: a missing file may come back.
    table = pq.read_table(path)
    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    skipped = json.loads(metadata[SKIPPED_FIELD])
    metadata[SKIPPED_FIELD] = json.dumps([[i, "missing_file", "gone"] for i, _, _ in skipped])
    ids, vectors = read_embedding_table(path)
    write_embedding_table(path, list(ids), vectors, metadata.pop("model_id"), metadata=metadata)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "unreadable"),
        (lambda p: p.write_bytes(b"PAR1 garbage"), "unreadable"),
        (_without_key, "no reuse key"),
        (_first_vectors_nan, "fails embeddings_finite"),
        (_transient_skip, "reasons that may pass (missing_file)"),
    ],
    ids=["truncated", "garbage", "no-key", "nan-vector", "transient-skip"],
)
def test_a_table_that_cannot_stand_is_embedded_again(
    corpus: Corpus, damage: Callable[[Path], None], why: str
) -> None:
    first = _embed(corpus, "clip_image", CountingEncoder("image"))
    damage(corpus.table("clip_image", "00000"))

    logged: list[str] = []
    warned: list[str] = []
    encoder = CountingEncoder("image")
    results = _embed(corpus, "clip_image", encoder, log=logged.append, warn=warned.append)

    assert [r.metadata["reused"] for r in results] == [False, True]
    assert encoder.loads == 1 and len(encoder.embedded) == 3
    # A damaged table is a warning in the run log; an out-of-date one is an info line.
    damaged = why == "unreadable"
    assert any(
        line.startswith("clip_image_embeddings[00000]: embedding it:") and why in line
        for line in (warned if damaged else logged)
    ), (logged, warned)
    assert damaged == bool(warned), warned
    assert _comparable(results[0]) == _comparable(first[0])
    assert all(o.passed for o in results[0].outcomes)
    assert REUSE_KEY_FIELD.encode() in pq.read_schema(corpus.table("clip_image", "00000")).metadata


def test_the_force_switch_and_a_run_without_a_version_embed_everything(corpus: Corpus) -> None:
    _embed(corpus, "clip_image", CountingEncoder("image"))
    forced = CountingEncoder("image")
    results = _embed(corpus, "clip_image", forced, reuse_unchanged=False)
    assert forced.loads == 1 and len(forced.embedded) == 6
    assert [r.metadata["reused"] for r in results] == [False, False]
    # The forced run still writes its keys, so the next ordinary run reuses its tables.
    after = CountingEncoder("image")
    assert [r.metadata["reused"] for r in _embed(corpus, "clip_image", after)] == [True, True]

    unversioned = CountingEncoder("image")
    _embed(corpus, "clip_image", unversioned, code_version=None)
    assert unversioned.loads == 1 and len(unversioned.embedded) == 6
    assert (
        REUSE_KEY_FIELD.encode() not in pq.read_schema(corpus.table("clip_image", "00000")).metadata
    )


def test_a_reused_shard_records_what_a_computed_one_records(corpus: Corpus) -> None:
    asset = source_named("clip_image").embedding_asset

    def recorded_run(run_id: str, reuse_unchanged: bool) -> list[StepResult]:
        run = EmbeddingRun(
            source_named("clip_image"),
            CountingEncoder("image").lazy(),
            2,
            0,
            CPU,
            torch.float32,
            LIMITS,
            code_version=CODE_VERSION,
            reuse_unchanged=reuse_unchanged,
        )
        step = StepStream(embed_shards(SHARDS, run, corpus.layout, corpus.catalog, print))
        return [
            run_recorded(
                step,
                shard,
                asset=asset,
                code_version=CODE_VERSION,
                run_id=run_id,
                profile="demo",
                catalog=corpus.catalog,
            )
            for shard in SHARDS
        ]

    def quarantine() -> list[dict]:
        # The catalog keeps the newest materialization's rows of each partition.
        return corpus.catalog.query(
            "SELECT * EXCLUDE (materialization_id) FROM quarantine_log ORDER BY shard, key"
        ).to_dicts()

    def records(run_id: str) -> list[dict]:
        columns = "config, model_ids, input_versions, row_counts, output_paths, failed_checks"
        return corpus.catalog.query(
            f"SELECT partition, status, {columns} FROM materializations WHERE run_id = ? "
            "ORDER BY partition",
            [run_id],
        ).to_dicts()

    computed = recorded_run("first", reuse_unchanged=True)
    computed_quarantine = quarantine()
    reused = recorded_run("second", reuse_unchanged=True)
    reused_quarantine = quarantine()
    recomputed = recorded_run("third", reuse_unchanged=False)
    assert [r.metadata["reused"] for r in reused] == [True, True]
    assert [r.metadata["reused"] for r in recomputed] == [False, False]

    assert len(records("first")) == 2
    assert records("second") == records("third") == records("first")
    assert reused_quarantine == quarantine() == computed_quarantine
    assert [row["key"] for row in reused_quarantine] == ["k3", "k3"]  # each broken picture
    assert [_comparable(r) for r in reused] == [_comparable(r) for r in recomputed]
    # The same bytes on disk, so the same content (data) version: nothing downstream is stale.
    assert [content_version(r) for r in reused] == [content_version(r) for r in computed]
    assert [content_version(r) for r in recomputed] == [content_version(r) for r in computed]


def test_the_key_ignores_row_order_and_uri_but_not_content_or_limits(corpus: Corpus) -> None:
    rows = pl.read_parquet(corpus.layout.corpus_images("00000"))

    def key(frame: pl.DataFrame, limits: ImageLimits = LIMITS, modality: str = "image") -> str:
        return shard_reuse_key(CODE_VERSION, "t", modality, frame, limits)  # type: ignore[arg-type]

    base = key(rows)
    assert key(rows.reverse()) == base
    assert key(rows.with_columns(pl.lit("/moved/x.jpg").alias("source_uri"))) == base
    assert key(rows, ImageLimits(max_caption_chars=5)) == base
    assert key(rows, ImageLimits(min_side_px=30)) != base
    assert key(rows.with_columns(pl.lit("other").alias("content_hash"))) != base
    assert key(rows.head(3)) != base
    assert key(rows.drop("content_hash")) is None
    assert key(rows.with_columns(pl.lit(None, pl.String).alias("content_hash"))) is None
    text = key(rows, modality="text")
    assert key(rows.with_columns(pl.lit("other").alias("content_hash")), modality="text") == text
    assert key(rows.with_columns(pl.lit("x").alias("caption")), modality="text") != text


def test_a_no_change_rerun_of_the_assets_loads_no_model(
    tmp_path: Path, demo_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg
    import image_factory as factory
    from conftest import make_home, run_shards

    from megapairs_assets.definitions import build_definitions
    from megapairs_assets.embeddings.sources import SOURCES
    from resources.corpus import CorpusSourceResource
    from resources.encoders import EncoderResource
    from resources.profiles import build_resources

    corpus = tmp_path / "corpus"
    factory.write_wds_shard(corpus / "00000.tar", factory.good_items(3))
    source = CorpusSourceResource(kind="webdataset", path=str(corpus))
    home = make_home(tmp_path, demo_models_dir)
    defs = build_definitions("demo", home, {"corpus_source": source})
    loads: list[str] = []
    real_load = EncoderResource.load

    def counting_load(self: EncoderResource, device: torch.device, dtype: torch.dtype):
        loads.append(self.backend)
        return real_load(self, device, dtype)

    monkeypatch.setattr(EncoderResource, "load", counting_load)
    instance = dg.DagsterInstance.ephemeral()
    assets = [s.embedding_asset for s in SOURCES]

    def reused(result: dg.ExecuteInProcessResult) -> list[bool]:
        assert result.success
        return [
            result.asset_materializations_for_node(asset)[0].metadata["reused"].value
            for asset in assets
        ]

    first = run_shards(defs, instance, ["00000"], job_name="corpus_and_embeddings")
    assert reused(first) == [False, False, False] and len(loads) == 3
    second = run_shards(defs, instance, ["00000"], job_name="corpus_and_embeddings")
    assert reused(second) == [True, True, True] and len(loads) == 3  # no model loaded again
    messages = [e.message or "" for e in instance.all_logs(second.run_id)]
    assert any(
        "clip_image_embeddings[00000]: inputs unchanged, table reused" in m for m in messages
    )
    assert any("was not loaded" in m for m in messages)

    # The resource's switch (run config or a resource override) re-embeds that table only.
    clip_key = SOURCES[0].encoder_key
    clip = build_resources("demo", home)[clip_key]
    assert clip.reuse_unchanged is True  # the default
    fields = {name: getattr(clip, name) for name in EncoderResource.model_fields}
    fields["reuse_unchanged"] = False
    forced = build_definitions(
        "demo",
        home,
        {"corpus_source": source, clip_key: EncoderResource(**fields)},
    )
    third = run_shards(forced, instance, ["00000"], job_name="corpus_and_embeddings")
    assert reused(third) == [False, True, True] and loads[3:] == [clip.backend]

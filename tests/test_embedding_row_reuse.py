"""A changed embedding shard embeds only its changed rows; the rest keep their old vectors.

Shards are embedded with fake encoders that count their loads and every row they embed, over a
small corpus written as the corpus stage writes it (image_id, key, source_uri, caption,
caption_issue, content_hash). The fake image model's vector depends on the picture alone, as a
real model's does up to rounding, so a merged table can be compared bit for bit with a full
embed. What is proved: an added, replaced or removed image and an edited caption cost exactly
the changed rows (a removal loads no model); the merged table is the full embed's, row order,
skips and checks included; content skips are carried over and transient ones tried again;
other settings, a damaged table and a table without per-row inputs embed the whole shard; and
the KNN step's view of the table (its footer digest) changes exactly when the table does.
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
from megapairs_assets.embeddings.compute import (
    INPUT_DIGEST_COLUMN,
    NO_CAPTION,
    embed_row_groups,
    read_embedding_table,
    write_embedding_table,
)
from megapairs_assets.embeddings.encoders import LoadedEncoder
from megapairs_assets.embeddings.reuse import (
    SETTINGS_KEY_FIELD,
    SKIPPED_FIELD,
    SKIPPED_INPUTS_FIELD,
    stored_metadata,
)
from megapairs_assets.embeddings.sources import source_named
from megapairs_assets.embeddings.step import EmbeddingRun, LazyEncoder, embed_shards
from megapairs_assets.knn.reuse import read_footer
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord, utc_now

CPU = torch.device("cpu")
LIMITS = ImageLimits()
DIM = 8
CHANGED, STEADY = "00000", "00001"
SHARDS = [CHANGED, STEADY]
CODE_VERSION = "embeddings-v1+s.aaaaaaaaaaaa"


class CountingEncoder:
    """A fake model factory: counts loads and the rows (images, captions) it embeds."""

    def __init__(self, modality: str) -> None:
        self.modality = modality
        self.loads = 0
        self.images = 0
        self.captions: list[str] = []

    def lazy(self) -> LazyEncoder:
        return LazyEncoder(self.modality, self._load)  # type: ignore[arg-type]

    def _load(self) -> LoadedEncoder:
        self.loads += 1
        if self.modality == "image":
            return LoadedEncoder("fake:image", DIM, "image", _pixels, 4, self._images)
        return LoadedEncoder("fake:text", DIM, "text", None, None, _encode_texts=self._texts)

    def _images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += len(pixels)
        return pixels.flatten(1)[:, :DIM] + 0.5  # each row from its own picture only

    def _texts(self, texts: list[str]) -> torch.Tensor:
        self.captions.extend(texts)
        lengths = torch.tensor([float(len(t)) for t in texts])
        return torch.stack([lengths + offset for offset in range(DIM)], dim=1)

    @property
    def rows(self) -> int:
        """Rows that went through the model."""
        return self.images + len(self.captions)


def _pixels(image: Image.Image) -> torch.Tensor:
    small = np.asarray(image.resize((4, 4)), dtype=np.float32) / 255.0
    return torch.from_numpy(small).permute(2, 0, 1)


class World:
    """Two corpus shards on disk and in the catalog, editable like a re-listed source.

    Shard 00000 has five pictures and a broken file (a content skip: decode_error, and no
    caption); shard 00001 three pictures and stays unchanged.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = DataLayout(root / "home")
        self.catalog = LineageCatalog(self.layout.catalog_path)
        self.rows: dict[str, list[dict]] = {}
        self.seed = 0
        for shard, count in ((CHANGED, 5), (STEADY, 3)):
            self.rows[shard] = [self._row(shard, f"{shard}/{i}") for i in range(count)]
            self.write(shard)
        broken = root / "broken.jpg"
        broken.write_bytes(b"not a jpeg at all")
        self.rows[CHANGED].append(
            {
                "image_id": f"{CHANGED}/broken",
                "key": "kbroken",
                "source_uri": str(broken),
                "caption": None,
                "caption_issue": "bad_caption_file: x.json",
            }
        )
        self.write(CHANGED)

    def _picture(self) -> Path:
        self.seed += 1
        path = self.root / f"picture-{self.seed}.jpg"
        rng = np.random.default_rng(self.seed)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
        return path

    def _row(self, shard: str, image_id: str) -> dict:
        return {
            "image_id": image_id,
            "key": f"k{image_id}",
            "source_uri": str(self._picture()),
            "caption": f"photo {image_id} of shard {shard}",
            "caption_issue": None,
        }

    def write(self, shard: str) -> None:
        frame = pl.DataFrame(
            self.rows[shard],
            schema={
                c: pl.String for c in ("image_id", "key", "source_uri", "caption", "caption_issue")
            },
        )
        hashes = [hashlib.sha256(Path(uri).read_bytes()).hexdigest() for uri in frame["source_uri"]]
        write_parquet_atomic(
            frame.with_columns(pl.Series("content_hash", hashes)),
            self.layout.corpus_images(shard),
        )
        self.catalog.record(
            MaterializationRecord("image_corpus", shard, "r", "v", "t", utc_now(), 0)
        )

    def add(self, shard: str, position: int, image_id: str) -> None:
        self.rows[shard].insert(position, self._row(shard, image_id))
        self.write(shard)

    def replace_picture(self, shard: str, image_id: str) -> None:
        (row,) = [r for r in self.rows[shard] if r["image_id"] == image_id]
        row["source_uri"] = str(self._picture())
        self.write(shard)

    def remove(self, shard: str, image_id: str) -> None:
        self.rows[shard] = [r for r in self.rows[shard] if r["image_id"] != image_id]
        self.write(shard)

    def set_caption(self, shard: str, image_id: str, caption: str) -> None:
        (row,) = [r for r in self.rows[shard] if r["image_id"] == image_id]
        row["caption"] = caption
        self.write(shard)

    def table(self, source: str, shard: str = CHANGED) -> Path:
        return self.layout.shard_table(source_named(source).embedding_asset, shard)

    def vectors(self, source: str, shard: str = CHANGED) -> dict[str, np.ndarray]:
        ids, vectors = read_embedding_table(self.table(source, shard))
        return dict(zip(ids, vectors, strict=True))


def _embed(
    world: World,
    source: str,
    encoder: CountingEncoder,
    code_version: str | None = CODE_VERSION,
    reuse_unchanged: bool = True,
    log: Callable[[str], None] | None = None,
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
    return list(embed_shards(SHARDS, run, world.layout, world.catalog, log or (lambda _: None)))


def _modality(source: str) -> str:
    return "image" if source == "clip_image" else "text"


def _full_embed_matches(world: World, source: str, merged: list[StepResult]) -> None:
    """The merged table is what embedding the whole shard gives: the same rows in the same
    order, bit for bit, the same skips, checks and quarantine rows."""
    ids, vectors = read_embedding_table(world.table(source))
    full = _embed(world, source, CountingEncoder(_modality(source)), reuse_unchanged=False)
    full_ids, full_vectors = read_embedding_table(world.table(source))
    assert list(ids) == list(full_ids)
    assert vectors.tobytes() == full_vectors.tobytes()
    assert merged[0].row_counts == full[0].row_counts
    assert merged[0].outcomes == full[0].outcomes
    assert all(o.passed for o in merged[0].outcomes)
    quarantine = {name: f.to_dicts() for name, f in merged[0].rows.items()}
    assert quarantine == {name: f.to_dicts() for name, f in full[0].rows.items()}


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.mark.parametrize("source", ["clip_image", "caption_text"])
def test_an_added_image_is_the_only_row_embedded(world: World, source: str) -> None:
    _embed(world, source, CountingEncoder(_modality(source)))
    before = world.vectors(source)
    world.add(CHANGED, 2, f"{CHANGED}/new")  # in the middle: the table keeps corpus order

    logged: list[str] = []
    encoder = CountingEncoder(_modality(source))
    results = _embed(world, source, encoder, log=logged.append)

    assert encoder.loads == 1 and encoder.rows == 1
    if source == "caption_text":
        assert encoder.captions == [f"photo {CHANGED}/new of shard {CHANGED}"]
    changed, steady = results
    assert changed.metadata["reused"] is False and steady.metadata["reused"] is True
    # Six old rows (the broken one's skip among them) kept, one embedded.
    assert (changed.metadata["rows_reused"], changed.metadata["rows_computed"]) == (6, 1)
    assert (steady.metadata["rows_reused"], steady.metadata["rows_computed"]) == (3, 0)
    after = world.vectors(source)
    assert set(after) == set(before) | {f"{CHANGED}/new"}
    assert all(after[i].tobytes() == before[i].tobytes() for i in before)
    # The broken file's skip was carried over (its quarantine row is there), not tried again.
    assert changed.rows["quarantine_log"]["key"].to_list() == ["kbroken"]
    asset = source_named(source).embedding_asset
    assert any(
        line.startswith(f"{asset}[{CHANGED}]:")
        and "keeping 6 unchanged rows, embedding 1 of 7" in line
        for line in logged
    ), logged
    _full_embed_matches(world, source, results)


def test_a_replaced_picture_is_embedded_again(world: World) -> None:
    _embed(world, "clip_image", CountingEncoder("image"))
    before = world.vectors("clip_image")
    world.replace_picture(CHANGED, f"{CHANGED}/3")

    encoder = CountingEncoder("image")
    results = _embed(world, "clip_image", encoder)

    assert encoder.loads == 1 and encoder.rows == 1
    assert results[0].metadata["rows_computed"] == 1
    after = world.vectors("clip_image")
    assert after[f"{CHANGED}/3"].tobytes() != before[f"{CHANGED}/3"].tobytes()
    assert all(after[i].tobytes() == before[i].tobytes() for i in before if i != f"{CHANGED}/3")
    _full_embed_matches(world, "clip_image", results)


@pytest.mark.parametrize("source", ["clip_image", "caption_text"])
def test_a_removal_loads_no_model_and_drops_the_row(world: World, source: str) -> None:
    _embed(world, source, CountingEncoder(_modality(source)))
    before = world.vectors(source)
    steady_bytes = world.table(source, STEADY).read_bytes()
    footers = {shard: read_footer(world.table(source, shard)).digest for shard in SHARDS}
    world.remove(CHANGED, f"{CHANGED}/1")

    encoder = CountingEncoder(_modality(source))
    results = _embed(world, source, encoder)

    assert encoder.loads == 0 and encoder.rows == 0
    assert [r.metadata["reused"] for r in results] == [False, True]
    assert (results[0].metadata["rows_reused"], results[0].metadata["rows_computed"]) == (5, 0)
    assert "items_per_s" not in results[0].metadata  # nothing went through the model
    assert results[0].model_ids == {source: f"fake:{_modality(source)}"}
    after = world.vectors(source)
    assert set(after) == set(before) - {f"{CHANGED}/1"}
    assert all(after[i].tobytes() == before[i].tobytes() for i in after)
    # The KNN step sees a changed table (it searches again) and an untouched one as before.
    assert read_footer(world.table(source)).digest != footers[CHANGED]
    assert read_footer(world.table(source, STEADY)).digest == footers[STEADY]
    assert world.table(source, STEADY).read_bytes() == steady_bytes
    _full_embed_matches(world, source, results)


def test_an_edited_caption_is_the_only_caption_embedded(world: World) -> None:
    _embed(world, "caption_text", CountingEncoder("text"))
    _embed(world, "clip_image", CountingEncoder("image"))
    before = world.vectors("caption_text")
    world.set_caption(CHANGED, f"{CHANGED}/4", "a much longer caption than before")

    encoder = CountingEncoder("text")
    results = _embed(world, "caption_text", encoder)

    assert encoder.captions == ["a much longer caption than before"]
    after = world.vectors("caption_text")
    assert after[f"{CHANGED}/4"].tobytes() != before[f"{CHANGED}/4"].tobytes()
    # The image table does not read captions: it keeps its tables whole.
    image_encoder = CountingEncoder("image")
    _embed(world, "clip_image", image_encoder)
    assert image_encoder.loads == 0
    _full_embed_matches(world, "caption_text", results)


def test_an_unchanged_rerun_after_a_merge_keeps_the_merged_table_whole(world: World) -> None:
    _embed(world, "clip_image", CountingEncoder("image"))
    world.add(CHANGED, 0, f"{CHANGED}/new")
    _embed(world, "clip_image", CountingEncoder("image"))
    merged = world.table("clip_image").read_bytes()

    encoder = CountingEncoder("image")
    results = _embed(world, "clip_image", encoder)

    assert encoder.loads == 0 and [r.metadata["reused"] for r in results] == [True, True]
    assert (results[0].metadata["rows_reused"], results[0].metadata["rows_computed"]) == (7, 0)
    assert world.table("clip_image").read_bytes() == merged


@pytest.mark.parametrize("source", ["clip_image", "caption_text"])
def test_other_settings_embed_the_whole_shard(world: World, source: str) -> None:
    _embed(world, source, CountingEncoder(_modality(source)))
    world.add(CHANGED, 1, f"{CHANGED}/new")

    logged: list[str] = []
    encoder = CountingEncoder(_modality(source))
    results = _embed(world, source, encoder, "embeddings-v1+s.bbbbbbbbbbbb", log=logged.append)

    assert encoder.loads == 1 and encoder.rows == 6 + 3  # every embeddable row of both shards
    assert [r.metadata["rows_reused"] for r in results] == [0, 0]
    assert any("its settings changed" in line for line in logged), logged


def test_the_force_switch_embeds_every_row(world: World) -> None:
    _embed(world, "clip_image", CountingEncoder("image"))
    world.add(CHANGED, 1, f"{CHANGED}/new")
    encoder = CountingEncoder("image")
    _embed(world, "clip_image", encoder, reuse_unchanged=False)
    assert encoder.rows == 6 + 3


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _without_row_inputs(path: Path) -> None:
    # As written before per-row inputs existed: the whole-table key and skips, nothing per row.
    table = pq.read_table(path)
    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    ids, vectors = read_embedding_table(path)
    skipped = [tuple(row) for row in json.loads(metadata[SKIPPED_FIELD])]
    footer = stored_metadata(metadata["megapairs_reuse_key"], skipped)  # type: ignore[arg-type]
    write_embedding_table(path, list(ids), vectors, metadata["model_id"], metadata=footer)


def _null_digests(path: Path) -> None:
    # The footer says per-row inputs, the column is null: it cannot vouch for any row.
    table = pq.read_table(path)
    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    ids, vectors = read_embedding_table(path)
    write_embedding_table(path, list(ids), vectors, metadata.pop("model_id"), metadata=metadata)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_truncated, "unreadable"),
        (lambda p: p.write_bytes(b"PAR1 garbage"), "unreadable"),
        (_without_row_inputs, "no per-row inputs"),
        (_null_digests, "no per-row inputs"),
    ],
    ids=["truncated", "garbage", "no-row-inputs", "null-digests"],
)
def test_a_table_that_cannot_vouch_for_its_rows_is_embedded_whole(
    world: World, damage: Callable[[Path], None], why: str
) -> None:
    _embed(world, "clip_image", CountingEncoder("image"))
    damage(world.table("clip_image"))
    world.add(CHANGED, 1, f"{CHANGED}/new")

    logged: list[str] = []
    encoder = CountingEncoder("image")
    results = _embed(world, "clip_image", encoder, log=logged.append)

    assert encoder.loads == 1 and encoder.rows == 6  # the changed shard's every picture
    assert results[0].metadata["rows_reused"] == 0
    assert all(o.passed for o in results[0].outcomes)
    assert any(
        line.startswith(f"clip_image_embeddings[{CHANGED}]: embedding it:") and why in line
        for line in logged
    ), logged
    # Written afresh with its per-row inputs, so the next change costs one row again.
    assert pq.read_table(world.table("clip_image"))[INPUT_DIGEST_COLUMN].null_count == 0
    world.remove(CHANGED, f"{CHANGED}/0")
    again = CountingEncoder("image")
    _embed(world, "clip_image", again)
    assert again.loads == 0


Columns = tuple[list[str], np.ndarray, list[str]]


def _rewrite(path: Path, edit: Callable[[dict[str, str], Columns], Columns]) -> None:
    """Rewrite a table in place with `edit(footer, (ids, vectors, digests))`'s columns (it may
    change the footer too), as a faulty run might have left it."""
    table = pq.read_table(path)
    footer = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    ids, vectors = read_embedding_table(path)
    columns = (list(ids), vectors.copy(), table[INPUT_DIGEST_COLUMN].to_pylist())
    ids, vectors, digests = edit(footer, columns)
    model_id = footer.pop("model_id")
    write_embedding_table(path, ids, vectors, model_id, footer, input_digests=digests)


def test_a_bad_old_vector_is_embedded_again_and_the_rest_kept(world: World) -> None:
    _embed(world, "clip_image", CountingEncoder("image"))

    def first_vector_nan(footer: dict[str, str], columns: Columns) -> Columns:
        columns[1][0] = np.nan
        return columns

    _rewrite(world.table("clip_image"), first_vector_nan)
    encoder = CountingEncoder("image")
    results = _embed(world, "clip_image", encoder)

    # The inputs are unchanged but the table fails its checks: only the bad row is redone.
    assert encoder.rows == 1 and results[0].metadata["rows_computed"] == 1
    assert all(o.passed for o in results[0].outcomes)
    _full_embed_matches(world, "clip_image", results)


def test_a_transient_skip_is_tried_again_and_a_content_skip_carried_over(world: World) -> None:
    _embed(world, "clip_image", CountingEncoder("image"))
    missing = f"{CHANGED}/2"

    def missing_that_day(footer: dict[str, str], columns: Columns) -> Columns:
        # A good picture was missing when the table was written; the broken one stays broken.
        ids, vectors, digests = columns
        index = ids.index(missing)
        skipped = json.loads(footer[SKIPPED_FIELD])
        footer[SKIPPED_FIELD] = json.dumps([[missing, "missing_file", "gone"], *skipped])
        inputs = json.loads(footer[SKIPPED_INPUTS_FIELD])
        footer[SKIPPED_INPUTS_FIELD] = json.dumps({**inputs, missing: digests[index]})
        keep = [i for i in range(len(ids)) if i != index]
        return [ids[i] for i in keep], vectors[keep], [digests[i] for i in keep]

    _rewrite(world.table("clip_image"), missing_that_day)
    encoder = CountingEncoder("image")
    results = _embed(world, "clip_image", encoder)

    assert encoder.rows == 1  # the picture missing that day; the broken file is not retried
    assert (results[0].metadata["rows_reused"], results[0].metadata["rows_computed"]) == (5, 1)
    assert results[0].rows["quarantine_log"]["key"].to_list() == ["kbroken"]
    assert missing in world.vectors("clip_image")
    _full_embed_matches(world, "clip_image", results)


def test_the_table_records_each_rows_input(world: World) -> None:
    _embed(world, "caption_text", CountingEncoder("text"))
    table = pq.read_table(world.table("caption_text"))
    footer = table.schema.metadata
    assert table.column_names == ["image_id", "embedding", INPUT_DIGEST_COLUMN]
    digests = table[INPUT_DIGEST_COLUMN].to_pylist()
    assert all(isinstance(d, str) and len(d) == 32 for d in digests)
    assert len(set(digests)) == len(digests)  # five different captions
    assert SETTINGS_KEY_FIELD.encode() in footer
    # The uncaptioned row's input (no caption, its issue) is recorded with its skip.
    assert list(json.loads(footer[SKIPPED_INPUTS_FIELD.encode()])) == [f"{CHANGED}/broken"]
    # Without a code version nothing is keyed, and the column says so (null).
    _embed(world, "caption_text", CountingEncoder("text"), code_version=None)
    unkeyed = pq.read_table(world.table("caption_text"))
    assert unkeyed[INPUT_DIGEST_COLUMN].null_count == unkeyed.num_rows


def test_an_uncaptioned_rows_skip_says_why_in_a_window_of_shards(world: World) -> None:
    # Both shards go through one input stream; the corpus's caption_issue still words the skip
    # (a merged table's carried skip and a full embed's must read the same).
    results = _embed(world, "caption_text", CountingEncoder("text"))
    assert results[0].rows["quarantine_log"]["detail"].to_list() == ["bad_caption_file: x.json"]

    # A shard from before the corpus recorded caption issues stacks with one that has them.
    encoder = CountingEncoder("text").lazy().get()
    older = pl.DataFrame({"image_id": ["a/0", "a/1"], "caption": ["a cat", None]})
    newer = pl.DataFrame(
        {"image_id": ["b/0"], "caption": [None], "caption_issue": ["caption_not_text"]}
    )
    groups = dict(embed_row_groups([("a", older), ("b", newer)], encoder, LIMITS, 2, 0, CPU))
    assert groups["a"].skipped == [("a/1", NO_CAPTION, "caption is null or empty")]
    assert groups["b"].skipped == [("b/0", NO_CAPTION, "caption_not_text")]


def test_a_shard_emptied_by_removals_writes_an_empty_table_without_the_model(
    world: World,
) -> None:
    _embed(world, "clip_image", CountingEncoder("image"))
    for image_id in [row["image_id"] for row in world.rows[STEADY]]:
        world.remove(STEADY, image_id)

    encoder = CountingEncoder("image")
    results = _embed(world, "clip_image", encoder)

    assert encoder.loads == 0
    assert results[1].row_counts == {"embedded": 0, "skipped": 0}
    assert all(o.passed for o in results[1].outcomes)
    ids, vectors = read_embedding_table(world.table("clip_image", STEADY))
    assert len(ids) == 0 and vectors.shape == (0, DIM)

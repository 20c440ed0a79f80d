"""The search command: a trained retriever ranks a gallery for composed, image or text queries.

Plain logic through `megapairs_assets.retriever.search` on the demo's tiny open_clip model;
the command through its own `register` on a fresh parser (configuration errors propagate as
`ConfigurationError`, which `megapairs` prints as one line and exits 2). One test runs the
wired `megapairs search` entry point once the subcommand is listed in cli/main.py.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from image_factory import (
    good_items,
    good_jpeg_bytes,
    not_an_image_bytes,
    truncated_jpeg_bytes,
    write_image_folder,
    write_not_a_tar,
    write_wds_shard,
)
from PIL import Image
from test_cli_startup import HEAVY, _modules_after

from megapairs_assets.cli import search as search_cli
from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation.gallery_cache import GalleryCache
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.retriever.model import Retriever, load_retriever
from megapairs_assets.retriever.search import (
    SearchConfigError,
    SearchDataError,
    SearchQuery,
    embed_gallery,
    gallery_from_path,
    open_query_images,
    read_queries_file,
    search,
)

CPU = torch.device("cpu")
GALLERY_SIZE = 8


@pytest.fixture(scope="module")
def checkpoint(demo_models_dir: Path) -> Path:
    return demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"


@pytest.fixture(scope="module")
def retriever(checkpoint: Path) -> Retriever:
    return load_retriever(DEMO_CLIP_MODEL, str(checkpoint), CPU, torch.float32)


@pytest.fixture
def gallery_dir(tmp_path: Path) -> Path:
    """Eight distinct pictures with captions, one of them in a subfolder."""
    folder = write_image_folder(tmp_path / "gallery", good_items(GALLERY_SIZE - 1))
    write_image_folder(folder / "more", [("deep", good_jpeg_bytes(50), "a deeper photo")])
    return folder


def _search_folder(
    retriever: Retriever,
    folder: Path,
    queries: list[SearchQuery],
    cache_root: Path,
    k: int = 5,
    include_query: bool = False,
):
    embeddings = embed_gallery(retriever, gallery_from_path(folder), GalleryCache(cache_root))
    images = open_query_images(queries, retriever.input_side_px)
    return search(retriever, queries, images, embeddings, k, include_query), embeddings


def test_an_image_searched_for_itself_ranks_first_with_include_query(
    retriever: Retriever, gallery_dir: Path, tmp_path: Path
) -> None:
    targets = [
        gallery_dir / "000000002.jpg",
        gallery_dir / "000000005.jpg",
        gallery_dir / "more/deep.jpg",
    ]
    queries = [SearchQuery(image=path) for path in targets]
    results, _ = _search_folder(
        retriever, gallery_dir, queries, tmp_path / "cache", include_query=True
    )
    for target, result in zip(targets, results, strict=True):
        assert result.hits[0].item.uri == str(target.resolve())
        assert result.hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert result.hits[1].score < result.hits[0].score - 1e-3  # the pictures differ
        assert [hit.rank for hit in result.hits] == [1, 2, 3, 4, 5]
        assert result.query_copies_left_out == 0
    assert results[2].hits[0].caption == "a deeper photo"  # read from the .txt beside it


def test_the_query_image_and_its_byte_copies_are_left_out_by_default(
    retriever: Retriever, gallery_dir: Path, tmp_path: Path
) -> None:
    target = gallery_dir / "000000002.jpg"
    (gallery_dir / "more/copy of 2.jpg").write_bytes(target.read_bytes())  # same bytes
    outside = tmp_path / "query.jpg"  # a query from elsewhere with a gallery image's bytes
    outside.write_bytes((gallery_dir / "000000005.jpg").read_bytes())
    queries = [SearchQuery(target), SearchQuery(outside, "at night"), SearchQuery(text="a cat")]
    cache = tmp_path / "cache"
    kept, _ = _search_folder(retriever, gallery_dir, queries, cache, k=3, include_query=True)
    left, _ = _search_folder(retriever, gallery_dir, queries, cache, k=3)
    copies = [{"000000002.jpg", "more/copy of 2.jpg"}, {"000000005.jpg"}, set()]
    for with_copies, without, own in zip(kept, left, copies, strict=True):
        assert without.query_copies_left_out == len(own)
        assert not {hit.item.item_id for hit in without.hits} & own
        # The rest keep their order and scores, ranked from 1, still k of them.
        expected = [(h.item, h.score) for h in with_copies.hits if h.item.item_id not in own]
        assert [(h.item, h.score) for h in without.hits][: len(expected)] == expected
        assert [hit.rank for hit in without.hits] == [1, 2, 3]
    assert {hit.item.item_id for hit in kept[0].hits[:2]} == copies[0]  # they did rank first
    assert kept[2].hits == left[2].hits  # a text query leaves out nothing


def test_composed_and_text_rankings_equal_brute_force_with_mmrets_fusion(
    retriever: Retriever, gallery_dir: Path, tmp_path: Path
) -> None:
    reference, text = gallery_dir / "000000003.jpg", "the same scene at night"
    queries = [SearchQuery(reference, text), SearchQuery(text="a red block")]
    results, embeddings = _search_folder(
        retriever, gallery_dir, queries, tmp_path / "cache", k=GALLERY_SIZE, include_query=True
    )
    paths = [item.uri for item in embeddings.gallery.items]
    gallery = retriever.project_images(paths)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    # MMRet: the raw projections are summed, then normalised (not the unit vectors summed).
    fused = retriever.project_images([reference])[0] + retriever.project_texts([text])[0]
    text_only = retriever.project_texts(["a red block"])[0]
    for query, result in zip([fused, text_only], results, strict=True):
        scores = gallery @ (query / np.linalg.norm(query))
        expected = [paths[i] for i in np.lexsort((np.arange(len(scores)), -scores))]
        assert [hit.item.uri for hit in result.hits] == expected
        np.testing.assert_allclose(
            [hit.score for hit in result.hits], np.sort(scores)[::-1], atol=1e-5
        )


def test_a_second_search_reuses_the_gallery_embeddings(
    retriever: Retriever, gallery_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedded: list[int] = []
    project_pixels = Retriever.project_pixels

    def counting(self: Retriever, pixels: torch.Tensor) -> np.ndarray:
        embedded.append(len(pixels))
        return project_pixels(self, pixels)

    monkeypatch.setattr(Retriever, "project_pixels", counting)
    query = [SearchQuery(gallery_dir / "000000001.jpg", "brighter")]
    first, embeddings = _search_folder(retriever, gallery_dir, query, tmp_path / "cache")
    assert sum(embedded) == GALLERY_SIZE + 1 and not embeddings.reused  # gallery + query image
    embedded.clear()
    second, embeddings = _search_folder(retriever, gallery_dir, query, tmp_path / "cache")
    assert sum(embedded) == 1 and embeddings.reused  # the query image only
    assert [(h.item, h.score) for h in second[0].hits] == [(h.item, h.score) for h in first[0].hits]
    # A replaced picture is a new gallery version: embedded again.
    (gallery_dir / "000000004.jpg").write_bytes(good_jpeg_bytes(99))
    embedded.clear()
    _, embeddings = _search_folder(retriever, gallery_dir, query, tmp_path / "cache")
    assert sum(embedded) == GALLERY_SIZE + 1 and not embeddings.reused


def test_unreadable_gallery_images_are_left_out_and_listed(
    retriever: Retriever, gallery_dir: Path, tmp_path: Path
) -> None:
    (gallery_dir / "broken.jpg").write_bytes(truncated_jpeg_bytes())
    (gallery_dir / "not-an-image.png").write_bytes(not_an_image_bytes())
    queries = [SearchQuery(text="anything")]
    for reused in (False, True):  # a cached search still knows which images were left out
        results, embeddings = _search_folder(
            retriever, gallery_dir, queries, tmp_path / "cache", k=50
        )
        assert embeddings.reused is reused
        assert len(results[0].hits) == GALLERY_SIZE
        assert not {hit.item.item_id for hit in results[0].hits} & {
            "broken.jpg",
            "not-an-image.png",
        }
        message = embeddings.skipped_message()
        assert message.startswith(f"2 of {GALLERY_SIZE + 2} gallery images cannot be read")
        assert "broken.jpg: decode_error" in message and "not-an-image.png: decode_error" in message


def test_webdataset_shards_search_with_their_captions_and_report_a_bad_shard(
    retriever: Retriever, tmp_path: Path
) -> None:
    shards = tmp_path / "shards"
    write_wds_shard(shards / "00000.tar", good_items(3))
    write_wds_shard(shards / "00001.tar", good_items(2, first_seed=10))
    write_not_a_tar(shards / "00002.tar")
    target = shards / "00001.tar"
    query_path = tmp_path / "query.jpg"
    query_path.write_bytes(good_jpeg_bytes(11))
    gallery = gallery_from_path(shards)
    assert len(gallery.items) == 5 and "00002.tar: not a readable tar" in gallery.unlisted[0]
    embeddings = embed_gallery(retriever, gallery, GalleryCache(tmp_path / "cache"))
    query = [SearchQuery(query_path)]
    images = open_query_images(query)
    results = search(retriever, query, images, embeddings, 2, include_query=True)
    best = results[0].hits[0]
    assert best.item.uri == f"{target}#000000011.jpg" and best.caption == "photo 1"
    # By default the member with the query's bytes is left out (its size from the tar header).
    (left,) = search(retriever, query, images, embeddings, 2)
    assert left.query_copies_left_out == 1 and best.item not in [h.item for h in left.hits]
    assert "00002.tar" in embeddings.skipped_message()
    # One shard alone is a gallery too.
    assert [item.item_id for item in gallery_from_path(target).items] == [
        "00001.tar#000000010.jpg",
        "00001.tar#000000011.jpg",
    ]


def test_bad_galleries_and_query_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(SearchConfigError, match="does not exist"):
        gallery_from_path(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SearchDataError, match="holds no images"):
        gallery_from_path(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(
        SearchConfigError, match=r"neither a webdataset \.tar shard nor a \.parquet"
    ):
        gallery_from_path(tmp_path / "notes.txt")
    with pytest.raises(SearchConfigError, match="does not exist"):
        read_queries_file(tmp_path / "queries.jsonl")
    lines = ['{"image": "q.jpg", "text": "red"}', "", '{"text": "blue"}', '{"image": 3}']
    (tmp_path / "q.jpg").write_bytes(good_jpeg_bytes(1))
    (tmp_path / "queries.jsonl").write_text("\n".join(lines))
    with pytest.raises(SearchDataError, match=r"queries.jsonl:4: image must be a string"):
        read_queries_file(tmp_path / "queries.jsonl")
    (tmp_path / "queries.jsonl").write_text("\n".join(lines[:3]))
    assert read_queries_file(tmp_path / "queries.jsonl") == [
        SearchQuery(tmp_path / "q.jpg", "red"),
        SearchQuery(text="blue"),
    ]


# --- the command -------------------------------------------------------------------------------


def _command(argv: list[str]) -> int:
    """Run the subcommand as `megapairs` would, through a fresh parser holding only it."""
    parser = argparse.ArgumentParser(prog="megapairs")
    search_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["search", *argv])
    return args.func(args)


@pytest.fixture
def command_args(home: Path, checkpoint: Path, gallery_dir: Path) -> list[str]:
    retriever = f"{DEMO_CLIP_MODEL}@{checkpoint}"
    return ["--retriever", retriever, "--gallery", str(gallery_dir), "--device", "cpu"]


def test_json_and_html_outputs(
    command_args: list[str], gallery_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    query = gallery_dir / "000000006.jpg"
    page = tmp_path / "results.html"
    argv = [*command_args, "--image", str(query), "--text", "in winter", "--top-k", "3"]
    assert _command([*argv, "--json", "--html", str(page)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["gallery"]["images"] == GALLERY_SIZE and report["gallery"]["unreadable"] == 0
    (only,) = report["queries"]
    assert only["kind"] == "image+text" and [r["rank"] for r in only["results"]] == [1, 2, 3]
    assert only["query_copies_left_out"] == 1  # the query is one of the gallery's pictures
    assert "000000006.jpg" not in {r["id"] for r in only["results"]}
    assert all(Path(r["path"]).is_file() and r["caption"] for r in only["results"])
    assert f"wrote {page}" in captured.err
    html = page.read_text()
    assert html.count("<figure>") == 3 and html.count("data:image/jpeg;base64,") == 4
    for result in only["results"]:
        assert result["path"] in html
    # The table: a row per result, the second run from the cache.
    assert _command([*argv, "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    assert "| rank | score | path | caption |" in captured.out
    assert captured.out.count(f"| {gallery_dir}") == 2
    assert "embeddings reused from" in captured.err
    assert "1 gallery image is the query image itself, left out" in captured.out
    # --include-query keeps it: the reference picture comes back among the results.
    assert _command([*argv, "--top-k", "8", "--include-query", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "000000006.jpg" in {r["id"] for r in report["queries"][0]["results"]}
    assert report["queries"][0]["query_copies_left_out"] == 0


def test_several_queries_from_a_file(
    command_args: list[str], gallery_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        json.dumps({"image": str(gallery_dir / "000000000.jpg")})
        + "\n"
        + json.dumps({"text": "a photo"})
        + "\n"
    )
    assert _command([*command_args, "--queries", str(queries), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [q["kind"] for q in report["queries"]] == ["image", "text"]
    assert [q["query_copies_left_out"] for q in report["queries"]] == [1, 0]
    assert "000000000.jpg" not in {r["id"] for r in report["queries"][0]["results"]}


def test_bad_input_is_one_message_with_the_evaluations_exit_codes(
    command_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Exit 2 (the entry point prints a ConfigurationError as one line): usage, configuration.
    with pytest.raises(ConfigurationError, match="no model named 'no-such-clip'"):
        _command([*command_args[:1], "no-such-clip@openai", *command_args[2:], "--text", "x"])
    with pytest.raises(ConfigurationError, match=r"query image .*missing\.jpg does not exist"):
        _command([*command_args, "--image", str(tmp_path / "missing.jpg")])
    with pytest.raises(ConfigurationError, match="give a query"):
        _command(command_args)
    # Exit 1: data that cannot be searched, named in one line.
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(not_an_image_bytes())
    assert _command([*command_args, "--image", str(bad)]) == 1
    assert f"query image {bad} cannot be used: decode_error" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    argv = [*command_args[:3], str(tmp_path / "empty"), "--text", "x"]
    assert _command(argv) == 1
    assert "holds no images" in capsys.readouterr().err


def test_the_default_gallery_is_the_homes_corpus(
    home: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from megapairs_assets.corpus.images import ImageLimits
    from megapairs_assets.corpus.sources import SourceSpec
    from megapairs_assets.corpus.step import build_corpus_shard
    from megapairs_assets.lib.storage import DataLayout
    from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord, utc_now

    argv = ["--retriever", f"{DEMO_CLIP_MODEL}@{checkpoint}", "--text", "x", "--json"]
    assert _command(argv) == 1
    assert "no image corpus under" in capsys.readouterr().err
    write_wds_shard(tmp_path / "corpus/00000.tar", good_items(4))
    layout, catalog = DataLayout(home), LineageCatalog(home / "catalog.duckdb")
    step = build_corpus_shard(
        "00000",
        SourceSpec("webdataset", str(tmp_path / "corpus")),
        ImageLimits(),
        layout,
        catalog,
        log=lambda line: None,
    )
    record = MaterializationRecord("image_corpus", "00000", "run", "v", "demo", utc_now(), 0.0)
    catalog.record(record, rows=step.rows)
    assert _command(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gallery"]["images"] == 4
    assert {r["id"] for r in report["queries"][0]["results"]} == {
        f"00000/{i:09d}" for i in range(4)
    }
    assert all(r["caption"].startswith("photo ") for r in report["queries"][0]["results"])
    # A query that is one of the corpus's pictures is left out: a byte copy (the corpus's
    # content hash), or the triplet export's re-encoded copy `images/<shard>/<key>.jpg` (the
    # query the demo's summary suggests).
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(good_jpeg_bytes(2))
    exported = home / "data/triplet_export/images/00000/000000001.jpg"
    exported.parent.mkdir(parents=True)
    picture = Image.open(io.BytesIO(good_jpeg_bytes(1)))
    picture.save(exported, quality=60)  # other bytes: only the export's naming finds it
    for query, own in ((copy, "00000/000000002"), (exported, "00000/000000001")):
        assert _command([*argv[:2], "--image", str(query), "--json"]) == 0
        (only,) = json.loads(capsys.readouterr().out)["queries"]
        assert only["query_copies_left_out"] == 1
        assert own not in {r["id"] for r in only["results"]} and len(only["results"]) == 3


def test_building_the_search_parser_imports_no_heavy_library() -> None:
    code = (
        "import argparse\nfrom megapairs_assets.cli.search import register\n"
        "parser = argparse.ArgumentParser()\nregister(parser.add_subparsers())\n"
        "try:\n    parser.parse_args(['search', '--help'])\n"
        "except SystemExit as done:\n    assert done.code == 0\n"
    )
    assert not _modules_after(code) & set(HEAVY)


MAIN = importlib.import_module("megapairs_assets.cli.main")


@pytest.mark.skipif(
    "search" not in MAIN.SUBCOMMANDS,
    reason="the lead adds 'search' to SUBCOMMANDS in megapairs_assets/cli/main.py",
)
def test_megapairs_search_is_wired_into_the_entry_point(
    home: Path, gallery_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["search", "--retriever", "no-such-clip@openai", "--gallery", str(gallery_dir)]
    assert MAIN.main([*argv, "--text", "x"]) == 2
    assert "megapairs search: configuration error: open_clip has no model" in (
        capsys.readouterr().err
    )
    assert os.environ.get("MEGAPAIRS_PROFILE") == "demo"

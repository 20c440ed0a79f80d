"""`megapairs search` as a new user meets it: manifest galleries, the odd files a folder holds,
queries that are not plain JPEGs, more results asked for than there are images.

Plain logic through `megapairs_assets.retriever.search` and the subcommand through its own
`register` (as tests/test_cli_search.py does), on the demo's tiny open_clip model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from image_factory import (
    good_items,
    good_jpeg_bytes,
    rgba_png_bytes,
    truncated_jpeg_bytes,
    write_image_folder,
    write_manifest,
    write_wds_shard,
)
from test_cli_search import _command

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation.gallery_cache import GalleryCache
from megapairs_assets.retriever.model import Retriever, load_retriever
from megapairs_assets.retriever.search import (
    Gallery,
    GalleryItem,
    SearchConfigError,
    SearchDataError,
    SearchQuery,
    embed_gallery,
    gallery_from_path,
    identical_rows,
    open_query_images,
    results_markdown,
    search,
    write_html,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint(demo_models_dir: Path) -> Path:
    return demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"


@pytest.fixture(scope="module")
def retriever(checkpoint: Path) -> Retriever:
    return load_retriever(DEMO_CLIP_MODEL, str(checkpoint), CPU, torch.float32)


def _manifest_rows(folder: Path) -> list[dict[str, object]]:
    """Three images (one by absolute path, two relative), a row whose file is missing."""
    write_image_folder(folder / "images", good_items(3), extension="jpg")
    return [
        {"path": "images/000000000.jpg", "caption": "first in the manifest", "key": "a"},
        {"path": str(folder / "images/000000001.jpg"), "caption": "second", "key": "b"},
        {"path": "images/000000002.jpg", "caption": "third", "key": "c"},
        {"path": "images/never_written.jpg", "caption": "lost", "key": "d"},
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_manifest_is_a_gallery_with_its_captions(
    retriever: Retriever, tmp_path: Path, suffix: str
) -> None:
    manifest = write_manifest(tmp_path / f"gallery{suffix}", _manifest_rows(tmp_path))
    gallery = gallery_from_path(manifest)
    assert [item.item_id for item in gallery.items] == ["00000/a", "00000/b", "00000/c"]
    assert [item.caption for item in gallery.items] == ["first in the manifest", "second", "third"]
    assert len(gallery.unlisted) == 1 and "never_written.jpg" in gallery.unlisted[0]
    embeddings = embed_gallery(retriever, gallery, GalleryCache(tmp_path / "cache"))
    assert "1 other gallery entry is left out" in embeddings.skipped_message()
    query = [SearchQuery(tmp_path / "images/000000001.jpg")]
    images = open_query_images(query, retriever.input_side_px)
    (kept,) = search(retriever, query, images, embeddings, 5, include_query=True)
    assert kept.hits[0].item.item_id == "00000/b" and kept.hits[0].caption == "second"
    # The row of the query's size and bytes is the query's copy: left out by default.
    (left,) = search(retriever, query, images, embeddings, 5)
    assert left.query_copies_left_out == 1
    assert [h.item.item_id for h in left.hits] == [h.item.item_id for h in kept.hits[1:]]


def test_a_manifest_that_cannot_be_a_gallery_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SearchDataError, match=r"gallery manifest .*empty\.jsonl"):
        gallery_from_path(empty)
    no_path = write_manifest(tmp_path / "captions.jsonl", [{"caption": "no path column"}])
    with pytest.raises(SearchDataError, match="needs a 'path' or 'url' column"):
        gallery_from_path(no_path)
    gone = write_manifest(tmp_path / "gone.jsonl", [{"path": "nowhere.jpg", "caption": "x"}])
    with pytest.raises(SearchDataError, match=r"holds no images \(.*nowhere\.jpg"):
        gallery_from_path(gone)


def test_a_manifest_gallery_reads_no_image_to_list_and_only_same_size_rows_for_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing a manifest is what every search does, cache hit or not: it must not read the
    gallery's files (it used to read and hash every one of them)."""
    from megapairs_assets.corpus import images, sources
    from megapairs_assets.retriever import search as search_module

    manifest = write_manifest(tmp_path / "gallery.jsonl", _manifest_rows(tmp_path))
    (tmp_path / "images/000000002.jpg").write_bytes(good_jpeg_bytes(1))  # a copy of row b
    read: list[str] = []
    real = images.read_uri_bytes

    def recording(uri: str) -> bytes:
        read.append(Path(uri).name)
        return real(uri)

    for module in (images, sources, search_module):
        monkeypatch.setattr(module, "read_uri_bytes", recording)
    gallery = gallery_from_path(manifest)
    assert read == [] and [i.size_bytes for i in gallery.items] == [
        (tmp_path / f"images/00000000{n}.jpg").stat().st_size for n in range(3)
    ]
    query = tmp_path / "images/000000001.jpg"
    assert gallery.items[0].size_bytes != query.stat().st_size  # so row a is never read
    assert identical_rows(gallery, [query]) == {query: [1, 2]}
    assert sorted(read) == ["000000001.jpg", "000000001.jpg", "000000002.jpg"]  # query, b, c


@pytest.fixture
def command_args(home: Path, checkpoint: Path) -> list[str]:
    return ["--retriever", f"{DEMO_CLIP_MODEL}@{checkpoint}", "--device", "cpu"]


def test_a_folders_pipes_and_broken_links_are_left_out_unread(tmp_path: Path) -> None:
    """A FIFO named like an image would block the embedding pass forever if it were read."""
    folder = write_image_folder(tmp_path / "photos", good_items(2))
    os.mkfifo(folder / "pipe.jpg")
    (folder / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    gallery = gallery_from_path(folder)
    assert [item.item_id for item in gallery.items] == ["000000000.jpg", "000000001.jpg"]
    assert sorted(gallery.unlisted) == [
        f"{folder}/dangling.png: a broken link",
        f"{folder}/pipe.jpg: not a regular file",
    ]


def test_the_export_copy_of_a_corpus_image_counts_as_that_image(tmp_path: Path) -> None:
    export = tmp_path / "triplet_export"
    items = [
        GalleryItem(f"00007/{key}", f"/corpus/00007.tar#{key}.jpg", content_hash=f"h{key}")
        for key in ("a", "b")
    ]
    gallery = Gallery("corpus", "corpus", items, export_root=export)
    copy = export / "images/00007/b.jpg"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(good_jpeg_bytes(3))  # re-encoded by the export: other bytes
    elsewhere = tmp_path / "b.jpg"
    elsewhere.write_bytes(good_jpeg_bytes(3))
    assert identical_rows(gallery, [copy, elsewhere]) == {copy: [1], elsewhere: []}
    with pytest.raises(SearchConfigError, match=r"query image .*gone\.jpg does not exist"):
        identical_rows(gallery, [tmp_path / "gone.jpg"])


def test_a_user_folder_with_spaces_odd_files_and_an_rgba_query(
    command_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = write_image_folder(tmp_path / "my photos", good_items(3))
    (folder / "broken.jpg").write_bytes(truncated_jpeg_bytes())
    query = tmp_path / "a query.png"
    query.write_bytes(rgba_png_bytes())
    page = tmp_path / "results page.html"
    argv = [*command_args, "--gallery", str(folder), "--image", str(query), "--top-k", "50"]
    assert _command([*argv, "--json", "--html", str(page)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["gallery"]["images"] == 4 and report["gallery"]["unreadable"] == 1
    (only,) = report["queries"]
    assert only["image"] == str(query) and only["query_copies_left_out"] == 0
    assert sorted(r["id"] for r in only["results"]) == [f"{i:09d}.jpg" for i in range(3)]
    assert "--top-k 50: the gallery has 3 readable images, all ranked" in captured.err
    assert "broken.jpg: decode_error" in captured.err
    assert " " not in Path(report["gallery"]["cache_entry"]).parent.name  # a safe folder name
    assert page.read_text().count("<figure>") == 3


def test_a_home_whose_cache_cannot_be_written_still_searches(
    command_args: list[str], home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = write_image_folder(tmp_path / "photos", good_items(2))
    home.mkdir(parents=True, exist_ok=True)
    (home / "benchmark_gallery_cache").write_text("not a folder")
    argv = [*command_args, "--gallery", str(folder), "--text", "x", "--json"]
    assert _command(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["gallery"]["cache_entry"] is None and len(report["queries"][0]["results"]) == 2
    assert "gallery embeddings not cached" in captured.err and "embedded (not cached)" in (
        captured.err
    )


def test_a_gallery_that_is_only_the_query_image_ranks_nothing_and_says_so(
    retriever: Retriever, tmp_path: Path
) -> None:
    folder = write_image_folder(tmp_path / "one", good_items(1))
    query = [SearchQuery(folder / "000000000.jpg", "in red")]
    embeddings = embed_gallery(retriever, gallery_from_path(folder), GalleryCache(tmp_path / "c"))
    images = open_query_images(query, retriever.input_side_px)
    results = search(retriever, query, images, embeddings, 3)
    assert results[0].hits == [] and results[0].query_copies_left_out == 1
    table = results_markdown(results)
    assert "no gallery image left to rank" in table and "| rank |" not in table
    page = write_html(tmp_path / "page.html", results, images, "r", "one")
    assert "no gallery image left to rank" not in page.read_text()  # the left-out note instead
    assert "the query image itself, left out" in page.read_text()


def test_a_hits_tar_member_path_is_a_query_image(retriever: Retriever, tmp_path: Path) -> None:
    """A user pastes a hit's path (`<tar>#<member>`) as the next query: more like this one."""
    shard = write_wds_shard(tmp_path / "shards/00000.tar", good_items(4))
    embeddings = embed_gallery(retriever, gallery_from_path(shard), GalleryCache(tmp_path / "c"))
    hit = Path(f"{shard}#000000002.jpg")
    query = [SearchQuery(hit, "brighter")]
    images = open_query_images(query, retriever.input_side_px)
    (result,) = search(retriever, query, images, embeddings, 5)
    assert result.query_copies_left_out == 1 and len(result.hits) == 3
    (kept,) = search(retriever, query, images, embeddings, 1, include_query=True)
    assert kept.hits[0].item.uri == str(hit)
    with pytest.raises(SearchConfigError, match="does not exist"):
        open_query_images([SearchQuery(Path(f"{tmp_path}/gone.tar#000000002.jpg"))])
    with pytest.raises(SearchDataError, match=r"cannot be used: missing_file"):
        open_query_images([SearchQuery(Path(f"{shard}#nope.jpg"))])

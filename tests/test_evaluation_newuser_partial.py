"""Partial and odd benchmark data a new user meets: empty or repeated annotations, captions in
any script or empty, unreadable images (all named at once), and re-runs that reuse or redo the
gallery embeddings for the right reasons."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from image_factory import picture
from test_evaluation_newuser_layouts import (
    circo_ids,
    circo_query,
    eval_argv,
    write_circo_release,
    write_cirr_release,
    write_fashioniq_release,
    write_json,
)

from megapairs_assets.cli.main import main
from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation.gallery_cache import GalleryCache
from megapairs_assets.evaluation.loaders import BenchmarkFormatError, load_circo, load_cirr
from megapairs_assets.evaluation.loaders.fashioniq import load_fashioniq
from megapairs_assets.evaluation.run import (
    BenchmarkImageError,
    BenchmarkSources,
    EvaluationSettings,
    Skipped,
    evaluate_benchmark,
    load_benchmark,
)
from megapairs_assets.retriever.model import Retriever, load_retriever

SETTINGS = EvaluationSettings(batch_size=4, num_workers=0)
IDS = circo_ids(8)


@pytest.fixture(scope="module")
def retriever(demo_models_dir: Path) -> Retriever:
    checkpoint = demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"
    return load_retriever(DEMO_CLIP_MODEL, str(checkpoint), torch.device("cpu"), torch.float32)


# --- annotations -------------------------------------------------------------------------------


def test_an_empty_annotation_list_fails_naming_the_file_before_any_embedding(
    home: Path, tmp_path: Path, demo_models_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    write_circo_release(tmp_path / "CIRCO", IDS, [])
    with pytest.raises(BenchmarkFormatError, match=r"val\.json: the file lists no queries"):
        load_benchmark("circo-val", BenchmarkSources(roots={"circo": tmp_path / "CIRCO"}))

    assert main(eval_argv(demo_models_dir, "circo-val", tmp_path / "CIRCO")) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'CIRCO/annotations/val.json'}: the file lists no queries" in err
    assert "gallery" not in err  # refused before embedding a single image
    assert not (home / "benchmark_gallery_cache").exists()


def test_repeated_query_ids_are_refused_naming_the_repeat(tmp_path: Path) -> None:
    queries = [circo_query(0, IDS[0], [IDS[1]]), circo_query(0, IDS[2], [IDS[3]])]
    write_circo_release(tmp_path / "circo", IDS, queries)
    for split in ("val", "test"):
        with pytest.raises(BenchmarkFormatError, match="entry 1: query id 0 repeats entry 0"):
            load_circo(tmp_path / "circo", split)

    pairs = write_cirr_release(tmp_path / "cirr", "test1")
    pairs[2]["pairid"] = pairs[0]["pairid"]
    write_json(tmp_path / "cirr/captions/cap.rc2.test1.json", pairs, indent=None)
    with pytest.raises(BenchmarkFormatError, match=r"test1\.json:1: entry 2: pairid 12060 repeats"):
        load_cirr(tmp_path / "cirr", "test1")


def test_a_ground_truth_listed_twice_is_refused(tmp_path: Path) -> None:
    # The official mAP divides by len(gt_img_ids): a repeat would change every score.
    write_circo_release(tmp_path, IDS, [circo_query(0, IDS[0], [IDS[1], IDS[2], IDS[1]])])
    with pytest.raises(BenchmarkFormatError, match="gt_img_ids repeats an image id"):
        load_circo(tmp_path, "val")


def test_captions_in_any_script_or_empty_are_kept_as_written(tmp_path: Path) -> None:
    caption = "ist größer, 大きい и ярче 🙂"
    write_circo_release(tmp_path / "circo", IDS, [circo_query(0, IDS[0], [IDS[1]])])
    query = circo_query(0, IDS[0], [IDS[1]], relative_caption=caption, shared_concept="")
    write_json(tmp_path / "circo/annotations/val.json", [query])
    (loaded,) = load_circo(tmp_path / "circo", "val").queries
    assert loaded.text == f"Find a picture that also , but {caption}."

    pairs = write_cirr_release(tmp_path / "cirr", "test1")
    pairs[1]["caption"] = " "  # as in the released test1 file (pairid 27098)
    write_json(tmp_path / "cirr/captions/cap.rc2.test1.json", pairs, indent=None)
    assert load_cirr(tmp_path / "cirr", "test1").queries[1].text == " "

    gallery = [f"B00{n}XYZ" for n in range(4)]
    triplets = [{"target": gallery[1], "candidate": gallery[0], "captions": ["is shiny", ""]}]
    write_fashioniq_release(tmp_path / "fiq", "shirt", gallery, triplets, suffix=".jpg")
    assert load_fashioniq(tmp_path / "fiq", "shirt").queries[0].text == "is shiny, and "


def test_one_split_missing_skips_only_that_split(tmp_path: Path) -> None:
    write_cirr_release(tmp_path, "val")
    sources = BenchmarkSources(roots={"cirr": tmp_path})
    (val,) = load_benchmark("cirr-val", sources)
    assert not isinstance(val, Skipped)
    (test1,) = load_benchmark("cirr-test1", sources)
    assert isinstance(test1, Skipped)
    assert str(tmp_path / "captions/cap.rc2.test1.json") in test1.detail


# --- images ----------------------------------------------------------------------------------


def test_every_unreadable_image_is_named_in_one_error(retriever: Retriever, tmp_path: Path) -> None:
    ids = circo_ids(12)
    write_circo_release(tmp_path, ids, [circo_query(0, ids[0], [ids[1]])])
    folder = tmp_path / "COCO2017_unlabeled/unlabeled2017"
    broken = [ids[2], ids[7], ids[11]]  # in different batches of 4
    for image_id in broken:
        (folder / f"{image_id:012d}.jpg").write_bytes(b"<html>404 Not Found</html>")
    # A thumbnail smaller than the corpus accepts is still a benchmark image.
    picture(3, (10, 6)).save(folder / f"{ids[5]:012d}.jpg")
    sources = BenchmarkSources(roots={"circo": tmp_path})
    cache = GalleryCache(tmp_path / "cache")
    with pytest.raises(BenchmarkImageError) as error:
        evaluate_benchmark(retriever, "circo-val", sources, cache, tmp_path / "out", SETTINGS)
    message = str(error.value)
    assert message.startswith("3 of 12 images of circo/val cannot be read: ")
    assert all(f"{image_id:012d}.jpg" in message for image_id in broken)
    assert f"{ids[5]:012d}.jpg" not in message

    for image_id in broken:
        picture(image_id, (20, 16)).save(folder / f"{image_id:012d}.jpg")
    result = evaluate_benchmark(retriever, "circo-val", sources, cache, tmp_path / "out", SETTINGS)
    assert result.splits[0].status == "scored"


# --- re-runs: what reuses the gallery embeddings, what does not ---------------------------------


def test_cache_survives_a_caption_fix_not_an_image_change_and_circo_splits_share_it(
    retriever: Retriever, tmp_path: Path
) -> None:
    ids = circo_ids(50)  # the test split's server file lists 50 images per query
    write_circo_release(tmp_path / "circo", ids, [circo_query(0, ids[0], [ids[1], ids[2]])])
    sources = BenchmarkSources(roots={"circo": tmp_path / "circo"})
    cache = GalleryCache(tmp_path / "cache")

    def run(key: str):
        lines: list[str] = []
        result = evaluate_benchmark(
            retriever, key, sources, cache, tmp_path / "out", SETTINGS, log=lines.append
        )
        return result.splits[0], lines

    first, _ = run("circo-val")
    assert first.gallery_reused is False
    # The test split ranks the same COCO unlabeled2017 gallery: no second embedding.
    test, lines = run("circo-test")
    assert test.gallery_reused is True and test.status == "submission"
    assert any("50 image embeddings reused from" in line for line in lines)
    assert len(list((tmp_path / "cache").glob("*/*/*/meta.json"))) == 1

    # Fixing a caption changes the recorded version, not the images' embeddings.
    val_path = tmp_path / "circo/annotations/val.json"
    fixed = json.loads(val_path.read_text())
    fixed[0]["relative_caption"] = "is held by a little boy"
    write_json(val_path, fixed)
    recaptioned, _ = run("circo-val")
    assert recaptioned.gallery_reused is True
    assert recaptioned.gallery_version != first.gallery_version

    # Replacing an image (same name) is a new gallery: embedded again.
    image = tmp_path / f"circo/COCO2017_unlabeled/unlabeled2017/{ids[4]:012d}.jpg"
    picture(99, (20, 16)).save(image)
    os.utime(image, ns=(1, 1))
    changed, _ = run("circo-val")
    assert changed.gallery_reused is False
    assert len(list((tmp_path / "cache").glob("*/*/*/meta.json"))) == 1  # the stale one went

"""Evaluation as the official benchmark code does it: images decoded as its loaders open them,
ties decided by the data rather than float noise, left-out queries reported, CIRR's headline
average, and clear refusals (server galleries too small, ids of the wrong type)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from image_factory import picture
from PIL import Image, ImageOps
from test_evaluation_loaders import write_circo, write_cirr, write_genecis

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation import metrics
from megapairs_assets.evaluation.benchmark import (
    CORPUS_DECODING,
    OFFICIAL_DECODING,
    BenchmarkSplit,
    CirQuery,
    ImageRef,
)
from megapairs_assets.evaluation.gallery_cache import GalleryCache
from megapairs_assets.evaluation.heldout import heldout_benchmark
from megapairs_assets.evaluation.images import crop_dilated_square, open_benchmark_image
from megapairs_assets.evaluation.loaders import BenchmarkFormatError, load_circo, load_cirr
from megapairs_assets.evaluation.run import (
    CIRR_AVERAGE,
    BenchmarkSources,
    EvaluationSettings,
    embed_images,
    evaluate_benchmark,
    evaluate_split,
    score_split,
)
from megapairs_assets.evaluation.scoring import candidate_scores, exact_scores
from megapairs_assets.evaluation.step import headline_metadata
from megapairs_assets.evaluation.submissions import SubmissionError
from megapairs_assets.retriever.model import Retriever, load_retriever

SETTINGS = EvaluationSettings(batch_size=8, num_workers=0)
EXIF_ORIENTATION = 0x0112
ROTATED_90 = 6  # "rotate 90 degrees clockwise to display"


@pytest.fixture(scope="module")
def retriever(demo_models_dir: Path) -> Retriever:
    checkpoint = demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"
    return load_retriever(DEMO_CLIP_MODEL, str(checkpoint), torch.device("cpu"), torch.float32)


def _rotated_tagged_jpeg(path: Path, size_px: tuple[int, int] = (160, 90)) -> Path:
    """A landscape JPEG whose EXIF says to show it rotated (as phones write them)."""
    image = picture(3, size_px)
    exif = image.getexif()
    exif[EXIF_ORIENTATION] = ROTATED_90
    image.save(path, exif=exif, quality=92)
    return path


def _png_copy(image: Image.Image, path: Path) -> Path:
    """The exact pixels, losslessly and with no EXIF: what the official loader would see."""
    image.save(path)
    return path


def _gallery_split(refs: list[ImageRef], decoding: str = OFFICIAL_DECODING) -> BenchmarkSplit:
    ids = [f"img{n}" for n in range(len(refs))]
    return BenchmarkSplit(
        benchmark="fidelity",
        split="gallery",
        metric_kind="recall",
        image_ids=ids,
        image_refs=refs,
        gallery_size=len(ids),
        queries=[CirQuery("q0", ids[0], "a picture", targets=(ids[-1],))],
        has_ground_truth=True,
        image_decoding=decoding,
    )


# --- 1. images decoded as the official loaders open them ------------------------------------


def test_benchmark_images_keep_their_stored_orientation(tmp_path: Path) -> None:
    tagged = _rotated_tagged_jpeg(tmp_path / "tagged.jpg")
    official = Image.open(tagged).convert("RGB")  # SEARLE, CLIP4Cir and GeneCIS do this
    assert official.size == (160, 90)
    ours = open_benchmark_image(ImageRef(str(tagged)))
    assert ours.size == official.size
    assert np.array_equal(np.asarray(ours), np.asarray(official))
    # GeneCIS boxes were drawn on the stored picture: the crop is taken from it.
    box = (20.0, 10.0, 50.0, 30.0)
    crop = open_benchmark_image(ImageRef(str(tagged), box=box))
    assert np.array_equal(np.asarray(crop), np.asarray(crop_dilated_square(official, box)))
    # The held-out split's corpus images are still decoded as training saw them: upright.
    upright = open_benchmark_image(ImageRef(str(tagged)), CORPUS_DECODING)
    assert upright.size == (90, 160)


def test_the_model_is_fed_the_official_pixels(retriever: Retriever, tmp_path: Path) -> None:
    """EXIF-tagged and large JPEGs reach the model exactly as `Image.open().convert("RGB")`
    gives them (no rotation, no reduced-scale decode), crops included."""
    tagged = _rotated_tagged_jpeg(tmp_path / "tagged.jpg")
    large = tmp_path / "large.jpg"
    picture(5, (1600, 1200)).save(large, quality=90)
    box = (20.0, 10.0, 50.0, 30.0)
    pairs = []
    for path in (tagged, large):
        official = Image.open(path).convert("RGB")
        pairs.append(
            (ImageRef(str(path)), ImageRef(str(_png_copy(official, path.with_suffix(".png")))))
        )
    pairs.append((ImageRef(str(tagged), box=box), ImageRef(str(tmp_path / "tagged.png"), box=box)))
    refs = [ref for pair in pairs for ref in pair]
    projections = embed_images(retriever, _gallery_split(refs), SETTINGS)
    for row in range(0, len(refs), 2):
        assert np.allclose(projections[row], projections[row + 1], atol=1e-5), refs[row]
    # The tagged picture's projection is not the rotated one's: the check can tell them apart.
    rotated = _png_copy(ImageOps.exif_transpose(Image.open(tagged)), tmp_path / "upright.png")
    both = embed_images(
        retriever, _gallery_split([ImageRef(str(tagged)), ImageRef(str(rotated))]), SETTINGS
    )
    assert not np.allclose(both[0], both[1], atol=1e-3)


def test_heldout_images_are_decoded_like_the_corpus() -> None:
    triplets = pl.DataFrame(
        {
            "q_img": [f"q{n}.jpg" for n in range(40)],
            "q_text": [["make it red"] for _ in range(40)],
            "t_img": [f"t{n}.jpg" for n in range(40)],
            "hns": [[f"q{n}.jpg"] for n in range(40)],
        }
    )
    split = heldout_benchmark(triplets, fraction=0.5)
    assert split.image_decoding == CORPUS_DECODING
    assert _gallery_split([ImageRef("x.jpg")]).image_decoding == OFFICIAL_DECODING


def test_a_change_of_decoding_is_a_new_gallery_cache_entry(
    retriever: Retriever, tmp_path: Path
) -> None:
    write_cirr(tmp_path / "cirr", "val")
    split = load_cirr(tmp_path / "cirr", "val")
    cache = GalleryCache(tmp_path / "cache")
    as_before = replace(split, image_decoding=CORPUS_DECODING)  # how every image was decoded
    assert evaluate_split(retriever, as_before, cache, tmp_path, SETTINGS).gallery_reused is False
    assert evaluate_split(retriever, as_before, cache, tmp_path, SETTINGS).gallery_reused is True
    # The same images decoded the official way are embedded again, not read from that entry.
    assert evaluate_split(retriever, split, cache, tmp_path, SETTINGS).gallery_reused is False
    assert evaluate_split(retriever, split, cache, tmp_path, SETTINGS).gallery_reused is True


# --- 2. identical embeddings score identically; GeneCIS's tie rule is deterministic --------


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def test_identical_candidates_score_exactly_the_same_wherever_they_sit() -> None:
    rng = np.random.default_rng(0)
    for dim in (7, 128, 768):
        embeddings = _unit(rng.standard_normal((40, dim)))
        queries = _unit(rng.standard_normal((60, dim)))
        # Row 0 is each query's target and also the last of its gallery (GeneCIS lists an
        # image twice when it is both); rows 1 and 2 are copies of one picture.
        embeddings[2] = embeddings[1]
        lists = [
            [0, *rng.choice(np.arange(3, 40), int(rng.integers(8, 14)), replace=False), 1, 2, 0]
            for _ in queries
        ]
        for scores in candidate_scores(queries, embeddings, lists):
            assert scores[0] == scores[-1]
            assert scores[-3] == scores[-2]


def test_genecis_target_listed_again_in_its_gallery_always_ties_against_it(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    count, dim = 60, 512
    ids = [f"img{n}" for n in range(count)]
    queries = []
    for n in range(40):
        reference, target, *others = rng.choice(count, 15, replace=False)
        gallery = [ids[i] for i in others] + [ids[target]]  # the target again, last
        queries.append(
            CirQuery(
                f"q{n}", ids[reference], "t", (ids[target],), candidates=(ids[target], *gallery)
            )
        )
    split = BenchmarkSplit(
        benchmark="genecis",
        split="focus_object",
        metric_kind="genecis",
        image_ids=ids,
        image_refs=[ImageRef(f"{i}.jpg") for i in ids],
        gallery_size=count,
        queries=queries,
        has_ground_truth=True,
    )
    images = rng.standard_normal((count, dim)).astype(np.float32)
    row = split.index_of()
    # Texts that fuse each query onto its target: the target (and its copy) rank first.
    texts = np.stack([3 * images[row[q.targets[0]]] - images[row[q.reference_id]] for q in queries])
    scored, _ = score_split(split, images, texts, tmp_path)
    # The copy scores exactly as the target does and a tie counts against the target: rank 2.
    assert scored == {"R@1": 0.0, "R@2": 100.0, "R@3": 100.0}


# --- 4. queries a protocol leaves out are reported -------------------------------------------


def test_genecis_queries_left_out_are_told_in_rows_table_and_metadata(
    retriever: Retriever, tmp_path: Path
) -> None:
    write_genecis(tmp_path / "genecis")  # each attribute task: 3 queries, 1 of another length
    result = evaluate_benchmark(
        retriever,
        "genecis",
        BenchmarkSources(roots={"genecis": tmp_path / "genecis"}),
        GalleryCache(tmp_path / "cache"),
        tmp_path / "out",
        SETTINGS,
    )
    rows = result.rows()
    attribute = rows.filter(rows["split"] == "focus_attribute")
    assert set(attribute["detail"]) == {
        "2 of 3 queries scored; 1 left out: gallery_length_not_modal (a gallery of another "
        "length than the task's most common; GeneCIS's evaluation code batches one gallery "
        "length per task)"
    }
    assert set(rows.filter(rows["split"] == "focus_object")["detail"]) == {""}
    mean = rows.filter(rows["split"] == "mean")
    assert set(mean["detail"]) == {
        "mean over focus_attribute, change_attribute, focus_object, change_object; they "
        "scored 8 of 10 queries (2 left out)"
    }
    table = result.table_markdown()
    assert "- focus_attribute: 2 of 3 queries scored; 1 left out" in table
    assert "- change_attribute: 2 of 3 queries scored; 1 left out" in table
    assert "focus_object: " not in table.split("\n\n")[-1]
    metadata = headline_metadata(result)
    assert metadata["queries_left_out"] == 2
    assert metadata["queries_left_out_detail"].startswith("focus_attribute: 2 of 3 queries")


# --- 5. CIRR's headline average; galleries too small for a server file ----------------------


def test_cirr_average_is_the_mean_of_r5_and_rsubset1(tmp_path: Path) -> None:
    write_cirr(tmp_path, "val", groups=6)
    split = load_cirr(tmp_path, "val")
    rng = np.random.default_rng(3)
    images = rng.standard_normal((len(split.image_ids), 16)).astype(np.float32)
    texts = rng.standard_normal((len(split.queries), 16)).astype(np.float32)
    scored, _ = score_split(split, images, texts, tmp_path)
    assert scored[CIRR_AVERAGE] == pytest.approx((scored["R@5"] + scored["R_subset@1"]) / 2)
    assert list(scored)[-1] == CIRR_AVERAGE  # after the numbers it averages, in every table


def test_server_galleries_too_small_are_refused_as_such(tmp_path: Path) -> None:
    write_cirr(tmp_path / "cirr", "test1", groups=8)  # 48 images; the file needs 50 + reference
    cirr = load_cirr(tmp_path / "cirr", "test1")
    write_circo(tmp_path / "circo", gallery_size=30)
    circo = load_circo(tmp_path / "circo", "test")
    for split, needed in ((cirr, 51), (circo, 50)):
        images = np.ones((len(split.image_ids), 8), dtype=np.float32)
        texts = np.ones((len(split.queries), 8), dtype=np.float32)
        with pytest.raises(SubmissionError, match=f"gallery is too small.*at least {needed}"):
            score_split(split, images, texts, tmp_path)


# --- 6. ids given as strings ------------------------------------------------------------------


def test_string_ids_are_refused_saying_the_official_files_use_integers(tmp_path: Path) -> None:
    write_circo(tmp_path / "circo")
    path = tmp_path / "circo/annotations/val.json"
    queries = json.loads(path.read_text())
    queries[0]["id"] = str(queries[0]["id"])
    path.write_text(json.dumps(queries))
    with pytest.raises(BenchmarkFormatError, match="official CIRCO files use integer ids"):
        load_circo(tmp_path / "circo", "val")
    write_cirr(tmp_path / "cirr", "val")
    path = tmp_path / "cirr/captions/cap.rc2.val.json"
    pairs = json.loads(path.read_text())
    pairs[1]["pairid"] = str(pairs[1]["pairid"])
    path.write_text(json.dumps(pairs))
    with pytest.raises(BenchmarkFormatError, match="official CIRR files use integer pairids"):
        load_cirr(tmp_path / "cirr", "val")


def test_exact_scores_equal_float64_inner_products() -> None:
    rng = np.random.default_rng(4)
    queries = _unit(rng.standard_normal((3, 33)))
    vectors = _unit(rng.standard_normal((3, 9, 33)))
    expected = np.einsum("qd,qmd->qm", queries.astype(np.float64), vectors.astype(np.float64))
    assert np.allclose(exact_scores(queries, vectors), expected, rtol=0, atol=1e-15)
    assert exact_scores(queries[0], vectors[0]).shape == (9,)
    assert metrics.rank_by_score(exact_scores(queries, vectors)).shape == (3, 9)

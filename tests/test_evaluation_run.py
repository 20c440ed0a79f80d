"""Scoring whole benchmarks: wiring checked with constructed projections, then end to end with
the demo's tiny open_clip model on tiny official-format files (cache reuse, server files,
skipped benchmarks, unreadable images)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from image_factory import picture
from test_evaluation_heldout import image_locations, tiny_triplets
from test_evaluation_loaders import write_circo, write_cirr, write_fashioniq, write_genecis

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation import metrics
from megapairs_assets.evaluation.gallery_cache import GalleryCache
from megapairs_assets.evaluation.loaders import load_circo, load_cirr, load_genecis
from megapairs_assets.evaluation.run import (
    CIRR_AVERAGE,
    BenchmarkImageError,
    BenchmarkSources,
    EvaluationSettings,
    evaluate_benchmark,
    score_split,
)
from megapairs_assets.evaluation.submissions import parse_circo_submission, parse_cirr_submission
from megapairs_assets.retriever.model import Retriever, load_retriever

SETTINGS = EvaluationSettings(batch_size=16, num_workers=0)


def _projections(count: int, seed: int = 0, dim: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)


def _perfect_texts(split, projections: np.ndarray) -> np.ndarray:
    """Text projections that fuse with the reference into exactly the first target."""
    row = split.index_of()
    return np.stack(
        [
            3 * projections[row[q.targets[0]]] - projections[row[q.reference_id]]
            for q in split.queries
        ]
    )


# --- wiring, with constructed projections ------------------------------------------------


def test_a_query_fused_onto_its_target_scores_full_marks(tmp_path: Path) -> None:
    write_cirr(tmp_path, "val")
    cirr = load_cirr(tmp_path, "val")
    images = _projections(len(cirr.image_ids))
    scored, files = score_split(cirr, images, _perfect_texts(cirr, images), tmp_path)
    assert files == [] and all(v == pytest.approx(100.0) for v in scored.values())
    assert set(scored) == {
        "R@1",
        "R@5",
        "R@10",
        "R@50",
        "R_subset@1",
        "R_subset@2",
        "R_subset@3",
        CIRR_AVERAGE,
    }

    write_genecis(tmp_path / "genecis")
    genecis = load_genecis(tmp_path / "genecis", "focus_attribute")
    images = _projections(len(genecis.image_ids), seed=1)
    scored, _ = score_split(genecis, images, _perfect_texts(genecis, images), tmp_path)
    assert scored == {"R@1": 100.0, "R@2": 100.0, "R@3": 100.0}


def test_cirr_with_text_adding_nothing_ranks_neighbours_of_the_deleted_reference(
    tmp_path: Path,
) -> None:
    write_cirr(tmp_path, "val", groups=6)
    split = load_cirr(tmp_path, "val")
    images = _projections(len(split.image_ids), seed=2)
    scored, _ = score_split(split, images, np.zeros_like(images[: len(split.queries)]), tmp_path)
    # The query is the reference image itself: it is always ranked first and then deleted,
    # so R@1 is whether the target is the reference's nearest other image.
    unit = images / np.linalg.norm(images, axis=1, keepdims=True)
    row = split.index_of()
    hits = []
    for q in split.queries:
        similarity = unit @ unit[row[q.reference_id]]
        similarity[row[q.reference_id]] = -np.inf
        hits.append(int(np.argmax(similarity)) == row[q.targets[0]])
    assert scored["R@1"] == pytest.approx(100 * np.mean(hits))


def test_circo_scores_equal_the_metric_on_an_independent_ranking(tmp_path: Path) -> None:
    write_circo(tmp_path)
    split = load_circo(tmp_path, "val")
    images = _projections(len(split.image_ids), seed=4)
    texts = _projections(len(split.queries), seed=5)
    scored, _ = score_split(split, images, texts, tmp_path)
    row = split.index_of()
    unit = images / np.linalg.norm(images, axis=1, keepdims=True)
    fused = np.stack(
        [images[row[q.reference_id]] + t for q, t in zip(split.queries, texts, strict=True)]
    )
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    ranking = metrics.rank_by_score(fused @ unit.T, depth=50)
    truths = [[row[t] for t in q.targets] for q in split.queries]
    expected = metrics.mean_average_precision_at_k(ranking, truths, ks=(5, 10, 25, 50))
    assert scored == {f"mAP@{k}": pytest.approx(v, abs=1e-6) for k, v in expected.items()}


# --- end to end with the demo's tiny open_clip model -------------------------------------


@pytest.fixture(scope="module")
def retriever(demo_models_dir: Path) -> Retriever:
    checkpoint = demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"
    return load_retriever(DEMO_CLIP_MODEL, str(checkpoint), torch.device("cpu"), torch.float32)


def _evaluate(retriever: Retriever, key: str, tmp_path: Path, **roots: Path):
    sources = BenchmarkSources(roots=roots)
    cache = GalleryCache(tmp_path / "cache")
    return evaluate_benchmark(retriever, key, sources, cache, tmp_path / "out", SETTINGS)


def test_circo_val_end_to_end_reuses_the_cached_gallery(
    retriever: Retriever, tmp_path: Path
) -> None:
    write_circo(tmp_path / "circo")
    first = _evaluate(retriever, "circo-val", tmp_path, circo=tmp_path / "circo")
    (result,) = first.splits
    assert result.status == "scored" and result.gallery_reused is False
    assert set(result.metrics) == {"mAP@5", "mAP@10", "mAP@25", "mAP@50"}
    assert all(0.0 <= v <= 100.0 for v in result.metrics.values())

    again = _evaluate(retriever, "circo-val", tmp_path, circo=tmp_path / "circo")
    assert again.splits[0].gallery_reused is True
    assert again.splits[0].metrics == result.metrics

    # Replacing an image file changes the gallery version: the cache is not reused.
    image = tmp_path / "circo/COCO2017_unlabeled/unlabeled2017/000000001005.jpg"
    picture(77, (24, 20)).save(image)
    os.utime(image, ns=(1, 1))
    changed = _evaluate(retriever, "circo-val", tmp_path, circo=tmp_path / "circo")
    assert changed.splits[0].gallery_reused is False
    assert changed.splits[0].gallery_version != result.gallery_version

    rows = first.rows()
    assert rows.columns[:6] == ["retriever_id", "benchmark", "split", "metric", "value", "status"]
    assert rows["retriever_id"].unique().to_list() == [retriever.retriever_id]
    assert "| val |" in first.table_markdown()


def test_server_files_parse_back(retriever: Retriever, tmp_path: Path) -> None:
    queries = write_circo(tmp_path / "circo")["test"]
    (circo,) = _evaluate(retriever, "circo-test", tmp_path, circo=tmp_path / "circo").splits
    assert circo.status == "submission" and circo.metrics == {}
    parsed = parse_circo_submission(circo.submissions[0], [str(q["id"]) for q in queries])
    assert all(len(ids) == 50 for ids in parsed.values())

    pairs = write_cirr(tmp_path / "cirr", "test1", groups=10)
    (cirr,) = _evaluate(retriever, "cirr-test1", tmp_path, cirr=tmp_path / "cirr").splits
    expected = [str(p["pairid"]) for p in pairs]
    by_metric = dict(parse_cirr_submission(path, expected) for path in cirr.submissions)
    assert set(by_metric) == {"recall", "recall_subset"}
    reference_of = {str(p["pairid"]): p["reference"] for p in pairs}
    for metric, rankings in by_metric.items():
        for pair_id, names in rankings.items():
            assert reference_of[pair_id] not in names  # the reference is excluded
            if metric == "recall_subset":
                members = next(p for p in pairs if str(p["pairid"]) == pair_id)["img_set"]
                assert set(names) <= set(members["members"])


def test_multi_split_benchmarks_add_a_mean_row(retriever: Retriever, tmp_path: Path) -> None:
    write_fashioniq(tmp_path / "fiq")
    fiq = _evaluate(retriever, "fashioniq-val", tmp_path, fashioniq=tmp_path / "fiq")
    assert [s.split for s in fiq.splits] == ["dress", "shirt", "toptee", "mean"]
    mean = fiq.splits[-1].metrics["R@10"]
    assert mean == pytest.approx(np.mean([s.metrics["R@10"] for s in fiq.splits[:3]]))

    write_genecis(tmp_path / "genecis")
    genecis = _evaluate(retriever, "genecis", tmp_path, genecis=tmp_path / "genecis")
    assert [s.split for s in genecis.splits][-1] == "mean"
    assert set(genecis.splits[0].metrics) == {"R@1", "R@2", "R@3"}
    assert "left out" in genecis.splits[0].detail


def test_skipped_benchmarks_are_rows_without_numbers(retriever: Retriever, tmp_path: Path) -> None:
    write_fashioniq(tmp_path / "fiq", categories=("dress",))
    result = _evaluate(retriever, "fashioniq-val", tmp_path, fashioniq=tmp_path / "fiq")
    rows = result.rows()
    skipped = rows.filter(rows["status"] == "skipped")
    assert sorted(skipped["split"]) == ["shirt", "toptee"]
    assert skipped["value"].null_count() == 2
    assert all("cap.shirt.val.json" in d or "cap.toptee.val.json" in d for d in skipped["detail"])
    assert "mean" not in rows["split"].to_list()  # no headline from a partial benchmark

    heldout = _evaluate(retriever, "heldout", tmp_path)
    assert heldout.rows()["status"].to_list() == ["skipped"]


def test_heldout_end_to_end(retriever: Retriever, tmp_path: Path) -> None:
    triplets = tiny_triplets(queries=30, prefix=str(tmp_path / "img"))
    (tmp_path / "img").mkdir()
    for n, uri in enumerate(sorted({*triplets["q_img"], *triplets["t_img"]})):
        picture(n, (24, 20)).save(uri)
    where = image_locations(triplets)
    sources = BenchmarkSources(
        triplets=lambda: triplets, locate_images=lambda ids: where, heldout_fraction=0.3
    )
    result = evaluate_benchmark(
        retriever, "heldout", sources, GalleryCache(tmp_path / "c"), tmp_path, SETTINGS
    )
    (split,) = result.splits
    assert set(split.metrics) == {"R@1", "R@5", "R@10", "mAP@5"}
    assert split.metrics["R@1"] <= split.metrics["R@5"] <= split.metrics["R@10"]


def test_an_unreadable_image_fails_naming_the_file(retriever: Retriever, tmp_path: Path) -> None:
    write_circo(tmp_path / "circo")
    broken = tmp_path / "circo/COCO2017_unlabeled/unlabeled2017/000000001009.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(BenchmarkImageError, match=r"000000001009\.jpg"):
        _evaluate(retriever, "circo-val", tmp_path, circo=tmp_path / "circo")

"""Each benchmark's scores worked out by hand, through the real loaders and `score_split`, and
the server files checked against what the CIRCO and CIRR servers accept.

The projections are constructed so that every query's score for every image is a number chosen
here: query q's fused embedding is the unit vector e_q (its text projection is 8 e_q minus its
reference's projection), and image i's unit embedding holds its score for query q in component
q (a last component makes the norm 1). Images with one vector tie exactly; ties rank by gallery
order, the rule `metrics` documents.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_evaluation_newuser_layouts import (
    circo_ids,
    circo_query,
    cirr_names,
    write_circo_release,
    write_cirr_release,
    write_fashioniq_release,
    write_genecis_release,
)

from megapairs_assets.evaluation.benchmark import BenchmarkSplit
from megapairs_assets.evaluation.loaders import load_circo, load_cirr, load_genecis
from megapairs_assets.evaluation.loaders.fashioniq import load_fashioniq
from megapairs_assets.evaluation.run import score_split
from megapairs_assets.evaluation.submissions import (
    parse_circo_submission,
    parse_cirr_submission,
)

DEFAULT_SCORE = 0.1  # every image not named for a query


def designed(split: BenchmarkSplit, scores: list[dict[str, float]]) -> tuple[np.ndarray, ...]:
    """(image projections, text projections) giving query q the image scores `scores[q]`."""
    assert len(scores) == len(split.queries)
    dims = len(scores) + 1
    images = np.full((len(split.image_ids), dims), DEFAULT_SCORE, dtype=np.float64)
    for q, wanted in enumerate(scores):
        for image_id, score in wanted.items():
            images[split.index_of()[image_id], q] = score
    slack = 1.0 - (images[:, :-1] ** 2).sum(axis=1)
    assert (slack > 0).all()
    images[:, -1] = np.sqrt(slack)
    row = split.index_of()
    axes = np.eye(dims)
    texts = np.stack(
        [8.0 * axes[q] - images[row[query.reference_id]] for q, query in enumerate(split.queries)]
    )
    return images.astype(np.float32), texts.astype(np.float32)


# --- CIRCO: mAP@K, reference kept, |GT| > K, ties -------------------------------------------


def circo_split(tmp_path: Path, split: str = "val") -> BenchmarkSplit:
    ids = circo_ids(60)  # gallery index n holds ids[n]
    val = [
        circo_query(0, ids[0], [ids[10], ids[11], ids[12], ids[13], ids[14], ids[15]]),
        circo_query(1, ids[1], [ids[30]]),
    ]
    write_circo_release(tmp_path, ids, val)
    return load_circo(tmp_path, split)


def circo_scores() -> list[dict[str, float]]:
    ids = [str(i) for i in circo_ids(60)]
    return [
        {
            ids[10]: 0.50,  # rank 1, GT
            ids[0]: 0.49,  # rank 2, the reference: kept, and not a hit
            ids[11]: 0.48,  # rank 3, GT
            ids[5]: 0.40,  # rank 4: ties with ids[12] and comes first (gallery index 5 < 12)
            ids[12]: 0.40,  # rank 5, GT
            ids[13]: 0.30,  # rank 6, GT
            ids[14]: 0.20,  # rank 7, GT
            ids[15]: 0.00,  # rank 60, GT, beyond every K
        },
        {ids[1]: 0.50, ids[30]: 0.45},  # the reference first, the only GT second
    ]


def test_circo_map_by_hand(tmp_path: Path) -> None:
    split = circo_split(tmp_path)
    scored, files = score_split(split, *designed(split, circo_scores()), tmp_path)
    # Query 0 (|GT| = 6), hits at ranks 1, 3, 5, 6, 7:
    #   AP@5  = (1/1 + 2/3 + 3/5) / min(6, 5)               = 2.266667 / 5 = 0.453333
    #   AP@10 = (1/1 + 2/3 + 3/5 + 4/6 + 5/7) / min(6, 10)   = 3.647619 / 6 = 0.607937
    #   AP@25 = AP@50 = 3.647619 / 6 (the sixth GT is ranked 60th)
    # Query 1 (|GT| = 1), hit at rank 2: AP@K = (1/2) / 1 = 0.5 for every K.
    assert files == []
    assert scored["mAP@5"] == pytest.approx(100 * (0.453333 + 0.5) / 2, abs=1e-3)
    for k in (10, 25, 50):
        assert scored[f"mAP@{k}"] == pytest.approx(100 * (0.607937 + 0.5) / 2, abs=1e-3)


def test_circo_test_file_is_what_the_server_takes(tmp_path: Path) -> None:
    split = circo_split(tmp_path, "test")
    assert not split.has_ground_truth
    scored, (path,) = score_split(split, *designed(split, circo_scores()), tmp_path)
    assert scored == {}
    payload = json.loads(path.read_text())
    # The server: every test query id as a string key, ids 0..n-1, 50 unique integers each.
    assert sorted(payload, key=int) == ["0", "1"]
    assert all(len(v) == 50 and len(set(v)) == 50 for v in payload.values())
    assert all(type(image_id) is int for v in payload.values() for image_id in v)
    ids = circo_ids(60)
    assert payload["0"][:7] == [ids[10], ids[0], ids[11], ids[5], ids[12], ids[13], ids[14]]
    assert ids[15] not in payload["0"]
    assert payload["1"][:2] == [ids[1], ids[30]]  # the reference stays in CIRCO rankings
    assert parse_circo_submission(path, ["0", "1"])["0"] == payload["0"]


# --- CIRR: Recall@K with the reference deleted, Recall_subset@K -----------------------------


def cirr_scores() -> list[dict[str, float]]:
    # Group g's members are names[6g .. 6g+5]; member 0 is the reference, member 3 the target.
    names = cirr_names("val", 3)
    return [
        {
            names[0]: 0.50,  # the reference: first, then deleted
            names[12]: 0.45,  # another group's image: rank 1 once the reference is gone
            names[3]: 0.40,  # the target: rank 2; first among the members
            names[1]: 0.30,
        },
        {
            names[13]: 0.50,  # rank 1, not a member
            names[8]: 0.35,  # member; ties with the target and comes first (index 8 < 9)
            names[9]: 0.35,  # the target: rank 3, second among the members
        },
        {names[12]: 0.50, names[15]: 0.45},  # reference first, then the target
    ]


def test_cirr_recall_and_recall_subset_by_hand(tmp_path: Path) -> None:
    write_cirr_release(tmp_path, "val", groups=3)
    split = load_cirr(tmp_path, "val")
    scored, files = score_split(split, *designed(split, cirr_scores()), tmp_path)
    # Target ranks once the reference is deleted: 2, 3, 1 (of 17 images).
    #   R@1 = 1/3; R@5 = R@10 = R@50 = 3/3.
    # Target ranks among the five members other than the reference: 1, 2, 1.
    #   R_subset@1 = 2/3; R_subset@2 = R_subset@3 = 3/3.
    # CIRR's headline Avg = (R@5 + R_subset@1) / 2 = (100 + 66.67) / 2.
    assert files == []
    assert scored == pytest.approx(
        {
            "R@1": 100 / 3,
            "R@5": 100.0,
            "R@10": 100.0,
            "R@50": 100.0,
            "R_subset@1": 200 / 3,
            "R_subset@2": 100.0,
            "R_subset@3": 100.0,
            "Avg(R@5,R_subset@1)": (100.0 + 200 / 3) / 2,
        }
    )


def test_cirr_test1_files_are_what_the_server_takes(tmp_path: Path) -> None:
    pairs = write_cirr_release(tmp_path, "test1", groups=9)  # 54 images: 50 after the reference
    split = load_cirr(tmp_path, "test1")
    names = cirr_names("test1", 9)
    scores = [{names[0]: 0.5, names[12]: 0.45, names[3]: 0.40, names[1]: 0.30}]
    scores += [{} for _ in pairs[1:]]
    _, paths = score_split(split, *designed(split, scores), tmp_path)
    by_metric = {}
    for path in paths:
        payload = json.loads(path.read_text())
        # The server: "version" and "metric" entries, then every pairid of test1.
        assert payload["version"] == "rc2"
        by_metric[payload["metric"]] = payload
        rankings = {k: v for k, v in payload.items() if k not in ("version", "metric")}
        assert sorted(rankings) == sorted(str(p["pairid"]) for p in pairs)
        parse_cirr_submission(path, [str(p["pairid"]) for p in pairs])
    assert set(by_metric) == {"recall", "recall_subset"}
    recall, subset = by_metric["recall"]["12060"], by_metric["recall_subset"]["12060"]
    assert len(recall) == 50 and names[0] not in recall
    assert recall[:3] == [names[12], names[3], names[1]]
    assert subset == [names[3], names[1], names[2]]  # members, reference out, ties by order
    for pair in pairs:
        members = set(pair["img_set"]["members"]) - {pair["reference"]}
        assert set(by_metric["recall_subset"][str(pair["pairid"])]) <= members


# --- FashionIQ: Recall@10/50, reference kept -------------------------------------------------


def test_fashioniq_recall_by_hand(tmp_path: Path) -> None:
    gallery = [f"B00{n:02d}ABCD" for n in range(60)]
    triplets = [
        {"target": gallery[1], "candidate": gallery[0], "captions": ["is red", "is longer"]},
        {"target": gallery[2], "candidate": gallery[3], "captions": ["is blue", "has dots"]},
    ]
    write_fashioniq_release(tmp_path, "dress", gallery, triplets)
    split = load_fashioniq(tmp_path, "dress")
    above = {gallery[10 + n]: 0.45 - 0.01 * n for n in range(10)}  # ten images above the target
    scores = [
        {gallery[0]: 0.50, gallery[1]: 0.45},  # the reference stays, first: the target is 2nd
        {**above, gallery[2]: 0.30},  # the target is 11th
    ]
    scored, _ = score_split(split, *designed(split, scores), tmp_path)
    # R@10: query 0 only = 1/2; R@50: both = 2/2.
    assert scored == pytest.approx({"R@10": 50.0, "R@50": 100.0})


# --- GeneCIS: Recall@1/2/3 over [target] + gallery -------------------------------------------


def test_genecis_recall_by_hand(tmp_path: Path) -> None:
    write_genecis_release(tmp_path)
    split = load_genecis(tmp_path, "focus_object")  # query q: target q+1, gallery q+2, q+3

    def coco(n: int) -> str:
        return f"coco{139 + n}"  # the writer's n-th COCO val2017 image

    scores = [
        # The target (1) ties with gallery image 2 and is beaten by 3: two at least as high.
        {coco(1): 0.40, coco(2): 0.40, coco(3): 0.50},
        {coco(2): 0.50, coco(3): 0.20, coco(4): 0.10},  # the target first
    ]
    scored, _ = score_split(split, *designed(split, scores), tmp_path)
    # Target ranks: 3 (ties count against the target), 1. R@1 = R@2 = 1/2; R@3 = 2/2.
    assert scored == pytest.approx({"R@1": 50.0, "R@2": 50.0, "R@3": 100.0})


def test_designed_scores_are_what_the_gallery_sees(tmp_path: Path) -> None:
    """The construction itself: a query's fused vector meets each image at its chosen score."""
    split = circo_split(tmp_path)
    images, texts = designed(split, circo_scores())
    row = split.index_of()
    reference = np.stack([images[row[q.reference_id]] for q in split.queries])
    fused = reference + texts
    fused /= np.linalg.norm(fused, axis=1, keepdims=True)
    unit = images / np.linalg.norm(images, axis=1, keepdims=True)
    first = str(circo_ids(60)[10])
    assert float(unit[row[first]] @ fused[0]) == pytest.approx(0.50, abs=1e-6)
    assert float(unit[row[first]] @ fused[1]) == pytest.approx(DEFAULT_SCORE, abs=1e-6)

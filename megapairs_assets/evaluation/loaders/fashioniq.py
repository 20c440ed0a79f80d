"""FashionIQ (dress, shirt, toptee; val) from its official layout under one root folder.

    <root>/captions/cap.{category}.val.json
        a list of {candidate, target, captions: [c1, c2]}; `candidate` is the reference.
    <root>/image_splits/split.{category}.val.json
        a list of image ids: the category's gallery.
    <root>/images/<image id>.{png,jpg,jpeg}

The query text joins the two captions as MMRet does, "{c1}, and {c2}", each caption exactly
as written (MMRet's published FashionIQ query files keep stray spaces and final full stops).
The reference image stays in the gallery.
"""

from __future__ import annotations

import os
from pathlib import Path

from megapairs_assets.evaluation.benchmark import BenchmarkSplit, CirQuery, ImageRef
from megapairs_assets.evaluation.loaders.images import require_image_dir
from megapairs_assets.evaluation.loaders.jsonfile import (
    BenchmarkFilesMissing,
    BenchmarkFormatError,
    read_json,
    require_field,
    require_list,
)

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def fashioniq_query_text(captions: list[str]) -> str:
    """MMRet's join of FashionIQ's two relative captions."""
    return f"{captions[0]}, and {captions[1]}"


def load_fashioniq(root: Path, category: str) -> BenchmarkSplit:
    """Load one FashionIQ category's val split; see the module docstring."""
    if category not in FASHIONIQ_CATEGORIES:
        raise ValueError(f"FashionIQ has categories {FASHIONIQ_CATEGORIES}, not {category!r}")
    captions_path = root / "captions" / f"cap.{category}.val.json"
    split_path = root / "image_splits" / f"split.{category}.val.json"
    captions = read_json(captions_path, f"FashionIQ {category} val captions")
    image_split = read_json(split_path, f"FashionIQ {category} val image split")
    image_dir = root / "images"
    require_image_dir(image_dir, "FashionIQ images")
    files_by_stem = _image_files(image_dir)

    gallery = require_list(image_split, "image ids")
    for index, image_id in enumerate(gallery):
        if not isinstance(image_id, str):
            raise image_split.error(f"image ids must be strings, got {image_id!r}", index)
    if len(set(gallery)) != len(gallery) or not gallery:
        raise BenchmarkFormatError(split_path, 1, "the image list is empty or repeats ids")
    image_ids = list(gallery)
    in_gallery = set(image_ids)
    known = set(image_ids)
    queries = []
    for index, entry in enumerate(require_list(captions, "FashionIQ triplets")):
        reference = require_field(captions, entry, index, "candidate", str)
        target = require_field(captions, entry, index, "target", str)
        texts = require_field(captions, entry, index, "captions", list)
        if len(texts) != 2 or not all(isinstance(t, str) for t in texts):
            raise captions.error("captions must be a list of exactly two strings", index)
        if target not in in_gallery:
            raise captions.error(f"target {target!r} is not in {split_path.name}", index)
        if reference not in known:
            image_ids.append(reference)  # embedded for its query, never a candidate
            known.add(reference)
        queries.append(
            CirQuery(
                query_id=f"{category}-{index}",
                reference_id=reference,
                text=fashioniq_query_text(texts),
                targets=(target,),
            )
        )
    missing = [image_id for image_id in image_ids if image_id not in files_by_stem]
    if missing:
        raise BenchmarkFilesMissing(
            image_dir / f"{missing[0]}.png",
            f"{len(missing)} of {len(image_ids)} FashionIQ {category} images (first missing "
            "shown; .jpg and .jpeg were tried too)",
        )
    return BenchmarkSplit(
        benchmark="fashioniq",
        split=category,
        metric_kind="recall",
        image_ids=image_ids,
        image_refs=[ImageRef(files_by_stem[image_id]) for image_id in image_ids],
        gallery_size=len(gallery),
        queries=queries,
        has_ground_truth=True,
        files=[captions_path, split_path],
    )


def _image_files(image_dir: Path) -> dict[str, str]:
    """Image id -> file path, for every image file in the folder (one listing, no stats)."""
    files: dict[str, str] = {}
    with os.scandir(image_dir) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() in IMAGE_SUFFIXES and stem not in files:
                files[stem] = entry.path
    return files

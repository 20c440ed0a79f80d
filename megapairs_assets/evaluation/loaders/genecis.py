"""GeneCIS (its four tasks) from the official annotation files and image folders under one root.

    <root>/genecis/{task}.json  (or <root>/{task}.json)
        a list of {reference, target, condition, gallery: [...]}. Attribute tasks describe each
        image as {image_id, instance_bbox: [x, y, w, h]} (a Visual Genome 1.2 image and an
        object box); object tasks as {val_image_id} (a COCO 2017 validation image).
    <root>/VG_100K/<image_id>.jpg, <root>/VG_100K_2/<image_id>.jpg  (Visual Genome 1.2, as
        its two zips unpack), or <root>/VG_100K_all/<image_id>.jpg (both merged, GeneCIS's name)
    <root>/val2017/<val_image_id as 12 digits>.jpg                  (COCO 2017 val)

As in the benchmark's own evaluation code: attribute images are cropped around the box
dilated by 0.7 and padded to a square, and each query ranks only `[target] + gallery`. That
code stacks a batch of galleries into one tensor, so it needs one gallery length per task (the
released object tasks all have 14); a query whose gallery has another length than the most
common one is left out here and counted in `discarded`, rather than failing the task.

The query text is the bare `condition` (what GeneCIS's own evaluation feeds CLIP's text
encoder). MMRet's GeneCIS template is not public; this is our documented choice.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from megapairs_assets.evaluation.benchmark import BenchmarkSplit, CirQuery, ImageRef
from megapairs_assets.evaluation.loaders.images import require_image_dir, require_images
from megapairs_assets.evaluation.loaders.jsonfile import (
    JsonDocument,
    read_json,
    require_field,
    require_list,
)

GENECIS_TASKS = ("focus_attribute", "change_attribute", "focus_object", "change_object")
VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2", "VG_100K_all")
COCO_VAL_DIR = "val2017"


def genecis_annotation_path(root: Path, task: str) -> Path:
    """Where a task's annotations are read: `<root>/genecis/` when it exists, else `<root>/`."""
    folder = root / "genecis" if (root / "genecis").is_dir() else root
    return folder / f"{task}.json"


def load_genecis(root: Path, task: str) -> BenchmarkSplit:
    """Load one GeneCIS task; see the module docstring."""
    if task not in GENECIS_TASKS:
        raise ValueError(f"GeneCIS has tasks {GENECIS_TASKS}, not {task!r}")
    path = genecis_annotation_path(root, task)
    document = read_json(path, f"GeneCIS {task} annotations")
    entries = require_list(document, "GeneCIS templates")
    attribute = task.endswith("attribute")
    resolve = _VgImages(root) if attribute else _CocoImages(root)

    parsed = []
    for index, entry in enumerate(entries):
        reference = require_field(document, entry, index, "reference", dict)
        target = require_field(document, entry, index, "target", dict)
        condition = require_field(document, entry, index, "condition", str)
        gallery = require_field(document, entry, index, "gallery", list)
        if not gallery:
            raise document.error("gallery is empty: the target has nothing to beat", index)
        images = [resolve.image(document, index, item) for item in (reference, target, *gallery)]
        parsed.append((index, condition, images))

    # The official evaluation can only batch galleries of one length: keep the modal one.
    modal_length = Counter(len(images) for _, _, images in parsed).most_common(1)[0][0]
    kept = [item for item in parsed if len(item[2]) == modal_length]
    image_refs: dict[str, ImageRef] = {}
    queries = []
    for index, condition, images in kept:
        for image_id, ref in images:
            image_refs.setdefault(image_id, ref)
        (reference_id, _), *candidates = images
        queries.append(
            CirQuery(
                query_id=f"{task}-{index}",
                reference_id=reference_id,
                text=condition,
                targets=(candidates[0][0],),
                candidates=tuple(image_id for image_id, _ in candidates),
            )
        )
    ids = list(image_refs)
    refs = [image_refs[image_id] for image_id in ids]
    require_images(refs, f"GeneCIS {task} images")
    discarded = len(parsed) - len(kept)
    return BenchmarkSplit(
        benchmark="genecis",
        split=task,
        metric_kind="genecis",
        image_ids=ids,
        image_refs=refs,
        gallery_size=len(ids),
        queries=queries,
        has_ground_truth=True,
        files=[path],
        discarded={"gallery_length_not_modal": discarded} if discarded else {},
    )


class _VgImages:
    """Visual Genome crops: `{image_id, instance_bbox}` -> (crop id, ImageRef with box)."""

    def __init__(self, root: Path) -> None:
        self.dirs = [root / name for name in VG_IMAGE_DIRS if (root / name).is_dir()]
        if not self.dirs:
            names = ", ".join(VG_IMAGE_DIRS[:-1]) + f" or {VG_IMAGE_DIRS[-1]}"
            require_image_dir(root / VG_IMAGE_DIRS[0], f"Visual Genome 1.2 images ({names})")

    def image(self, document: JsonDocument, index: int, item: Any) -> tuple[str, ImageRef]:
        image_id = require_field(document, item, index, "image_id", (int, str))
        box = require_field(document, item, index, "instance_bbox", list)
        if (
            len(box) != 4
            or not all(isinstance(v, int | float) for v in box)
            or box[2] <= 0
            or (box[3] <= 0)
        ):
            raise document.error("instance_bbox must be [x, y, width, height], sizes > 0", index)
        path = self._path(image_id)
        key = json.dumps([float(v) for v in box], separators=(",", ":"))
        return f"vg{image_id}{key}", ImageRef(str(path), box=tuple(float(v) for v in box))

    def _path(self, image_id: int | str) -> Path:
        for folder in self.dirs:
            candidate = folder / f"{image_id}.jpg"
            if candidate.is_file():
                return candidate
        return self.dirs[0] / f"{image_id}.jpg"  # reported missing by require_images


class _CocoImages:
    """COCO 2017 val images: `{val_image_id}` -> (image id, ImageRef)."""

    def __init__(self, root: Path) -> None:
        self.folder = root / COCO_VAL_DIR
        require_image_dir(self.folder, "COCO 2017 val images")

    def image(self, document: JsonDocument, index: int, item: Any) -> tuple[str, ImageRef]:
        image_id = require_field(document, item, index, "val_image_id", (int, str))
        try:
            number = int(image_id)
        except ValueError:
            raise document.error(f"val_image_id {image_id!r} is not a number", index) from None
        return f"coco{number}", ImageRef(str(self.folder / f"{number:012d}.jpg"))

"""CIRCO (val, test) from its official layout under one root folder.

    <root>/annotations/{val,test}.json
        a list of {id, reference_img_id, target_img_id, relative_caption, shared_concept,
        gt_img_ids}; test omits target_img_id and gt_img_ids (answers are on the server).
        Query ids are unique, and so are the ids within one `gt_img_ids`.
    <root>/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json
        {"images": [{"id", "file_name", ...}, ...]}: the gallery, all 123,403 images.
    <root>/COCO2017_unlabeled/unlabeled2017/<file_name>

The query text is MMRet's: "Find a picture that also {shared_concept}, but
{relative_caption}." The reference image stays in the gallery; every id in `gt_img_ids`
counts for mAP@K. Both splits rank the same gallery, so they share one cache entry of its
embeddings (`GALLERY_NAME`).
"""

from __future__ import annotations

from pathlib import Path

from megapairs_assets.evaluation.benchmark import BenchmarkSplit, CirQuery, ImageRef
from megapairs_assets.evaluation.loaders.images import require_image_dir, require_images
from megapairs_assets.evaluation.loaders.jsonfile import (
    read_json,
    require_field,
    require_list,
)

CIRCO_SPLITS = ("val", "test")
IMAGE_INFO = Path("COCO2017_unlabeled/annotations/image_info_unlabeled2017.json")
IMAGE_DIR = Path("COCO2017_unlabeled/unlabeled2017")
GALLERY_NAME = "unlabeled2017"
# The official files hold numbers; ids as strings mean an edited file (refused, not guessed).
INTEGER_IDS = "the official CIRCO files use integer ids"


def circo_query_text(shared_concept: str, relative_caption: str) -> str:
    """MMRet's CIRCO query: both the shared concept and the relative caption."""
    return f"Find a picture that also {shared_concept}, but {relative_caption}."


def load_circo(root: Path, split: str) -> BenchmarkSplit:
    """Load one CIRCO split; see the module docstring for the files read."""
    if split not in CIRCO_SPLITS:
        raise ValueError(f"CIRCO has splits {CIRCO_SPLITS}, not {split!r}")
    annotations_path = root / "annotations" / f"{split}.json"
    annotations = read_json(annotations_path, f"CIRCO {split} annotations")
    info = read_json(
        root / IMAGE_INFO,
        "the COCO 2017 unlabeled image list (from COCO's image_info_unlabeled2017.zip)",
    )
    require_image_dir(root / IMAGE_DIR, "COCO 2017 unlabeled images")

    image_ids, image_refs = _gallery(info, root / IMAGE_DIR)
    known = set(image_ids)
    queries = []
    first_entry: dict[int, int] = {}
    for index, entry in enumerate(require_list(annotations, "CIRCO queries")):
        query_id = require_field(annotations, entry, index, "id", int, type_hint=INTEGER_IDS)
        if query_id in first_entry:
            raise annotations.error(
                f"query id {query_id} repeats entry {first_entry[query_id]}: a server file "
                "keyed by query id would lose one of them",
                index,
            )
        first_entry[query_id] = index
        reference = str(
            require_field(annotations, entry, index, "reference_img_id", int, type_hint=INTEGER_IDS)
        )
        concept = require_field(annotations, entry, index, "shared_concept", str)
        caption = require_field(annotations, entry, index, "relative_caption", str)
        targets: tuple[str, ...] = ()
        if split == "val":
            gt = require_field(annotations, entry, index, "gt_img_ids", list)
            if not gt:
                raise annotations.error("gt_img_ids is empty: the query has no answer", index)
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in gt):
                raise annotations.error(
                    f"gt_img_ids must be integer image ids ({INTEGER_IDS})", index
                )
            if len(set(gt)) != len(gt):
                # The official mAP divides by len(gt_img_ids): a repeat would change it.
                raise annotations.error("gt_img_ids repeats an image id", index)
            targets = tuple(str(x) for x in gt)
        unknown = [i for i in (reference, *targets) if i not in known]
        if unknown:
            raise annotations.error(
                f"image id {unknown[0]} is not in {IMAGE_INFO} (the CIRCO gallery)", index
            )
        queries.append(
            CirQuery(
                query_id=str(query_id),
                reference_id=reference,
                text=circo_query_text(concept, caption),
                targets=targets,
            )
        )
    require_images(image_refs, "CIRCO gallery images")
    return BenchmarkSplit(
        benchmark="circo",
        split=split,
        metric_kind="circo",
        image_ids=image_ids,
        image_refs=image_refs,
        gallery_size=len(image_ids),
        queries=queries,
        has_ground_truth=split == "val",
        files=[annotations_path, root / IMAGE_INFO],
        gallery_name=GALLERY_NAME,
    )


def _gallery(info, image_dir: Path) -> tuple[list[str], list[ImageRef]]:
    if not isinstance(info.value, dict) or not isinstance(info.value.get("images"), list):
        raise info.error('expected an object with an "images" list')
    ids, refs = [], []
    for index, image in enumerate(info.value["images"]):
        image_id = require_field(
            info, image, index, "id", int, under_key="images", type_hint=INTEGER_IDS
        )
        file_name = require_field(info, image, index, "file_name", str, under_key="images")
        ids.append(str(image_id))
        refs.append(ImageRef(str(image_dir / file_name)))
    if len(set(ids)) != len(ids):
        raise info.error("image ids repeat in the image list")
    if not ids:
        raise info.error("the image list is empty")
    return ids, refs

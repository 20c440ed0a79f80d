"""CIRR (val, test1) from its official layout under one root folder.

    <root>/captions/cap.rc2.{val,test1}.json
        a list of {pairid, reference, target_hard, target_soft, caption, img_set: {id,
        members, reference_rank, target_rank}}; test1 has no target (answers are on the
        server). `pairid`s are unique.
    <root>/image_splits/split.rc2.{val,test1}.json
        {image name: relative path such as "./dev/dev-244-0-img0.png"}; the split's gallery,
        in file order.
    images: <root>/img_raw/<relative path> (the dataset README's layout), else
        <root>/<relative path> (CLIP4Cir's).

The annotation folders may also sit in `<root>/cirr/` with the images' `dev/`, `test1/` beside
it in `<root>` (the layout SEARLE and GeneCIS document); the image folder is the first of
`img_raw/` and the folder itself, at either level (or the root's parent, for a root naming
that `cirr/` folder), that holds the split's first image.

The query text is the caption as written. The reference image is deleted from each query's
ranking; Recall_subset ranks the `img_set` members without the reference.
"""

from __future__ import annotations

from pathlib import Path

from megapairs_assets.evaluation.benchmark import BenchmarkSplit, CirQuery, ImageRef
from megapairs_assets.evaluation.loaders.images import require_images
from megapairs_assets.evaluation.loaders.jsonfile import (
    BenchmarkFormatError,
    read_json,
    require_field,
    require_list,
)

CIRR_SPLITS = ("val", "test1")
CIRR_VERSION = "rc2"
SUBSET_SIZE = 6  # every img_set has six members, the reference among them


def load_cirr(root: Path, split: str) -> BenchmarkSplit:
    """Load one CIRR split; see the module docstring for the files read."""
    if split not in CIRR_SPLITS:
        raise ValueError(f"CIRR has splits {CIRR_SPLITS}, not {split!r}")
    folder = annotation_folder(root)
    captions_path = folder / "captions" / f"cap.{CIRR_VERSION}.{split}.json"
    split_path = folder / "image_splits" / f"split.{CIRR_VERSION}.{split}.json"
    captions = read_json(captions_path, f"CIRR {split} captions")
    image_split = read_json(split_path, f"CIRR {split} image split")

    image_ids, image_refs = _gallery(image_split, root, folder)
    known = set(image_ids)
    queries = []
    first_entry: dict[int, int] = {}
    for index, entry in enumerate(require_list(captions, "CIRR pairs")):
        pair_id = require_field(
            captions,
            entry,
            index,
            "pairid",
            int,
            type_hint="the official CIRR files use integer pairids",
        )
        if pair_id in first_entry:
            raise captions.error(
                f"pairid {pair_id} repeats entry {first_entry[pair_id]}: a server file keyed "
                "by pairid would lose one of them",
                index,
            )
        first_entry[pair_id] = index
        reference = require_field(captions, entry, index, "reference", str)
        caption = require_field(captions, entry, index, "caption", str)
        img_set = require_field(captions, entry, index, "img_set", dict)
        members = img_set.get("members")
        if (
            not isinstance(members, list)
            or len(members) != SUBSET_SIZE
            or not all(isinstance(m, str) for m in members)
        ):
            raise captions.error(
                f"img_set.members must be a list of {SUBSET_SIZE} image names", index
            )
        targets: tuple[str, ...] = ()
        if split == "val":
            target = require_field(captions, entry, index, "target_hard", str)
            if target not in members:
                raise captions.error(f"target_hard {target!r} is not one of img_set.members", index)
            targets = (target,)
        unknown = [name for name in (reference, *targets, *members) if name not in known]
        if unknown:
            raise captions.error(f"image {unknown[0]!r} is not in {split_path.name}", index)
        queries.append(
            CirQuery(
                query_id=str(pair_id),
                reference_id=reference,
                text=caption,
                targets=targets,
                subset=tuple(members),
            )
        )
    require_images(image_refs, f"CIRR {split} images")
    return BenchmarkSplit(
        benchmark="cirr",
        split=split,
        metric_kind="cirr",
        image_ids=image_ids,
        image_refs=image_refs,
        gallery_size=len(image_ids),
        queries=queries,
        has_ground_truth=split == "val",
        remove_reference=True,
        files=[captions_path, split_path],
    )


def annotation_folder(root: Path) -> Path:
    """Where `captions/` and `image_splits/` are: the root, else `<root>/cirr/` when only it
    has them (SEARLE's layout)."""
    if not (root / "captions").is_dir() and (root / "cirr" / "captions").is_dir():
        return root / "cirr"
    return root


def _gallery(image_split, root: Path, folder: Path) -> tuple[list[str], list[ImageRef]]:
    if not isinstance(image_split.value, dict) or not image_split.value:
        raise BenchmarkFormatError(
            image_split.path, 1, "expected a non-empty object {image name: relative path}"
        )
    ids, relatives = [], []
    for name, relative in image_split.value.items():
        if not isinstance(relative, str):
            raise BenchmarkFormatError(
                image_split.path,
                image_split.key_line(name),
                f"the path of {name!r} should be a string, got {type(relative).__name__}",
            )
        ids.append(name)
        relatives.append(relative)
    image_root = _image_root(root, folder, relatives[0])
    return ids, [ImageRef(str(image_root / relative)) for relative in relatives]


def _image_root(root: Path, folder: Path, first_image: str) -> Path:
    """The folder the split file's relative paths start from (see the module docstring)."""
    # root.parent last: a root naming SEARLE's `cirr/` annotation folder itself.
    candidates = [root / "img_raw", root, folder / "img_raw", folder, root.parent]
    candidates = list(dict.fromkeys(candidates))
    for candidate in candidates:
        if (candidate / first_image).is_file():
            return candidate
    # None holds it: the dataset README's layout, so the missing image is named there.
    return next((c for c in candidates if c.is_dir() and c.name == "img_raw"), root)

"""Each benchmark loader on tiny files in the official formats, written here; plus bad files.

The `write_*` helpers build a benchmark root the way the official downloads lay it out; other
evaluation tests import them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from image_factory import picture
from PIL import Image

from megapairs_assets.evaluation.images import crop_dilated_square
from megapairs_assets.evaluation.loaders import (
    BenchmarkFilesMissing,
    BenchmarkFormatError,
    load_circo,
    load_cirr,
    load_fashioniq,
    load_genecis,
)
from megapairs_assets.evaluation.run import BenchmarkSources, Skipped, load_benchmark

IMAGE_PX = (24, 20)


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture(seed, IMAGE_PX).save(path)


def _json(path: Path, value: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, indent=2)
    path.write_text(text)
    return text


def entry_start_line(text: str, index: int) -> int:
    """1-based line where entry `index` of a top-level list written with indent=2 starts."""
    starts = [n for n, line in enumerate(text.splitlines(), start=1) if line == "  {"]
    return starts[index]


# --- writers of official layouts ---------------------------------------------------------


def write_circo(root: Path, gallery_size: int = 55) -> dict[str, list[dict]]:
    images = [{"id": 1000 + n, "file_name": f"{1000 + n:012d}.jpg"} for n in range(gallery_size)]
    _json(root / "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json", {"images": images})
    for n, image in enumerate(images):
        _image(root / "COCO2017_unlabeled/unlabeled2017" / image["file_name"], n)
    val = [
        {
            "id": 0,
            "reference_img_id": 1000,
            "target_img_id": 1003,
            "relative_caption": "is running on grass",
            "shared_concept": "a dog",
            "gt_img_ids": [1003, 1004, 1007],
        },
        {
            "id": 1,
            "reference_img_id": 1001,
            "target_img_id": 1010,
            "relative_caption": "has two of them",
            "shared_concept": "a red bus",
            "gt_img_ids": [1010],
        },
    ]
    test = [{k: v for k, v in q.items() if k not in ("target_img_id", "gt_img_ids")} for q in val]
    _json(root / "annotations/val.json", val)
    _json(root / "annotations/test.json", test)
    return {"val": val, "test": test}


def write_cirr(root: Path, split: str = "val", groups: int = 3) -> list[dict]:
    names = [f"{split}-{g}-{m}-img0" for g in range(groups) for m in range(6)]
    prefix = "dev" if split == "val" else split
    _json(
        root / f"image_splits/split.rc2.{split}.json",
        {name: f"./{prefix}/{name}.png" for name in names},
    )
    for n, name in enumerate(names):
        _image(root / "img_raw" / prefix / f"{name}.png", n)
    pairs = []
    for g in range(groups):
        members = names[g * 6 : g * 6 + 6]
        pair = {
            "pairid": 12000 + g,
            "reference": members[0],
            "caption": f"make it look like group {g}",
            "img_set": {"id": g, "members": members, "reference_rank": 0},
        }
        if split == "val":
            pair |= {"target_hard": members[2], "target_soft": {members[2]: 1.0}}
            pair["img_set"]["target_rank"] = 2
        pairs.append(pair)
    _json(root / f"captions/cap.rc2.{split}.json", pairs)
    return pairs


def write_fashioniq(root: Path, categories: tuple[str, ...] = ("dress", "shirt", "toptee")) -> None:
    for c, category in enumerate(categories):
        gallery = [f"B{c}{n:04d}" for n in range(8)]
        _json(root / f"image_splits/split.{category}.val.json", gallery)
        for n, image_id in enumerate(gallery):
            suffix = ".png" if n % 2 else ".jpg"  # the loader takes either
            _image(root / "images" / f"{image_id}{suffix}", 100 * c + n)
        _image(root / "images" / f"R{c}.png", 999)  # a reference outside the gallery
        triplets = [
            {"candidate": gallery[0], "target": gallery[3], "captions": ["is red", "has stripes."]},
            {"candidate": f"R{c}", "target": gallery[5], "captions": [" shorter", "na"]},
        ]
        _json(root / f"captions/cap.{category}.val.json", triplets)


def write_genecis(root: Path) -> dict[str, list[dict]]:
    for n in range(6):
        image = picture(n, (60, 40))
        (root / "VG_100K").mkdir(parents=True, exist_ok=True)
        image.save(root / "VG_100K" / f"{10 + n}.jpg")
        (root / "val2017").mkdir(parents=True, exist_ok=True)
        image.save(root / "val2017" / f"{200 + n:012d}.jpg")

    def vg(n: int) -> dict:
        return {"image_id": 10 + n, "instance_bbox": [5.0, 4.0, 20.0, 10.0 + n], "object_name": "x"}

    def coco(n: int) -> dict:
        return {"val_image_id": 200 + n}

    tasks = {}
    for task in ("focus_attribute", "change_attribute"):
        tasks[task] = [
            {"reference": vg(0), "target": vg(1), "condition": "color", "gallery": [vg(2), vg(3)]},
            {"reference": vg(4), "target": vg(5), "condition": "size", "gallery": [vg(0), vg(1)]},
            # One gallery of another length: the official protocol leaves it out.
            {"reference": vg(1), "target": vg(2), "condition": "shape", "gallery": [vg(3)]},
        ]
    for task in ("focus_object", "change_object"):
        tasks[task] = [
            {"reference": coco(0), "target": coco(1), "condition": "dog", "gallery": [coco(2)]},
            {"reference": coco(3), "target": coco(4), "condition": "car", "gallery": [coco(5)]},
        ]
    for task, entries in tasks.items():
        _json(root / "genecis" / f"{task}.json", entries)
    return tasks


# --- CIRCO -------------------------------------------------------------------------------


def test_circo_val_reads_queries_ground_truths_and_the_whole_gallery(tmp_path: Path) -> None:
    write_circo(tmp_path)
    split = load_circo(tmp_path, "val")
    assert split.gallery_size == 55 and split.gallery_ids[0] == "1000"
    first = split.queries[0]
    assert first.text == "Find a picture that also a dog, but is running on grass."
    assert first.targets == ("1003", "1004", "1007")
    assert first.reference_id in split.gallery_ids  # CIRCO keeps the reference in the gallery
    assert split.image_refs[0].uri.endswith("unlabeled2017/000000001000.jpg")
    assert split.has_ground_truth and not split.remove_reference


def test_circo_test_has_no_answers(tmp_path: Path) -> None:
    write_circo(tmp_path)
    split = load_circo(tmp_path, "test")
    assert not split.has_ground_truth
    assert all(q.targets == () for q in split.queries)


def test_circo_malformed_entry_names_file_and_line(tmp_path: Path) -> None:
    queries = write_circo(tmp_path)["val"]
    del queries[1]["shared_concept"]
    text = _json(tmp_path / "annotations/val.json", queries)
    with pytest.raises(BenchmarkFormatError) as error:
        load_circo(tmp_path, "val")
    assert f"val.json:{entry_start_line(text, 1)}: entry 1: missing key 'shared_concept'" in str(
        error.value
    )


def test_circo_empty_ground_truth_and_bad_json_are_refused(tmp_path: Path) -> None:
    queries = write_circo(tmp_path)["val"]
    queries[0]["gt_img_ids"] = []
    text = _json(tmp_path / "annotations/val.json", queries)
    with pytest.raises(BenchmarkFormatError, match=f"val.json:{entry_start_line(text, 0)}:.*empty"):
        load_circo(tmp_path, "val")
    (tmp_path / "annotations/val.json").write_text('[\n  {"id": 0,\n   "reference_img_id": }\n]')
    with pytest.raises(BenchmarkFormatError, match=r"val.json:3: invalid JSON"):
        load_circo(tmp_path, "val")


def test_circo_unknown_image_id_is_an_error(tmp_path: Path) -> None:
    queries = write_circo(tmp_path)["val"]
    queries[1]["gt_img_ids"] = [1010, 424242]
    _json(tmp_path / "annotations/val.json", queries)
    with pytest.raises(BenchmarkFormatError, match="424242 is not in"):
        load_circo(tmp_path, "val")


def test_missing_benchmark_files_are_skipped_naming_the_path(tmp_path: Path) -> None:
    absent = tmp_path / "nowhere"
    sources = BenchmarkSources(roots={"circo": absent, "cirr": None})
    (skipped,) = load_benchmark("circo-val", sources)
    assert isinstance(skipped, Skipped) and skipped.path == absent
    (unset,) = load_benchmark("cirr-val", sources)
    assert isinstance(unset, Skipped) and "no cirr root configured" in unset.reason

    write_circo(tmp_path / "circo")
    (tmp_path / "circo/annotations/test.json").unlink()
    (test,) = load_benchmark("circo-test", BenchmarkSources(roots={"circo": tmp_path / "circo"}))
    assert isinstance(test, Skipped) and test.path == tmp_path / "circo/annotations/test.json"


def test_a_missing_gallery_image_skips_the_benchmark(tmp_path: Path) -> None:
    write_circo(tmp_path)
    gone = tmp_path / "COCO2017_unlabeled/unlabeled2017/000000001007.jpg"
    gone.unlink()
    with pytest.raises(BenchmarkFilesMissing) as missing:
        load_circo(tmp_path, "val")
    assert missing.value.path == gone and "1 of 55" in str(missing.value)


# --- CIRR --------------------------------------------------------------------------------


def test_cirr_val_reads_pairs_subsets_and_img_raw_images(tmp_path: Path) -> None:
    pairs = write_cirr(tmp_path, "val")
    split = load_cirr(tmp_path, "val")
    query = split.queries[1]
    assert query.query_id == "12001" and query.text == "make it look like group 1"
    assert query.targets == (pairs[1]["target_hard"],)
    assert query.subset == tuple(pairs[1]["img_set"]["members"])
    assert split.remove_reference and split.gallery_size == 18
    assert "/img_raw/dev/" in split.image_refs[0].uri


def test_cirr_test1_has_no_targets(tmp_path: Path) -> None:
    write_cirr(tmp_path, "test1")
    split = load_cirr(tmp_path, "test1")
    assert not split.has_ground_truth and split.queries[0].targets == ()


def test_cirr_malformed_members_name_file_and_line(tmp_path: Path) -> None:
    pairs = write_cirr(tmp_path, "val")
    pairs[2]["img_set"]["members"] = pairs[2]["img_set"]["members"][:5]  # one member short
    text = _json(tmp_path / "captions/cap.rc2.val.json", pairs)
    with pytest.raises(BenchmarkFormatError) as error:
        load_cirr(tmp_path, "val")
    assert f"cap.rc2.val.json:{entry_start_line(text, 2)}: entry 2: img_set.members" in str(
        error.value
    )


def test_cirr_bad_split_file_value_names_its_line(tmp_path: Path) -> None:
    write_cirr(tmp_path, "val")
    path = tmp_path / "image_splits/split.rc2.val.json"
    mapping = json.loads(path.read_text())
    mapping["val-1-1-img0"] = 7
    text = _json(path, mapping)
    line = next(
        n for n, text_line in enumerate(text.splitlines(), 1) if '"val-1-1-img0"' in text_line
    )
    with pytest.raises(BenchmarkFormatError, match=f"split.rc2.val.json:{line}:"):
        load_cirr(tmp_path, "val")


# --- FashionIQ ---------------------------------------------------------------------------


def test_fashioniq_joins_captions_as_mmret_and_keeps_reference_in_gallery(tmp_path: Path) -> None:
    write_fashioniq(tmp_path)
    split = load_fashioniq(tmp_path, "shirt")
    assert split.queries[0].text == "is red, and has stripes."
    assert split.queries[1].text == " shorter, and na"  # captions exactly as written
    assert split.gallery_size == 8
    assert split.queries[0].reference_id in split.gallery_ids
    # A reference outside the category's gallery is embedded but never a candidate.
    assert split.image_ids[8:] == ["R1"]
    assert split.image_refs[0].uri.endswith("B10000.jpg")
    assert split.image_refs[1].uri.endswith("B10001.png")


def test_fashioniq_malformed_captions_name_file_and_line(tmp_path: Path) -> None:
    write_fashioniq(tmp_path)
    path = tmp_path / "captions/cap.dress.val.json"
    triplets = json.loads(path.read_text())
    triplets[1]["captions"] = ["only one"]
    text = _json(path, triplets)
    with pytest.raises(BenchmarkFormatError) as error:
        load_fashioniq(tmp_path, "dress")
    assert f"cap.dress.val.json:{entry_start_line(text, 1)}: entry 1: captions" in str(error.value)


def test_fashioniq_missing_category_skips_only_it(tmp_path: Path) -> None:
    write_fashioniq(tmp_path, categories=("dress", "toptee"))
    loaded = load_benchmark("fashioniq-val", BenchmarkSources(roots={"fashioniq": tmp_path}))
    kinds = {item.split: type(item).__name__ for item in loaded}
    assert kinds == {"dress": "BenchmarkSplit", "shirt": "Skipped", "toptee": "BenchmarkSplit"}


# --- GeneCIS -----------------------------------------------------------------------------


def test_genecis_attribute_task_crops_boxes_and_keeps_modal_galleries(tmp_path: Path) -> None:
    write_genecis(tmp_path)
    split = load_genecis(tmp_path, "focus_attribute")
    assert len(split.queries) == 2 and split.discarded == {"gallery_length_not_modal": 1}
    query = split.queries[0]
    assert query.text == "color"
    assert len(query.candidates) == 3 and query.targets == (query.candidates[0],)
    refs = dict(zip(split.image_ids, split.image_refs, strict=True))
    assert refs[query.candidates[0]].box == (5.0, 4.0, 20.0, 11.0)
    assert refs[query.candidates[0]].uri.endswith("VG_100K/11.jpg")


def test_genecis_object_task_reads_coco_val_files(tmp_path: Path) -> None:
    write_genecis(tmp_path)
    split = load_genecis(tmp_path, "change_object")
    refs = dict(zip(split.image_ids, split.image_refs, strict=True))
    assert refs["coco201"].uri.endswith("val2017/000000000201.jpg") and refs["coco201"].box is None
    assert split.queries[1].candidates == ("coco204", "coco205")


def test_genecis_malformed_box_names_file_and_line(tmp_path: Path) -> None:
    tasks = write_genecis(tmp_path)
    tasks["change_attribute"][1]["gallery"][0]["instance_bbox"] = [1, 2, 3]
    text = _json(tmp_path / "genecis/change_attribute.json", tasks["change_attribute"])
    with pytest.raises(BenchmarkFormatError) as error:
        load_genecis(tmp_path, "change_attribute")
    assert f"change_attribute.json:{entry_start_line(text, 1)}: entry 1: instance_bbox" in str(
        error.value
    )


def test_genecis_crop_dilates_the_box_and_pads_to_a_square() -> None:
    image = Image.new("RGB", (100, 50), (255, 255, 255))
    # Box (40, 10, 20, 10): left 40 - 14 = 26, top 10 - 7 = 3; size 1.7x -> 34 x 17.
    crop = crop_dilated_square(image, (40.0, 10.0, 20.0, 10.0))
    assert crop.size == (34, 34)
    assert crop.getpixel((17, 0)) == (0, 0, 0)  # black padding above the 17-px-high crop
    assert crop.getpixel((17, 17)) == (255, 255, 255)
    # Clipped at the image's edge: a box in the corner.
    assert crop_dilated_square(image, (0.0, 0.0, 10.0, 10.0)).size == (17, 17)

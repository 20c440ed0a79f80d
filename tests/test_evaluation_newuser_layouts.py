"""A new user's benchmark folders, as the official downloads and the common codebases lay them
out: where `--root` (or MEGAPAIRS_*_ROOT) may point, and what is said when it points wrong.

The `write_*_release` helpers copy the real files' shapes (checked against the official
repositories): CIRCO's COCO image list with every COCO field and 12-digit file names, CIRR's
captions on one line and split paths like "./dev/dev-1-0-img0.png", GeneCIS with Visual Genome
boxes and COCO val2017 ids. The other `test_evaluation_newuser_*` files import them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from image_factory import picture

from megapairs_assets.cli.main import main
from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation.loaders import load_cirr, load_genecis
from megapairs_assets.evaluation.run import BenchmarkSources, Skipped, load_benchmark

IMAGE_PX = (20, 16)


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture(seed, IMAGE_PX).save(path)


def write_json(path: Path, value: object, indent: int | None = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=indent, ensure_ascii=False), encoding="utf-8")


# --- writers of the released layouts --------------------------------------------------------


def circo_ids(count: int) -> list[int]:
    """COCO-like image ids: integers, not consecutive."""
    return [100_000 + 37 * n for n in range(count)]


def write_circo_release(
    root: Path, gallery_ids: list[int], val: list[dict], test: list[dict] | None = None
) -> None:
    """<root>/annotations/{val,test}.json and COCO2017_unlabeled/{annotations,unlabeled2017}."""
    images = [
        {
            "license": 4,
            "file_name": f"{image_id:012d}.jpg",
            "coco_url": f"http://images.cocodataset.org/unlabeled2017/{image_id:012d}.jpg",
            "height": IMAGE_PX[1],
            "width": IMAGE_PX[0],
            "date_captured": "2013-11-14 11:18:45",
            "id": image_id,
        }
        for image_id in gallery_ids
    ]
    info = {"info": {}, "licenses": [], "images": images, "categories": []}
    write_json(root / "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json", info)
    for n, image_id in enumerate(gallery_ids):
        write_image(root / f"COCO2017_unlabeled/unlabeled2017/{image_id:012d}.jpg", n)
    write_json(root / "annotations/val.json", val)
    if test is None:
        hidden = ("target_img_id", "gt_img_ids", "semantic_aspects")
        test = [{k: v for k, v in q.items() if k not in hidden} for q in val]
    write_json(root / "annotations/test.json", test)


def circo_query(query_id: int, reference: int, ground_truths: list[int], **extra) -> dict:
    return {
        "reference_img_id": reference,
        "target_img_id": ground_truths[0],
        "relative_caption": "is held by a little girl on a chair",
        "shared_concept": "a teddy bear",
        "gt_img_ids": ground_truths,
        "id": query_id,
        "semantic_aspects": ["cardinality"],
        **extra,
    }


def cirr_names(split: str, groups: int) -> list[str]:
    prefix = "dev" if split == "val" else split
    return [f"{prefix}-{g}-{m % 4}-img{m // 4}" for g in range(groups) for m in range(6)]


def write_cirr_release(
    root: Path, split: str = "val", groups: int = 3, layout: str = "readme"
) -> list[dict]:
    """CIRR `split` with `groups` image sets of six.

    layout: "readme" (the dataset README: images under img_raw/), "clip4cir" (images beside
    captions/), or "searle" (annotations under cirr/, images beside it).
    """
    folder = "dev" if split == "val" else split
    names = cirr_names(split, groups)
    annotations = root / "cirr" if layout == "searle" else root
    images = root / "img_raw" if layout == "readme" else root
    write_json(
        annotations / f"image_splits/split.rc2.{split}.json",
        {name: f"./{folder}/{name}.png" for name in names},
    )
    for n, name in enumerate(names):
        write_image(images / folder / f"{name}.png", 500 + n)
    pairs = []
    for g in range(groups):
        members = names[g * 6 : g * 6 + 6]
        pair: dict = {"pairid": 12060 + g, "reference": members[0]}
        if split == "val":
            pair |= {"target_hard": members[3], "target_soft": {members[3]: 1.0}}
        pair |= {
            "caption": f"show {g + 2} bottles of soft drink",
            "img_set": {"id": 36 + g, "members": members, "reference_rank": 0},
        }
        if split == "val":
            pair["img_set"]["target_rank"] = 3
        pairs.append(pair)
    # The released caption files are one line each.
    write_json(annotations / f"captions/cap.rc2.{split}.json", pairs, indent=None)
    return pairs


def write_fashioniq_release(
    root: Path, category: str, gallery: list[str], triplets: list[dict], suffix: str = ".png"
) -> None:
    write_json(root / f"image_splits/split.{category}.val.json", gallery)
    for n, image_id in enumerate(gallery):
        write_image(root / "images" / f"{image_id}{suffix}", 900 + n)
    write_json(root / f"captions/cap.{category}.val.json", triplets)


def write_genecis_release(root: Path, vg_dir: str = "VG_100K", coco_dir: Path | None = None):
    """The four tasks (two queries each), VG images in `vg_dir`, COCO val2017 in `coco_dir`
    (default <root>/val2017)."""
    coco_dir = coco_dir or root / "val2017"
    for n in range(6):
        write_image(root / vg_dir / f"{2_300_000 + n}.jpg", 700 + n)
        write_image(coco_dir / f"{139 + n:012d}.jpg", 800 + n)

    def vg(n: int) -> dict:
        return {"image_id": 2_300_000 + n, "instance_bbox": [2, 3, 8, 6], "object_name": "shirt"}

    def coco(n: int) -> dict:
        return {"val_image_id": 139 + n}

    for task, image in (
        ("focus_attribute", vg),
        ("change_attribute", vg),
        ("focus_object", coco),
        ("change_object", coco),
    ):
        entries = [
            {
                "reference": image(q),
                "target": image(q + 1),
                "condition": "color",
                "gallery": [image(q + 2), image(q + 3)],
            }
            for q in range(2)
        ]
        write_json(root / "genecis" / f"{task}.json", entries)


# --- where the root may point -----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["readme", "clip4cir", "searle"])
def test_cirr_loads_from_each_published_layout(tmp_path: Path, layout: str) -> None:
    write_cirr_release(tmp_path, "val", layout=layout)
    roots = [tmp_path] + ([tmp_path / "cirr"] if layout == "searle" else [])
    for root in roots:
        split = load_cirr(root, "val")
        assert len(split.queries) == 3 and split.gallery_size == 18
        assert all(os.path.isfile(ref.uri) for ref in split.image_refs), root
        assert split.image_refs[0].uri.endswith("dev/dev-0-0-img0.png")


def test_a_root_one_level_too_high_is_skipped_naming_the_folder_to_use(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_circo_release(data / "CIRCO", circo_ids(3), [circo_query(0, circo_ids(3)[0], [100037])])
    write_cirr_release(data / "CIRR", "val", layout="searle")
    sources = BenchmarkSources(roots={"circo": data, "cirr": data})
    for key, folder in (("circo-val", "CIRCO"), ("cirr-val", "CIRR")):
        (skipped,) = load_benchmark(key, sources)
        assert isinstance(skipped, Skipped)
        assert skipped.detail.endswith(
            f"; {data / folder} holds {key[:-4]} files: give that folder as the {key[:-4]} root"
        ), skipped.detail
    # A root that is right but lacks an image says only what is missing.
    (data / "CIRCO/COCO2017_unlabeled/unlabeled2017/000000100000.jpg").unlink()
    (skipped,) = load_benchmark("circo-val", BenchmarkSources(roots={"circo": data / "CIRCO"}))
    assert "000000100000.jpg" in skipped.detail and "give that folder" not in skipped.detail


def test_an_unset_root_says_how_to_set_it() -> None:
    (skipped,) = load_benchmark("fashioniq-val", BenchmarkSources())[:1]
    assert isinstance(skipped, Skipped)
    for setting in ("MEGAPAIRS_FASHIONIQ_ROOT", "fashioniq_root", "--root"):
        assert setting in skipped.detail


def test_environment_variables_set_the_profile_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resources.profiles import build_resources

    write_circo_release(tmp_path / "CIRCO", circo_ids(3), [circo_query(0, 100000, [100037])])
    monkeypatch.setenv("MEGAPAIRS_CIRCO_ROOT", str(tmp_path / "CIRCO"))
    monkeypatch.delenv("MEGAPAIRS_CIRR_ROOT", raising=False)
    monkeypatch.delenv("MEGAPAIRS_DEPLOYMENT", raising=False)
    evaluation = build_resources("demo", tmp_path / "home")["evaluation"]
    assert evaluation.roots()["circo"] == tmp_path / "CIRCO"
    assert evaluation.roots()["cirr"] is None
    assert {"circo-val", "circo-test"} <= set(evaluation.configured_benchmarks())
    assert "cirr-val" not in evaluation.configured_benchmarks()
    (split,) = load_benchmark("circo-val", evaluation.sources())
    assert not isinstance(split, Skipped) and split.gallery_ids == ["100000", "100037", "100074"]


def test_genecis_reads_vg_100k_all_and_a_symlinked_coco_folder(tmp_path: Path) -> None:
    coco = tmp_path / "coco" / "val2017"  # COCO kept elsewhere, linked into the root
    write_genecis_release(tmp_path / "genecis_root", vg_dir="VG_100K_all", coco_dir=coco)
    (tmp_path / "genecis_root/val2017").symlink_to(coco, target_is_directory=True)
    attribute = load_genecis(tmp_path / "genecis_root", "focus_attribute")
    assert attribute.image_refs[0].uri.endswith("VG_100K_all/2300000.jpg")
    assert attribute.image_refs[0].box == (2.0, 3.0, 8.0, 6.0)
    objects = load_genecis(tmp_path / "genecis_root", "change_object")
    assert objects.image_refs[0].uri.endswith("val2017/000000000139.jpg")
    assert all(os.path.isfile(ref.uri) for ref in objects.image_refs)

    write_genecis_release(tmp_path / "no_vg", vg_dir="visual_genome")
    sources = BenchmarkSources(roots={"genecis": tmp_path / "no_vg"})
    (skipped, *_) = load_benchmark("genecis", sources)
    assert "VG_100K, VG_100K_2 or VG_100K_all" in skipped.detail


def test_an_annotation_file_saved_with_a_byte_order_mark_reads(tmp_path: Path) -> None:
    write_cirr_release(tmp_path, "val")
    path = tmp_path / "captions/cap.rc2.val.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(load_cirr(tmp_path, "val").queries) == 3


# --- the same through `megapairs eval` -----------------------------------------------------


def eval_argv(demo_models_dir: Path, benchmark: str, root: Path) -> list[str]:
    retriever = f"{DEMO_CLIP_MODEL}@{demo_models_dir / (DEMO_CLIP_MODEL + '.pt')}"
    return [
        "eval",
        "--retriever",
        retriever,
        "--benchmark",
        benchmark,
        "--root",
        str(root),
        "--device",
        "cpu",
        "--num-workers",
        "0",
    ]


def test_eval_scores_searle_layout_and_points_a_parent_root_at_it(
    home: Path, tmp_path: Path, demo_models_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    write_cirr_release(tmp_path / "data/CIRR", "val", groups=9, layout="searle")
    assert main(eval_argv(demo_models_dir, "cirr-val", tmp_path / "data/CIRR")) == 0
    captured = capsys.readouterr()
    assert "| val |" in captured.out and "cirr/val gallery: 54/54 images" in captured.err

    assert main(eval_argv(demo_models_dir, "cirr-val", tmp_path / "data")) == 3
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data/CIRR'} holds cirr files: give that folder as the cirr root" in err

    # Run again: the gallery comes from the cache, and the log says so.
    assert main(eval_argv(demo_models_dir, "cirr-val", tmp_path / "data/CIRR")) == 0
    err = capsys.readouterr().err
    assert "cirr/val gallery: 54 image embeddings reused from " in err
    assert "54/54 images" not in err

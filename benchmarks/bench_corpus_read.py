"""Repeated work in reading a corpus, before and after it was removed, measured in one run.

    python -m benchmarks.bench_corpus_read [--baseline-ref REF] [--quick]

Three measurements, each with the `megapairs_assets` package as it was at git commit REF
("before", default c143cf4, the commit before these changes) and as it is now ("now"), in fresh
processes on the same files, best of a few repeats:

- corpus step: `build_corpus_shard` on one folder shard of 2,000 photo-sized JPEGs (1024x768,
  ~200 KB; plus copies, cut-off files and non-images, so every rule runs), wall and CPU time.
  Also counted: the bytes sha256 hashed during the step (each image's bytes were hashed
  twice), and whether both versions write byte-identical images/quarantine tables, for that
  shard and for a manifest shard naming the same files (half through a folder link).
- flat folder: a run over 20,000 loose files cut into shards of ~1,000 (before: 20 by position,
  `root-00000`...; now where the names say, `root`, `root-IMG_001234`, ...): `scan_source`,
  then per shard its progress count and every record (the files are tiny, so this is the
  listing work plus 20,000 small reads, the same for both). Also counted: how many times the
  top folder is listed.
- flat folder growth: the shards a run must redo (a new id, or an id whose images changed)
  after 10 photos are added to that folder: a burst sorting together in the middle
  (`IMG_010000_0.jpg`...), and 10 edits spread over it (`IMG_001000_edit.jpg`, ...).
- manifest gallery: `megapairs search`'s listing of a `.jsonl` manifest of 20,000 rows of
  2-4 KB files (`gallery_from_path`), and the query-copy check for one image query
  (`identical_rows`), which now reads only the rows of the query's size.
- search gallery key: what every `megapairs search --gallery` does before it can use cached
  embeddings, listing the gallery and building its cache key (`gallery_cache_key`), for the
  flat folder (20,000 files) and the manifest gallery: seconds, and `os.stat` calls per image
  (each folder image was stat'ed twice, once to list it and once for the key).

Writes benchmarks/results/corpus_read.json (not with --quick). Scratch data goes to a temporary
folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._machine import REPO_ROOT, export_package, run_json_child, write_result

DEFAULT_BASELINE = "c143cf4"
PHOTO_SIZE_PX = (1024, 768)
DISTINCT_PICTURES = 16

# Runs in a fresh interpreter; argv: code root, task, JSON arguments. Prints one JSON line.
_CHILD = r"""
import hashlib, json, sys, time
code_root, task, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, code_root)
hashed = [0]
real_sha256 = hashlib.sha256
def counting_sha256(data=b"", **kwargs):
    hashed[0] += len(data)
    return real_sha256(data, **kwargs)
hashlib.sha256 = counting_sha256  # looked up at call time by the corpus code
import megapairs_assets
assert megapairs_assets.__file__.startswith(code_root), megapairs_assets.__file__
from pathlib import Path
from megapairs_assets.corpus import sources
answer = {}

cpu = []
def best(repeats, work):
    times = []
    cpu.clear()
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        result = work()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return min(times), result

if task == "step":
    from megapairs_assets.corpus.images import ImageLimits
    from megapairs_assets.corpus.step import build_corpus_shard
    from megapairs_assets.lib.storage import DataLayout
    from megapairs_assets.lineage.catalog import LineageCatalog
    spec = sources.SourceSpec("folder", args["corpus"])
    layout = DataLayout(Path(args["home"]))
    catalog = LineageCatalog(layout.home / "catalog.duckdb")
    quiet = lambda message: None
    build_corpus_shard("warm", spec, ImageLimits(), layout, catalog, log=quiet)
    hashed[0] = 0
    result = build_corpus_shard(args["shard"], spec, ImageLimits(), layout, catalog, log=quiet)
    answer["bytes_hashed"] = hashed[0]
    answer["row_counts"] = result.row_counts
    answer["tables_sha256"] = {
        name: real_sha256(Path(path).read_bytes()).hexdigest()
        for name, path in sorted(result.outputs.items())
    }
    manifest = sources.SourceSpec("manifest", args["manifest"], shard_size=10**6)
    by_manifest = build_corpus_shard("00000", manifest, ImageLimits(), layout, catalog, log=quiet)
    answer["manifest_row_counts"] = by_manifest.row_counts
    answer["manifest_tables_sha256"] = {
        name: real_sha256(Path(path).read_bytes()).hexdigest()
        for name, path in sorted(by_manifest.outputs.items())
    }
    limits = ImageLimits()
    step = lambda: build_corpus_shard(args["shard"], spec, limits, layout, catalog, log=quiet)
    answer["seconds"] = best(args["repeats"], step)[0]
    answer["cpu_seconds"] = min(cpu)  # steadier than wall time on a shared machine
elif task == "flat":
    spec = sources.SourceSpec("folder", args["corpus"], shard_size=args["shard_size"])
    listed = [0]
    real_entries = sources._folder_entries
    def counting_entries(folder):
        listed[0] += 1
        return real_entries(folder)
    sources._folder_entries = counting_entries
    shared = hasattr(sources, "SourceListings")
    def run():
        extra = (sources.SourceListings(),) if shared else ()
        shards = sources.scan_source(spec, *extra).shards
        records = 0
        for shard in shards:
            sources.count_shard_records(spec, shard, *extra)
            records += sum(1 for _ in sources.iter_shard_records(spec, shard, *extra))
        return len(shards), records
    run()  # warm: the file system's caches, imports
    listed[0] = 0
    answer["shards"], answer["records"] = run()
    answer["listings_per_run"] = listed[0]
    answer["seconds"] = best(args["repeats"], run)[0]
elif task == "growth":
    spec = sources.SourceSpec("folder", args["corpus"], shard_size=args["shard_size"])
    def shards():
        extra = (sources.SourceListings(),) if hasattr(sources, "SourceListings") else ()
        return {
            shard: [record.key for record in sources.iter_shard_records(spec, shard, *extra)]
            for shard in sources.scan_source(spec, *extra).shards
        }
    before = shards()
    folder = Path(args["corpus"])
    for scenario, names in args["scenarios"].items():
        try:
            for name in names:
                (folder / name).write_bytes(b"new")
            after = shards()
        finally:
            for name in names:
                (folder / name).unlink(missing_ok=True)
        answer[scenario] = {
            "shards_before": len(before),
            "shards_after": len(after),
            "redo": sum(1 for shard, keys in after.items() if before.get(shard) != keys),
            "retired": len(before.keys() - after.keys()),
        }
elif task == "manifest":
    from megapairs_assets.retriever.search import gallery_from_path, identical_rows
    gallery_from_path(Path(args["manifest"]))  # warm: the manifest parse, the page cache
    seconds, gallery = best(args["repeats"], lambda: gallery_from_path(Path(args["manifest"])))
    answer["seconds"], answer["items"] = seconds, len(gallery.items)
    query = Path(args["query"])
    copies_s, found = best(args["repeats"], lambda: identical_rows(gallery, [query]))
    answer["query_copies_seconds"], answer["query_copies"] = copies_s, len(found[query])
elif task == "search_key":
    import os, types
    from megapairs_assets.retriever.search import gallery_cache_key, gallery_from_path
    stats = [0]
    real_stat = os.stat
    def counting_stat(*a, **k):
        stats[0] += 1
        return real_stat(*a, **k)
    os.stat = counting_stat  # Path.stat/is_file/exists call it too
    # The key reads only these of a retriever: no model is loaded.
    spec = types.SimpleNamespace(fingerprint=lambda: "bench")
    retriever = types.SimpleNamespace(retriever_id="bench", spec=spec, dtype="torch.float32")
    key = lambda: gallery_cache_key(retriever, gallery_from_path(Path(args["gallery"])))
    key()  # warm: imports, the page cache
    stats[0] = 0
    answer["gallery_version"] = key().gallery_version
    answer["stats"] = stats[0]
    answer["seconds"] = best(args["repeats"], key)[0]
print(json.dumps(answer))
"""


def unique_jpeg(picture: bytes, index: int) -> bytes:
    """`picture` (a JPEG) with a comment segment naming `index`: same pixels, other bytes."""
    text = b"megapairs bench %d" % index
    return picture[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + picture[2:]


def write_step_corpus(root: Path, images: int) -> Path:
    """Folder corpus with shard `photos` (`images` photos with captions, 1% copies, 1% cut-off
    JPEGs, 0.5% non-images) and a 4-photo warm-up shard `warm`; beside it `manifest.jsonl`
    naming the same files (half through a folder link, plus a missing file)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from image_factory import good_jpeg_bytes

    pictures = [good_jpeg_bytes(seed, PHOTO_SIZE_PX) for seed in range(DISTINCT_PICTURES)]
    for shard, count in (("photos", images), ("warm", 4)):
        folder = root / shard
        folder.mkdir(parents=True)
        for index in range(count):
            data = unique_jpeg(pictures[index % DISTINCT_PICTURES], index)
            (folder / f"{index:06d}.jpg").write_bytes(data)
            (folder / f"{index:06d}.txt").write_text(f"photo {index} of a holiday at the sea")
    folder = root / "photos"
    for index in range(images // 100):
        copy = unique_jpeg(pictures[index % DISTINCT_PICTURES], index)
        (folder / f"copy_{index:04d}.jpg").write_bytes(copy)
        (folder / f"cut_{index:04d}.jpg").write_bytes(copy[: len(copy) // 2])
    for index in range(images // 200):
        (folder / f"text_{index:04d}.png").write_bytes(b"not a picture %d" % index)
    (root.parent / "photos_link").symlink_to(folder)
    pictures_only = sorted(path.name for path in folder.iterdir() if path.suffix != ".txt")
    names = [*pictures_only, "never_written.jpg"]
    lines = [
        json.dumps({"path": f"{('step/photos', 'photos_link')[n % 2]}/{name}", "caption": name})
        for n, name in enumerate(names)
    ]
    (root.parent / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_flat_folder(folder: Path, files: int) -> Path:
    """`files` loose tiny files `IMG_<n>.jpg` (the listing is measured, not decoding)."""
    folder.mkdir(parents=True)
    for index in range(files):
        (folder / f"IMG_{index:06d}.jpg").write_bytes(b"%d" % index)
    return folder


def growth_scenarios(files: int) -> dict[str, list[str]]:
    """10 photos added to `write_flat_folder(files)`: a burst sorting together in the middle,
    and 10 edits spread evenly over the folder."""
    middle = files // 2
    spread = [files * (2 * part + 1) // 20 for part in range(10)]
    return {
        "burst": [f"IMG_{middle:06d}_{index}.jpg" for index in range(10)],
        "spread": [f"IMG_{index:06d}_edit.jpg" for index in spread],
    }


def write_manifest_gallery(root: Path, rows: int) -> tuple[Path, Path]:
    """(manifest, a query file that is a copy of row 7): `rows` files of 2-4 KB, .jsonl."""
    images = root / "images"
    images.mkdir(parents=True)
    chance = random.Random(0)
    lines = []
    for index in range(rows):
        name = f"{index:06d}.jpg"
        (images / name).write_bytes(os.urandom(chance.randint(2048, 4096)))
        lines.append(json.dumps({"path": f"images/{name}", "caption": f"photo {index}"}))
    manifest = root / "gallery.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    query = root / "query.jpg"
    query.write_bytes((images / "000007.jpg").read_bytes())
    return manifest, query


def measure(code_root: Path, task: str, arguments: dict) -> dict:
    """One fresh process running `task` with the package under `code_root`."""
    command = [sys.executable, "-c", _CHILD, str(code_root), task, json.dumps(arguments)]
    return run_json_child(command, f"{task} with {code_root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE, help="git commit before")
    parser.add_argument("--quick", action="store_true", help="a tenth of the data; no JSON")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    step_images, flat_files, manifest_rows = 2_000 // scale, 20_000 // scale, 20_000 // scale
    shard_size, repeats = 1_000 // scale, 3
    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_corpus_read_") as scratch:
        root = Path(scratch)
        codes = {
            "before": export_package(args.baseline_ref, root / "baseline"),
            "now": REPO_ROOT,
        }
        corpus = write_step_corpus(root / "step", step_images)
        flat = write_flat_folder(root / "flat", flat_files)
        manifest, query = write_manifest_gallery(root / "manifest", manifest_rows)
        for label, code_root in codes.items():
            step = {
                "corpus": str(corpus),
                "shard": "photos",
                "home": str(root / f"home-{label}"),
                "manifest": str(root / "manifest.jsonl"),
            }
            flat_args = {"corpus": str(flat), "shard_size": shard_size}
            growth = {**flat_args, "scenarios": growth_scenarios(flat_files)}
            gallery = {"manifest": str(manifest), "query": str(query)}
            results[label] = {
                "corpus_step": measure(code_root, "step", {**step, "repeats": repeats}),
                "flat_folder": measure(code_root, "flat", {**flat_args, "repeats": repeats}),
                "flat_folder_growth": measure(code_root, "growth", growth),
                "manifest_gallery": measure(code_root, "manifest", {**gallery, "repeats": 3}),
                "folder_gallery_key": measure(
                    code_root, "search_key", {"gallery": str(flat), "repeats": 3}
                ),
                "manifest_gallery_key": measure(
                    code_root, "search_key", {"gallery": str(manifest), "repeats": 3}
                ),
            }
    before, now = results["before"], results["now"]
    identical = all(
        before["corpus_step"][name] == now["corpus_step"][name]
        for name in ("tables_sha256", "manifest_tables_sha256", "row_counts", "manifest_row_counts")
    )
    ratios = {
        "corpus_step": before["corpus_step"]["seconds"] / now["corpus_step"]["seconds"],
        "corpus_step_cpu": before["corpus_step"]["cpu_seconds"] / now["corpus_step"]["cpu_seconds"],
        "flat_folder": before["flat_folder"]["seconds"] / now["flat_folder"]["seconds"],
        "manifest_gallery": before["manifest_gallery"]["seconds"]
        / now["manifest_gallery"]["seconds"],
        "folder_gallery_key": before["folder_gallery_key"]["seconds"]
        / now["folder_gallery_key"]["seconds"],
    }
    for label in ("before", "now"):
        step, flat_run, gallery = (
            results[label]["corpus_step"],
            results[label]["flat_folder"],
            results[label]["manifest_gallery"],
        )
        print(
            f"{label:6s} corpus step ({step_images} photos + bad/copies): {step['seconds']:.2f} s "
            f"({step['cpu_seconds']:.2f} s CPU), "
            f"{step['bytes_hashed'] / 2**20:.0f} MiB hashed, rows {step['row_counts']}; "
            f"manifest shard of the same files: rows {step['manifest_row_counts']}"
        )
        print(
            f"{label:6s} flat folder {flat_files} files, {flat_run['shards']} shards: "
            f"{flat_run['seconds']:.2f} s a run, {flat_run['listings_per_run']} listings"
        )
        for scenario, grown in results[label]["flat_folder_growth"].items():
            print(
                f"{label:6s} flat folder + 10 photos ({scenario}): {grown['redo']} of "
                f"{grown['shards_after']} shards to redo, {grown['retired']} retired"
            )
        print(
            f"{label:6s} manifest gallery {gallery['items']} rows: listing {gallery['seconds']:.3f}"
            f" s; query-copy check {gallery['query_copies_seconds'] * 1e3:.1f} ms"
            f" ({gallery['query_copies']} copy)"
        )
        for name, images in (("folder", flat_files), ("manifest", manifest_rows)):
            keyed = results[label][f"{name}_gallery_key"]
            print(
                f"{label:6s} {name} gallery {images} images, listing + cache key: "
                f"{keyed['seconds']:.3f} s, {keyed['stats'] / images:.2f} os.stat per image"
            )
    print(
        "before/now: "
        + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
        + f"; tables (folder and manifest shard) byte-identical: {identical}"
    )
    print(f"({time.perf_counter() - started:.0f} s in all)")
    if not identical:
        raise SystemExit("the corpus tables differ between before and now")
    for name in ("folder_gallery_key", "manifest_gallery_key"):
        if before[name]["gallery_version"] != now[name]["gallery_version"]:
            raise SystemExit(f"{name}: the search cache key differs between before and now")
    if not args.quick:
        payload = {
            "baseline_ref": args.baseline_ref,
            "sizes": {
                "step_images": step_images,
                "flat_files": flat_files,
                "shard_size": shard_size,
                "manifest_rows": manifest_rows,
            },
            "results": results,
            "before_over_now": {name: round(ratio, 2) for name, ratio in ratios.items()},
            "tables_byte_identical": identical,
        }
        print(f"wrote {write_result('corpus_read', payload)}")


if __name__ == "__main__":
    main()

"""Peak memory of the corpus step on one shard, and how it grows with the shard's size.

    python -m benchmarks.bench_corpus_memory [--sizes 1000 5000] [--baseline-ref REF] [--quick]

Writes one folder shard (`<n>.jpg` + `<n>.txt`) and one webdataset tar (`.jpg`, `.txt`,
`.json` per sample) of `--sizes` photo-sized JPEGs (1024x768, ~200 KB each; 16 distinct
pictures, each file made unique by a JPEG comment, so no two share a content hash) and runs
`build_corpus_shard` on each in a fresh process, which reports:

- peak RSS during the step above the RSS just before it (libraries already imported and
  warmed on a 4-image shard), in MiB;
- the Python heap's peak (tracemalloc) during the step, in a second fresh process (tracing
  slows the step and adds its own memory, so it never shares a run with the RSS figure).

The marginal cost per image is (peak at the largest size - peak at the smallest) / (size
difference): what each further image of a shard adds. An image's bytes and pixels are held
only while it is checked, so that figure is the table's rows, the duplicate indexes and the
folder listing or tar index, not pictures. With `--baseline-ref REF` the `megapairs_assets`
package as it was at git commit REF is measured too, in the same run on the same files, and
the ratios before / now are printed (without it, only now). The recorded result compares
against a4e918e, the commit before the memory changes.

Writes benchmarks/results/corpus_memory.json (not with --quick). Timings are noisy on a shared
machine; memory figures are steadier (RSS within about 1 MiB from run to run).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks._machine import REPO_ROOT, export_package, run_json_child, write_result

PHOTO_SIZE_PX = (1024, 768)
DISTINCT_PICTURES = 16

# Run in a fresh interpreter with the code root first on sys.path; argv: code root, corpus kind,
# corpus path, shard, home, "rss" | "trace", repository root (for benchmarks._machine), warm-up
# corpus path, warm-up shard. Prints one JSON line.
_CHILD = r"""
import json, sys, time, tracemalloc
code_root, kind, path, shard, home, mode = sys.argv[1:7]
sys.path.insert(0, code_root)
sys.path.insert(1, sys.argv[7])
from benchmarks._machine import current_rss_mib, peak_rss_mib, reset_peak_rss
from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import SourceSpec
from megapairs_assets.corpus.step import build_corpus_shard
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog
import megapairs_assets
assert megapairs_assets.__file__.startswith(code_root), megapairs_assets.__file__
spec = SourceSpec(kind, path)
from pathlib import Path
layout = DataLayout(Path(home))
catalog = LineageCatalog(layout.home / "catalog.duckdb")
quiet = lambda message: None
# Warm-up on the same code paths (imports, decoder, parquet writer, catalog query).
warm = SourceSpec(kind, sys.argv[8])
build_corpus_shard(sys.argv[9], warm, ImageLimits(), layout, catalog, log=quiet)
import gc; gc.collect()
reset_peak_rss()
rss_before = current_rss_mib()
if mode == "trace":
    tracemalloc.start()
started = time.perf_counter()
result = build_corpus_shard(shard, spec, ImageLimits(), layout, catalog, log=quiet)
seconds = time.perf_counter() - started
answer = {"seconds": round(seconds, 2), "row_counts": result.row_counts}
if mode == "trace":
    answer["python_heap_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
else:
    answer["rss_peak_above_start_mib"] = round(peak_rss_mib() - rss_before, 1)
    answer["rss_start_mib"] = round(rss_before, 1)
print(json.dumps(answer))
"""


def unique_jpeg(picture: bytes, index: int) -> bytes:
    """`picture` (a JPEG) with a comment segment naming `index`: same pixels, other bytes."""
    text = b"megapairs bench %d" % index
    return picture[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + picture[2:]


def photo_bytes(count: int) -> list[bytes]:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from image_factory import good_jpeg_bytes

    return [good_jpeg_bytes(seed, PHOTO_SIZE_PX) for seed in range(count)]


def write_corpora(root: Path, size: int, pictures: list[bytes]) -> dict[str, tuple[str, str]]:
    """kind -> (corpus path, shard id) of a folder shard and a tar shard of `size` photos."""
    folder = root / f"folder{size}" / "photos"
    folder.mkdir(parents=True)
    tar_root = root / f"wds{size}"
    tar_root.mkdir()
    with tarfile.open(tar_root / "00000.tar", "w") as tar:
        for index in range(size):
            data = unique_jpeg(pictures[index % len(pictures)], index)
            caption = f"photo {index} of a holiday at the sea".encode()
            (folder / f"{index:06d}.jpg").write_bytes(data)
            (folder / f"{index:06d}.txt").write_bytes(caption)
            metadata = json.dumps({"key": f"{index:06d}", "caption": caption.decode()}).encode()
            for name, payload in (("jpg", data), ("txt", caption), ("json", metadata)):
                info = tarfile.TarInfo(f"{index:06d}.{name}")
                info.size, info.mtime = len(payload), 1_700_000_000
                tar.addfile(info, io.BytesIO(payload))
    return {"folder": (str(folder.parent), "photos"), "webdataset": (str(tar_root), "00000")}


def measure(
    code_root: Path,
    kind: str,
    corpus: tuple[str, str],
    warm: tuple[str, str],
    home: Path,
    mode: str,
) -> dict:
    """One fresh process running `build_corpus_shard` with the package under `code_root`."""
    command = [
        sys.executable,
        "-c",
        _CHILD,
        str(code_root),
        kind,
        corpus[0],
        corpus[1],
        str(home),
        mode,
        str(REPO_ROOT),
        warm[0],
        warm[1],
    ]
    return run_json_child(command, f"{kind} {mode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--baseline-ref", default=None, help="git commit to compare against")
    parser.add_argument("--quick", action="store_true", help="100 and 400 images; no JSON")
    args = parser.parse_args()
    sizes = [100, 400] if args.quick else sorted(args.sizes)
    codes = {"now": REPO_ROOT}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_corpus_memory_") as scratch:
        root = Path(scratch)
        if args.baseline_ref:
            codes = {"before": export_package(args.baseline_ref, root / "baseline"), **codes}
        pictures = photo_bytes(DISTINCT_PICTURES)
        corpora = {size: write_corpora(root, size, pictures) for size in sizes}
        warm = write_corpora(root, 4, pictures)
        results: dict = {}
        for label, code_root in codes.items():
            for kind in ("folder", "webdataset"):
                by_size = {}
                for size in sizes:
                    home = root / f"home-{label}-{kind}-{size}"
                    rss = measure(code_root, kind, corpora[size][kind], warm[kind], home, "rss")
                    heap = measure(code_root, kind, corpora[size][kind], warm[kind], home, "trace")
                    assert rss["row_counts"]["images"] == size, rss
                    by_size[size] = {
                        **rss,
                        **{"python_heap_peak_mib": heap["python_heap_peak_mib"]},
                    }
                    print(
                        f"{label:6s} {kind:10s} {size:6d} images: peak RSS +"
                        f"{rss['rss_peak_above_start_mib']:.1f} MiB, Python heap peak "
                        f"{heap['python_heap_peak_mib']:.1f} MiB, {rss['seconds']:.1f} s"
                    )
                small, large = sizes[0], sizes[-1]
                span = max(large - small, 1)
                results.setdefault(label, {})[kind] = {
                    "by_size": by_size,
                    "rss_kib_per_image": round(
                        (
                            by_size[large]["rss_peak_above_start_mib"]
                            - by_size[small]["rss_peak_above_start_mib"]
                        )
                        * 1024
                        / span,
                        2,
                    ),
                    "python_heap_kib_per_image": round(
                        (
                            by_size[large]["python_heap_peak_mib"]
                            - by_size[small]["python_heap_peak_mib"]
                        )
                        * 1024
                        / span,
                        2,
                    ),
                }
                figures = results[label][kind]
                print(
                    f"{label:6s} {kind:10s} per further image: RSS "
                    f"{figures['rss_kib_per_image']:.2f} KiB, Python heap "
                    f"{figures['python_heap_kib_per_image']:.2f} KiB"
                )
    if "before" in results:
        for kind in ("folder", "webdataset"):
            before, now = results["before"][kind], results["now"][kind]
            large = sizes[-1]
            ratio = before["by_size"][large]["python_heap_peak_mib"] / max(
                now["by_size"][large]["python_heap_peak_mib"], 1e-6
            )
            results.setdefault("ratio_before_over_now", {})[kind] = {
                f"python_heap_peak_at_{large}": round(ratio, 2),
                f"rss_peak_at_{large}": round(
                    before["by_size"][large]["rss_peak_above_start_mib"]
                    / max(now["by_size"][large]["rss_peak_above_start_mib"], 1e-6),
                    2,
                ),
            }
            print(
                f"{kind}: before / now at {large} images: {results['ratio_before_over_now'][kind]}"
            )
    payload = {
        "sizes": sizes,
        "photo_size_px": list(PHOTO_SIZE_PX),
        "baseline_ref": args.baseline_ref,
        "commit": subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
        "load_average_end": os.getloadavg()[0],
        "wall_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    if not args.quick:
        print(f"wrote {write_result('corpus_memory', payload)}")


if __name__ == "__main__":
    main()

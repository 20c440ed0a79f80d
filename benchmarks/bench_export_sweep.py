"""The release export's unused-image sweep when every shard re-exports, old way against new.

    python -m benchmarks.bench_export_sweep [--shards 50 200 400] [--list-len 1500]
        [--changed 0.07] [--old-sample 40] [--quick]

The scene the scale audit measured: a release folder of N exported shards, each naming
`--list-len` images (a third its own, the rest from other shards, as the global KNN pairs
do); a shard is added and every old shard re-exports with `--changed` of its images swapped
for others. Only the folder's bookkeeping is timed (the image lists, the sweep and the images
it deletes), not the JPEG work, which is the same both ways.

- old (the function before this change, kept here as the baseline): each shard's export ends
  with a sweep of what it stopped naming, which reads every shard's image list. Its cost per
  shard does not depend on which shard it is, so it is timed over the first `--old-sample`
  shards and multiplied out to N (said so in the output); with the sample >= N it runs all.
- new: each export journals what it stopped naming (`_narrow_named_images`) and runs the
  folder update (`update_release_folder`, no card), which sweeps only when the journal has
  reached SWEEP_PENDING_FRACTION of the lists' entries; then one forced sweep
  (`sweep_unused_images`, as before publishing) so both end with the same folder, which is
  checked: of the images some shard stopped naming, exactly those another still names are
  left.

Printed and saved: seconds per variant at each N, the number of passes over the lists, and the
ratio old / new. Writes benchmarks/results/export_sweep.json; `--quick` (N = 20, 60; lists of
300) writes nothing.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

import megapairs_assets.generation.export as export
from benchmarks._machine import write_result
from benchmarks.bench_embedding import code_commit
from megapairs_assets.lib.storage import DataLayout


def image(shard: int, key: int) -> str:
    return f"images/{shard:05d}/{key:09d}.jpg"


def build_folder(root: Path, shards: int, list_len: int, seed: int) -> dict[str, set[str]]:
    """N shards' image lists (a third own images, the rest other shards'); returns them."""
    rng = random.Random(seed)
    own = list_len // 3
    lists: dict[str, set[str]] = {}
    for s in range(shards):
        named = {image(s, k) for k in range(own)}
        while len(named) < list_len:
            other = rng.randrange(shards)
            named.add(image(other, own + rng.randrange(3 * list_len)))
        lists[f"{s:05d}"] = named
        export._write_named_images(root, f"{s:05d}", named)
    return lists


def re_export_plan(
    lists: dict[str, set[str]], changed: float, seed: int
) -> list[tuple[str, set[str], set[str]]]:
    """(shard, named before, named after) for every shard: `changed` of its images swapped for
    new images of the added shard (its number is N)."""
    rng = random.Random(seed + 1)
    added = len(lists)
    plan = []
    for shard, named in lists.items():
        gone = set(rng.sample(sorted(named), round(changed * len(named))))
        new = {image(added, rng.randrange(10 * len(named))) for _ in gone}
        plan.append((shard, named, (named - gone) | new))
    return plan


def touch(root: Path, relpaths: set[str]) -> None:
    """The images exist (what the sweep deletes is a real file)."""
    for relpath in relpaths:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def old_way(root: Path, layout: DataLayout, plan: list[tuple[str, set[str], set[str]]]) -> int:
    """The export's folder bookkeeping before the sweep journal: widen, narrow, then sweep what
    this shard stopped naming under the folder's lock (one read of every list per shard)."""
    lock = export.card_lock_path(layout, root)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for shard, before, after in plan:
        export._write_named_images(root, shard, before | after)
        export._write_named_images(root, shard, after)
        with FileLock(str(lock)):
            export.remove_unused_images(root, (before | after) - after)
    return len(plan)


def new_way(root: Path, layout: DataLayout, plan: list[tuple[str, set[str], set[str]]]) -> None:
    """The export's folder bookkeeping now: widen, journal and narrow, the folder update."""
    settings: Any = None  # read only to write the card, which is not written here
    for shard, before, after in plan:
        export._write_named_images(root, shard, before | after)
        export._narrow_named_images(root, layout, shard, before | after, after)
        export.update_release_folder(root, settings, layout, write_card=False)


def counting_passes() -> list[int]:
    """Count the passes over the lists (`_named_among` calls) from here on."""
    passes: list[int] = []
    original = export._named_among

    def counted(root, wanted):
        passes.append(len(wanted))
        return original(root, wanted)

    export._named_among = counted
    return passes


def images_on_disk(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / "images").rglob("*.jpg")}


def measure(shards: int, list_len: int, changed: float, old_sample: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-export-sweep-") as tmp:
        base = Path(tmp) / "base"
        lists = build_folder(base, shards, list_len, seed=shards)
        plan = re_export_plan(lists, changed, seed=shards)
        # Only the images some shard stops naming exist as files: the sweep never looks at
        # the others, and 400 shards' worth would be half a million empty files.
        dropped = {p for _, before, after in plan for p in before - after}
        touch(base, dropped)
        old_root, new_root = Path(tmp) / "old", Path(tmp) / "new"
        shutil.copytree(base, old_root)
        shutil.copytree(base, new_root)
        layout = DataLayout(Path(tmp) / "home")

        passes = counting_passes()
        sample = plan[: min(old_sample, shards)]
        start = time.perf_counter()
        old_way(old_root, layout, sample)
        old_s = (time.perf_counter() - start) * shards / len(sample)
        old_passes = len(passes)

        # The new way from its steady state: a sweep has counted the folder before.
        export._write_journal(new_root, {image(shards + 1, 0)})
        export.sweep_unused_images(new_root, layout)
        passes.clear()
        start = time.perf_counter()
        new_way(new_root, layout, plan)
        step_s = time.perf_counter() - start
        step_passes = len(passes)
        start = time.perf_counter()
        export.sweep_unused_images(new_root, layout)
        final_s = time.perf_counter() - start

        kept = dropped & {p for _, _, after in plan for p in after}  # still named elsewhere
        assert images_on_disk(new_root) == kept, "the new way left the wrong images"
        if len(sample) == shards:
            assert images_on_disk(old_root) == kept, "the old way left the wrong images"
    new_s = step_s + final_s
    return {
        "shards": shards,
        "list_len": list_len,
        "changed_per_shard": round(changed * list_len),
        "old_s": round(old_s, 3),
        "old_timed_shards": len(sample),
        "old_passes_over_lists": shards if len(sample) < shards else old_passes,
        "new_s": round(new_s, 3),
        "new_step_s": round(step_s, 3),
        "new_final_sweep_s": round(final_s, 3),
        "new_passes_over_lists": step_passes + 1,
        "ratio_old_over_new": round(old_s / new_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[50, 200, 400])
    parser.add_argument("--list-len", type=int, default=1500)
    parser.add_argument("--changed", type=float, default=0.07)
    parser.add_argument("--old-sample", type=int, default=40)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.shards, args.list_len = [20, 60], 300
    rows = []
    for shards in args.shards:
        row = measure(shards, args.list_len, args.changed, args.old_sample)
        rows.append(row)
        sampled = (
            f" (timed over {row['old_timed_shards']} shards, x{shards / row['old_timed_shards']:g})"
            if row["old_timed_shards"] < shards
            else ""
        )
        print(
            f"{shards:>6} shards x {args.list_len} images, {row['changed_per_shard']} changed "
            f"each: old {row['old_s']:.2f} s{sampled}, {row['old_passes_over_lists']} passes | "
            f"new {row['new_s']:.2f} s ({row['new_step_s']:.2f} s re-exports + "
            f"{row['new_final_sweep_s']:.2f} s final sweep), {row['new_passes_over_lists']} "
            f"passes | old/new {row['ratio_old_over_new']}x",
            flush=True,
        )
    if not args.quick:
        result = {
            "benchmark": "export_sweep",
            "commit": code_commit(),
            "sweep_pending_fraction": export.SWEEP_PENDING_FRACTION,
            "rows": rows,
        }
        print(f"wrote {write_result('export_sweep', result)}")


if __name__ == "__main__":
    main()

"""A growing flat folder of photos keeps its shards.

A folder's loose images beyond `shard_size` are cut where their sorted names say
(`cut_loose_images`: content-defined, as rsync and FastCDC cut bytes), and each shard is named
by its first image, so a photo added or removed in the middle changes the one shard it falls
in, not every shard after it (which would redo every downstream table of those shards). Shard
size 10 here, so a few dozen tiny images make several shards.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
from image_factory import unique_tiny_jpeg_bytes, write_loose_photos

from megapairs_assets.corpus.sources import (
    ShardReadError,
    SourceListings,
    SourceSpec,
    count_shard_records,
    cut_loose_images,
    is_cut_name,
    iter_shard_records,
    loose_shard_bounds,
    scan_source,
)
from megapairs_assets.lib.storage import is_safe_partition_key

SHARD_SIZE = 10
FEWEST, MOST = loose_shard_bounds(SHARD_SIZE)
PHOTOS = 80


def _shards(spec: SourceSpec) -> dict[str, list[str]]:
    """Shard id -> the keys it reads, as one run of the corpus step lists and reads them."""
    listings = SourceListings()
    shards = {}
    for shard in scan_source(spec, listings).shards:
        keys = [record.key for record in iter_shard_records(spec, shard, listings)]
        assert count_shard_records(spec, shard, listings) == len(keys)
        shards[shard] = keys
    return shards


def _changed(before: dict[str, list[str]], after: dict[str, list[str]]) -> set[str]:
    """Ids whose shard is not in both with the same records: the shards to redo or retire."""
    return {
        shard for shard in before.keys() | after.keys() if before.get(shard) != after.get(shard)
    }


def _read_once(shards: dict[str, list[str]], keys: list[str]) -> None:
    read = [key for records in shards.values() for key in records]
    assert sorted(read) == sorted(keys)  # every image, and none by two shards


@pytest.fixture
def photos(tmp_path: Path) -> tuple[SourceSpec, dict[str, list[str]]]:
    folder = tmp_path / "export"
    write_loose_photos(folder, PHOTOS, caption_every=PHOTOS)
    spec = SourceSpec("folder", str(folder), shard_size=SHARD_SIZE)
    shards = _shards(spec)
    assert len(shards) >= 5
    return spec, shards


def _middle_shard(shards: dict[str, list[str]]) -> str:
    """A shard away from both ends, in name order of its first image."""
    ordered = sorted((records[0], shard) for shard, records in shards.items())
    return ordered[len(ordered) // 2][1]


def _name(stem: str, is_cut: bool) -> str:
    """The first `<stem>_edit<n>.jpg` that is (or is not) a cut name at SHARD_SIZE."""
    for number in range(1_000):
        name = f"{stem}_edit{number}.jpg"
        if is_cut_name(name, SHARD_SIZE) == is_cut:
            return name
    raise AssertionError(f"no {'cut' if is_cut else 'plain'} name for {stem}")


def _piece_after(names: list[str], start: int) -> int:
    """How many names from `start` on come before the next cut name."""
    stop = start + 1
    while stop < len(names) and not is_cut_name(names[stop], SHARD_SIZE):
        stop += 1
    return stop - start


def test_adding_a_photo_in_the_middle_changes_only_the_shard_it_falls_in(photos):
    spec, before = photos
    shard = _middle_shard(before)
    head = before[shard][0]
    assert shard == f"root-{head}" and len(before[shard]) < MOST
    # `IMG_00040_edit0.jpg` sorts right after `IMG_00040.jpg`, inside the piece that piece heads.
    added = _name(head, is_cut=False)
    (Path(spec.path) / added).write_bytes(unique_tiny_jpeg_bytes(10_000))

    after = _shards(spec)

    assert _changed(before, after) == {shard}
    assert after[shard] == [head, added[:-4], *before[shard][1:]]
    _read_once(after, [key for keys in before.values() for key in keys] + [added[:-4]])
    # A photo sorting before all others joins the first shard, whose id never changes.
    first = Path(spec.path) / "AAA_scan.jpg"
    assert not is_cut_name(first.name, SHARD_SIZE)
    first.write_bytes(unique_tiny_jpeg_bytes(10_001))
    assert _changed(after, _shards(spec)) == {"root"}


def test_removing_a_photo_changes_only_the_shard_it_was_in(photos):
    spec, before = photos
    shard = _middle_shard(before)
    names = sorted(path.name for path in Path(spec.path).glob("*.jpg"))
    head = names.index(f"{before[shard][0]}.jpg")
    assert _piece_after(names, head) > FEWEST  # its first piece stays long enough to stand
    gone = before[shard][1]
    (Path(spec.path) / f"{gone}.jpg").unlink()

    after = _shards(spec)

    assert _changed(before, after) == {shard}
    assert after[shard] == [key for key in before[shard] if key != gone]


def test_a_new_cut_name_splits_one_shard_in_two(photos):
    spec, before = photos
    # The longest shard away from the first: room for two pieces of FEWEST images.
    shard = max((s for s in before if s != "root"), key=lambda s: len(before[s]))
    keys = before[shard]
    assert len(keys) >= 2 * FEWEST + 1
    middle = keys[len(keys) // 2]
    added = _name(middle, is_cut=True)
    names = sorted([*(path.name for path in Path(spec.path).glob("*.jpg")), added])
    assert _piece_after(names, names.index(added)) >= FEWEST  # long enough to stand alone
    (Path(spec.path) / added).write_bytes(unique_tiny_jpeg_bytes(10_002))

    after = _shards(spec)

    new_shard = f"root-{added[:-4]}"
    assert _changed(before, after) == {shard, new_shard}
    cut_at = keys.index(middle) + 1
    assert after[shard] == keys[:cut_at]
    assert after[new_shard] == [added[:-4], *keys[cut_at:]]


def test_removing_a_shards_first_photo_retires_its_id(photos):
    spec, before = photos
    shard = _middle_shard(before)
    ordered = sorted(before, key=lambda s: before[s][0])
    previous = ordered[ordered.index(shard) - 1]
    assert len(before[previous]) + len(before[shard]) - 1 <= MOST
    (Path(spec.path) / f"{before[shard][0]}.jpg").unlink()

    after = _shards(spec)

    # The shard's piece has no cut name left at its start: it joins the shard before.
    assert shard not in after
    assert _changed(before, after) == {shard, previous}
    assert after[previous] == before[previous] + before[shard][1:]
    # Its id is refused, so none of its images is read twice (by it and by `previous`).
    with pytest.raises(ShardReadError, match="missing_shard") as refused:
        list(iter_shard_records(spec, shard))
    assert refused.value.reason == "missing_shard"
    assert count_shard_records(spec, shard) is None


def _synthetic_names(count: int, seed: int) -> list[str]:
    """Sorted file names as cameras, scanners and phones write them, with odd characters."""
    chance = random.Random(seed)
    makers = (
        lambda n: f"IMG_{n:05d}.jpg",
        lambda n: f"DSC{n:04d}.JPG",
        lambda n: f"PXL_20240{chance.randint(1, 9)}{n:04d}.jpg",
        lambda n: f"scan {n} (copy).png",
        lambda n: f"été_{n}.jpeg",
        lambda n: "".join(chance.choices(string.ascii_letters, k=chance.randint(1, 40))) + ".png",
    )
    names = {chance.choice(makers)(n) for n in range(count * 2)}
    return sorted(names)[:count]


@pytest.mark.parametrize("shard_size", [2, 10, 20, 100])
def test_cut_sizes_stay_within_bounds_and_ids_are_safe_and_distinct(shard_size):
    names = _synthetic_names(2_000, seed=shard_size)
    fewest, most = loose_shard_bounds(shard_size)
    cuts = cut_loose_images(names, shard_size)
    assert cuts[0].start == 0 and cuts[-1].stop == len(names)
    assert all(a.stop == b.start for a, b in itertools.pairwise(cuts))
    assert all(fewest <= c.stop - c.start <= most for c in cuts)
    ids = [c.shard_id for c in cuts]
    assert ids[0] == "root" and len(set(ids)) == len(ids)
    assert all(is_safe_partition_key(shard) and shard.startswith("root-") for shard in ids[1:])
    assert 2_000 / (1.6 * shard_size) < len(cuts) < 2_000 / (0.8 * shard_size)


def test_adding_names_anywhere_re_cuts_at_most_the_neighbourhood():
    names = _synthetic_names(2_000, seed=7)
    before = {(c.shard_id, tuple(names[c.start : c.stop])) for c in cut_loose_images(names, 20)}
    chance = random.Random(11)
    one_shard = 0
    trials = 200
    for trial in range(trials):
        near = names[chance.randrange(len(names))]
        grown = sorted([*names, f"{near[:-4]}~{trial}.jpg"])
        cuts = cut_loose_images(grown, 20)
        after = {(c.shard_id, tuple(grown[c.start : c.stop])) for c in cuts}
        # The shard it falls in, plus at most the shard it splits off or joins (an even split
        # of an over-long run moves its parts, two here).
        assert len(before - after) <= 2 and len(after - before) <= 2
        one_shard += len(before - after) == 1 and len(after - before) == 1
    assert one_shard >= 0.8 * trials
    # The old positional cut (every 20 names) would re-cut every shard after the new name.


def test_the_cut_is_the_same_in_every_process():
    names = _synthetic_names(500, seed=3)
    here = [[c.shard_id, c.start, c.stop] for c in cut_loose_images(names, 10)]
    script = (
        "import json, sys\n"
        "from megapairs_assets.corpus.sources import cut_loose_images\n"
        "names = json.loads(sys.stdin.read())\n"
        "print(json.dumps([[c.shard_id, c.start, c.stop] for c in cut_loose_images(names, 10)]))"
    )
    for seed in ("1", "2"):
        environment = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(names),
            capture_output=True,
            text=True,
            env=environment,
            check=True,
            timeout=60,
        )
        assert json.loads(done.stdout) == here

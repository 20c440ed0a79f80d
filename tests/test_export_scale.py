"""The release folder's unused-image sweep scales with the images that changed, not with the
shard count: exports add what they stopped naming to a sweep journal, and a sweep (which reads
every shard's image list) runs only once the journal is worth it. Whatever the order, a crash
or parallel exports, no image a shard names is removed, and a forced sweep leaves exactly the
named ones (on local disk and on an S3 server started here)."""

from __future__ import annotations

import itertools
import logging
import random
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from fault_server import ChatServer
from generation_fixtures import http_settings, make_world, run_all, write_pairs

import megapairs_assets.generation.export as export
from megapairs_assets.generation.common import EXPORT_ASSET
from megapairs_assets.lib.storage import DataLayout, DataPath, data_root_path

SETTINGS = http_settings("http://127.0.0.1:9")  # never called: no card is written here


def image(shard: int, key: int) -> str:
    return f"images/{shard:05d}/{key:09d}.jpg"


def on_disk(root: DataPath) -> set[str]:
    base = str(root).rstrip("/")
    return {str(p).removeprefix(base + "/") for p in (root / "images").rglob("*.jpg")}


def touch(root: DataPath, relpaths: set[str]) -> None:
    for relpath in relpaths:
        path = root / relpath
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"jpeg")


def name(root: DataPath, shard: str, relpaths: set[str]) -> None:
    """Shard `shard` names `relpaths` (its image list), and the images exist."""
    export._write_named_images(root, shard, relpaths)
    touch(root, relpaths)


def re_export(root: DataPath, layout: DataLayout, shard: str, now: set[str]) -> int:
    """What an export does with the folder: widen the list, write the images, journal what it
    stopped naming, narrow the list, then the folder update; returns the images removed."""
    before = export._read_named_images(root, shard)
    export._write_named_images(root, shard, before | now)
    touch(root, now)
    export._narrow_named_images(root, layout, shard, before | now, now)
    return export.update_release_folder(root, SETTINGS, layout, write_card=False).images_removed


def every_named(root: DataPath) -> set[str]:
    return {
        p
        for listed in (root / "shards").glob(f"*{export.NAMED_IMAGES_SUFFIX}")
        for p in export._paths_in_list(listed).to_list()
    }


def journal(root: DataPath) -> list[DataPath]:
    return list((root / export.SWEEP_JOURNAL_DIR).glob("*.parquet"))


@pytest.fixture
def sweeps(monkeypatch) -> list[int]:
    """How many candidates each full pass over the image lists decided."""
    calls: list[int] = []
    original = export._named_among
    monkeypatch.setattr(
        export,
        "_named_among",
        lambda root, wanted: calls.append(len(wanted)) or original(root, wanted),
    )
    return calls


def folder_of(shards: int, per_shard: int, tmp_path: Path) -> tuple[Path, DataLayout]:
    """`shards` shards naming `per_shard` images each: half their own, half the next shard's."""
    root, layout = tmp_path / "export", DataLayout(tmp_path / "home")
    for s in range(shards):
        own = {image(s, k) for k in range(per_shard // 2)}
        nxt = {image((s + 1) % shards, k + per_shard // 2) for k in range(per_shard // 2)}
        name(root, f"{s:05d}", own | nxt)
    return root, layout


def test_an_export_journals_what_it_stopped_naming_and_sweeps_only_when_due(tmp_path, sweeps):
    root, layout = folder_of(20, 50, tmp_path)  # 1,000 list entries: due at 10 waiting
    touch(root, {image(99, 0)})
    export.note_unused_images(root, layout, {image(99, 0)})
    assert export.sweep_unused_images(root, layout) == 1  # counts the lists' entries
    assert sweeps == [1] and journal(root) == []

    # 00003 stops naming 7 images, two of which 00002 names too: they wait.
    also = {image(3, 0), image(3, 1)}
    name(root, "00002", export._read_named_images(root, "00002") | also)
    listed = export._read_named_images(root, "00003")
    dropped = {image(3, k) for k in range(5)} | {image(4, 25), image(4, 26)}
    assert re_export(root, layout, "00003", listed - dropped) == 0
    assert sweeps == [1] and len(journal(root)) == 1
    assert dropped <= on_disk(root)

    # 00005 stops naming 5 more: 12 waiting, a sweep is due and decides them all at once.
    listed = export._read_named_images(root, "00005")
    more = {image(5, k) for k in range(5)}
    assert re_export(root, layout, "00005", listed - more) == 10
    assert sweeps == [1, 12]
    assert on_disk(root) == every_named(root)
    assert also <= on_disk(root)
    assert journal(root) == [] and not (root / export.SWEEP_JOURNAL_DIR).exists()


def test_re_exporting_every_shard_reads_the_lists_a_few_times_not_once_per_shard(tmp_path, sweeps):
    shards, per_shard, changed = 30, 100, 6
    root, layout = folder_of(shards, per_shard, tmp_path)
    export.note_unused_images(root, layout, {image(99, 0)})
    export.sweep_unused_images(root, layout)
    sweeps.clear()
    rng = random.Random(7)
    for s in range(shards):  # each shard swaps `changed` of its images for new ones
        shard = f"{s:05d}"
        listed = sorted(export._read_named_images(root, shard))
        gone = set(rng.sample(listed, changed))
        new = {image(s, 1000 + k) for k in range(changed)}
        re_export(root, layout, shard, (set(listed) - gone) | new)
    # 180 journal entries, due every 30 (1% of 3,000): 6 passes over the lists, not 30.
    assert 0 < len(sweeps) <= shards * changed // (per_shard * shards // 100) + 1
    export.sweep_unused_images(root, layout)
    assert on_disk(root) == every_named(root)


def test_a_crash_mid_sweep_leaves_the_journal_for_the_next_one(tmp_path, monkeypatch):
    root, layout = folder_of(4, 10, tmp_path)
    dropped = {image(0, 0), image(0, 1)}
    export._write_named_images(root, "00000", export._read_named_images(root, "00000") - dropped)
    export.note_unused_images(root, layout, dropped)

    def killed(root, wanted):
        raise OSError("connection reset")

    with monkeypatch.context() as patch:
        patch.setattr(export, "_named_among", killed)
        with pytest.raises(OSError):
            export.sweep_unused_images(root, layout)
    assert len(journal(root)) == 1 and dropped <= on_disk(root)
    assert export.sweep_unused_images(root, layout) == 2
    assert on_disk(root) == every_named(root) and journal(root) == []


def test_a_crash_before_the_list_narrows_keeps_what_the_list_still_names(tmp_path):
    root, layout = folder_of(3, 10, tmp_path)
    listed = export._read_named_images(root, "00001")
    dropped = {image(1, 0), image(1, 1)}
    export.note_unused_images(root, layout, dropped)  # ... and the export died here
    assert export.sweep_unused_images(root, layout) == 0
    assert dropped <= on_disk(root)
    # Its re-run journals them again and narrows the list: now they go.
    assert re_export(root, layout, "00001", listed - dropped) == 2
    assert on_disk(root) == every_named(root)


def test_a_retired_shard_is_withdrawn_through_the_journal(tmp_path):
    root, layout = folder_of(3, 10, tmp_path)
    (root / "triplets").mkdir()
    (root / "triplets" / "00001.parquet").write_bytes(b"")
    touch(root, {image(1, 77)})  # in its folder, named by nobody
    shared = {image(1, k) for k in range(5, 10)}  # 00000 names these images of 00001
    assert shared <= export._read_named_images(root, "00000")

    update = export.update_release_folder(
        root, SETTINGS, layout, retired=["00001"], write_card=False
    )
    assert update.withdrawn == ["00001"]
    assert not (root / "triplets" / "00001.parquet").exists()
    assert on_disk(root) == every_named(root)
    assert shared <= on_disk(root) and image(1, 77) not in on_disk(root)
    assert journal(root) == []


def test_parallel_exports_never_remove_an_image_a_shard_names(tmp_path):
    """Four exporters re-export their shards, which name overlapping images, at once (each
    with its own lock object, as processes have); each export ends with its blocking check,
    re-writing a missing image as its re-run would. Every named image is there at the end,
    and a forced sweep then leaves exactly the named ones."""
    root, layout = folder_of(8, 12, tmp_path)
    pool = [image(s, k) for s in range(8) for k in range(20)]
    errors: list[BaseException] = []

    def exporter(seed: int) -> None:  # exports shards `seed` and `seed + 4`, as a step would
        rng = random.Random(seed)
        try:
            for _ in range(15):
                shard = f"{seed + 4 * rng.randrange(2):05d}"
                now = set(rng.sample(pool, 12))
                re_export(root, layout, shard, now)
                missing = {p for p in now if not (root / p).exists()}
                touch(root, missing)  # the failed check's re-run
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=exporter, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert every_named(root) <= on_disk(root)
    export.sweep_unused_images(root, layout)
    assert on_disk(root) == every_named(root)


def test_a_real_re_export_defers_its_sweep_until_one_is_due(tmp_path, sweeps):
    world = make_world(tmp_path, pairs_per_shard=(8, 3), images_per_shard=12)
    root = tmp_path / "out"
    with ChatServer() as server:
        settings = http_settings(server.base_url)
        settings = replace(
            settings, export=replace(settings.export, image_side_px=16, export_dir=str(root))
        )
        for shard in world.shards:
            run_all(world, settings, shard)
        assert sweeps == []  # a first export journals nothing
        # As if the last sweep had counted a large folder: 00000's drops wait.
        hint = export._sweep_hint_path(world.layout, root)
        hint.write_text('{"list_entries": 1000000}')
        own = world.image_ids[:12]
        write_pairs(
            world.layout,
            world.catalog,
            "00000",
            [(own[4], own[5], [own[4], own[6], own[7]]), (own[6], own[7], [own[6], own[4]])],
        )
        result = run_all(world, settings, "00000")[EXPORT_ASSET]
    assert all(o.passed for o in result.outcomes)
    assert result.metadata["orphaned_images_removed"] == 0 and sweeps == []
    assert journal(root) and every_named(root) < set(on_disk(root))
    removed = export.sweep_unused_images(root, world.layout)
    assert removed > 0 and on_disk(root) == every_named(root)


# -- on an S3 server ---------------------------------------------------------------------------

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
_BUCKET = "megapairs-export-scale"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as env:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",  # moto takes any key; never real credentials
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            env.setenv(key, value)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
                Bucket=_BUCKET
            )
            yield endpoint
        finally:
            server.stop()


_counter = itertools.count()


def test_on_an_object_store_the_journal_and_sweep_work_the_same(tmp_path, s3_endpoint):
    root = data_root_path(f"s3://{_BUCKET}/export-{next(_counter)}", {"endpoint_url": s3_endpoint})
    layout = DataLayout(tmp_path / "home")
    for s in range(3):  # each names 4 of its own images and image 9 of the next shard
        name(root, f"{s:05d}", {image(s, k) for k in range(4)} | {image((s + 1) % 3, 9)})
    listed = export._read_named_images(root, "00000")
    dropped = {image(0, 0), image(1, 9)}  # no other shard names either
    assert re_export(root, layout, "00000", listed - dropped) == 2  # no count yet: due
    assert on_disk(root) == every_named(root)
    assert export._sweep_hint_path(layout, root).is_file()  # local: a hint, never the truth
    assert journal(root) == []
    # As if the last sweep had counted a large folder: 00001's two drops wait in one object,
    # whose name carries the count (deciding whether a sweep is due reads no journal object).
    export._sweep_hint_path(layout, root).write_text('{"list_entries": 1000000}')
    assert re_export(root, layout, "00001", {image(1, k) for k in range(3)}) == 0
    (waiting,) = journal(root)
    assert waiting.name.endswith("-2.parquet")
    assert pl.read_parquet(waiting.read_bytes())["image_path"].to_list() == [
        image(1, 3),
        image(2, 9),
    ]
    assert export.sweep_unused_images(root, layout) == 2
    assert on_disk(root) == every_named(root) and journal(root) == []

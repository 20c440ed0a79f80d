"""A webdataset tar's `.caption` members are captions, as `.caption` files are in a folder.

Preference is the folder's: `.txt`, then `.caption`, then the `.json`'s `caption` field. A
`.caption` beside a `.txt` is reported as not read (never a silent pick), and the progress
total counts that report too.
"""

from __future__ import annotations

from image_factory import good_jpeg_bytes, write_tar_members

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import SourceSpec, count_shard_records, iter_shard_records
from megapairs_assets.corpus.table import build_shard_table


def test_tar_caption_members_are_read_in_the_folders_order(tmp_path):
    write_tar_members(
        tmp_path / "00000.tar",
        [
            ("only.jpg", good_jpeg_bytes(1)),
            ("only.CAPTION", b"from .caption\r\n"),
            ("both.caption", b"not this one"),  # before its image and .txt, as tar sorts it
            ("both.jpg", good_jpeg_bytes(2)),
            ("both.txt", b"from .txt"),
            ("meta.jpg", good_jpeg_bytes(3)),
            ("meta.caption", b"from .caption, not .json"),
            ("meta.json", b'{"caption": "from .json"}'),
            ("alone.caption", b"no image"),
        ],
    )
    spec = SourceSpec("webdataset", str(tmp_path))
    records = list(iter_shard_records(spec, "00000"))
    assert count_shard_records(spec, "00000") == len(records) == 5
    images, quarantine = build_shard_table("00000", records, ImageLimits())
    assert dict(zip(images["key"], images["caption"], strict=True)) == {
        "both": "from .txt",
        "meta": "from .caption, not .json",
        "only": "from .caption",
    }
    assert images["caption_issue"].is_null().all()
    rows = dict(zip(quarantine["key"], quarantine.iter_rows(named=True), strict=True))
    assert set(rows) == {"both", "alone"}
    assert rows["both"]["reason"] == "unsupported_member"
    assert rows["both"]["source_uri"].endswith(".tar#both.caption")
    assert (
        rows["both"]["detail"]
        == "both.caption is not read: both.txt already gives the caption of both"
    )
    assert rows["alone"]["reason"] == "missing_image"

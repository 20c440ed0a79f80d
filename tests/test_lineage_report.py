"""`megapairs lineage`: pages of an image's pairs, every input on request, lookups by source uri,
and a stage's skips of an image (issue 7 item 9, issue 8 item 6)."""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from megapairs_assets.cli.lineage import register
from megapairs_assets.corpus.step import IMAGE_LINEAGE
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord
from megapairs_assets.lineage.report import MAX_INPUTS_SHOWN, lineage_report
from megapairs_assets.mining.pair_table import PAIR_LINEAGE

SHARD = "00000"
CORPUS_DIR = "/data/corpus"
IMAGE_COUNT = 30
HUB = f"{SHARD}/000000001"  # the image in many pairs
UNCAPTIONED = f"{SHARD}/000000003"
REJECTED_URI = f"{CORPUS_DIR}/{SHARD}.tar#broken.jpg"
EXTRA_INPUTS = 3  # pair materialization inputs beyond MAX_INPUTS_SHOWN


def uri(key: str) -> str:
    return f"{CORPUS_DIR}/{SHARD}.tar#{key}.jpg"


def record(
    catalog: LineageCatalog,
    asset: str,
    inputs: dict[str, str] | None = None,
    rows: dict[str, pl.DataFrame] | None = None,
) -> str:
    m = MaterializationRecord(
        asset=asset,
        partition=SHARD,
        run_id="run-0001",
        code_version=f"{asset}-v1",
        profile="test",
        started_at=datetime(2026, 1, 1, 12, 0, 0),
        duration_s=1.0,
        input_versions=inputs or {},
    )
    catalog.record(m, rows)
    return m.materialization_id


def pair_rows(images: list[str]) -> pl.DataFrame:
    """HUB as query of the first 20 images, as target of the next 5, a negative elsewhere."""
    rows = []
    for other in images[2:22]:
        rows.append((HUB, other, [HUB, images[25]]))
    for other in images[22:27]:
        rows.append((other, HUB, [other, images[28]]))
    rows.append((images[28], images[29], [images[28], HUB]))
    return pl.DataFrame(
        {
            "pair_id": [f"pair{i:04d}" for i in range(len(rows))],
            "query_id": [q for q, _, _ in rows],
            "target_id": [t for _, t, _ in rows],
            "shard": SHARD,
            "sources": [["clip_image"]] * len(rows),
            "scores": [json.dumps({"score_clip_image": 0.9, "score_dino_image": None})] * len(rows),
            "hard_negative_ids": [n for _, _, n in rows],
            "knn_versions": "{}",
        }
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root whose catalog holds one shard: corpus, caption skips, mined pairs."""
    tmp_path = tmp_path_factory.mktemp("lineage")
    catalog = LineageCatalog(DataLayout(tmp_path).catalog_path)
    keys = [f"{i:09d}" for i in range(IMAGE_COUNT)]
    images = [f"{SHARD}/{k}" for k in keys]
    corpus = record(
        catalog,
        "image_corpus",
        rows={
            IMAGE_LINEAGE.name: pl.DataFrame(
                {
                    "image_id": images,
                    "shard": SHARD,
                    "key": keys,
                    "source_uri": [uri(k) for k in keys],
                    "caption": [f"caption {k}" for k in keys],
                    "content_hash": [f"{i:064x}" for i in range(IMAGE_COUNT)],
                    "width": 64,
                    "height": 48,
                }
            ),
            "quarantine_log": pl.DataFrame(
                {
                    "stage": ["image_corpus"],
                    "shard": [SHARD],
                    "key": ["broken"],
                    "source_uri": [REJECTED_URI],
                    "reason": ["decode_error"],
                    "detail": ["cannot identify image file"],
                }
            ),
        },
    )
    corpus_input = {f"image_corpus/{SHARD}": corpus}
    captions = record(
        catalog,
        "caption_text_embeddings",
        inputs=corpus_input,
        rows={
            "quarantine_log": pl.DataFrame(
                {
                    "stage": ["caption_text_embeddings"],
                    "shard": [SHARD],
                    "key": [UNCAPTIONED.split("/")[1]],
                    "source_uri": [uri(UNCAPTIONED.split("/")[1])],
                    "reason": ["no_caption"],
                    "detail": ["empty caption"],
                }
            )
        },
    )
    knn = record(catalog, "caption_text_knn", inputs={f"caption_text_embeddings/{SHARD}": captions})
    inputs = {f"caption_text_knn/{SHARD}": knn}
    for index in range(MAX_INPUTS_SHOWN + EXTRA_INPUTS - 1):
        name = f"extra_input_{index}"
        inputs[f"{name}/{SHARD}"] = record(catalog, name)
    pairs = record(
        catalog, "mined_image_pairs", inputs=inputs, rows={PAIR_LINEAGE.name: pair_rows(images)}
    )
    # Generation dropped one pair (its quarantine rows are keyed by pair id).
    record(
        catalog,
        "pair_descriptions",
        inputs={f"mined_image_pairs/{SHARD}": pairs},
        rows={
            "quarantine_log": pl.DataFrame(
                {
                    "stage": ["pair_descriptions"],
                    "shard": [SHARD],
                    "key": ["pair0003"],
                    "source_uri": [None],  # kept out of the image reports other tests read
                    "reason": ["request_quarantined"],
                    "detail": ["attempt 3/3: ConnectError"],
                }
            )
        },
    )
    return tmp_path


def report(home: Path, item: str, **options: object) -> str:
    text = lineage_report(LineageCatalog(DataLayout(home).catalog_path), item, **options)
    assert text is not None, item
    return text


def listed_pairs(text: str) -> list[str]:
    return re.findall(r"^ {4}(pair\d{4}): ", text, flags=re.MULTILINE)


def chain_lines(text: str, asset_prefix: str) -> list[str]:
    return re.findall(rf"^ +{asset_prefix}\w*\[", text, flags=re.MULTILINE)


def test_a_pair_report_says_which_stage_dropped_the_pair(home: Path) -> None:
    dropped = report(home, "pair0003")
    reason = "request_quarantined (attempt 3/3: ConnectError)"
    assert f"dropped by pair_descriptions: {reason}" in dropped
    assert "dropped by" not in report(home, "pair0004")


def test_an_image_lists_a_page_of_its_pairs_and_says_how_to_see_more(home: Path) -> None:
    text = report(home, HUB)
    assert "in 25 mined pairs (20 as query, 5 as target); a mined hard negative in 1" in text
    assert len(listed_pairs(text)) == 10
    assert "showing pairs 1-10 of 25" in text and "--all" in text
    # As query first: the first page lists only pairs where HUB is the query.
    assert all(f"{HUB} -> " in line for line in text.splitlines() if re.match(r" {4}pair", line))


def test_pages_cover_every_pair_once_and_all_lists_them_together(home: Path) -> None:
    everything = report(home, HUB, pair_limit=None)
    every_pair = listed_pairs(everything)
    assert len(every_pair) == len(set(every_pair)) == 25
    assert "showing" not in everything
    pages = [listed_pairs(report(home, HUB, pair_limit=10, pair_offset=o)) for o in (0, 10, 20)]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [pair for page in pages for pair in page] == every_pair
    assert "showing pairs 21-25 of 25" in report(home, HUB, pair_limit=10, pair_offset=20)
    assert "pair0025" not in everything  # HUB is only a negative there, not a pair member


def test_inputs_beyond_the_first_few_are_counted_then_shown_on_request(home: Path) -> None:
    short = report(home, "pair0000")
    assert f"(+{EXTRA_INPUTS} more inputs; --all-inputs)" in short
    assert len(chain_lines(short, "extra_input_")) == MAX_INPUTS_SHOWN - 1
    full = report(home, "pair0000", all_inputs=True)
    assert "more input" not in full
    assert len(chain_lines(full, "extra_input_")) == MAX_INPUTS_SHOWN + EXTRA_INPUTS - 1
    # The chain reaches the corpus through the caption stage.
    assert "image_corpus[00000]" in full and "caption_text_embeddings[00000]" in full


@pytest.mark.parametrize("how", ["image_id", "full_uri", "uri_tail"])
def test_a_kept_image_is_found_by_its_source_uri(home: Path, how: str) -> None:
    key = HUB.split("/")[1]
    item = {"image_id": HUB, "full_uri": uri(key), "uri_tail": f"{SHARD}.tar#{key}.jpg"}[how]
    text = report(home, item)
    assert text.startswith(f"image {HUB}\n")
    assert text == report(home, HUB)


def test_an_image_report_shows_the_stages_that_skipped_it(home: Path) -> None:
    text = report(home, UNCAPTIONED)
    assert "skipped by 1 stage:" in text
    assert "caption_text_embeddings: no_caption (empty caption)" in text
    assert "skipped by no stage" in report(home, HUB)


def test_a_quarantined_input_is_found_by_its_uri_or_its_end(home: Path) -> None:
    for item in (REJECTED_URI, f"{SHARD}.tar#broken.jpg", f"{SHARD}/broken"):
        text = report(home, item)
        assert "was quarantined:" in text
        assert "stage image_corpus: decode_error (cannot identify image file)" in text


def test_unknown_ids_and_ambiguous_tails(home: Path) -> None:
    catalog = LineageCatalog(DataLayout(home).catalog_path)
    assert lineage_report(catalog, "nothing-like-this") is None
    assert lineage_report(catalog, f"{SHARD}.tar") is None  # not at a uri's end
    with pytest.raises(ValueError, match="pair_limit"):
        lineage_report(catalog, HUB, pair_limit=-1)


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megapairs")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_the_cli_flags_reach_the_report(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    args = _cli(["lineage", HUB, "--limit", "3", "--offset", "3"])
    assert args.func(args) == 0
    assert "showing pairs 4-6 of 25" in capsys.readouterr().out
    args = _cli(["lineage", "pair0000", "--all-inputs"])
    assert args.func(args) == 0
    assert "more input" not in capsys.readouterr().out
    args = _cli(["lineage", HUB, "--all"])
    assert args.func(args) == 0
    assert len(listed_pairs(capsys.readouterr().out)) == 25
    args = _cli(["lineage", "no-such-id"])
    assert args.func(args) == 1
    assert "is not a triplet, pair or materialization id" in capsys.readouterr().err


def test_the_cli_refuses_contradictory_or_negative_paging(capsys) -> None:
    for argv in (["lineage", HUB, "--all", "--limit", "3"], ["lineage", HUB, "--limit", "-1"]):
        with pytest.raises(SystemExit) as exited:
            _cli(argv)
        assert exited.value.code == 2

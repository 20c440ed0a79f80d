"""Progress lines: done / total, rate and ETA, rate-limited, and a final line."""

from __future__ import annotations

from megapairs_assets.lib.progress import Progress


def test_progress_logs_done_total_rate_and_eta() -> None:
    lines: list[str] = []
    with Progress(200, "embed[00000]", "images", log=lines.append, log_every_s=0.0, bar=False) as p:
        p.update(50)
        p.update(50)
        p.update(10)
    assert len(lines) == 3  # one per update; closing adds nothing the last one said
    assert "100/200 images (50%)" in lines[1]
    assert "images/s" in lines[1] and "ETA" in lines[1]
    assert lines[-1].startswith("embed[00000]: 110/200")


def test_closing_logs_the_final_count_once() -> None:
    lines: list[str] = []
    with Progress(4, "describe", log=lines.append, log_every_s=3600.0, bar=False) as p:
        p.update(3)  # rate-limited: nothing yet
        p.update(1)
    assert [line.split(",")[0] for line in lines] == ["describe: 4/4 items (100%)"]
    lines.clear()
    with Progress(4, "describe", log=lines.append, log_every_s=0.0, bar=False) as p:
        p.update(4)  # logged here; the closing line would repeat it
    assert len(lines) == 1 and "4/4" in lines[0]


def test_progress_is_rate_limited() -> None:
    lines: list[str] = []
    with Progress(10_000, "knn", log=lines.append, log_every_s=3600.0, bar=False) as p:
        for _ in range(1000):
            p.update(10)
    assert len(lines) == 1  # only the closing line, not one per update
    assert "10000/10000" in lines[0]


def test_unknown_total_reports_count_and_rate_without_eta() -> None:
    lines: list[str] = []
    with Progress(None, "corpus[00001]", "images", log=lines.append, bar=False) as p:
        p.update(7)
    assert "7 images" in lines[-1] and "ETA" not in lines[-1]

"""What the Dagster pages say after `megapairs demo`, checked word for word: a check's outcome
states its rule (not the violation), the loss sparkline's caption states what is drawn, a
shard answered by the run-wide prefetch shows the model's calls, tokens and time, and the
benchmark comparison names base and trained retrievers."""

from __future__ import annotations

import polars as pl
import pytest
from fault_server import ChatServer
from generation_fixtures import http_settings, make_world

from megapairs_assets.evaluation.plot import comparison_figure, comparison_markdown
from megapairs_assets.generation.backends.heuristic import HEURISTIC_BACKEND
from megapairs_assets.generation.describe import (
    RepeatedDescriptions,
    describe_pairs_for_shard,
    prefetch_descriptions,
)
from megapairs_assets.generation.runner import RunStats, stats_table
from megapairs_assets.training.plot import SPARKLINE_CHARS, loss_sparkline_markdown

# --- 1. a check's outcome names the rule it holds -------------------------------------------


def _descriptions(texts: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"description": texts, "backend": ["openai_http"] * len(texts)})


def test_descriptions_varied_says_the_rule_whether_it_passes_or_fails() -> None:
    passed = RepeatedDescriptions.of(_descriptions(["a", "b", "c", "d"])).outcome()
    failed = RepeatedDescriptions.of(_descriptions(["same"] * 3 + ["other"])).outcome()
    assert passed.passed and not failed.passed and failed.failing_rows == 3
    rule = "no one text is 50% or more of the model descriptions"
    assert passed.detail.startswith(f"ok: {rule}")
    assert failed.detail.startswith(f"3 rows violate: {rule}")
    assert "repeating" not in passed.detail + failed.detail
    # The caption heuristic's template rows are not model descriptions: never a violation.
    heuristic = pl.DataFrame({"description": ["t"] * 5, "backend": [HEURISTIC_BACKEND] * 5})
    assert RepeatedDescriptions.of(heuristic).outcome().passed


# --- 2. the loss sparkline's caption says what it draws -------------------------------------


def _curve(steps: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"step": range(1, steps + 1), "loss": [5.0 - i / steps for i in range(steps)]}
    )


def test_sparkline_caption_states_the_characters_drawn_and_the_steps_in_each() -> None:
    sixty = loss_sparkline_markdown(_curve(60))
    drawn = sixty.split("` ", 1)[1].split(" `", 1)[0]
    assert len(drawn) == SPARKLINE_CHARS == 48
    # 60 steps over 48 characters: slices of 1 or 2 steps, not "2 steps per character".
    assert "60 logged steps; 48 characters, each the mean of 1-2 steps)" in sixty
    assert "per character" not in sixty
    assert "each the mean of 2 steps)" in loss_sparkline_markdown(_curve(96))
    # One character per step: nothing to say about resampling.
    assert loss_sparkline_markdown(_curve(48)).endswith("of 48 logged steps)")


# --- 3. a shard answered by the run-wide prefetch shows the model's work ---------------------


def test_a_prefetched_shard_shows_the_model_calls_tokens_and_time_it_cost(tmp_path) -> None:
    world = make_world(tmp_path, pairs_per_shard=(3, 2))
    with ChatServer() as server:
        settings = http_settings(server.base_url)
        prefetch = prefetch_descriptions(list(world.shards), world.layout, world.catalog, settings)
        calls = server.count()
        result = describe_pairs_for_shard("00000", world.layout, world.catalog, settings)
        assert server.count() == calls  # the step itself sent nothing
    metadata = result.metadata
    assert prefetch.succeeded == 5
    assert metadata["model_prefetched"] == metadata["model_calls"] == 3
    rows = pl.read_parquet(result.outputs["descriptions"]).filter(
        pl.col("backend") != HEURISTIC_BACKEND
    )
    assert rows.height == 3
    tokens = int(rows["prompt_tokens"].sum() + rows["completion_tokens"].sum())
    assert metadata["model_tokens"] == tokens > 0
    # The shard's share of the prefetch's time (3 of its 5 answers) is in its rate.
    share_s = prefetch.elapsed_s * 3 / 5
    requests = metadata["model_requests"] + metadata["heuristic_requests"]
    assert 0 < metadata["rows_per_s"] <= requests / share_s * 1.01
    assert "prefetched_tokens" in result.markdown["requests"]


def test_request_tables_are_a_row_per_figure() -> None:
    table = stats_table({"prefetch": RunStats(requests=5, calls=5, succeeded=5, elapsed_s=2.0)})
    lines = table.splitlines()
    assert lines[0] == "| figure | prefetch |"
    assert "| calls | 5 |" in lines and "| rows_per_s | 2.5 |" in lines
    assert len(lines) == 2 + len(RunStats().as_metadata())  # every figure, none cut off


# --- 5. the comparison names base and trained retrievers -----------------------------------

BASE = "megapairs-tiny-clip__models.megapairs-tiny-clip"
TRAINED = "megapairs-tiny-clip__demo.open_clip"


def _scores() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "retriever_id": [TRAINED, TRAINED, BASE, BASE],
            "split": ["heldout"] * 4,
            "metric": ["R@1", "R@5", "R@1", "R@5"],
            "value": [30.0, 50.0, 10.0, 20.0],
        }
    )


def test_comparison_legend_says_which_retriever_is_base_and_which_trained() -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    figure = comparison_figure(_scores(), "heldout", base_retriever_id=BASE)
    try:
        _, labels = figure.axes[0].get_legend_handles_labels()
    finally:
        plt.close(figure)
    assert labels == [f"base ({BASE})", f"trained ({TRAINED})"]  # the base first


def test_comparison_text_bars_say_base_and_trained(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    text = comparison_markdown(_scores(), "heldout", base_retriever_id=BASE)
    lines = [line.strip() for line in text.splitlines()]
    r1 = lines.index("R@1")
    assert lines[r1 + 1].startswith(f"base ({BASE})") and lines[r1 + 1].endswith("10.00")
    assert lines[r1 + 2].startswith(f"trained ({TRAINED})") and lines[r1 + 2].endswith("30.00")

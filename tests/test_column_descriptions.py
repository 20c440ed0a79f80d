"""Every column a stage writes is explained where Dagster shows the table's columns."""

from __future__ import annotations

import polars as pl
import pytest

from megapairs_assets.corpus.table import CORPUS_COLUMN_DESCRIPTIONS, CORPUS_SCHEMA
from megapairs_assets.embeddings.assets import embedding_stages as EMBEDDING_STAGES
from megapairs_assets.evaluation.assets import STAGE as SCORES_STAGE
from megapairs_assets.evaluation.run import SCORE_COLUMNS
from megapairs_assets.generation.assets import (
    DESCRIBE_STAGE,
    EXPORT_STAGE,
    INSTRUCT_STAGE,
    TRIPLET_STAGE,
)
from megapairs_assets.generation.describe import DESCRIPTION_SCHEMA
from megapairs_assets.generation.instruct import INSTRUCTION_SCHEMA
from megapairs_assets.generation.triplets import RELEASE_FIELDS, TRIPLET_SCHEMA
from megapairs_assets.knn.search import KNN_COLUMN_DESCRIPTIONS, KNN_SCHEMA
from megapairs_assets.lib.step import StepResult
from megapairs_assets.mining.assets import STAGE as MINING_STAGE
from megapairs_assets.mining.pairs import PAIRS_SCHEMA, pairs_column_descriptions
from megapairs_assets.orchestration.shard_step import Stage, partition_metadata


def _embedding_table_columns() -> list[str]:
    """The columns `write_embedding_table` actually writes (read back from a tiny table)."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from megapairs_assets.embeddings.compute import write_embedding_table

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "00000.parquet"
        write_embedding_table(path, ["a/1"], np.ones((1, 4), dtype=np.float16) / 2, "m")
        return pl.read_parquet_schema(path).names()


EMBEDDING_TABLE_COLUMNS = _embedding_table_columns()


DECLARED = [
    ("image_corpus", CORPUS_COLUMN_DESCRIPTIONS, list(CORPUS_SCHEMA)),
    ("embeddings", EMBEDDING_STAGES[0].columns, EMBEDDING_TABLE_COLUMNS),
    ("knn", KNN_COLUMN_DESCRIPTIONS, list(KNN_SCHEMA)),
    ("mined_image_pairs", MINING_STAGE.columns, list(PAIRS_SCHEMA)),
    ("pair_descriptions", DESCRIBE_STAGE.columns, list(DESCRIPTION_SCHEMA)),
    ("pair_instructions", INSTRUCT_STAGE.columns, list(INSTRUCTION_SCHEMA)),
    ("triplets", TRIPLET_STAGE.columns, list(TRIPLET_SCHEMA)),
    ("triplet_export", EXPORT_STAGE.columns, ["triplet_id", *RELEASE_FIELDS]),
    ("benchmark_scores", SCORES_STAGE.columns, list(SCORE_COLUMNS)),
]


@pytest.mark.parametrize(
    ("table", "descriptions", "columns"), DECLARED, ids=[d[0] for d in DECLARED]
)
def test_each_written_column_has_a_description_and_none_is_stale(
    table: str, descriptions: dict[str, str], columns: list[str]
) -> None:
    assert set(descriptions) == set(columns), table
    assert all(text.strip() for text in descriptions.values()), table


def test_score_columns_follow_the_configured_sources() -> None:
    described = pairs_column_descriptions(["clip_image", "my_source"])
    assert "score_my_source" in described and "score_dino_image" not in described
    assert "my_source" in described["score_my_source"]


def test_the_materialization_column_schema_carries_the_descriptions(tmp_path) -> None:
    path = tmp_path / "00000.parquet"
    pl.DataFrame(
        {"query_id": ["a"], "rank": [0], "neighbor_id": ["b"], "score": [0.5], "extra": [1]}
    ).write_parquet(path)
    stage = Stage("clip_image_knn", "knn-v2", columns=KNN_COLUMN_DESCRIPTIONS)
    result = StepResult(partition="00000", outputs={"knn": path}, row_counts={"rows": 1})
    schema = partition_metadata(result, stage.asset_name, stage.columns)["dagster/column_schema"]
    by_name = {column.name: column.description for column in schema.columns}
    assert by_name["neighbor_id"] == KNN_COLUMN_DESCRIPTIONS["neighbor_id"]
    # A column no one described still shows, without a made-up text.
    assert by_name["extra"] is None


def test_the_column_schema_is_the_stage_table_not_its_quarantine(tmp_path) -> None:
    rejects = tmp_path / "quarantine.parquet"
    pl.DataFrame({"row": [1], "reason": ["bad"]}).write_parquet(rejects)
    table = tmp_path / "00000.parquet"
    pl.DataFrame({"query_id": ["a"]}).write_parquet(table)
    result = StepResult(partition="00000", outputs={"quarantine": rejects, "knn": table})
    schema = partition_metadata(result, "clip_image_knn", KNN_COLUMN_DESCRIPTIONS)
    assert [c.name for c in schema["dagster/column_schema"].columns] == ["query_id"]
    only_rejects = StepResult(partition="demo", outputs={"quarantine": rejects})
    assert "dagster/column_schema" not in partition_metadata(only_rejects, "mmret_clip_checkpoint")


def test_long_preview_cells_are_cut_to_stay_readable() -> None:
    from megapairs_assets.orchestration.shard_step import preview_table

    long = "word " * 100
    table = preview_table(pl.DataFrame({"q_text": [[long, long]], "n": [3]}))
    (record,) = table.records
    assert len(record.data["q_text"]) == 80 and record.data["q_text"].endswith("…")
    assert record.data["n"] == 3

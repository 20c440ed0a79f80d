"""The catalog's row table of mined pairs, declared apart from the mining code so that a
reader of the catalog (`megapairs lineage`) declares it without importing the KNN and model
code mining pulls in."""

from __future__ import annotations

from megapairs_assets.lineage.catalog import RowTable, register_row_table

PAIR_LINEAGE = register_row_table(
    RowTable(
        "pair_lineage",
        (
            ("pair_id", "VARCHAR"),
            ("query_id", "VARCHAR"),
            ("target_id", "VARCHAR"),
            ("shard", "VARCHAR"),
            ("sources", "VARCHAR[]"),
            ("scores", "VARCHAR"),
            ("hard_negative_ids", "VARCHAR[]"),
            ("knn_versions", "VARCHAR"),
        ),
        description=(
            "Every mined pair of the current mined_image_pairs materialization of each shard; "
            "with image uris and its triplet: view pair_provenance."
        ),
        column_docs=(
            ("pair_id", "stable id of the (query, target) pair"),
            ("query_id", "image_lineage.image_id of the query image"),
            ("target_id", "image_lineage.image_id of the target (any shard: KNN is corpus-wide)"),
            ("shard", "the query's shard (the partition that mined it)"),
            ("sources", "the similarity sources whose band the pair fell in"),
            ("scores", "JSON: score_<source> -> cosine similarity (NULL: not a neighbour there)"),
            ("hard_negative_ids", "image ids; the first is the query image itself"),
            ("knn_versions", "JSON: 'knn asset/shard' -> materialization id of the graphs read"),
        ),
    )
)

"""The catalog's documented views: the joins people ask the lineage catalog for.

The catalog creates each view (and its comments) once the tables it reads exist, so a reader
with nothing but the `duckdb` package finds them next to the tables:

- `current_materializations`: the newest record of each (asset, partition), with its status and
  how many records (re-materializations, failures, retirements) came before it.
- `materialization_inputs`: one row per input a materialization read, with whether that input
  version is still its partition's current one (False: the output is stale).
- `quarantine_report`: every quarantined or skipped item with the run and time behind it.
- `pair_provenance`: each mined pair with its images' source uris and captions, the run that
  mined it and the triplet made from it (if any).
- `triplet_provenance`: each triplet with the models, templates and runs behind its description
  and instructions, and its images' source uris.

Plain data, no imports: `catalog.py` creates these, `report.py` and users read them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogView:
    """A view of the lineage catalog: created once every table in `requires` exists."""

    name: str
    description: str
    sql: str
    requires: tuple[str, ...]
    column_docs: tuple[tuple[str, str], ...] = ()


# The newest record of each partition. Ties on started_at cannot happen in practice (records of a
# partition are written one after another), and arg_max picks one row consistently if they do.
# arg_max_null for nullable columns: plain arg_max skips NULLs, so a complete newest record would
# show an older attempt's error.
CURRENT_MATERIALIZATIONS = CatalogView(
    name="current_materializations",
    description=(
        "The newest record of each (asset, partition): its status says whether the partition's "
        "tables are readable (complete), being written or abandoned (pending), broken by a "
        "failed step (failed) or out of the dataset (retired)."
    ),
    sql="""
SELECT asset,
       partition,
       arg_max(materialization_id, started_at) AS materialization_id,
       arg_max(status, started_at) AS status,
       max(started_at) AS started_at,
       arg_max(run_id, started_at) AS run_id,
       arg_max(code_version, started_at) AS code_version,
       arg_max(profile, started_at) AS profile,
       arg_max(row_counts, started_at) AS row_counts,
       arg_max_null(error, started_at) AS error,
       arg_max_null(failed_checks, started_at) AS failed_checks,
       arg_max(materialization_id, started_at) FILTER (WHERE status = 'complete')
           AS last_complete_materialization_id,
       count(*) AS records,
       count(*) FILTER (WHERE status = 'complete') AS complete_records
FROM materializations
GROUP BY asset, partition
""",
    requires=("materializations",),
    column_docs=(
        ("materialization_id", "the newest record's id"),
        ("status", "the newest record's status: complete, pending, failed or retired"),
        ("error", "why the newest record failed, when it did"),
        ("failed_checks", "the blocking checks the newest record failed, when it completed"),
        (
            "last_complete_materialization_id",
            "the newest complete materialization (its row lineage is in the row tables)",
        ),
        ("records", "how many records the partition has (1 + older versions and attempts)"),
        ("complete_records", "how many of them completed"),
    ),
)

MATERIALIZATION_INPUTS = CatalogView(
    name="materialization_inputs",
    description=(
        "One row per input a materialization read (its input_versions, unnested), with that "
        "input's record and whether it is still the current version of its partition."
    ),
    sql="""
WITH read AS (
    SELECT m.materialization_id,
           m.asset,
           m.partition,
           m.status,
           m.started_at,
           e.key AS input_key,
           split_part(e.key, '/', 1) AS key_asset,
           e.key[length(split_part(e.key, '/', 1)) + 2:] AS key_partition,
           json_extract_string(e.value, '$') AS input_materialization_id
    FROM materializations AS m, json_each(m.input_versions) AS e
)
SELECT r.materialization_id,
       r.asset,
       r.partition,
       r.status,
       r.started_at,
       r.input_key,
       coalesce(i.asset, r.key_asset) AS input_asset,
       coalesce(i.partition, r.key_partition) AS input_partition,
       r.input_materialization_id,
       i.status AS input_status,
       i.started_at AS input_started_at,
       c.materialization_id AS input_current_materialization_id,
       (c.materialization_id = r.input_materialization_id) AS input_is_current
FROM read AS r
LEFT JOIN materializations AS i ON i.materialization_id = r.input_materialization_id
LEFT JOIN current_materializations AS c
       ON c.asset = coalesce(i.asset, r.key_asset)
      AND c.partition = coalesce(i.partition, r.key_partition)
""",
    requires=("materializations", "current_materializations"),
    column_docs=(
        ("materialization_id", "the materialization that read the input"),
        ("input_key", "'asset/partition' as the step recorded it"),
        ("input_materialization_id", "the version of the input it read"),
        ("input_status", "that version's status (NULL: not in this catalog)"),
        ("input_current_materialization_id", "the input partition's newest record now"),
        (
            "input_is_current",
            "False: the input was re-materialized (or failed, or retired) since it was read",
        ),
    ),
)

QUARANTINE_REPORT = CatalogView(
    name="quarantine_report",
    description=(
        "Every quarantined input or skipped row of the current materializations "
        "(quarantine_log) with the run, time and code version of the step that rejected it."
    ),
    sql="""
SELECT q.stage,
       q.shard,
       q.key,
       q.source_uri,
       q.reason,
       q.detail,
       q.materialization_id,
       m.run_id,
       m.started_at,
       m.code_version,
       m.profile
FROM quarantine_log AS q
LEFT JOIN materializations AS m USING (materialization_id)
""",
    requires=("quarantine_log", "materializations"),
    column_docs=(
        ("stage", "the asset that rejected or skipped the item"),
        ("key", "the item's key in its shard: an image key, or a pair id for generation"),
        ("reason", "a reason code (README, 'Bad input')"),
        ("detail", "what exactly was wrong"),
    ),
)

PAIR_PROVENANCE = CatalogView(
    name="pair_provenance",
    description=(
        "Each mined pair of the current pair_lineage with its images' source uris and "
        "captions, the mining run, and the triplet made from it (NULL: dropped by generation, "
        "see quarantine_report where key = pair_id)."
    ),
    sql="""
SELECT p.pair_id,
       p.shard,
       p.query_id,
       qi.source_uri AS query_uri,
       qi.caption AS query_caption,
       p.target_id,
       ti.source_uri AS target_uri,
       ti.caption AS target_caption,
       p.sources,
       p.scores,
       p.hard_negative_ids,
       t.triplet_id,
       p.materialization_id,
       m.run_id,
       m.started_at AS mined_at,
       m.code_version
FROM pair_lineage AS p
LEFT JOIN image_lineage AS qi ON qi.image_id = p.query_id
LEFT JOIN image_lineage AS ti ON ti.image_id = p.target_id
LEFT JOIN triplet_lineage AS t ON t.pair_id = p.pair_id
LEFT JOIN materializations AS m ON m.materialization_id = p.materialization_id
""",
    requires=("pair_lineage", "image_lineage", "triplet_lineage", "materializations"),
    column_docs=(
        ("sources", "the similarity sources (KNN graphs) that found the pair"),
        ("scores", "JSON: score of each source (NULL where that source did not find it)"),
        ("hard_negative_ids", "image ids; the first is the query image itself"),
        ("triplet_id", "the triplet made from this pair; NULL when generation dropped it"),
    ),
)

TRIPLET_PROVENANCE = CatalogView(
    name="triplet_provenance",
    description=(
        "Each triplet of the current triplet_lineage with the generators, models and templates "
        "behind its description and instructions, its images' source uris, and the run that "
        "built it."
    ),
    sql="""
SELECT t.triplet_id,
       t.pair_id,
       t.shard,
       t.query_id,
       qi.source_uri AS query_uri,
       t.target_id,
       ti.source_uri AS target_uri,
       t.hard_negative_ids,
       t.instruction_count,
       t.description_generator,
       t.description_model,
       t.description_served_model,
       t.description_template,
       t.instruction_generator,
       t.instruction_model,
       t.instruction_served_model,
       t.instruction_template,
       t.demo_ids,
       t.input_versions,
       t.materialization_id,
       m.run_id,
       m.started_at AS built_at,
       m.code_version,
       m.profile
FROM triplet_lineage AS t
LEFT JOIN image_lineage AS qi ON qi.image_id = t.query_id
LEFT JOIN image_lineage AS ti ON ti.image_id = t.target_id
LEFT JOIN materializations AS m ON m.materialization_id = t.materialization_id
""",
    requires=("triplet_lineage", "image_lineage", "materializations"),
    column_docs=(
        ("description_model", "the model that wrote the pair's description"),
        ("instruction_model", "the model that wrote the triplet's instructions (q_text)"),
        (
            "description_served_model",
            "the model the server said answered for the description (null: not recorded)",
        ),
        ("instruction_served_model", "likewise, for the instructions"),
        ("instruction_template", "the prompt template (name#hash) of the instructions"),
        ("demo_ids", "the in-context demonstrations the instruction prompt showed"),
        ("input_versions", "JSON: 'asset/partition' -> materialization id of the tables read"),
        ("built_at", "when the triplets materialization started"),
    ),
)

# In creation order: a view comes after the views it reads.
VIEWS: tuple[CatalogView, ...] = (
    CURRENT_MATERIALIZATIONS,
    MATERIALIZATION_INPUTS,
    QUARANTINE_REPORT,
    PAIR_PROVENANCE,
    TRIPLET_PROVENANCE,
)

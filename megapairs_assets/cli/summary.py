"""The end-of-run summary printed by `megapairs demo`: what was made, and where.

Everything is read back from the outputs and the catalog, not from the runs' own memory.
"""

from __future__ import annotations

import json
import shlex
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import polars as pl

from megapairs_assets.corpus.table import unexpected_unread
from megapairs_assets.evaluation.catalog_rows import heldout_summary_lines
from megapairs_assets.generation.triplets import generation_summary, sample_query
from megapairs_assets.lib.storage import DataLayout, read_parquet
from megapairs_assets.lib.words import plural
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.lineage.id_lists import IN_IDS, id_list
from megapairs_assets.mining.step import ASSET_NAME as PAIRS_ASSET
from megapairs_assets.training.names import ASSET_NAME as CHECKPOINT_ASSET


def mining_summary(layout: DataLayout, catalog: LineageCatalog, shards: list[str]) -> dict:
    """Images, quarantine by reason and pairs by source over `shards`."""
    images = catalog.query(
        f"SELECT count(*) AS n FROM image_lineage WHERE shard {IN_IDS}", [id_list(shards)]
    )["n"][0]
    quarantine = catalog.query(
        f"SELECT stage, reason, count(*) AS n FROM quarantine_log WHERE shard {IN_IDS} "
        "GROUP BY ALL ORDER BY n DESC, stage, reason",
        [id_list(shards)],
    )
    paths = [layout.shard_table(PAIRS_ASSET, s) for s in shards]
    tables = [read_parquet(p) for p in paths if p.exists()]
    pairs = pl.concat(tables) if tables else pl.DataFrame()
    found = (
        dict(pairs.explode("sources").group_by("sources").len().iter_rows()) if pairs.height else {}
    )
    # Every configured source (a `score_<source>` column each), so one that mined nothing shows 0.
    configured = [c.removeprefix("score_") for c in pairs.columns if c.startswith("score_")]
    per_source = {source: found.get(source, 0) for source in sorted({*configured, *found})}
    return {
        "images": int(images),
        "quarantine": quarantine,
        "pairs": pairs.height,
        "pairs_per_source": per_source,
        "example_pair_id": pairs["pair_id"][0] if pairs.height else None,
    }


def training_lines(catalog: LineageCatalog, query: tuple[Any, str] | None = None) -> list[str]:
    """Per trained config: its newest complete checkpoint's row counts and time, then the
    commands that score its export (the folder a user would otherwise have to look for) and
    search with it (`query`: an image and a text to try, e.g. the sample triplet's)."""
    frame = catalog.query(
        "SELECT partition, arg_max(row_counts, started_at) AS row_counts, "
        "arg_max(duration_s, started_at) AS duration_s, "
        "arg_max(output_paths, started_at) AS output_paths "
        "FROM materializations WHERE asset = ? AND status = 'complete' GROUP BY partition "
        "ORDER BY partition",
        [CHECKPOINT_ASSET],
    )
    lines = []
    for row in frame.iter_rows(named=True):
        counts = json.loads(row["row_counts"] or "{}")
        detail = ", ".join(f"{k} {v}" for k, v in counts.items())
        lines.append(
            f"  checkpoint:  config {row['partition']!r}, {detail} in {row['duration_s']:.1f} s"
        )
        export = json.loads(row["output_paths"] or "{}").get("open_clip_dir")
        if export:
            lines.append(f"    score it:  megapairs eval --retriever {export} --benchmark heldout")
            image, text = query or ("<image>", "<what to change>")
            lines.append(
                f"    use it:    megapairs search --retriever {export} "
                f"--image {shlex.quote(str(image))} --text {shlex.quote(text)}"
            )
    return lines


def check_lines(results: Sequence[Any]) -> list[str]:
    """The runs' asset check results: a count of passes, then each failure with its severity
    and partitions (a failed warning check does not stop a run, so it is easy to miss)."""
    passed, failures, warnings = 0, 0, 0
    failed: list[str] = []
    for result in results:
        for evaluation in result.get_asset_check_evaluations():
            if evaluation.passed:
                passed += 1
                continue
            partitions = evaluation.metadata.get("failing_partitions")
            where = f" [{partitions.value}]" if partitions is not None else ""
            severity = "error" if evaluation.severity == dg.AssetCheckSeverity.ERROR else "warn"
            warnings += severity == "warn"
            failures += severity == "error"
            # The check's own words say what is wrong (which images repeat, which rows fail).
            words = textwrap.shorten(evaluation.description or "", 300, placeholder=" ...")
            failed.append(
                f"    {severity}: {evaluation.asset_key.to_user_string()} "
                f"{evaluation.check_name}{where}"
            )
            if words:
                failed.append(f"      {words}")
    # A failed warning check is a warning, not a failure: the run went on (README, "Checks").
    counts = f"{passed} passed, {failures} failed, {plural(warnings, 'warning')}"
    return [f"  checks:      {counts}", *failed]


def print_summary(
    resources: Mapping[str, Any], shards: list[str], wall_s: float, results: Sequence[Any]
) -> None:
    layout: DataLayout = resources["storage"].layout()
    catalog: LineageCatalog = resources["catalog"].catalog()
    s = mining_summary(layout, catalog, shards)
    run_ids = [result.run_id for result in results]
    print()
    runs = plural(len(run_ids), "run")
    print(f"done in {wall_s:.1f} s ({runs}: {', '.join(r[:8] for r in run_ids)})")
    print(f"  images:      {s['images']} valid across {plural(len(shards), 'shard')}")
    quarantine: pl.DataFrame = s["quarantine"]
    print(f"  quarantined: {int(quarantine['n'].sum()) if quarantine.height else 0}")
    for row in quarantine.iter_rows(named=True):
        print(f"    {row['stage']}: {row['reason']} x{row['n']}")
    report = layout.corpus_source_report()
    if report.exists():
        unread = unexpected_unread(read_parquet(report))  # not the demo corpus's licence
        if unread.height:
            entries = plural(unread.height, "entry")
            print(f"  not read:    {entries} of the corpus source ({report})")
    print(f"  mined pairs: {s['pairs']}  by source: {s['pairs_per_source']}")
    if 0 in s["pairs_per_source"].values():
        print(
            "    a source mined no pairs: the band_positions table on mined_image_pairs (and "
            "each shard's log line) says where its neighbours' scores fell"
        )
    for line in check_lines(results):
        print(line)
    generated = generation_summary(layout, shards)
    if generated:
        print(generated)
    for line in training_lines(catalog, sample_query(layout, shards)):
        print(line)
    base_id = resources["evaluation"].base_spec().retriever_id
    for line in heldout_summary_lines(catalog, base_id):
        print(f"  {line}")
    print(f"  outputs:     {layout.data_dir}")
    print(f"  catalog:     {catalog.location}")
    if s["example_pair_id"]:
        print(f"  trace a pair: megapairs lineage {s['example_pair_id']}")
    print("  browse:      megapairs ui   (the Dagster UI on workspace.yaml, same instance)")
    print("  status:      megapairs status   (each asset's partitions; any that need attention)")

"""The end-of-run summary printed by `megapairs demo`: what was made, and where.

Everything is read back from the outputs and the catalog, not from the runs' own memory.
"""

from __future__ import annotations

import json
import shlex
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from megapairs_assets.corpus.table import unexpected_unread
from megapairs_assets.embeddings.sources import source_named
from megapairs_assets.evaluation.catalog_rows import heldout_summary_lines
from megapairs_assets.generation.common import TRIPLETS_ASSET
from megapairs_assets.generation.triplets import generation_summary, sample_query
from megapairs_assets.lib.errors import first_line, storage_errors
from megapairs_assets.lib.storage import DataLayout, read_parquet
from megapairs_assets.lib.words import plural
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.lineage.id_lists import IN_IDS, id_list
from megapairs_assets.mining.step import ASSET_NAME as PAIRS_ASSET
from megapairs_assets.training.names import ASSET_NAME as CHECKPOINT_ASSET

# embeddings.compute.NO_CAPTION (not imported: that module loads torch). An image without a
# caption is kept; only the caption source skips it, so it is no quarantine.
_NO_CAPTION = "no_caption"
_CAPTION_SOURCE = "caption_text"
# evaluation.step.ASSET_NAME (not imported: that module loads torch).
SCORES_ASSET = "benchmark_scores"


def mining_summary(layout: DataLayout, catalog: LineageCatalog, shards: list[str]) -> dict:
    """Images, quarantine by reason and pairs by source over `shards`.

    `quarantine`: rejected items by stage and reason; images the caption source skipped for
    having no caption are kept, so they are not in it but counted as `no_caption`.
    `empty_sources`: sources that mined no pair because their embedding tables hold no row
    (the caption source on a corpus without captions).
    """
    return {**catalog_mining_summary(catalog, shards), **stored_pairs_summary(layout, shards)}


def catalog_mining_summary(catalog: LineageCatalog, shards: list[str]) -> dict:
    """The part of `mining_summary` the lineage catalog alone holds (images, quarantine), so
    the summary can still say it when the data root cannot be read."""
    images = catalog.query(
        f"SELECT count(*) AS n FROM image_lineage WHERE shard {IN_IDS}", [id_list(shards)]
    )["n"][0]
    by_reason = catalog.query(
        f"SELECT stage, reason, count(*) AS n FROM quarantine_log WHERE shard {IN_IDS} "
        "GROUP BY ALL ORDER BY n DESC, stage, reason",
        [id_list(shards)],
    )
    skipped = by_reason.filter(pl.col("reason") == _NO_CAPTION)
    return {
        "images": int(images),
        "quarantine": by_reason.filter(pl.col("reason") != _NO_CAPTION),
        "no_caption": int(skipped["n"].sum()) if skipped.height else 0,
    }


def stored_pairs_summary(layout: DataLayout, shards: list[str]) -> dict:
    """The part of `mining_summary` read from the data root: pairs by source, the sources
    that had nothing to mine, an example pair. Raises a `storage_errors()` error when the data
    root cannot be read."""
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
        "empty_sources": [
            source
            for source, count in per_source.items()
            if count == 0 and _has_only_empty_tables(layout, source, shards)
        ],
        "pairs": pairs.height,
        "pairs_per_source": per_source,
        "example_pair_id": pairs["pair_id"][0] if pairs.height else None,
    }


def _has_only_empty_tables(layout: DataLayout, source: str, shards: list[str]) -> bool:
    """Whether `source`'s embedding tables over `shards` exist and hold no row at all."""
    try:
        asset = source_named(source).embedding_asset
    except KeyError:
        return False
    paths = [layout.shard_table(asset, shard) for shard in shards]
    tables = [read_parquet(path, columns=["image_id"]) for path in paths if path.exists()]
    return bool(tables) and all(table.is_empty() for table in tables)


def mining_lines(summary: Mapping[str, Any]) -> list[str]:
    """The summary's quarantine lines, the images without a caption (kept, so apart from the
    quarantine), and why a source mined no pairs."""
    quarantine: pl.DataFrame = summary["quarantine"]
    lines = [f"  quarantined: {int(quarantine['n'].sum()) if quarantine.height else 0}"]
    lines += [
        f"    {row['stage']}: {row['reason']} x{row['n']}"
        for row in quarantine.iter_rows(named=True)
    ]
    if summary["no_caption"]:
        images = plural(summary["no_caption"], "image")
        lines.append(f"  no caption:  {images} (kept; the caption source skips them)")
    return lines


def source_hint_lines(summary: Mapping[str, Any]) -> list[str]:
    """Why sources mined no pairs: no rows to compare (no captions at all, for the caption
    source), else where the band_positions table says their neighbours' scores fell."""
    lines = []
    empty = summary["empty_sources"]
    for source in empty:
        if source == _CAPTION_SOURCE:
            lines.append(
                f"    {source} mined no pairs: no captions (its caption table has no rows; give "
                "images captions, e.g. a <stem>.txt beside each, to mine by caption)"
            )
        else:
            lines.append(f"    {source} mined no pairs: its embedding table has no rows")
    if any(count == 0 and s not in empty for s, count in summary["pairs_per_source"].items()):
        lines.append(
            "    a source mined no pairs: the band_positions table on mined_image_pairs (and "
            "each shard's log line) says where its neighbours' scores fell"
        )
    return lines


def training_lines(
    catalog: LineageCatalog,
    query: tuple[Any, str] | None = None,
    layout: DataLayout | None = None,
    trained_now: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[str]:
    """Per trained config: its newest complete checkpoint's row counts and time, then the
    commands that score its export (the folder a user would otherwise have to look for) and
    search with it (`query`: an image and a text to try, e.g. the sample triplet's).

    `trained_now`: config -> the metadata of its checkpoint materialized by this command's
    runs (`checkpoint_metadata`), which says whether the run trained, resumed, or found the
    config already trained and only exported it (then the time is the export's, and the line
    says so).

    Both commands load from this machine: an export on an object store is named by its local
    copy under `layout`'s home (where evaluation mirrors it), and a query image that is not a
    local file is left out of the search command, with a line saying where it is."""
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
        metadata = (trained_now or {}).get(row["partition"])
        # Steps are checkpoint metadata (not a row count); catalog rows written before that
        # still hold them among their row counts.
        steps = counts.pop("steps", None) or (metadata or {}).get("steps")
        detail = ", ".join(
            [f"{k} {v}" for k, v in counts.items()] + ([f"steps {steps}"] if steps else [])
        )
        how = _how_trained(steps, metadata, row["duration_s"])
        lines.append(f"  checkpoint:  config {row['partition']!r}, {detail} {how}")
        export = json.loads(row["output_paths"] or "{}").get("open_clip_dir")
        if not export:
            continue
        export = _local_export(str(export), layout)
        quoted = shlex.quote(export)
        lines.append(f"    score it:  megapairs eval --retriever {quoted} --benchmark heldout")
        image, text = query or ("<image>", "<what to change>")
        if _is_url(str(image)):
            lines.append(
                f"    use it:    megapairs search --retriever {quoted} --text {shlex.quote(text)}"
            )
            lines.append(
                f"               (its query image is {image}; search reads local files: "
                "copy it here and add --image <that file>)"
            )
        else:
            lines.append(
                f"    use it:    megapairs search --retriever {quoted} "
                f"--image {shlex.quote(str(image))} --text {shlex.quote(text)}"
            )
    return lines


def _how_trained(steps: Any, metadata: Mapping[str, Any] | None, duration_s: float) -> str:
    """'in 10.3 s', or what the run did instead of training from the start: found the config
    already trained (its resume point at the last step) and only exported it, or resumed."""
    resumed = int((metadata or {}).get("resumed_from_step") or 0)
    if steps and resumed >= int(steps):
        return (
            f"(already trained in an earlier run: exported again without training, "
            f"{duration_s:.1f} s)"
        )
    if resumed:
        return f"(resumed at step {resumed}, trained to step {steps} in {duration_s:.1f} s)"
    return f"in {duration_s:.1f} s"


def checkpoint_metadata(results: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """config -> the metadata (plain values) of the checkpoint each of `results` (Dagster run
    results) materialized for it; the newest run wins."""
    found: dict[str, dict[str, Any]] = {}
    for result in results:
        for event in result.get_asset_materialization_events():
            materialization = event.materialization
            if (
                materialization.asset_key.to_user_string() == CHECKPOINT_ASSET
                and materialization.partition
            ):
                found[materialization.partition] = {
                    key: getattr(value, "value", value)
                    for key, value in materialization.metadata.items()
                }
    return found


def remade_assets(catalog: LineageCatalog, run_ids: Sequence[str]) -> set[str]:
    """The assets `run_ids` completed a materialization of (any partition), per the catalog."""
    if not run_ids:
        return set()
    frame = catalog.query(
        f"SELECT DISTINCT asset FROM materializations WHERE status = 'complete' "
        f"AND run_id {IN_IDS}",
        [id_list(list(run_ids))],
    )
    return set(frame["asset"].to_list())


def _is_url(path: str) -> bool:
    return "://" in path


def _local_export(export: str, layout: DataLayout | None) -> str:
    """`export` itself when it is a local folder, else its local copy under the home (eval and
    search load open_clip exports from this machine only)."""
    marker = f"/{CHECKPOINT_ASSET}/"
    if not _is_url(export) or layout is None or marker not in export:
        return export
    from megapairs_assets.evaluation.step import local_checkpoint_root  # imports torch

    relative = export.split(marker, 1)[1]
    return str(local_checkpoint_root(layout) / relative)


def local_query(query: tuple[Any, str] | None, catalog: LineageCatalog) -> tuple[Any, str] | None:
    """`query` with its image made a local file where one exists: an exported image on an
    object store (`images/<shard>/<key>.jpg`) is replaced by its corpus source image when that
    is a plain local file; otherwise the query is kept as it is (the caller says where)."""
    if query is None or not _is_url(str(query[0])):
        return query
    image, text = query
    parts = str(image).rstrip("/").split("/")
    image_id = f"{parts[-2]}/{parts[-1].removesuffix('.jpg')}"
    found = catalog.query(
        "SELECT source_uri FROM image_lineage WHERE image_id = ? LIMIT 1", [image_id]
    )
    source = found["source_uri"][0] if found.height else None
    if source and not _is_url(source) and "#" not in source and Path(source).is_file():
        return Path(source), text
    return query


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
    """Print the end-of-run summary. Never raises for a data root that cannot be read (an
    object store that went away, missing credentials): what the catalog knows is still
    printed, the tables' parts are left out, and one line says why."""
    layout: DataLayout = resources["storage"].layout()
    catalog: LineageCatalog = resources["catalog"].catalog()
    unreadable: list[BaseException] = []  # the first storage error; later reads are skipped

    def stored(read: Callable[[], Any], default: Any = None) -> Any:
        """`read()` from the data root, or `default` once the data root failed to read."""
        if unreadable:
            return default
        try:
            return read()
        except storage_errors() as error:
            unreadable.append(error)
            return default

    s = catalog_mining_summary(catalog, shards)
    s.update(stored(lambda: stored_pairs_summary(layout, shards), {}))
    run_ids = [result.run_id for result in results]
    print()
    runs = plural(len(run_ids), "run")
    print(f"done in {wall_s:.1f} s ({runs}: {', '.join(r[:8] for r in run_ids)})")
    print(f"  images:      {s['images']} valid across {plural(len(shards), 'shard')}")
    for line in mining_lines(s):
        print(line)
    report = layout.corpus_source_report()
    unread = stored(lambda: _unread_entries(report))
    if unread is not None and unread.height:
        entries = plural(unread.height, "entry")
        print(f"  not read:    {entries} of the corpus source ({report})")
    if "pairs" in s:
        print(f"  mined pairs: {s['pairs']}  by source: {s['pairs_per_source']}")
        for line in source_hint_lines(s):
            print(line)
    for line in check_lines(results):
        print(line)
    # Outputs of later stages that these runs did not remake (`--until mine` over an older
    # full run) were made from other pairs: they are named, not shown as if they were current.
    remade = remade_assets(catalog, run_ids)
    earlier: list[str] = []
    generated = stored(lambda: generation_summary(layout, shards))
    if generated and TRIPLETS_ASSET in remade:
        print(generated)
    elif generated:
        earlier.append("triplets")
    trained = training_lines(
        catalog,
        local_query(stored(lambda: sample_query(layout, shards)), catalog),
        layout,
        checkpoint_metadata(results),
    )
    if trained and CHECKPOINT_ASSET in remade:
        for line in trained:
            print(line)
    elif trained:
        earlier.append("checkpoint")
    base_id = resources["evaluation"].base_spec().retriever_id
    scores = heldout_summary_lines(catalog, base_id)
    if scores and SCORES_ASSET in remade:
        for line in scores:
            print(f"  {line}")
    elif scores:
        earlier.append("held-out scores")
    if earlier:
        print(
            f"  earlier:     {', '.join(earlier)} left out: made by earlier runs, not remade "
            "now, so they may not match these pairs (`megapairs demo` remakes them)"
        )
    if unreadable:
        print(
            f"  data root:   could not be read ({first_line(unreadable[0])}); pairs, triplets "
            "and the corpus report are left out"
        )
    print(f"  outputs:     {layout.data_dir}")
    print(f"  catalog:     {catalog.location}")
    if s.get("example_pair_id"):
        print(f"  trace a pair: megapairs lineage {s['example_pair_id']}")
    print("  browse:      megapairs ui   (the Dagster UI on workspace.yaml, same instance)")
    print("  status:      megapairs status   (each asset's partitions; any that need attention)")


def _unread_entries(report: Any) -> pl.DataFrame | None:
    """The corpus source report's unexpected unread entries; None when there is no report."""
    if not report.exists():
        return None
    return unexpected_unread(read_parquet(report))  # not the demo corpus's licence

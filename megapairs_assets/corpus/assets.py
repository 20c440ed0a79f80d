"""Dagster wiring of the image corpus: one partition per shard, and a sensor for its shards."""

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import dagster as dg

from megapairs_assets.corpus.sources import SourceListings, shard_file_fingerprints
from megapairs_assets.corpus.step import (
    ASSET_NAME,
    CORPUS_CHECKS,
    CROSS_SHARD_CHECKS,
    build_corpus_shard,
)
from megapairs_assets.corpus.table import (
    CORPUS_COLUMN_DESCRIPTIONS,
    unexpected_unread,
    unread_summary,
    write_source_report,
)
from megapairs_assets.embeddings.sources import SOURCES
from megapairs_assets.orchestration.partitions import (
    SHARD_BACKFILL_POLICY,
    SHARD_PARTITIONS_NAME,
    shard_asset_options,
    shard_partitions,
)
from megapairs_assets.orchestration.runs import shard_range_tags
from megapairs_assets.orchestration.settings_version import fields
from megapairs_assets.orchestration.shard_step import Stage, materialize_partitions
from resources.corpus import CorpusSourceResource
from resources.storage import LineageCatalogResource, StorageResource


def corpus_settings(resources: Any) -> dict[str, Any]:
    """What decides a shard's rows: the source layout and the validation limits (not where the
    source lives: the same bytes elsewhere make the same table)."""
    return fields(
        resources.corpus_source,
        (
            "kind",
            "shard_size",
            "min_side_px",
            "max_pixels",
            "max_caption_chars",
            "max_aspect_ratio",
        ),
    )


_UNREAD_NAMED = 3
"""How many unread source entries the corpus step's warning names."""

STAGE = Stage(
    ASSET_NAME,
    "corpus-v1",
    CORPUS_CHECKS,
    CROSS_SHARD_CHECKS,
    corpus_settings,
    columns=CORPUS_COLUMN_DESCRIPTIONS,
)


@dg.asset(
    name=ASSET_NAME,
    kinds={"parquet", "duckdb"},
    check_specs=STAGE.check_specs(),
    **shard_asset_options("corpus", STAGE.code_version),
)
def image_corpus(
    context: dg.AssetExecutionContext,
    corpus_source: CorpusSourceResource,
    storage: StorageResource,
    catalog: LineageCatalogResource,
) -> dg.MaterializeResult:
    """The image corpus of one shard: valid images with captions, and a quarantine table.

    Every input is read once and validated (decodable, size limits, duplicate keys and
    content). Rejected inputs get a quarantine row with a reason; the rest of the shard goes on.
    Output per shard: `images.parquet` (image_id, source_uri, caption, width, height,
    content_hash, ...) and `quarantine.parquet` (source_uri, reason, detail).
    """
    layout, lineage = storage.layout(), catalog.catalog()
    spec, limits = corpus_source.spec(), corpus_source.limits()
    # Entries of the source that no shard reads (odd files, unsafe names) are reported, never
    # silently dropped: data/image_corpus/source_report.parquet.
    # One listing of a folder source for the whole step: every shard reads from it (see
    # SourceListings for why that is never stale).
    listings = SourceListings()
    unread = write_source_report(spec, layout, listings)
    # The warning names the first entries itself and no file: the report may live in a home
    # that is gone by the time someone reads the log (`megapairs check`'s throwaway one); the
    # materialization's metadata names it. The bundled demo corpus's licence and provenance
    # files are expected there, so they are not news.
    unexpected = unexpected_unread(unread)
    if unexpected.height:
        every = " (every entry: the source_report of this materialization's metadata)"
        context.log.warning(
            unread_summary(unexpected, _UNREAD_NAMED)
            + (every if unexpected.height > _UNREAD_NAMED else "")
        )
    return materialize_partitions(
        context,
        STAGE,
        lambda shard: build_corpus_shard(
            shard, spec, limits, layout, lineage, context.log.info, listings
        ),
        lineage,
        storage.profile,
        run_metadata={
            "unread_source_entries": unread.height,
            "unexpected_unread_source_entries": unexpected.height,
            "source_report": dg.MetadataValue.path(str(layout.corpus_source_report())),
        },
    )


def shard_changes(found: list[str], known: list[str]) -> tuple[list[str], list[str]]:
    """(new shards, shards gone from the source) between the source and the partition set."""
    found_set, known_set = set(found), set(known)
    return [s for s in found if s not in known_set], sorted(known_set - found_set)


# The graphs that search the whole corpus: after shards leave it, every remaining shard's graph
# still lists neighbours in them, and no partition update tells automation so.
KNN_ASSETS = [source.knn_asset for source in SOURCES]


def knn_refresh_requests(remaining: Sequence[str], retired: Sequence[str]) -> list[dg.RunRequest]:
    """Runs re-searching the KNN graphs of the `remaining` shards (in partition-set order),
    in ranges of at most the shard assets' backfill chunk; automation carries the changes on."""
    chunk = SHARD_BACKFILL_POLICY.max_partitions_per_run or len(remaining)
    retired_key = hashlib.sha256(",".join(sorted(retired)).encode()).hexdigest()[:12]
    return [
        dg.RunRequest(
            run_key=f"knn-after-retiring-{retired_key}-{shards[0]}",
            asset_selection=[dg.AssetKey(name) for name in KNN_ASSETS],
            tags=shard_range_tags(list(shards)),
        )
        for shards in (remaining[i : i + chunk] for i in range(0, len(remaining), chunk))
    ]


_UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def shards_in_unfinished_runs(instance: dg.DagsterInstance, order: Sequence[str]) -> set[str]:
    """The shards (of `order`, the partition set's order) that a queued or running run works on,
    by its partition or partition-range tags."""
    position = {shard: index for index, shard in enumerate(order)}
    busy: set[str] = set()
    for run in instance.get_runs(dg.RunsFilter(statuses=_UNFINISHED)):
        tags = run.tags
        if tags.get("dagster/partition") in position:
            busy.add(tags["dagster/partition"])
        start = position.get(tags.get("dagster/asset_partition_range_start", ""))
        end = position.get(tags.get("dagster/asset_partition_range_end", ""))
        if start is not None and end is not None:
            busy.update(order[start : end + 1])
    return busy


def _fingerprints_from_cursor(cursor: str | None) -> dict[str, str]:
    """The shard files' fingerprints the sensor saw last (none from a cursor of before)."""
    try:
        value = json.loads(cursor) if cursor else {}
    except ValueError:
        return {}
    files = value.get("shard_files") if isinstance(value, dict) else None
    return dict(files) if isinstance(files, dict) else {}


def build_shards_sensor(
    default_status: dg.DefaultSensorStatus, shard_assets: Sequence[str]
) -> dg.SensorDefinition:
    """The sensor keeping the `shards` partition set equal to the corpus source's shards;
    `shard_assets` names the shard-partitioned assets whose partitions a removed shard retires."""

    @dg.sensor(
        name="new_shards_sensor",
        minimum_interval_seconds=60,
        default_status=default_status,
        asset_selection=[ASSET_NAME, *KNN_ASSETS],
    )
    def new_shards_sensor(
        context: dg.SensorEvaluationContext,
        corpus_source: CorpusSourceResource,
        catalog: LineageCatalogResource,
    ) -> dg.SensorResult | dg.SkipReason:
        """Registers shards that appeared in the corpus source and materializes their corpus;
        materializes again a registered shard whose file or folder changed since the last tick
        (replaced in place, or still being written when it was first seen); removes shards that
        left it (their row lineage and tables are retired from the dataset, their files stay
        until a user deletes them) and searches the remaining shards' KNN graphs again, so none
        lists a retired image (automation then refreshes what follows; with new shards too,
        their embeddings already make every graph search again)."""
        try:
            found = corpus_source.shard_ids()
            seen = shard_file_fingerprints(corpus_source.spec(), found)
        except Exception as error:  # a bad source must not kill the sensor daemon
            return dg.SkipReason(f"corpus source unreadable: {error}")
        known = list(context.instance.get_dynamic_partitions(SHARD_PARTITIONS_NAME))
        new, gone = shard_changes(found, known)
        before = _fingerprints_from_cursor(context.cursor)
        changed = [s for s in known if s in seen and s in before and seen[s] != before[s]]
        if changed:
            # Read again only once no run works on the shard: a step still reading its old
            # rows would land after the re-read and count as up to date for automation.
            busy = shards_in_unfinished_runs(context.instance, known) & set(changed)
            if busy:
                context.log.info(f"{len(busy)} changed shards wait for their runs: {sorted(busy)}")
                seen = {**seen, **{shard: before[shard] for shard in busy}}
                changed = [shard for shard in changed if shard not in busy]
        cursor = json.dumps({"shard_files": seen}, sort_keys=True)
        if not new and not gone and not changed:
            if seen != before:
                context.update_cursor(cursor)
            return dg.SkipReason(f"no shard changes ({len(found)} shards)")
        if known and len(gone) == len(known):
            # Every shard at once: far more likely the sensor reads another corpus than the
            # one the home was built from (a process started without the home's settings)
            # than a user replacing the whole corpus; retiring would drop all its lineage.
            return dg.SkipReason(
                f"the corpus source {corpus_source.path} holds none of the {len(known)} "
                "registered shards; nothing is retired by the sensor. To switch this home to "
                "that corpus, run `megapairs sync` (or `megapairs demo --corpus <path>`); "
                "else start the UI with the home's settings"
            )
        requests = []
        if new:
            requests.append(shard_partitions.build_add_request(new))
        if gone:
            catalog.catalog().retire_partitions(gone, shard_assets)
            requests.append(shard_partitions.build_delete_request(gone))
            context.log.warning(f"{len(gone)} shards left the corpus source: {gone[:10]}")
        if changed:
            context.log.info(f"{len(changed)} shards changed in place: {changed[:10]}")
        corpus_only = [dg.AssetKey(ASSET_NAME)]
        run_requests = [
            dg.RunRequest(partition_key=shard, asset_selection=corpus_only) for shard in new
        ] + [
            dg.RunRequest(
                partition_key=shard,
                asset_selection=corpus_only,
                run_key=f"changed-{shard}-{seen[shard]}",
            )
            for shard in changed
        ]
        if gone and not new:
            remaining = [shard for shard in known if shard not in set(gone)]
            run_requests += knn_refresh_requests(remaining, gone)
        return dg.SensorResult(
            run_requests=run_requests, dynamic_partitions_requests=requests, cursor=cursor
        )

    return new_shards_sensor

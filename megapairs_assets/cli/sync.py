"""`megapairs sync`: bring the partition sets up to date without a running daemon.

The sensors `new_shards_sensor` and `training_configs_sensor` keep the `shards` and
`training_configs` partition sets equal to the corpus source and the training resource, but
only while a Dagster daemon runs (`megapairs ui`, a cluster). Without one, a shard added to the
corpus or a config added to `resources/training.py` has no partition, and
`dagster asset materialize --partition NEW` is refused. This does what those two sensors do,
once, on the home's instance: registers new shards and configs, removes the partitions of
shards that left the corpus (their lineage rows are retired, as the sensor does) and of
configs the resource no longer has. It materializes nothing; `--dry-run` only prints.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sync",
        help="register new shards and training configs as partitions (what the sensors do)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true", help="print the changes, make none")
    parser.set_defaults(func=cmd_sync)
    return parser


def cmd_sync(args: argparse.Namespace) -> int:
    import dagster as dg

    from megapairs_assets.cli.instance import prepare_dagster_home
    from megapairs_assets.corpus.assets import shard_changes
    from megapairs_assets.definitions import build_definitions
    from megapairs_assets.lib.storage import default_home
    from megapairs_assets.lib.words import plural
    from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME, shard_asset_names
    from megapairs_assets.training.assets import (
        TRAINING_CONFIG_PARTITIONS_NAME,
        split_config_names,
    )
    from resources.environment import lineage_catalog, profile_from_env

    home = default_home()
    prepare_dagster_home(home)
    defs = build_definitions(profile_from_env(), home)
    resources = defs.resources
    instance = dg.DagsterInstance.get()
    verb = "would be" if args.dry_run else "are"

    found = resources["corpus_source"].shard_ids()  # a bad source is a configuration error
    new, gone = shard_changes(found, list(instance.get_dynamic_partitions(SHARD_PARTITIONS_NAME)))
    configs, invalid = split_config_names(resources["training"].configs)
    known = list(instance.get_dynamic_partitions(TRAINING_CONFIG_PARTITIONS_NAME))
    new_configs = [name for name in configs if name not in known]
    gone_configs = [name for name in known if name not in configs]

    print(f"megapairs sync: {plural(len(found), 'shard')} in the corpus source, home {home}")
    for problem in invalid.values():
        print(f"  training config not registered: {problem}")
    if not (new or gone or new_configs or gone_configs):
        print("  nothing to change: every shard and training config has its partition")
        return 0
    if new:
        print(f"  {plural(len(new), 'new shard')} {verb} registered: {_first(new)}")
    if gone:
        print(f"  {plural(len(gone), 'shard')} left the corpus and {verb} retired: {_first(gone)}")
    if new_configs:
        print(f"  new training configs {verb} registered: {', '.join(new_configs)}")
    if gone_configs:
        print(f"  training configs no longer in the resource {verb} removed: {gone_configs}")
    if args.dry_run:
        return 0
    if new:
        instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, new)
    if gone:
        # As the sensor does: the partitions go, their lineage rows are marked retired.
        lineage_catalog(home).retire_partitions(gone, shard_asset_names(defs.assets))
        for shard in gone:
            instance.delete_dynamic_partition(SHARD_PARTITIONS_NAME, shard)
        if found:
            # The sensor requests this itself; without a daemon, the user runs it.
            print(
                "  the other shards' KNN graphs still list images of the retired ones: search "
                "them again with `megapairs demo` (unchanged embeddings are reused) or the "
                "`mining_half` job over their range"
            )
    if new_configs:
        instance.add_dynamic_partitions(TRAINING_CONFIG_PARTITIONS_NAME, new_configs)
    for name in gone_configs:
        instance.delete_dynamic_partition(TRAINING_CONFIG_PARTITIONS_NAME, name)
    return 0


def _first(names: list[str], count: int = 10) -> str:
    more = f", ... ({len(names) - count} more)" if len(names) > count else ""
    return ", ".join(names[:count]) + more

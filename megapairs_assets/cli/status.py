"""`megapairs status`: where every asset of the home stands, partition by partition.

Reads the lineage catalog (the newest record of each partition) and the Dagster instance's
partition sets (registered shards, training configs; for `benchmark_scores` every registered
retriever x benchmark), and prints per asset how many partitions are complete, failed a
blocking check, read an input re-materialized since, failed, are pending (running, or left by a
killed step), are missing (registered, never materialized) or retired, and how many inputs it
quarantined; then each partition that needs attention.
`--json` prints the same as JSON. Exit code 0 either way (1 when there is no catalog yet).
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "status",
        help="each asset's partitions: complete, failing checks, failed, pending, missing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=cmd_status)
    return parser


def cmd_status(args: argparse.Namespace) -> int:
    import dagster as dg

    from megapairs_assets.cli.instance import prepare_dagster_home
    from megapairs_assets.cli.lineage import existing_catalog
    from megapairs_assets.definitions import build_definitions
    from megapairs_assets.evaluation.assets import BENCHMARK_DIMENSION
    from megapairs_assets.lib.storage import default_home
    from megapairs_assets.lineage.status import asset_status, format_status
    from resources.environment import profile_from_env

    home = default_home()
    catalog = existing_catalog(home)
    if catalog is None:
        return 1
    # Importing the definitions also declares every stage's catalog tables.
    defs = build_definitions(profile_from_env(), home)
    graph = defs.resolve_asset_graph()
    # Scores are expected only on the benchmarks this home can score (their folders set, and
    # the held-out split), as the demo and the retriever sensors score them.
    scored_benchmarks = set(defs.resources["evaluation"].configured_benchmarks())
    prepare_dagster_home(home)
    instance = dg.DagsterInstance.get()
    assets, expected = [], {}
    for key in graph.toposorted_asset_keys:
        name = key.to_user_string()
        assets.append(name)
        partitions = graph.get(key).partitions_def
        if partitions is not None:
            # Dagster's own list: a dynamic set's registered keys; a multi-partitioned asset's
            # product of its dimensions' keys (benchmark_scores: retrievers x benchmarks), each
            # as the string the catalog records.
            keys = partitions.get_partition_keys(dynamic_partitions_store=instance)
            expected[name] = [
                str(partition)
                for partition in keys
                if not isinstance(partition, dg.MultiPartitionKey)
                or partition.keys_by_dimension.get(BENCHMARK_DIMENSION, "") in scored_benchmarks
                or BENCHMARK_DIMENSION not in partition.keys_by_dimension
            ]
    report = asset_status(catalog, assets, expected)
    if args.json:
        print(json.dumps([s.as_dict() for s in report], indent=2, default=str))
        return 0
    print(f"megapairs status: {home} (catalog {catalog.location})\n")
    print(format_status(report))
    print(
        "\ninputs changed: complete partitions that read an input re-materialized since "
        "(Dagster's UI says whether its content changed); `megapairs lineage 'asset[partition]'` "
        "shows one partition's chain"
    )
    return 0

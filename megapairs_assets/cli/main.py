"""The `megapairs` command: run the demo graph in process, trace lineage, open the UI."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DAGSTER_YAML = "telemetry:\n  enabled: false\n"


def _prepare_dagster_home(home: Path) -> Path:
    """Use `$DAGSTER_HOME` if set, else `<home>/dagster`, so the UI later shows the same runs."""
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or home / "dagster")
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dagster_home


def cmd_demo(args: argparse.Namespace) -> int:
    """Materialize the whole graph for every shard in one in-process run, then summarize."""
    import dagster as dg
    from dagster._core.storage.tags import (
        ASSET_PARTITION_RANGE_END_TAG,
        ASSET_PARTITION_RANGE_START_TAG,
    )

    from megapairs_assets.cli.summary import print_summary
    from megapairs_assets.corpus.assets import shard_changes
    from megapairs_assets.corpus.sources import list_shards
    from megapairs_assets.definitions import build_definitions
    from megapairs_assets.lib.storage import DataLayout, default_home
    from megapairs_assets.lineage.catalog import LineageCatalog
    from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
    from resources.profiles import profile_from_env

    started = time.perf_counter()
    home, profile = default_home(), profile_from_env()
    print(f"megapairs: profile {profile!r}, data root {home}")
    _prepare_dagster_home(home)
    defs = build_definitions(profile, home)
    resources = defs.resources
    print("checking configuration (building demo models on first use)...")
    for key in ("clip_image_encoder", "dino_image_encoder", "caption_text_encoder"):
        dim = resources[key].validate()
        print(f"  {key}: {resources[key].model_id} ({dim}-d)")
    resources["mining"].params()
    shards = list_shards(resources["corpus_source"].spec())
    if not shards:
        print(f"no shards found in {resources['corpus_source'].path}", file=sys.stderr)
        return 1
    instance = dg.DagsterInstance.get()
    new, gone = shard_changes(shards, list(instance.get_dynamic_partitions(SHARD_PARTITIONS_NAME)))
    for shard in gone:
        instance.delete_dynamic_partition(SHARD_PARTITIONS_NAME, shard)
    if gone:
        removed = LineageCatalog(DataLayout(home).catalog_path).retire_partitions(gone)
        print(f"  {len(gone)} shards left the corpus source ({', '.join(gone[:5])}): removed "
              f"from the partition set, {removed} lineage rows retired")
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, new)
    print(f"materializing the mining half for {len(shards)} shards ({shards[0]}..{shards[-1]})")
    log_level = "WARNING" if args.quiet else "INFO"
    result = defs.resolve_job_def("mining_half").execute_in_process(
        instance=instance,
        tags={
            ASSET_PARTITION_RANGE_START_TAG: shards[0],
            ASSET_PARTITION_RANGE_END_TAG: shards[-1],
        },
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        raise_on_error=False,
    )
    print_summary(home, shards, time.perf_counter() - started, run_id=result.run_id)
    if not result.success:
        print("the run failed: see the log above or `megapairs ui`", file=sys.stderr)
        return 1
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from megapairs_assets.lib.storage import DataLayout, default_home
    from megapairs_assets.lineage.catalog import LineageCatalog
    from megapairs_assets.lineage.report import lineage_report

    catalog_path = DataLayout(default_home()).catalog_path
    if not catalog_path.exists():
        print(f"no lineage catalog at {catalog_path}: run `megapairs demo` first", file=sys.stderr)
        return 1
    report = lineage_report(LineageCatalog(catalog_path), args.id)
    if report is None:
        print(
            f"{args.id!r} is not a pair id, image id or quarantined uri in {catalog_path}",
            file=sys.stderr,
        )
        return 1
    print(report)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """`dagster dev` on this project's workspace, sharing the demo's Dagster instance."""
    from megapairs_assets.lib.storage import default_home

    _prepare_dagster_home(default_home())
    workspace = Path(__file__).resolve().parents[2] / "workspace.yaml"
    command = ["dagster", "dev", "-w", str(workspace), "-h", args.host, "-p", str(args.port)]
    os.execvp(command[0], command)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megapairs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole graph on the profile's corpus, in process")
    demo.add_argument("--quiet", action="store_true", help="only warnings from Dagster")
    demo.set_defaults(func=cmd_demo)
    lineage = sub.add_parser("lineage", help="print the chain behind a pair id or image id")
    lineage.add_argument("id")
    lineage.set_defaults(func=cmd_lineage)
    ui = sub.add_parser("ui", help="open the Dagster UI on this workspace")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

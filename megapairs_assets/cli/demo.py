"""`megapairs demo`: the whole graph on the profile's corpus (or `--corpus`), in one process."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

# The loop, in order; each phase is one Dagster run (a run holds one partitioning).
PHASES = ("mine", "generate", "train", "evaluate")

FAISS_HINT = (
    "faiss is not installed: install the project with one faiss extra, "
    '`.venv/bin/pip install -e ".[cpu,dev]"` (or ".[gpu,dev]" on CUDA 12 machines)'
)


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the whole graph on the profile's corpus (or --corpus), in process",
        description="Mine, generate, train and evaluate in this process, on the profile's corpus "
        "(or --corpus), with the Dagster instance and lineage catalog under $MEGAPAIRS_HOME "
        "(default ./megapairs_home). A home holds one corpus: shards missing from the corpus "
        "given are retired there, so give another corpus its own MEGAPAIRS_HOME. Running the "
        "same command again resumes; `megapairs ui` shows the runs.",
    )
    demo.add_argument("--quiet", action="store_true", help="only warnings from Dagster")
    demo.add_argument(
        "--corpus",
        type=Path,
        help="your own corpus instead of the bundled one: a folder of webdataset .tar shards, "
        "a single .tar shard, a folder of images or of image folders, or a .parquet/.jsonl "
        "manifest",
    )
    demo.add_argument(
        "--until",
        choices=PHASES,
        default=PHASES[-1],
        help="stop after this phase (default: the whole loop: mine, generate, train, evaluate)",
    )
    demo.set_defaults(func=run_demo)


# What "checking configuration" does under each profile, said before it starts.
CHECKING = {
    "demo": "building the demo profile's small models on first use",
    "paper": "the paper profile's corpus, weights, servers and devices; nothing is downloaded",
}


RESUME_HINT = (
    "interrupted: what finished is kept (completed partitions, cached model answers, the last "
    "training checkpoint); run the same command again to resume"
)


def was_interrupted(result: Any) -> bool:
    """Whether a run ended because the user pressed Ctrl-C: Dagster turns SIGINT into a
    DagsterExecutionInterruptedError inside the step and records the run as failed. A library
    interrupted mid-call may fail with its own error instead (DuckDB: "Query interrupted"),
    caused by Dagster's: the whole chain of each error counts."""
    from megapairs_assets.orchestration.console import event_error, is_interrupt

    return any(is_interrupt(event_error(event)) for event in result.all_events)


def last_run_messages(instance: Any, run_id: str, count: int = 3) -> list[str]:
    """The last `count` messages the run's steps logged (Dagster's own events left out).

    After Ctrl-C they are what the user needs (training: "interrupted after step 13 of 60;
    its state is saved in ..."), and the terminal may not have shown them: Dagster's captured
    step output is copied by child processes that the same Ctrl-C stops first."""
    messages = [
        entry
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is None and entry.user_message and entry.step_key
    ]
    return [f"{entry.step_key}: {entry.user_message}" for entry in messages[-count:]]


def run_demo(args: argparse.Namespace) -> int:
    """Materialize a job for every shard of the corpus in one in-process run, then summarize."""
    from megapairs_assets.demo.models import quiet_demo_models_note

    if args.quiet:  # warnings only: the untrained-demo-models note is not one
        with quiet_demo_models_note():
            return _run_demo(args)
    return _run_demo(args)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    # Without a CUDA GPU every KNN runs on faiss (with one, exact torch search needs no faiss).
    if not torch.cuda.is_available():
        try:
            import faiss  # noqa: F401
        except ImportError:
            print(FAISS_HINT, file=sys.stderr)
            return 2
    import dagster as dg

    from megapairs_assets.cli.instance import prepare_dagster_home, release_dead_runs
    from megapairs_assets.cli.summary import print_summary
    from megapairs_assets.corpus.assets import shard_changes
    from megapairs_assets.corpus.sources import detect_source_kind
    from megapairs_assets.definitions import build_definitions
    from megapairs_assets.evaluation.assets import register_retrievers, score_partition_key
    from megapairs_assets.evaluation.step import known_retrievers
    from megapairs_assets.lib.errors import ConfigurationError
    from megapairs_assets.lib.storage import check_writable_folder, default_home
    from megapairs_assets.lib.words import is_or_are, plural
    from megapairs_assets.orchestration.console import (
        interrupt_quiet_console_logger,
        interrupts_survive_finalizers,
    )
    from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME, shard_asset_names
    from megapairs_assets.orchestration.runs import shard_range_tags
    from megapairs_assets.training.assets import register_training_configs
    from resources.cluster import ClusterSettings
    from resources.corpus import CorpusSourceResource, record_chosen_corpus
    from resources.environment import lineage_catalog, profile_from_env
    from resources.profiles import CORPUS_VARIABLE, ENCODER_RESOURCES, check_ready

    started = time.perf_counter()
    home, profile = default_home(), profile_from_env()
    overrides = {}
    if args.corpus is not None:
        corpus = args.corpus.expanduser()  # a quoted "~/photos" reaches us unexpanded
        overrides["corpus_source"] = CorpusSourceResource(
            kind=detect_source_kind(corpus), path=str(corpus.resolve())
        )
    print(f"megapairs: profile {profile!r}, home {home}")
    check_writable_folder(home, "MEGAPAIRS_HOME")
    if "corpus_source" in overrides:
        chosen = overrides["corpus_source"]
        from_env = os.environ.get(CORPUS_VARIABLE, "").strip()
        if profile == "paper" and from_env and Path(from_env).resolve() != Path(chosen.path):
            # Every other process would read the variable's corpus and retire these shards.
            raise ConfigurationError(
                f"--corpus {chosen.path} and {CORPUS_VARIABLE}={from_env} name different "
                f"corpora: drop --corpus, or set {CORPUS_VARIABLE} to it"
            )
        # Recorded for every other process on this home (the UI's code location and its
        # sensors, `sync`, `check`): they build the profile's resources, and would otherwise
        # read another corpus (the bundled one, or $MEGAPAIRS_HOME/corpus) and retire these
        # shards.
        record_chosen_corpus(home, chosen)
    prepare_dagster_home(home)
    # Dagster's console logger, except that an interrupted run's errors print without their
    # stack (Ctrl-C is not a bug); every job of the demo gets it as its "console" logger.
    defs = dg.Definitions.merge(
        build_definitions(profile, home, resource_overrides=overrides),
        dg.Definitions(loggers={"console": interrupt_quiet_console_logger}),
    )
    resources = defs.resources
    phases = PHASES[: PHASES.index(args.until) + 1]
    print(f"checking configuration ({CHECKING.get(profile, 'the profile')})...")
    # Opens the data root's filesystem: a bad URL fails here, before any step runs.
    tables = resources["storage"].layout().data_dir
    check_writable_folder(tables, "the data root's data folder")
    print(f"  tables: {tables}")
    # Opens (or creates) the lineage catalog: an unreachable DuckLake fails here too.
    catalog = resources["catalog"].catalog()
    print(f"  lineage catalog: {catalog.location} (schema v{catalog.schema_version()})")
    resources["mining"].params()
    source = resources["corpus_source"]
    if profile == "demo":
        # Every other demo setting is local, and checking the encoders builds the demo models:
        # a bad corpus is the one thing to fix, said in one line before any model is built.
        source.shard_ids()
    # Everything the phases up to --until need (corpus, weights, servers, devices), every
    # missing setting in one error, before any work.
    check_ready(resources, phases)
    shards = source.shard_ids()  # an empty source raises; only_shards may still leave none
    if not shards:
        raise ConfigurationError(f"none of the shards asked for is in {source.path}")
    for key in ENCODER_RESOURCES:
        dim = resources[key].dim or resources[key].validate()
        print(f"  {key}: {resources[key].model_id} ({dim}-d)")
    print(f"  corpus: {source.kind} {source.path}")
    instance = dg.DagsterInstance.get()
    if ClusterSettings.from_env().deployment == "embedded":  # runs of this machine only
        release_dead_runs(instance, log=lambda line: print(f"  {line}"))
    new, gone = shard_changes(shards, list(instance.get_dynamic_partitions(SHARD_PARTITIONS_NAME)))
    for shard in gone:
        instance.delete_dynamic_partition(SHARD_PARTITIONS_NAME, shard)
    if gone:
        removed = lineage_catalog(home).retire_partitions(gone, shard_asset_names(defs.assets))
        print(
            f"  {plural(len(gone), 'shard')} {is_or_are(len(gone))} no longer in the corpus "
            f"({', '.join(gone[:5])}): removed "
            f"from the partition set, {removed} lineage rows retired"
        )
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, new)
    log_level = "WARNING" if args.quiet else "INFO"
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    job = "mine_and_generate" if "generate" in phases else "mining_half"
    print(f"{job}: {plural(len(shards), 'shard')} ({shards[0]}..{shards[-1]})")
    results: list[Any] = []

    def execute(job_name: str, **options: Any) -> bool:
        """Run one job in process; raise KeyboardInterrupt if the user interrupted it."""
        with interrupts_survive_finalizers():  # a Ctrl-C during garbage collection counts too
            result = defs.resolve_job_def(job_name).execute_in_process(
                instance=instance, run_config=run_config, raise_on_error=False, **options
            )
        results.append(result)
        if was_interrupted(result):
            raise KeyboardInterrupt
        return result.success

    try:
        ok = execute(job, tags=shard_range_tags(shards))
        if "train" in phases and ok:
            reason = nothing_to_train_on(resources, shards)
            if reason:
                print(reason, file=sys.stderr)
                print_summary(resources, shards, time.perf_counter() - started, results)
                return 1
            trained = []
            for config in register_training_configs(instance, resources["training"]):
                print(f"train: MMRet-CLIP checkpoint for training config {config!r}")
                trained.append(execute("train", partition_key=config))
            # One config failing leaves the others' checkpoints worth scoring (the exit code
            # still says a run failed).
            ok = any(trained)
        if "evaluate" in phases and ok:
            evaluation, layout = resources["evaluation"], resources["storage"].layout()
            retrievers = list(known_retrievers(evaluation.base_spec(), layout))
            register_retrievers(instance, retrievers)
            print(f"evaluate: held-out scores of {len(retrievers)} retrievers (base model first)")
            for retriever_id in retrievers:
                key = str(score_partition_key(retriever_id, "heldout"))
                ok = execute("evaluate", partition_key=key) and ok
    except KeyboardInterrupt:
        if results:
            lines = last_run_messages(instance, results[-1].run_id)
            if lines:
                print("\nthe interrupted run's last messages:", file=sys.stderr)
                print("\n".join(f"  {line}" for line in lines), file=sys.stderr)
        print(f"\n{RESUME_HINT}", file=sys.stderr)
        return 130
    print_summary(resources, shards, time.perf_counter() - started, results)
    if not all(r.success for r in results):
        print("a run failed: see the log above or `megapairs ui`", file=sys.stderr)
        return 1
    return 0


def nothing_to_train_on(resources: Any, shards: list[str]) -> str | None:
    """Why training cannot start (no triplets came out of generation), or None.

    Said before the training run, which would only fail on an empty table, with the quarantine
    reasons that ate the pairs and, for missing captions, what to do about them.
    """
    from megapairs_assets.cli.summary import mining_summary
    from megapairs_assets.generation.common import TRIPLETS_ASSET
    from megapairs_assets.lib.storage import read_parquet

    layout = resources["storage"].layout()
    paths = [layout.shard_table(TRIPLETS_ASSET, shard) for shard in shards]
    if sum(read_parquet(path).height for path in paths if path.exists()):
        return None
    summary = mining_summary(layout, resources["catalog"].catalog(), shards)
    generation_stages = ("pair_descriptions", "pair_instructions", TRIPLETS_ASSET)
    reasons = [
        f"{row['n']} x {row['reason']} ({row['stage']})"
        for row in summary["quarantine"].iter_rows(named=True)
        if row["stage"] in generation_stages
    ]
    lines = [
        f"no triplets to train on: {summary['pairs']} mined pairs, "
        + (f"quarantined by generation as {', '.join(reasons)}" if reasons else "none generated")
        + "; skipping train and evaluate."
    ]
    if any("missing_caption" in reason for reason in reasons):
        lines.append(
            "The demo profile describes a pair from its two captions (its LLM reads text only): "
            "give each image a caption (a .txt file with the image's name beside it, or a .txt "
            "member in a webdataset shard), or describe the images themselves with a model that "
            "reads images: the paper profile (InternVL2 behind vLLM), or the generation "
            "resource's describe_template describe_images with such a model as its backend "
            '(README, "Generation" and "Changing a setting for one run").'
        )
    return "\n".join(lines)

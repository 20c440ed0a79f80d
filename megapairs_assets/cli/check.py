"""`megapairs check`: gate a CI on the pipeline's asset checks.

Two modes:
- sample (default): materialize a job (`--select`, default mining_half) over a small fixed
  sample of shards (the first `--shards` shards of the profile's corpus, or of `--corpus`)
  into a throwaway home that holds every table, the catalog and the Dagster instance
  (`MEGAPAIRS_DATA_ROOT` and the cluster's catalog settings are ignored here, so a CI check
  never rewrites real data), with Dagster evaluating every asset check as the UI would. The
  job must make everything its assets read (`generate` alone is refused: use
  mine_and_generate);
- `--existing [--home DIR]`: re-evaluate the checks on the tables already written (under
  `--home`, else `$MEGAPAIRS_HOME`, with `MEGAPAIRS_DATA_ROOT` and the deployment's lineage
  catalog), read-only (nothing is written there; a catalog it cannot lock, as on a read-only
  mount, is read from a private copy), e.g. on a production data root; `--select` narrows it to
  one job's assets or to one asset. Checks that only a run can evaluate (`knn_corpus_complete`:
  the index covered every shard) are not re-evaluated.

Prints one line per (asset, check) with how many partitions pass, and under it every partition
that failed with its details (`--verbose`: one line per (asset, check, partition)), then the
entries of the corpus source that no shard reads and the inputs the corpus step quarantined
(neither is a failure; the bundled demo corpus's licence and provenance files are not listed).
A sample adds `image_corpus sample_has_images`, which fails when no sampled image was accepted
(a corpus of corrupt files), since every other check then passes on empty tables. Exits 0 when
every blocking check passed, 1 when a blocking check failed, 2 on a usage or configuration error
(found before any work, an empty corpus before any model is built: an unknown `--select`, an
unwritable `--home` or `--junit-xml`, `--existing` with nothing to check), 3 when the run itself
failed before its checks could run, 130 when Ctrl-C or SIGTERM stopped it (a throwaway home is
removed then too). Failed warning checks print but never fail the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_RUN_FAILED = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)
DEFAULT_SAMPLE_SHARDS = 2


@dataclass(frozen=True)
class CheckRow:
    """One check's outcome for one partition."""

    asset: str
    check: str
    partition: str
    passed: bool
    blocking: bool
    detail: str

    @property
    def status(self) -> str:
        if self.passed:
            return "pass"
        return "FAIL" if self.blocking else "warn"


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "check",
        help="run the asset checks on a small sample (or on existing data) for CI",
        description="Materialize a job over the corpus's first shards in a throwaway home "
        "(removed afterwards, also on Ctrl-C) and print every asset check's result, or "
        "re-check tables already written (--existing). Exit codes: 0 every blocking check "
        "passed (failed warning checks print but pass), 1 a blocking check failed, 2 a usage "
        "or configuration error (found before any work), 3 the run failed before its checks "
        "ran, 130 interrupted.",
    )
    check.add_argument(
        "--select",
        metavar="NAME",
        help="a job name (mining_half, mine_and_generate, corpus_and_embeddings, corpus_only): "
        "the job the sample materializes (default mining_half); with --existing, a job or an "
        "asset name (e.g. mined_image_pairs): the assets re-checked (default all)",
    )
    check.add_argument(
        "--corpus",
        type=Path,
        metavar="PATH",
        help="sample shards from this corpus instead of the profile's (a folder of webdataset "
        ".tar shards, a single .tar shard, a folder of images or of image folders, or a "
        ".parquet/.jsonl manifest)",
    )
    check.add_argument(
        "--shards",
        type=_positive_int,
        metavar="N",
        help=f"sample size: the corpus's first N shards (default {DEFAULT_SAMPLE_SHARDS})",
    )
    check.add_argument(
        "--existing",
        action="store_true",
        help="re-check the tables already written (under --home, else $MEGAPAIRS_HOME; "
        "read-only) instead of materializing",
    )
    check.add_argument(
        "--home",
        type=Path,
        metavar="DIR",
        help="a MEGAPAIRS_HOME: the sample's (an empty folder or an earlier sample's, kept "
        "after the run; default: a throwaway folder), or with --existing the one whose tables "
        "are re-checked (default: $MEGAPAIRS_HOME)",
    )
    check.add_argument(
        "--quiet",
        action="store_true",
        help="print only warnings of the run's log (and the results), no progress or notes",
    )
    check.add_argument(
        "--verbose",
        action="store_true",
        help="one line per (asset, check, partition), passing ones included (default: one line "
        "per (asset, check) with its pass count, then each failing partition in full)",
    )
    check.add_argument(
        "--junit-xml",
        type=Path,
        metavar="PATH",
        help="also write the results as a JUnit XML report (one test case per asset, check and "
        "partition; a blocking failure is a failure, a failed warning passes with its detail), "
        "which CI systems show as test results",
    )
    check.set_defaults(func=run_check)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_check(args: argparse.Namespace) -> int:
    """`megapairs check`: the exit code (see the module docstring); Ctrl-C or SIGTERM stops it
    with EXIT_INTERRUPTED and no results, having removed a throwaway home."""
    try:
        with interrupt_on_sigterm():
            return _run_check(args)
    except KeyboardInterrupt:
        print("megapairs check: interrupted; nothing to report", file=sys.stderr)
        return EXIT_INTERRUPTED


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within this block SIGTERM (a cancelled CI job, `timeout`) raises KeyboardInterrupt as
    Ctrl-C does, so the sample's throwaway home is removed on the way out: Python's default
    would end the process at once and leave it in the temporary folder. Only the main thread
    can set a handler; elsewhere nothing changes. The previous handler is put back."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run_check(args: argparse.Namespace) -> int:
    from megapairs_assets.lib.errors import ConfigurationError

    # Every mistake in the arguments is reported before any data is read or any model loads.
    if args.existing and (args.corpus is not None or args.shards is not None):
        raise ConfigurationError(
            "--corpus and --shards choose the shards of a fresh sample; --existing re-checks the "
            "tables already written: drop one or the other"
        )
    if args.junit_xml is not None:
        args.junit_xml = args.junit_xml.expanduser()
        ensure_writable_file(args.junit_xml, "--junit-xml")
    if args.existing:
        from megapairs_assets.lib.errors import first_line, storage_errors
        from megapairs_assets.lineage.catalog import MissingTableError

        try:
            with ExitStack() as stack:
                return _check_existing_home(args, stack)
        except MissingTableError:
            raise  # a table the catalog records is gone: the data's fault, not the store's
        except storage_errors() as error:
            # An object store that is down or refuses our credentials is an infrastructure
            # fault: not "a blocking check failed" (1), which CI would report as bad data.
            print(
                f"megapairs check: the data root could not be read ({first_line(error)}); "
                "no check ran",
                file=sys.stderr,
            )
            return EXIT_RUN_FAILED
    resolve_selection(args.select or "mining_half", existing=False)
    if args.home is not None:
        home = args.home.expanduser().resolve()
        ensure_writable_dir(home, f"--home {home}")
        claim_sample_home(home)
        return _check_sample(args, home, kept=True)
    try:
        throwaway = tempfile.TemporaryDirectory(prefix="megapairs-check-")
    except OSError as error:
        raise ConfigurationError(
            f"cannot create the sample's throwaway home in {tempfile.gettempdir()}: "
            f"{error.strerror or error}; set TMPDIR to a writable folder, or give --home one"
        ) from error
    with throwaway as tmp:
        return _check_sample(args, Path(tmp), kept=False)


def _check_existing_home(args: argparse.Namespace, stack: ExitStack) -> int:
    """`--existing`: re-check the tables under --home (else $MEGAPAIRS_HOME), writing nothing
    there (`stack` removes the catalog copy `existing_catalog` may make)."""
    from megapairs_assets.lib.errors import ConfigurationError
    from megapairs_assets.lib.storage import default_home
    from resources.environment import profile_from_env
    from resources.profiles import build_resources

    assets = resolve_selection(args.select, existing=True) if args.select else None
    # The tables the pipeline wrote: --home, else $MEGAPAIRS_HOME (and its data root).
    home = (args.home.expanduser() if args.home else default_home()).resolve()
    resources = build_resources(profile_from_env(), home)
    layout = resources["storage"].layout()
    catalog = existing_catalog(resources["catalog"].catalog(), stack)
    rows = check_existing(layout, catalog, resources["mining"].params(), assets)
    if not layout.data_dir.exists():
        if not rows:
            raise ConfigurationError(
                f"--existing: no tables at {layout.data_dir}; point --home (or MEGAPAIRS_HOME, "
                "MEGAPAIRS_DATA_ROOT) at the data the pipeline wrote, or drop --existing to "
                "check a fresh sample"
            )
        # The catalog records partitions whose tables should be here: each fails
        # table_present below (a deleted data root is bad data, not a usage error).
        print(
            f"megapairs check: nothing at {layout.data_dir}, where the lineage catalog records "
            "complete partitions",
            file=sys.stderr,
        )
    if not rows:
        # Not a pass: a gate that checked nothing must not let a CI job through.
        raise ConfigurationError(
            f"--existing: the lineage catalog of {home} lists no current partition of "
            + (f"the assets of --select {args.select}" if args.select else "any asset")
            + ", so there is nothing to check; materialize them first (megapairs demo), or "
            "point --home at the home that did"
        )
    code = report(rows, args.verbose, args.junit_xml)
    if assets is None or "image_corpus" in assets:
        print_unread(layout, kept=True)
        print_quarantine(layout, catalog.current_partitions("image_corpus"))
    return code


def existing_catalog(catalog: Any, stack: ExitStack) -> Any:
    """The lineage catalog `--existing` reads: `catalog` itself where this process may take its
    file lock (the lock file lives beside it), else a private copy in a temporary folder that
    `stack` removes, so a read-only mount of a production home can be checked. ConfigurationError
    when a file catalog does not exist: opening it would create one in the home."""
    import shutil

    from megapairs_assets.lib.errors import ConfigurationError
    from megapairs_assets.lineage.catalog import LineageCatalog

    if catalog.is_ducklake:
        return catalog  # no file lock to take
    path: Path = catalog.path
    if not path.exists():
        raise ConfigurationError(
            f"--existing: no lineage catalog at {path}, so nothing was materialized under this "
            "home; point --home (or MEGAPAIRS_HOME) at the home the pipeline ran in"
        )
    lock = path.with_name(path.name + ".lock")
    if os.access(path.parent, os.W_OK) and (not lock.exists() or os.access(lock, os.W_OK)):
        return catalog
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="megapairs-check-"))
    copy = Path(folder) / path.name
    shutil.copyfile(path, copy)
    wal = path.with_name(path.name + ".wal")  # commits not yet checkpointed into the file
    if wal.exists():
        shutil.copyfile(wal, copy.with_name(copy.name + ".wal"))
    print(
        f"megapairs check: {path.parent} is read-only here: reading a copy of {path.name}",
        file=sys.stderr,
    )
    return LineageCatalog(copy, lock_timeout_s=catalog.lock_timeout_s)


SAMPLE_HOME_MARKER = ".megapairs-check-sample"
"""The file that marks a folder as a `check` sample's home, which a later sample may reuse."""


def claim_sample_home(home: Path) -> None:
    """Mark `home` as a sample's home; ConfigurationError when it already holds a pipeline's
    tables or catalog that a sample did not write (`--home` of `--existing` names the data to
    re-check; here it would mix a sample into that data)."""
    from megapairs_assets.lib.errors import ConfigurationError

    marker = home / SAMPLE_HOME_MARKER
    if not marker.exists() and ((home / "catalog.duckdb").exists() or (home / "data").exists()):
        raise ConfigurationError(
            f"--home {home} holds a pipeline's data; a sample would write its tables and "
            "catalog there. To re-check that data use --existing --home "
            f"{home}; for a sample give an empty folder (or drop --home for a throwaway one)"
        )
    marker.write_text("A `megapairs check` sample home: a later sample may overwrite it.\n")


def ensure_writable_dir(folder: Path, what: str) -> None:
    """Create `folder` if needed and prove a file can be written in it; a ConfigurationError
    that starts with `what` otherwise (a read-only mount, a path through a file, no permission).
    """
    from megapairs_assets.lib.errors import ConfigurationError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".megapairs-check-probe-"):
            pass
    except OSError as error:
        raise ConfigurationError(
            f"{what}: cannot write in {folder} ({error.strerror or error}); give a path this "
            "user can write"
        ) from error


def ensure_writable_file(path: Path, option: str) -> None:
    """Fail before any work when `path` cannot be written (its folder is created), so a long
    run never ends in a traceback instead of its report."""
    from megapairs_assets.lib.errors import ConfigurationError

    if path.is_dir():
        raise ConfigurationError(
            f"{option} {path} is a folder; give a file path, e.g. {path / 'checks.xml'}"
        )
    ensure_writable_dir(path.parent, f"{option} {path}")


# Where the configured pipeline keeps its data: the sample never reads these, so a CI check
# pointed at a production environment cannot rewrite its tables or its lineage catalog.
_PRODUCTION_DATA_SETTINGS = (
    "MEGAPAIRS_DATA_ROOT",
    "MEGAPAIRS_STORAGE_ENDPOINT_URL",
    "MEGAPAIRS_LINEAGE_CATALOG",
    "MEGAPAIRS_LINEAGE_DATA_PATH",
    "MEGAPAIRS_POSTGRES_URL",
)


@contextmanager
def sample_environment() -> Iterator[None]:
    """The environment of a sample check: the embedded deployment, with every table and the
    catalog under the sample's own home (the profile's models and corpus are still used)."""
    saved = dict(os.environ)
    for name in _PRODUCTION_DATA_SETTINGS:
        os.environ.pop(name, None)
    os.environ["MEGAPAIRS_DEPLOYMENT"] = "embedded"
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _check_sample(args: argparse.Namespace, home: Path, kept: bool) -> int:
    """A sample run in `home` (`kept`: it outlives the run, so its files may be named)."""
    from megapairs_assets.demo.models import quiet_demo_models_note

    with sample_environment(), quiet_demo_models_note() if args.quiet else nullcontext():
        return _run_sample(args, home, kept)


def _run_sample(args: argparse.Namespace, home: Path, kept: bool) -> int:
    import dagster as dg

    from megapairs_assets.cli.demo import was_interrupted
    from megapairs_assets.corpus.sources import detect_source_kind
    from megapairs_assets.definitions import build_definitions
    from megapairs_assets.orchestration.console import (
        interrupt_quiet_console_logger,
        interrupts_survive_finalizers,
    )
    from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
    from megapairs_assets.orchestration.runs import shard_range_tags
    from resources.corpus import CorpusSourceResource
    from resources.environment import profile_from_env
    from resources.profiles import check_ready

    job_name = args.select or "mining_half"
    selected = job_assets(job_name)  # resolve_selection has vetted it
    resources = build_definitions(profile_from_env(), home).resources
    source = resources["corpus_source"]
    if args.corpus is not None:
        corpus = args.corpus.expanduser()  # a quoted "~/photos" reaches us unexpanded
        kind = detect_source_kind(corpus)  # a ConfigurationError says what is wrong
        source = CorpusSourceResource(kind=kind, path=str(corpus.resolve()))
    if profile_from_env() == "demo":
        # Every other demo setting is local, and checking the encoders builds the demo models:
        # a corpus with no shard (an empty folder) is one configuration error at once.
        source.shard_ids()
    # Every setting the sample needs (the corpus, encoder weights, and the generation servers
    # when the job generates), all missing ones in one configuration error, before any work.
    check_ready({**resources, "corpus_source": source}, preflight_phases(selected))
    # The sample is the corpus: KNN searches exactly these shards.
    shards = source.shard_ids()[: args.shards or DEFAULT_SAMPLE_SHARDS]
    fields = {name: getattr(source, name) for name in type(source).model_fields}
    sample = CorpusSourceResource(**{**fields, "only_shards": shards})
    # Dagster's console logger, except that an interrupted run's errors print without their
    # stack (as in `megapairs demo`).
    defs = dg.Definitions.merge(
        build_definitions(profile_from_env(), home, resource_overrides={"corpus_source": sample}),
        dg.Definitions(loggers={"console": interrupt_quiet_console_logger}),
    )
    job = defs.resolve_job_def(job_name)
    print(f"megapairs check: {job_name} over {len(shards)} shards {shards} in {home}")
    log_level = "WARNING" if args.quiet else "INFO"
    # The instance's files (compute logs) go under the home too, so a throwaway home takes
    # them along, and they are released when the run ends.
    with dg.DagsterInstance.ephemeral(tempdir=str(home / "dagster")) as instance:
        instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, shards)
        with interrupts_survive_finalizers():  # a Ctrl-C during garbage collection counts too
            result = job.execute_in_process(
                instance=instance,
                tags=shard_range_tags(shards),
                run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
                raise_on_error=False,
            )
    if was_interrupted(result):
        # Ctrl-C (or SIGTERM) reached the run's steps: a table of the checks that happened to
        # run before it would read like a result.
        raise KeyboardInterrupt
    layout = defs.resources["storage"].layout()
    rows = rows_from_evaluations(result.get_asset_check_evaluations(), defs)
    if "image_corpus" in selected:
        rows += sample_image_rows(layout, shards)
    run_error = None if result.success else f"run {result.run_id} failed: see the log above"
    code = report(rows, args.verbose, args.junit_xml, run_error)
    # Read now: a throwaway home, and with it the quarantine tables, is gone once we return.
    print_unread(layout, kept)
    print_quarantine(layout, shards)
    if code == EXIT_OK and not result.success:
        print("the run failed before all checks ran: see the log above", file=sys.stderr)
        return EXIT_RUN_FAILED
    return code


SAMPLE_HAS_IMAGES = "sample_has_images"
"""The row a sample adds: its shards hold at least one accepted image (else every other check
passed on empty tables, which proves nothing)."""


def sample_image_rows(layout: Any, shards: list[str]) -> list[CheckRow]:
    """`image_corpus  sample_has_images  -`: fails (blocking) when no image of the sampled
    shards was accepted, e.g. a corpus of corrupt files. None when a shard's corpus table is
    missing: the run failed before it, which the report says already."""
    from megapairs_assets.lib.storage import read_parquet

    paths = [layout.corpus_images(shard) for shard in shards]
    if not all(path.exists() for path in paths):
        return []
    images = sum(read_parquet(path, columns=["image_id"]).height for path in paths)
    detail = (
        ""
        if images
        else f"none of the {len(shards)} sampled shards holds an accepted image (every input "
        "was quarantined: see the list below), so the other checks ran on empty tables"
    )
    return [CheckRow("image_corpus", SAMPLE_HAS_IMAGES, "-", images > 0, True, detail)]


QUARANTINE_LINES_PER_SHARD = 5


def quarantine_lines(layout: Any, shards: list[str]) -> list[str]:
    """One line per input the corpus step quarantined in `shards` (at most
    QUARANTINE_LINES_PER_SHARD a shard, then a count): a corrupt image is not a check failure
    (the run leaves it out, by design), but a CI log should still say which inputs were lost."""
    from megapairs_assets.lib.storage import read_parquet

    lines = []
    for shard in shards:
        path = layout.corpus_quarantine(shard)
        if not path.exists():
            continue
        rows = read_parquet(path, columns=["source_uri", "reason", "detail"]).to_dicts()
        for row in rows[:QUARANTINE_LINES_PER_SHARD]:
            lines.append(
                f"image_corpus[{shard}]  {row['reason']}  {row['source_uri']}  {row['detail']}"
            )
        if len(rows) > QUARANTINE_LINES_PER_SHARD:
            more = len(rows) - QUARANTINE_LINES_PER_SHARD
            lines.append(f"image_corpus[{shard}]  ... and {more} more: {path}")
    return lines


UNREAD_LINES = 10
"""How many entries of the corpus source that no shard reads `megapairs check` names."""


def unread_lines(layout: Any, kept: bool) -> list[str]:
    """One line per entry of the corpus source that no shard reads (its source report, less
    the bundled demo corpus's own licence and provenance files), at most UNREAD_LINES, then a
    count: with the report's path when the home is `kept`, else how to keep it (a throwaway
    home is deleted when the check ends, so naming a file in it would help no one)."""
    from megapairs_assets.corpus.table import unexpected_unread
    from megapairs_assets.lib.storage import read_parquet

    path = layout.corpus_source_report()
    if not path.exists():
        return []
    report = unexpected_unread(read_parquet(path))
    lines = [
        f"{row['reason']}  {row['source_uri']}  {row['detail']}"
        for row in report.head(UNREAD_LINES).iter_rows(named=True)
    ]
    if report.height > UNREAD_LINES:
        more = report.height - UNREAD_LINES
        where = f": {path}" if kept else " (--home DIR keeps the full list in a source report)"
        lines.append(f"... and {more} more{where}")
    return lines


def print_unread(layout: Any, kept: bool) -> None:
    """Print `unread_lines` under a heading that says they do not fail the check."""
    lines = unread_lines(layout, kept)
    if lines:
        print("\ncorpus entries no shard reads (left out of the run; not check failures):")
        print("\n".join("  " + line for line in lines))


def print_quarantine(layout: Any, shards: list[str]) -> None:
    """Print `quarantine_lines` under a heading that says they do not fail the check."""
    lines = quarantine_lines(layout, shards)
    if lines:
        print("\nquarantined inputs (left out of the run; not check failures):")
        print("\n".join("  " + line for line in lines))


def preflight_phases(assets: set[str]) -> tuple[str, ...]:
    """The `check_ready` phases a job of `assets` needs: mining when it embeds (the encoders'
    weights; a `corpus_only` sample loads, and so builds, no model), generation when it sends
    requests to a model. The corpus itself is read right after, whatever the job."""
    from megapairs_assets.embeddings.sources import SOURCES
    from megapairs_assets.generation.common import DESCRIPTIONS_ASSET, INSTRUCTIONS_ASSET

    embeds = bool(assets & {source.embedding_asset for source in SOURCES})
    generates = bool(assets & {DESCRIPTIONS_ASSET, INSTRUCTIONS_ASSET})
    return ("mine",) * embeds + ("generate",) * generates


def rows_from_evaluations(evaluations: list, defs) -> list[CheckRow]:
    """One row per (asset, check, partition) from Dagster's check evaluations."""
    blocking: dict[tuple[str, str], bool] = {}
    for assets_def in defs.assets or []:
        for spec in getattr(assets_def, "check_specs", []):
            blocking[(spec.asset_key.to_user_string(), spec.name)] = spec.blocking
    rows = []
    for evaluation in evaluations:
        asset = evaluation.asset_key.to_user_string()
        metadata = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
        checked = _split(metadata.get("partitions_checked"))
        failing = set(_split(metadata.get("failing_partitions")))
        details = metadata.get("failures_by_partition") or {}
        if isinstance(details, str):  # recorded as JSON text before it was JSON metadata
            details = json.loads(details)
        for partition in checked or ["-"]:
            passed = evaluation.passed or partition not in failing
            rows.append(
                CheckRow(
                    asset=asset,
                    check=evaluation.check_name,
                    partition=partition,
                    passed=passed,
                    blocking=blocking.get((asset, evaluation.check_name), True),
                    detail=details.get(partition, "") if not passed else "",
                )
            )
    return rows


def job_assets(job_name: str) -> set[str]:
    """The names of the assets a job selects; ConfigurationError for an unknown job."""
    from jobs import all_jobs
    from megapairs_assets.definitions import ALL_ASSETS
    from megapairs_assets.lib.errors import ConfigurationError

    by_name = {job.name: job for job in all_jobs}
    if job_name not in by_name:
        raise ConfigurationError(f"unknown job {job_name!r}; jobs: {', '.join(sorted(by_name))}")
    return {key.to_user_string() for key in by_name[job_name].selection.resolve(ALL_ASSETS)}


def resolve_selection(name: str, existing: bool) -> set[str]:
    """The asset names `--select NAME` stands for; ConfigurationError when it cannot be used.

    With `existing`, NAME is a job (its assets) or an asset (just it). A sample starts from an
    empty home, so there NAME must be a job that includes everything its assets read: `generate`
    alone would fail on the missing mined pairs after loading every model.
    """
    import difflib

    from jobs import all_jobs
    from megapairs_assets.definitions import ALL_ASSETS
    from megapairs_assets.lib.errors import ConfigurationError

    jobs = {job.name: job for job in all_jobs}
    asset_names = sorted(
        key.to_user_string() for assets_def in ALL_ASSETS for key in assets_def.keys
    )
    if name not in jobs and name not in asset_names:
        close = difflib.get_close_matches(name, [*jobs, *asset_names], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        known = f"jobs: {', '.join(sorted(jobs))}"
        if existing:
            known += f"; assets: {', '.join(asset_names)}"
        what = "job or asset" if existing else "job"
        raise ConfigurationError(f"unknown {what} {name!r}; {hint}{known}")
    if name not in jobs:  # an asset
        if existing:
            return {name}
        holders = [
            j
            for _, j in sorted((len(job_assets(j)), j) for j in jobs)
            if name in job_assets(j) and not _missing_upstream(j)
        ]
        raise ConfigurationError(
            f"--select {name} is an asset; a sample materializes a job: "
            + (f"use --select {holders[0]}" if holders else "pick one of the jobs")
            + f", or re-check its tables with --existing --select {name}"
        )
    selected = job_assets(name)
    missing = _missing_upstream(name)
    if existing or not missing:
        return selected
    (job,) = [job for job in all_jobs if job.name == name]
    parents = {key.to_user_string() for key in job.selection.upstream(depth=1).resolve(ALL_ASSETS)}
    whole = sorted(
        (len(job_assets(j)), j)
        for j in jobs
        if selected | missing <= job_assets(j) and not _missing_upstream(j)
    )
    again = f"re-check the tables already written with --existing --select {name}"
    instead = (
        f"use --select {whole[0][1]}, or {again}" if whole else f"no job samples that: {again}"
    )
    raise ConfigurationError(
        f"--select {name}: a sample starts from an empty home, and {name} reads "
        f"{', '.join(sorted(parents - selected))}, which it does not materialize; {instead}"
    )


def _missing_upstream(job_name: str) -> set[str]:
    """The assets a job's assets read that the job itself does not materialize."""
    from jobs import all_jobs
    from megapairs_assets.definitions import ALL_ASSETS

    (job,) = [job for job in all_jobs if job.name == job_name]
    upstream = job.selection.upstream().resolve(ALL_ASSETS)
    return {key.to_user_string() for key in upstream} - job_assets(job_name)


TABLE_PRESENT = "table_present"
"""The row `--existing` adds for a current partition whose table is missing."""


def check_existing(
    layout: Any, catalog: Any, params: Any, assets: set[str] | None = None
) -> list[CheckRow]:
    """Re-run every stage's checks (or those of `assets`) on the tables of `layout`, read-only.

    The partitions checked are each asset's current ones in the lineage catalog (retired
    shards left out): a current partition whose table is gone fails `table_present`, and a
    file the catalog does not list is not part of the dataset, so it is not checked.
    """
    import megapairs_assets.definitions  # noqa: F401  (stages declare their catalog tables)
    from megapairs_assets.corpus.step import ASSET_NAME as CORPUS
    from megapairs_assets.corpus.step import CORPUS_CHECKS, latest_config, recheck_corpus_shard
    from megapairs_assets.embeddings.sources import SOURCES
    from megapairs_assets.embeddings.step import recheck_embedding_shard
    from megapairs_assets.generation.common import (
        DESCRIPTIONS_ASSET,
        INSTRUCTIONS_ASSET,
        TRIPLETS_ASSET,
    )
    from megapairs_assets.generation.describe import check_descriptions
    from megapairs_assets.generation.instruct import check_instructions
    from megapairs_assets.generation.parsing import DescriptionLimits, InstructionLimits
    from megapairs_assets.generation.triplets import check_triplets
    from megapairs_assets.knn.step import recheck_knn_shard
    from megapairs_assets.lib.storage import read_parquet
    from megapairs_assets.mining.step import ASSET_NAME as PAIRS
    from megapairs_assets.mining.step import recheck_pairs_shard

    def recorded(asset: str, shard: str, key: str, default: Any) -> Any:
        """A setting as the shard's newest materialization recorded it."""
        return latest_config(catalog, asset, shard).get(key, default)

    def descriptions(shard: str) -> list:
        limits = DescriptionLimits(**recorded(DESCRIPTIONS_ASSET, shard, "description_limits", {}))
        return check_descriptions(
            read_parquet(layout.shard_table(DESCRIPTIONS_ASSET, shard)), limits
        )

    def instructions(shard: str) -> list:
        limits = InstructionLimits(**recorded(INSTRUCTIONS_ASSET, shard, "instruction_limits", {}))
        return check_instructions(
            read_parquet(layout.shard_table(INSTRUCTIONS_ASSET, shard)), limits
        )

    def triplets(shard: str) -> list:
        least = recorded(TRIPLETS_ASSET, shard, "min_instructions", 3)
        return check_triplets(read_parquet(layout.shard_table(TRIPLETS_ASSET, shard)), least)

    rechecks: dict[str, Callable[[str], list]] = {
        CORPUS: lambda shard: recheck_corpus_shard(shard, layout, catalog)
    }
    for source in SOURCES:
        rechecks[source.embedding_asset] = partial(
            recheck_embedding_shard, source, layout=layout, catalog=catalog
        )
        rechecks[source.knn_asset] = partial(
            recheck_knn_shard, source, layout=layout, catalog=catalog
        )
    rechecks[PAIRS] = lambda shard: recheck_pairs_shard(shard, layout, catalog, params)
    rechecks[DESCRIPTIONS_ASSET] = descriptions
    rechecks[INSTRUCTIONS_ASSET] = instructions
    rechecks[TRIPLETS_ASSET] = triplets

    rows: list[CheckRow] = []
    for asset, recheck in rechecks.items():
        if assets is not None and asset not in assets:
            continue
        for shard in catalog.current_partitions(asset):
            table = (
                layout.corpus_images(shard) if asset == CORPUS else layout.shard_table(asset, shard)
            )
            if not table.exists():
                detail = f"materialized, but its table is missing: {table}"
                rows.append(CheckRow(asset, TABLE_PRESENT, shard, False, True, detail))
                continue
            for o in recheck(shard):
                blocking = not (asset == CORPUS and o.name not in CORPUS_CHECKS)
                rows.append(CheckRow(asset, o.name, shard, o.passed, blocking, o.detail))
    return rows


def report(
    rows: list[CheckRow],
    verbose: bool = False,
    junit_xml: Path | None = None,
    run_error: str | None = None,
) -> int:
    """Print the checks' outcomes and return the exit code.

    By default one line per (asset, check) with its pass count, each failing partition (with
    its detail) on a line of its own below it; with `verbose`, one line per (asset, check,
    partition). A failing partition's line is the same in both forms (asset, check, partition,
    FAIL or warn, detail), so a search for it does not depend on the flag. `junit_xml`: the
    same results as a JUnit report (with `run_error`, a failed run, as an error case).
    """
    code = _print_report(rows, verbose)
    if junit_xml is not None:
        # Written after the results are printed, so a write that fails still leaves them shown.
        try:
            write_junit_xml(rows, junit_xml, run_error)
        except OSError as error:
            print(f"megapairs check: could not write {junit_xml}: {error}", file=sys.stderr)
            return code if code != EXIT_OK else EXIT_USAGE
    return code


def _print_report(rows: list[CheckRow], verbose: bool) -> int:
    """`report`'s printing; returns the exit code the rows give."""
    if not rows:
        print("no checks were evaluated", file=sys.stderr)
        return EXIT_RUN_FAILED
    ordered = sorted(rows, key=lambda r: (r.asset, r.check, r.partition))
    widths = (
        max(len(r.asset) for r in rows),
        max(len(r.check) for r in rows),
        max(len(r.partition) for r in rows),
    )
    if verbose:
        header = (
            f"{'asset':<{widths[0]}}  {'check':<{widths[1]}}  {'partition':<{widths[2]}}  status"
        )
        print(header)
        print("-" * len(header))
        for r in ordered:
            print(_partition_line(r, widths))
    else:
        groups: dict[tuple[str, str], list[CheckRow]] = {}
        for r in ordered:
            groups.setdefault((r.asset, r.check), []).append(r)
        header = f"{'asset':<{widths[0]}}  {'check':<{widths[1]}}  result"
        print(header)
        print("-" * len(header))
        for (asset, check), group in groups.items():
            print(f"{asset:<{widths[0]}}  {check:<{widths[1]}}  {_pass_count(group)}")
            for r in group:
                if not r.passed:
                    print("  " + _partition_line(r, widths))
    failed = [r for r in rows if not r.passed and r.blocking]
    warned = [r for r in rows if not r.passed and not r.blocking]
    print(
        f"\n{len(rows)} check results: {len(rows) - len(failed) - len(warned)} passed, "
        f"{_count(len(failed), 'blocking failure')}, {_count(len(warned), 'warning')}"
    )
    return EXIT_CHECK_FAILED if failed else EXIT_OK


def _partition_line(r: CheckRow, widths: tuple[int, int, int]) -> str:
    """`asset  check  partition  status  detail`, in the table's columns."""
    line = f"{r.asset:<{widths[0]}}  {r.check:<{widths[1]}}  {r.partition:<{widths[2]}}  "
    return line + r.status + (f"  {r.detail}" if r.detail else "")


def _pass_count(group: list[CheckRow]) -> str:
    """`18/18 partitions pass`, `16/18 partitions pass, 1 FAIL, 1 warn`; for an unpartitioned
    asset (partition `-`) just its status."""
    if len(group) == 1 and group[0].partition == "-":
        return group[0].status
    passed = sum(r.passed for r in group)
    failed = sum(r.status == "FAIL" for r in group)
    warned = sum(r.status == "warn" for r in group)
    text = f"{passed}/{len(group)} partitions pass"
    return text + (f", {failed} FAIL" if failed else "") + (f", {warned} warn" if warned else "")


def _split(value: object) -> list[str]:
    if not value or value == "-":
        return []
    return [part.strip() for part in str(value).split(",") if part.strip()]


def write_junit_xml(rows: list[CheckRow], path: Path, run_error: str | None = None) -> None:
    """The results as JUnit XML: a test suite per asset, a case per (check, partition). A
    blocking failure is a `failure`; a failed warning check passes, its detail in
    `system-out` (JUnit has no warning); a run that failed before its checks is an `error`."""
    from xml.etree import ElementTree

    from megapairs_assets.lib.storage import write_atomic

    suites = ElementTree.Element("testsuites", name="megapairs check")
    totals = {"tests": 0, "failures": 0, "errors": 0}
    by_asset: dict[str, list[CheckRow]] = {}
    for r in sorted(rows, key=lambda r: (r.asset, r.check, r.partition)):
        by_asset.setdefault(r.asset, []).append(r)
    if run_error is not None:
        by_asset.setdefault("run", [])
    for asset, group in by_asset.items():
        failures = sum(r.status == "FAIL" for r in group)
        errors = int(asset == "run" and run_error is not None)
        counts = {"tests": len(group) + errors, "failures": failures, "errors": errors}
        # `skipped` and `time` too: some readers (Jenkins, dorny/test-reporter) expect them.
        suite = ElementTree.SubElement(
            suites,
            "testsuite",
            name=asset,
            **{key: str(value) for key, value in counts.items()},
            skipped="0",
            time="0",
        )
        for key, value in counts.items():
            totals[key] += value
        for r in group:
            case = ElementTree.SubElement(
                suite, "testcase", classname=asset, name=f"{r.check}[{r.partition}]", time="0"
            )
            if r.status == "FAIL":
                failure = ElementTree.SubElement(case, "failure", message=r.detail[:500])
                failure.text = r.detail
            elif r.status == "warn":
                ElementTree.SubElement(case, "system-out").text = f"warning: {r.detail}"
        if errors:
            case = ElementTree.SubElement(suite, "testcase", classname="run", name="run", time="0")
            ElementTree.SubElement(case, "error", message=run_error or "").text = run_error
    suites.attrib.update({key: str(value) for key, value in totals.items()})
    tree = ElementTree.ElementTree(suites)
    ElementTree.indent(tree)
    path.expanduser().parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        path.expanduser(), lambda tmp: tree.write(tmp, encoding="utf-8", xml_declaration=True)
    )


def _count(n: int, noun: str) -> str:
    """'1 warning', '2 warnings', '0 warnings'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

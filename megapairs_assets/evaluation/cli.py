"""`megapairs eval`: score one retriever on one benchmark from a terminal, outside the UI.

    megapairs eval --retriever <checkpoint path | open_clip name[@pretrained] | base>
                   --benchmark <key> [--root DIR]

It runs the same code as the `benchmark_scores` asset (same loaders, metrics, gallery cache
under the data root, server files under `<data>/benchmark_scores/<retriever>/<benchmark>/`)
and prints the same table. It does not write catalog rows: scores that should be part of the
lineage come from materializing the asset.

Exit codes (EXIT_CODES, also in `megapairs eval --help`): 0 every split of the benchmark was
scored (or its server files written); 1 a benchmark file or image exists but cannot be used
(the message names it); 2 usage or configuration error (`configuration error:` line, printed
by `megapairs_assets.cli.main`); 3 a split was skipped because its files are missing (or, for
heldout, no triplets exist yet): a benchmark asked for by name must not pass unnoticed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megapairs_assets.lib.errors import ConfigurationError

if TYPE_CHECKING:
    from megapairs_assets.evaluation.run import BenchmarkResult
    from megapairs_assets.retriever.model import RetrieverSpec

BASE_ALIAS = "base"
# `evaluation.run.BENCHMARK_KEYS`, spelled here because `megapairs` builds every subcommand's
# parser at start-up and evaluation.run imports torch and faiss (~1.4 s): `megapairs lineage`
# must not pay for them. tests/test_cli_startup.py keeps the two equal.
BENCHMARK_KEYS = (
    "circo-val",
    "circo-test",
    "cirr-val",
    "cirr-test1",
    "fashioniq-val",
    "genecis",
    "heldout",
)
BENCHMARK_HELP = (
    "the benchmark and split to score: circo-val, circo-test (CIRCO), cirr-val, cirr-test1 "
    "(CIRR), fashioniq-val (FashionIQ dress, shirt and toptee), genecis (GeneCIS, its four "
    "tasks) or heldout (our own split of the project's triplets); circo-test and cirr-test1 "
    "have no public answers: they write the evaluation servers' submission files"
)
EXIT_SCORED, EXIT_BAD_DATA, EXIT_SKIPPED = 0, 1, 3
EXIT_CODES = (
    "exit codes: 0 every split scored (or its server files written); 1 a benchmark file or "
    "image cannot be used; 2 usage or configuration error; 3 a split was skipped because its "
    "files are missing (heldout: no triplets yet)"
)


class BenchmarkRootError(ConfigurationError):
    """A `--root` that names no folder: a mistyped path, not a benchmark whose files are absent
    (a folder that exists but lacks them is a `skipped` split, exit 3)."""


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to the `megapairs` parser."""
    parser = subparsers.add_parser(
        "eval",
        help="score a retriever on one CIR benchmark and print the table",
        description=(
            "Score a retriever (a trained checkpoint, an open_clip model, or the profile's base "
            "model) on one benchmark with the official metrics, and print the table the UI "
            "shows. Benchmarks: " + ", ".join(BENCHMARK_KEYS) + "."
        ),
        epilog=EXIT_CODES,
    )
    add_retriever_argument(parser)
    parser.add_argument(
        "--benchmark",
        required=True,
        choices=BENCHMARK_KEYS,
        metavar="BENCHMARK",  # the help lists the choices, each with what it is
        help=BENCHMARK_HELP,
    )
    parser.add_argument(
        "--root",
        type=Path,
        help="the benchmark's folder in its official layout, which must exist (default: the "
        "profile's setting)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "float16"),
        help="numbers the retriever runs in (default: the profile's, else float32)",
    )
    parser.add_argument("--batch-size", type=_positive_int, help="images per forward pass")
    parser.add_argument(
        "--num-workers", type=_non_negative_int, help="image decode worker processes (0: none)"
    )
    parser.set_defaults(func=run_eval)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """Score and print the table; see the module docstring for the exit codes.

    A configuration error (retriever, profile, deployment, --root) propagates as
    `ConfigurationError`, which the `megapairs` entry point prints as one line (exit 2); a
    benchmark file or image that cannot be used is one line here (exit 1).
    """
    from megapairs_assets.evaluation.heldout import HeldOutError
    from megapairs_assets.evaluation.loaders import BenchmarkFormatError
    from megapairs_assets.evaluation.run import STATUS_SKIPPED, BenchmarkImageError

    try:
        result = evaluate_from_arguments(args)
    except ConfigurationError:
        raise
    except (BenchmarkFormatError, BenchmarkImageError, HeldOutError, ValueError) as error:
        print(f"megapairs eval: {error}", file=sys.stderr)
        return EXIT_BAD_DATA
    print(result.table_markdown())
    skipped = [s for s in result.splits if s.status == STATUS_SKIPPED]
    if skipped:
        reasons = "; ".join(f"{s.split}: {s.detail}" for s in skipped)
        print(
            f"megapairs eval: {args.benchmark}: {len(skipped)} split(s) skipped, not scored "
            f"({reasons})",
            file=sys.stderr,
        )
        return EXIT_SKIPPED
    return EXIT_SCORED


def evaluate_from_arguments(args: argparse.Namespace) -> BenchmarkResult:
    """The benchmark result `megapairs eval` prints, from its parsed arguments.

    The same code as the `benchmark_scores` asset, with the profile's evaluation settings (batch
    size and precision: what the gallery cache and the scores depend on) unless an argument
    overrides them; public so a test can compare its exact numbers with the asset's.
    """
    from dataclasses import replace

    from megapairs_assets.cli.search import refuse_remote_retriever
    from megapairs_assets.evaluation.run import BENCHMARK_FAMILY, evaluate_benchmark
    from megapairs_assets.evaluation.step import gallery_cache, output_dir
    from megapairs_assets.lib.storage import DataLayout, default_home
    from megapairs_assets.retriever.model import load_retriever_spec
    from resources.device import DeviceResource

    home = default_home()
    layout = DataLayout(home)
    resources = _profile_resources(home)
    evaluation = resources.get("evaluation")
    refuse_remote_retriever(args.retriever)  # open_clip loads from this machine only
    spec = retriever_spec(args.retriever, evaluation)
    sources = _sources(evaluation, layout, resources["catalog"].catalog())
    family = BENCHMARK_FAMILY[args.benchmark]
    if args.root is not None:
        if family == "heldout":
            raise ConfigurationError(
                "--root does not apply to heldout (it reads the project's triplets)"
            )
        if not args.root.is_dir():
            problem = "is not a folder" if args.root.exists() else "does not exist"
            raise BenchmarkRootError(
                f"--root {args.root} {problem}; give the {family} benchmark's folder"
            )
        sources = replace(sources, roots={**sources.roots, family: args.root})
    settings = evaluation.settings() if evaluation else _default_settings()
    if args.batch_size is not None:
        settings = replace(settings, batch_size=args.batch_size)
    if args.num_workers is not None:
        settings = replace(settings, num_workers=args.num_workers)
    import torch

    device = DeviceResource(device=args.device).torch_device()
    precision = args.precision or (evaluation.precision if evaluation else "float32")
    retriever = load_retriever_spec(spec, device, getattr(torch, precision))
    print(f"retriever {retriever.retriever_id} on {device} in {precision}", file=sys.stderr)
    cache = gallery_cache(layout)
    return evaluate_benchmark(
        retriever,
        args.benchmark,
        sources,
        cache,
        output_dir(layout, retriever.retriever_id, args.benchmark),
        settings,
        log=lambda line: print(line, file=sys.stderr),
        # Drops the cache entries of deleted checkpoints, once the benchmark has loaded.
        before_first_split=lambda: cache.keep_tidy(retriever.retriever_id, spec),
    )


def _profile_resources(home: Path) -> dict:
    """The profile's resources (its `evaluation` resource, when it has one, and the catalog)."""
    from resources.environment import profile_from_env
    from resources.profiles import build_resources

    return build_resources(profile_from_env(), home)


def _sources(evaluation, layout, catalog):
    """The profile's benchmark roots, and the catalog's triplets for "heldout"."""
    from megapairs_assets.corpus.step import image_uris
    from megapairs_assets.evaluation.run import BenchmarkSources
    from megapairs_assets.evaluation.step import read_triplets

    def triplets():
        if catalog.path is not None and not catalog.path.exists():
            return None  # no run has written anything under this data root yet
        frame, _ = read_triplets(layout, catalog)
        return frame

    def locate(image_ids):
        return image_uris(catalog, image_ids)

    if evaluation is None:
        return BenchmarkSources(triplets=triplets, locate_images=locate)
    return evaluation.sources(triplets, locate)


def _default_settings():
    from megapairs_assets.evaluation.run import EvaluationSettings

    return EvaluationSettings()


def retriever_spec(argument: str, evaluation: Any | None) -> RetrieverSpec:
    """What `--retriever` names (eval and search take the same forms): `base`, the profile's
    base retriever (its weights checked here), or a checkpoint, export or open_clip name."""
    from megapairs_assets.retriever.model import spec_from_argument

    if argument == BASE_ALIAS:
        if evaluation is None:
            raise ConfigurationError("this profile configures no base retriever; name one instead")
        evaluation.prepare()
        return evaluation.base_spec()
    return spec_from_argument(argument, default_model=evaluation.base_model if evaluation else None)


def add_retriever_argument(parser: argparse.ArgumentParser) -> None:
    """`--retriever`, as `eval` and `search` take it (resolved by `retriever_spec`)."""
    parser.add_argument(
        "--retriever",
        required=True,
        help="a checkpoint file (a training folder's Lightning lightning/last.ckpt included), a "
        "training folder (<data>/mmret_clip_checkpoint/<config>, read through its open_clip/ "
        "export), an open_clip export folder, <open_clip name>[@<pretrained tag or file>] "
        f"(weights from the local cache: nothing is downloaded), or '{BASE_ALIAS}' for the "
        "profile's base retriever",
    )

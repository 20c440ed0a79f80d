"""`megapairs eval`: score one retriever on one benchmark from a terminal, outside the UI.

    megapairs eval --retriever <checkpoint path | open_clip name[@pretrained] | base>
                   --benchmark <key> [--root DIR]

It runs the same code as the `benchmark_scores` asset (same loaders, metrics, gallery cache
under the data root, server files under `<data>/benchmark_scores/<retriever>/<benchmark>/`)
and prints the same table. It does not write catalog rows: scores that should be part of the
lineage come from materializing the asset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megapairs_assets.evaluation.run import BENCHMARK_FAMILY, BENCHMARK_KEYS

BASE_ALIAS = "base"


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
    )
    parser.add_argument(
        "--retriever",
        required=True,
        help="a checkpoint file or open_clip export folder, <open_clip name>[@<pretrained tag or "
        f"file>], or '{BASE_ALIAS}' for the profile's base retriever",
    )
    parser.add_argument("--benchmark", required=True, choices=BENCHMARK_KEYS)
    parser.add_argument(
        "--root",
        type=Path,
        help="the benchmark's folder in its official layout (default: the profile's setting)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "float16"),
        help="numbers the retriever runs in (default: the profile's, else float32)",
    )
    parser.add_argument("--batch-size", type=int, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, help="image decode worker processes")
    parser.set_defaults(func=run_eval)
    return parser


def run_eval(args: argparse.Namespace) -> int:
    """Score and print; a configuration or format problem is one line on stderr, exit 1."""
    from megapairs_assets.evaluation.heldout import HeldOutError
    from megapairs_assets.evaluation.loaders import BenchmarkFormatError
    from megapairs_assets.evaluation.run import BenchmarkImageError
    from megapairs_assets.retriever.model import RetrieverConfigError

    try:
        result = _evaluate(args)
    except (
        RetrieverConfigError,
        BenchmarkFormatError,
        BenchmarkImageError,
        HeldOutError,
        ValueError,
    ) as error:
        print(f"megapairs eval: {error}", file=sys.stderr)
        return 1
    print(result.table_markdown())
    return 0


def _evaluate(args: argparse.Namespace):
    from dataclasses import replace

    from megapairs_assets.evaluation.run import evaluate_benchmark
    from megapairs_assets.evaluation.step import gallery_cache, output_dir
    from megapairs_assets.lib.storage import DataLayout, default_home
    from megapairs_assets.retriever.model import load_retriever_spec, spec_from_argument
    from resources.device import DeviceResource

    home = default_home()
    layout = DataLayout(home)
    resources = _profile_resources(home)
    evaluation = resources.get("evaluation")
    if args.retriever == BASE_ALIAS:
        if evaluation is None:
            raise ValueError("this profile configures no base retriever; name one instead")
        evaluation.prepare()
        spec = evaluation.base_spec()
    else:
        spec = spec_from_argument(
            args.retriever, default_model=evaluation.base_model if evaluation else None
        )
    sources = _sources(evaluation, layout, resources["catalog"].catalog())
    family = BENCHMARK_FAMILY[args.benchmark]
    if args.root is not None:
        if family == "heldout":
            raise ValueError("--root does not apply to heldout (it reads the project's triplets)")
        sources = replace(sources, roots={**sources.roots, family: args.root})
    settings = evaluation.settings() if evaluation else _default_settings()
    if args.batch_size:
        settings = replace(settings, batch_size=args.batch_size)
    if args.num_workers is not None:
        settings = replace(settings, num_workers=args.num_workers)
    import torch

    device = DeviceResource(device=args.device).torch_device()
    precision = args.precision or (evaluation.precision if evaluation else "float32")
    retriever = load_retriever_spec(spec, device, getattr(torch, precision))
    print(f"retriever {retriever.retriever_id} on {device} in {precision}", file=sys.stderr)
    return evaluate_benchmark(
        retriever,
        args.benchmark,
        sources,
        gallery_cache(layout),
        output_dir(layout, retriever.retriever_id, args.benchmark),
        settings,
        log=lambda line: print(line, file=sys.stderr),
    )


def _profile_resources(home: Path) -> dict:
    """The profile's resources (its `evaluation` resource, when it has one, and the catalog)."""
    from resources.profiles import build_resources, profile_from_env

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

"""The search subcommand: rank a gallery of images for a query, with a trained retriever.

    megapairs search --retriever <checkpoint | export | last.ckpt | name[@tag] | base>
                     [--gallery <image folder | .tar shard | folder of .tar shards | manifest>]
                     --image Q.jpg --text "..." [--top-k 10] [--json] [--html out.html]

A query is an image, a text, or both (fused by MMRet's rule); `--queries FILE` runs one query
per JSON line ({"image": ..., "text": ...}). Without `--gallery` the gallery is the current
image corpus of $MEGAPAIRS_HOME. A gallery image with exactly the query image's bytes (a query
picked from the gallery) is left out and counted in the output; `--include-query` keeps it.
Gallery embeddings go through the evaluation's gallery cache
(`<home>/benchmark_gallery_cache/`), so searching the same gallery again with the same
retriever embeds nothing. The cache is bounded (`evaluation.gallery_cache`: least recently used
entries are evicted past its size and entry budget) and cleaned on each search: entries of
retrievers whose weights were deleted are removed. Evictions, those removals and a gallery
embedded again because its images or the retriever changed are said on stderr; nothing is said
when nothing happened. The work is `megapairs_assets.retriever.search`; torch and open_clip
are imported when the command runs, never while the parser is built.

Exit codes (EXIT_CODES, also in the command's --help), as the eval command's: 0 results
printed (unreadable gallery images are left out and listed on stderr); 1 the data cannot be
searched (an empty or unreadable gallery or manifest, a query image that does not decode, a
malformed queries file or an image it names that is not there); 2 usage or configuration error (a
retriever that does not load, a --gallery, --image or --queries path that does not exist),
printed by `megapairs_assets.cli.main`.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from megapairs_assets.evaluation.cli import (
    EXIT_BAD_DATA,
    add_retriever_argument,
    retriever_spec,
)
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.words import plural

EXIT_FOUND = 0
EXIT_CODES = (
    "exit codes: 0 results printed (unreadable gallery images are left out and listed); 1 the "
    "gallery or a query cannot be used (no readable image, a manifest that cannot be read, a "
    "query image that does not decode, "
    "a malformed queries file, an image it names that is not there); 2 usage or configuration "
    "error (a retriever that does not load, a --gallery, --image or --queries path that does "
    "not exist)"
)
DEFAULT_TOP_K = 10
# How much of a query's text the Markdown header and the HTML page echo (a pasted document
# would otherwise bury the results); --json keeps the whole text.
QUERY_CHARS_SHOWN = 200


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def local_image(text: str) -> Path:
    """The --image path; a URL (s3://...) is a ConfigurationError saying what to pass instead,
    since `Path` would turn it into a local path that does not exist (`s3:/bucket/...`)."""
    if "://" in text:
        raise ConfigurationError(
            f"--image {text} is a URL; search reads query images from this machine: copy it "
            "here (e.g. `aws s3 cp`) and pass that file, or leave --image out and search by "
            "--text"
        )
    return Path(text).expanduser()


def refuse_remote_retriever(argument: str) -> None:
    """A ConfigurationError for a --retriever given as a URL, naming the local copy to pass:
    open_clip loads exports from this machine only, and evaluation mirrors the data root's
    checkpoints under `<home>/cache/mmret_clip_checkpoint/`."""
    if "://" not in argument:
        return
    from megapairs_assets.evaluation.step import CACHE_DIRNAME, CHECKPOINT_ASSET
    from megapairs_assets.lib.storage import default_home

    marker = f"/{CHECKPOINT_ASSET}/"
    if marker in argument:
        relative = argument.split(marker, 1)[1]
        local = default_home() / CACHE_DIRNAME / CHECKPOINT_ASSET / relative
        instead = f"its local copy, --retriever {local}"
    else:
        instead = "a local checkpoint or export folder"
    raise ConfigurationError(
        f"--retriever {argument} is a URL; search loads retrievers from this machine: pass "
        f"{instead} (benchmark_scores or `megapairs eval` copies the data root's checkpoints "
        "there)"
    )


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `search` subcommand to the `megapairs` parser."""
    parser = subparsers.add_parser(
        "search",
        help="rank a gallery of images for an image + text query with a retriever",
        description=(
            "Rank a gallery (a folder of images, a webdataset .tar shard or a folder of them, a "
            ".parquet/.jsonl manifest, or by default the current image corpus) for a composed "
            "query: a reference image "
            "and an instruction, fused by MMRet's rule; an image or a text alone works too. "
            "Gallery embeddings are cached per retriever and gallery, so a second search "
            "embeds nothing. Nothing is downloaded."
        ),
        epilog=EXIT_CODES,
    )
    add_retriever_argument(parser)
    parser.add_argument(
        "--gallery",
        type=Path,
        help="the images to rank: a folder of images (searched recursively; captions from "
        "<stem>.txt beside an image), a webdataset .tar shard or a folder of them, or a "
        ".parquet/.jsonl manifest as `demo --corpus` takes (rows with path, caption) (default: "
        "the current image corpus of $MEGAPAIRS_HOME, with its captions)",
    )
    parser.add_argument("--image", help="the query's reference image (a file on this machine)")
    parser.add_argument("--text", help="the query's text (with --image: the modification)")
    parser.add_argument(
        "--queries",
        type=Path,
        help='several queries: a JSON Lines file, one {"image": ..., "text": ...} a line '
        "(either may be left out; image paths relative to the file); not with --image/--text",
    )
    parser.add_argument(
        "--top-k",
        type=_positive_int,
        default=DEFAULT_TOP_K,
        help=f"results per query (default {DEFAULT_TOP_K})",
    )
    parser.add_argument(
        "--include-query",
        action="store_true",
        help="keep the query image itself in the results: gallery images with its exact bytes "
        "and, on the corpus, the image whose triplet-export copy it is (default: left out and "
        "counted, as a query picked from the gallery would rank itself first)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of tables"
    )
    parser.add_argument(
        "--html",
        type=Path,
        help="also write a self-contained page with thumbnails of each query and its results",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="embed the gallery again even when its embeddings are cached",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "float16"),
        help="numbers the retriever runs in (default: the profile's, else float32)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, help="images per forward pass (default: profile's)"
    )
    parser.add_argument(
        "--num-workers",
        type=_non_negative_int,
        help="image decode worker processes (0: none; default: the profile's)",
    )
    parser.set_defaults(func=run_search)
    return parser


def run_search(args: argparse.Namespace) -> int:
    """Search and print the results; see the module docstring for the exit codes.

    A configuration error propagates as `ConfigurationError`, which the `megapairs` entry point
    prints as one line (exit 2); data that cannot be searched is one line here (exit 1).
    """
    from megapairs_assets.retriever.search import SearchDataError

    refuse_remote_retriever(args.retriever)
    try:
        return _search(args)
    except ConfigurationError:
        raise
    except SearchDataError as error:
        print(f"megapairs search: {error}", file=sys.stderr)
        return EXIT_BAD_DATA


def _queries(args: argparse.Namespace) -> list:
    """The queries asked for: --queries FILE, or one made of --image and/or --text."""
    from megapairs_assets.retriever.search import SearchQuery, read_queries_file

    if args.queries is not None:
        if args.image is not None or args.text is not None:
            raise ConfigurationError("give either --queries FILE or --image/--text, not both")
        queries = read_queries_file(args.queries)
    else:
        text = args.text.strip() if args.text is not None else None
        if args.image is None and not text:
            raise ConfigurationError(
                "give a query: --image, --text (not empty) or both, or --queries"
            )
        queries = [SearchQuery(local_image(args.image) if args.image else None, text or None)]
    # Absolute, as the hits' paths are: the output makes sense from any folder.
    return [replace(q, image=q.image.absolute()) if q.image else q for q in queries]


def _local_export_root(resources: dict, home: Path) -> Path | None:
    """The home's triplet export folder (the generation resource's, else the default), when it
    is on this machine: a query picked from it is a copy of a corpus image."""
    from megapairs_assets.generation.common import export_dir
    from megapairs_assets.lib.storage import DataLayout, is_local

    configured = getattr(resources.get("generation"), "export_dir", None)
    root = export_dir(DataLayout(home), configured)
    return Path(root) if is_local(root) else None


def shown_text(text: str | None) -> str | None:
    """A query text as headers echo it: whitespace collapsed and at most QUERY_CHARS_SHOWN
    characters, saying how long the whole was when it had to be cut."""
    if text is None or len(text) <= QUERY_CHARS_SHOWN:
        return text
    return textwrap.shorten(
        text, QUERY_CHARS_SHOWN, placeholder=f" ... ({len(text)} characters in all)"
    )


def shown_results(results: list[Any]) -> list[Any]:
    """`results` with each query's text shortened for the Markdown header and the HTML page;
    the search itself (the model) had the full text."""
    return [replace(r, query=replace(r.query, text=shown_text(r.query.text))) for r in results]


def _search(args: argparse.Namespace) -> int:
    import torch

    from megapairs_assets.evaluation.step import gallery_cache
    from megapairs_assets.lib.storage import DataLayout, default_home
    from megapairs_assets.retriever.model import load_retriever_spec
    from megapairs_assets.retriever.search import (
        SearchConfigError,
        embed_gallery,
        gallery_from_corpus,
        gallery_from_path,
        open_query_images,
        query_image_problem,
        results_json,
        results_markdown,
        search,
        write_html,
    )
    from resources.device import DeviceResource
    from resources.environment import profile_from_env
    from resources.profiles import build_resources

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    queries = _queries(args)
    if args.html is not None and not args.html.expanduser().parent.is_dir():
        raise ConfigurationError(f"--html {args.html}: folder {args.html.parent} does not exist")
    for query in queries:  # a mistyped path is found before any model is loaded
        problem = query_image_problem(query.image) if query.image is not None else None
        if problem is not None:
            raise SearchConfigError(f"query image {query.image} {problem}")
    home = default_home()
    resources = build_resources(profile_from_env(), home)
    evaluation = resources.get("evaluation")
    spec = retriever_spec(args.retriever, evaluation)
    if args.gallery is not None:
        gallery = gallery_from_path(args.gallery)
    else:
        gallery = gallery_from_corpus(
            resources["catalog"].catalog(), home, _local_export_root(resources, home)
        )
    device = DeviceResource(device=args.device).torch_device()
    precision = args.precision or (evaluation.precision if evaluation else "float32")
    retriever = load_retriever_spec(spec, device, getattr(torch, precision))
    log(f"retriever {retriever.retriever_id} on {device} in {precision}")
    images = open_query_images(queries, retriever.input_side_px)
    started = time.perf_counter()
    cache = gallery_cache(DataLayout(home))
    cache.notice = log
    cache.keep_tidy(retriever.retriever_id, spec)
    embeddings = embed_gallery(
        retriever,
        gallery,
        cache,
        batch_size=args.batch_size or (evaluation.batch_size if evaluation else 64),
        num_workers=(
            args.num_workers
            if args.num_workers is not None
            else (evaluation.num_workers if evaluation else 0)
        ),
        refresh=args.refresh,
        log=log,
    )
    if embeddings.cache_entry is None:
        how = "embedded (not cached)"
    else:
        verb = "embeddings reused from" if embeddings.reused else "embedded and cached in"
        how = f"{verb} {embeddings.cache_entry}"
    log(
        f"gallery {gallery.name}: {plural(len(gallery.items), 'image')}, {how} "
        f"({time.perf_counter() - started:.2f} s)"
    )
    skipped = embeddings.skipped_message()
    if skipped:
        log(f"megapairs search: {skipped}")
    results = search(
        retriever, queries, images, embeddings, args.top_k, include_query=args.include_query
    )
    searchable = len(embeddings.readable_rows)
    if args.top_k > searchable:
        log(f"--top-k {args.top_k}: the gallery has {searchable} readable images, all ranked")
    if args.json:  # data for programs: each query's text in full
        print(json.dumps(results_json(results, embeddings, retriever.retriever_id), indent=2))
    else:
        print(results_markdown(shown_results(results)))
    if args.html is not None:
        page = write_html(
            args.html, shown_results(results), images, retriever.retriever_id, gallery.name
        )
        log(f"wrote {page}")
    return EXIT_FOUND

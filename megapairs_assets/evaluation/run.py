"""One benchmark for one retriever, end to end: load, embed (cached), rank, score, submit.

The benchmark keys are the `benchmarks` partition keys and the CLI's `--benchmark` values:

| key | splits scored | metrics (percent) |
|---|---|---|
| circo-val | val | mAP@5/10/25/50 |
| circo-test | test | none: the CIRCO server file |
| cirr-val | val | R@1/5/10/50, R_subset@1/2/3, Avg(R@5,R_subset@1) |
| cirr-test1 | test1 | none: the two CIRR server files |
| fashioniq-val | dress, shirt, toptee, mean | R@10/50 |
| genecis | 4 tasks, mean | R@1/2/3 |
| heldout | heldout | R@1/5/10, mAP@5 |

A split whose files are absent is a `skipped` row naming the path looked at, never a number;
a "mean" row exists only when every split it averages was scored. Queries a benchmark's protocol
leaves out (GeneCIS: a gallery of another length than the task's most common one; held-out:
an image not found in the corpus) are counted in the scored rows' `detail` and in the table.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

from megapairs_assets.corpus.images import ImageRejected
from megapairs_assets.evaluation import metrics
from megapairs_assets.evaluation.benchmark import BenchmarkSplit, ImageRef
from megapairs_assets.evaluation.catalog_rows import (
    STATUS_SCORED,
    STATUS_SKIPPED,
    STATUS_SUBMISSION,
)
from megapairs_assets.evaluation.gallery_cache import CacheKey, GalleryCache
from megapairs_assets.evaluation.heldout import ImageLocator, heldout_benchmark
from megapairs_assets.evaluation.images import open_benchmark_image
from megapairs_assets.evaluation.loaders import (
    FASHIONIQ_CATEGORIES,
    GENECIS_TASKS,
    BenchmarkFilesMissing,
    BenchmarkFormatError,
    load_circo,
    load_cirr,
    load_fashioniq,
    load_genecis,
)
from megapairs_assets.evaluation.scoring import candidate_scores, top_k
from megapairs_assets.evaluation.submissions import (
    CIRCO_TOP,
    CIRR_TOP,
    SubmissionError,
    write_circo_submission,
    write_cirr_submission,
)
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.progress import Progress
from megapairs_assets.retriever.model import Retriever, fuse_projections, normalize_rows

MEAN_SPLIT = "mean"

SCORE_COLUMNS = {
    "retriever_id": pl.String,
    "benchmark": pl.String,
    "split": pl.String,
    "metric": pl.String,
    "value": pl.Float64,
    "status": pl.String,
    "detail": pl.String,
    "gallery_version": pl.String,
    "queries": pl.Int64,
    "gallery_images": pl.Int64,
}
"""One row per (split, metric) scored; one row per skipped split or submission file."""


@dataclass(frozen=True)
class BenchmarkSources:
    """Where benchmark data comes from.

    roots: benchmark family ("circo", "cirr", "fashioniq", "genecis") -> its folder, or None
        when not configured. triplets: returns the project's triplets (all shards) or None
        when there are none yet; read only for "heldout". locate_images: image ids -> where
        their pixels are (the corpus), for triplets keyed by image id.
    """

    roots: Mapping[str, Path | None] = field(default_factory=dict)
    triplets: Callable[[], pl.DataFrame | None] | None = None
    locate_images: ImageLocator | None = None
    heldout_fraction: float = 0.05
    heldout_max_queries: int | None = None


@dataclass(frozen=True)
class EvaluationSettings:
    """How to embed and rank: images per forward pass, decode workers, queries per search."""

    batch_size: int = 64
    num_workers: int = 2
    query_batch_size: int = 16_384

    def __post_init__(self) -> None:
        # A batch of 0 would embed nothing and score every query as a miss, silently.
        problems = [
            f"{name} must be a positive integer, got {value}"
            for name, value in (
                ("batch_size", self.batch_size),
                ("query_batch_size", self.query_batch_size),
            )
            if value < 1
        ]
        if self.num_workers < 0:
            problems.append(f"num_workers must be 0 or more, got {self.num_workers}")
        if problems:
            raise ConfigurationError("evaluation settings: " + "; ".join(problems))


@dataclass(frozen=True)
class Skipped:
    """A split that could not be scored because its files are absent: why and where."""

    benchmark: str
    split: str
    path: Path | None
    reason: str

    @property
    def detail(self) -> str:
        """The reason, naming the path looked at once (most reasons already name it)."""
        if self.path is None or str(self.path) in self.reason:
            return self.reason
        return f"{self.reason} (looked at {self.path})"


@dataclass
class SplitResult:
    """What scoring one split produced."""

    benchmark: str
    split: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    detail: str = ""
    gallery_version: str | None = None
    queries: int = 0
    gallery_images: int = 0
    queries_left_out: int = 0
    gallery_reused: bool | None = None
    submissions: list[Path] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class BenchmarkResult:
    """All splits of one benchmark key for one retriever, plus the headline means."""

    retriever_id: str
    benchmark: str
    splits: list[SplitResult]

    def rows(self) -> pl.DataFrame:
        """The catalog rows: one per metric scored, one per skipped split or submission.

        `detail` says why a split was skipped, which file a submission row is, and on scored
        rows what the number covers ("9 of 12 queries scored; 3 left out: ...", "mean over
        ..."), empty when it covers every query of its split."""
        records = []
        for result in self.splits:
            base = {
                "retriever_id": self.retriever_id,
                "benchmark": result.benchmark,
                "split": result.split,
                "gallery_version": result.gallery_version,
                "queries": result.queries,
                "gallery_images": result.gallery_images,
            }
            if result.status == STATUS_SCORED:
                records += [
                    {
                        **base,
                        "metric": m,
                        "value": v,
                        "status": result.status,
                        "detail": result.detail,
                    }
                    for m, v in result.metrics.items()
                ]
            elif result.status == STATUS_SUBMISSION:
                records += [
                    {
                        **base,
                        "metric": None,
                        "value": None,
                        "status": result.status,
                        "detail": str(path),
                    }
                    for path in result.submissions
                ]
            else:
                records.append(
                    {
                        **base,
                        "metric": None,
                        "value": None,
                        "status": result.status,
                        "detail": result.detail,
                    }
                )
        return pl.DataFrame(records, schema=SCORE_COLUMNS)

    def scored(self) -> list[SplitResult]:
        return [s for s in self.splits if s.status == STATUS_SCORED]

    def table_markdown(self) -> str:
        """One row per split (and mean), one column per metric; notes under it say which splits
        were skipped and why, which left queries out, and which server files were written."""
        scored = self.scored()
        names = list(dict.fromkeys(m for s in scored for m in s.metrics))
        lines = [f"**{self.benchmark}** · retriever `{self.retriever_id}`", ""]
        if names:
            lines += [
                "| split | " + " | ".join(names) + " | queries |",
                "|---|" + "---|" * (len(names) + 1),
            ]
            for s in scored:
                cells = [f"{s.metrics[n]:.2f}" if n in s.metrics else "" for n in names]
                lines.append(f"| {s.split} | " + " | ".join(cells) + f" | {s.queries} |")
        notes = []
        for s in self.splits:
            if s.status == STATUS_SKIPPED:
                notes.append(f"- {s.split}: skipped ({s.detail})")
            elif s.queries_left_out and s.split != MEAN_SPLIT:
                notes.append(f"- {s.split}: {s.detail}")
            elif s.status == STATUS_SUBMISSION:
                files = ", ".join(f"`{p}`" for p in s.submissions)
                notes.append(f"- {s.split}: server file(s) written: {files}")
        if notes and names:
            lines.append("")  # a list right under a table would read as one of its rows
        return "\n".join(lines + notes)


# --- benchmark keys --------------------------------------------------------------------------


# Files that mark a benchmark's folder (any one of them), for pointing at it when a root
# names the folder above it (e.g. `data/` instead of `data/CIRCO`).
BENCHMARK_MARKERS = {
    "circo": ("annotations/val.json", "annotations/test.json"),
    "cirr": tuple(
        f"{folder}captions/cap.rc2.{split}.json"
        for folder in ("", "cirr/")
        for split in ("val", "test1")
    ),
    "fashioniq": tuple(f"captions/cap.{c}.val.json" for c in FASHIONIQ_CATEGORIES),
    "genecis": tuple(f"{folder}{t}.json" for folder in ("genecis/", "") for t in GENECIS_TASKS),
}
_HINT_DEPTH = 2  # folders below the root searched for a misplaced benchmark
_HINT_MAX_FOLDERS = 200  # sub-folders listed per level; an image folder is not walked


def _family_root(sources: BenchmarkSources, family: str) -> Path | Skipped:
    root = sources.roots.get(family)
    if root is None:
        return Skipped(
            family,
            "*",
            None,
            f"no {family} root configured (set MEGAPAIRS_{family.upper()}_ROOT, the evaluation "
            f"resource's {family}_root, or pass `megapairs eval --root`)",
        )
    return Path(root)


def _load(
    family: str, split: str, sources: BenchmarkSources, loader: Callable[[Path], BenchmarkSplit]
) -> BenchmarkSplit | Skipped:
    root = _family_root(sources, family)
    if isinstance(root, Skipped):
        return Skipped(family, split, None, root.reason)
    if not root.is_dir():
        return Skipped(family, split, root, f"{family} root folder not found at {root}")
    try:
        loaded = loader(root)
    except BenchmarkFilesMissing as missing:
        return Skipped(family, split, missing.path, str(missing) + _elsewhere_hint(root, family))
    if not loaded.queries:
        # Caught before the gallery is embedded: nothing could be scored.
        raise BenchmarkFormatError(loaded.files[0], None, "the file lists no queries")
    return loaded


def _elsewhere_hint(root: Path, family: str) -> str:
    """'; <folder> holds ... files' when the root lacks the benchmark but a folder below has it."""
    markers = BENCHMARK_MARKERS.get(family, ())
    if any((root / marker).is_file() for marker in markers):
        return ""  # the root is right; something inside it is missing
    found: list[Path] = []
    for folder in _sub_folders(root, _HINT_DEPTH):
        inside_found = any(folder.is_relative_to(outer) for outer in found)
        if not inside_found and any((folder / marker).is_file() for marker in markers):
            found.append(folder)
    if not found:
        return ""
    shown = " or ".join(str(folder) for folder in found[:2])
    return f"; {shown} holds {family} files: give that folder as the {family} root"


def _sub_folders(root: Path, depth: int) -> list[Path]:
    """Folders up to `depth` levels below `root`, sorted, at most _HINT_MAX_FOLDERS a level."""
    level, found = [root], []
    for _ in range(depth):
        below = []
        for folder in level:
            try:
                with os.scandir(folder) as entries:
                    names = sorted(
                        e.name for e in entries if e.is_dir() and not e.name.startswith(".")
                    )
            except OSError:
                continue
            if len(names) > _HINT_MAX_FOLDERS:
                continue  # an image tree, not where annotation folders live
            below += [folder / name for name in names]
        found += below
        level = below
    return found


def _heldout(sources: BenchmarkSources) -> list[BenchmarkSplit | Skipped]:
    triplets = sources.triplets() if sources.triplets is not None else None
    if triplets is None or triplets.height == 0:
        reason = (
            "no triplets have been generated yet: run `megapairs demo` or materialize "
            "`triplets` first"
        )
        return [Skipped("heldout", "heldout", None, reason)]
    split = heldout_benchmark(
        triplets, sources.heldout_fraction, sources.heldout_max_queries, sources.locate_images
    )
    return [split]


BENCHMARK_LOADERS: dict[str, Callable[[BenchmarkSources], list[BenchmarkSplit | Skipped]]] = {
    "circo-val": lambda s: [_load("circo", "val", s, lambda r: load_circo(r, "val"))],
    "circo-test": lambda s: [_load("circo", "test", s, lambda r: load_circo(r, "test"))],
    "cirr-val": lambda s: [_load("cirr", "val", s, lambda r: load_cirr(r, "val"))],
    "cirr-test1": lambda s: [_load("cirr", "test1", s, lambda r: load_cirr(r, "test1"))],
    "fashioniq-val": lambda s: [
        _load("fashioniq", c, s, lambda r, c=c: load_fashioniq(r, c)) for c in FASHIONIQ_CATEGORIES
    ],
    "genecis": lambda s: [
        _load("genecis", t, s, lambda r, t=t: load_genecis(r, t)) for t in GENECIS_TASKS
    ],
    "heldout": _heldout,
}
BENCHMARK_KEYS = tuple(BENCHMARK_LOADERS)
BENCHMARK_FAMILY = {key: key.split("-")[0] for key in BENCHMARK_KEYS}
"""Benchmark key -> the family whose configured root it reads ("heldout" reads triplets)."""


def load_benchmark(key: str, sources: BenchmarkSources) -> list[BenchmarkSplit | Skipped]:
    """The splits of benchmark `key`, each loaded or skipped (format errors propagate)."""
    if key not in BENCHMARK_LOADERS:
        raise ValueError(f"unknown benchmark {key!r}; known: {', '.join(BENCHMARK_KEYS)}")
    return BENCHMARK_LOADERS[key](sources)


# --- scoring ---------------------------------------------------------------------------------


def evaluate_benchmark(
    retriever: Retriever,
    key: str,
    sources: BenchmarkSources,
    cache: GalleryCache,
    output_dir: Path,
    settings: EvaluationSettings = EvaluationSettings(),
    log: Callable[[str], None] | None = None,
    before_first_split: Callable[[], None] | None = None,
) -> BenchmarkResult:
    """Load benchmark `key`, score every available split, add means, write server files.

    `before_first_split` runs once, after the first split loaded and before it is embedded
    (the callers tidy the gallery cache there, so a benchmark refused while loading touches
    nothing)."""
    results = []
    for item in load_benchmark(key, sources):
        if isinstance(item, Skipped):
            results.append(
                SplitResult(item.benchmark, item.split, STATUS_SKIPPED, detail=item.detail)
            )
            continue
        if before_first_split is not None:
            before_first_split()
            before_first_split = None
        results.append(evaluate_split(retriever, item, cache, output_dir, settings, log))
    mean = _mean_row(key, results)
    if mean is not None:
        results.append(mean)
    return BenchmarkResult(retriever.retriever_id, key, results)


def evaluate_split(
    retriever: Retriever,
    split: BenchmarkSplit,
    cache: GalleryCache,
    output_dir: Path,
    settings: EvaluationSettings = EvaluationSettings(),
    log: Callable[[str], None] | None = None,
) -> SplitResult:
    """Embed (or reuse) the split's images, embed its queries, rank and score."""
    started = time.perf_counter()
    images_version = split.images_version()
    version = split.gallery_version(images_version)
    key = CacheKey(
        retriever_id=retriever.retriever_id,
        weights_fingerprint=retriever.spec.fingerprint(),
        benchmark=split.benchmark,
        split=split.cache_name,
        gallery_version=images_version,
        image_count=len(split.image_ids),
        precision=str(retriever.dtype).removeprefix("torch."),
        image_decoding=split.image_decoding,
        batch_size=settings.batch_size,
        device=device_kind(retriever.device),
    )
    check_server_gallery(split)
    projections, reused = cache.get_or_compute(
        key, lambda: embed_images(retriever, split, settings, log)
    )
    if reused and log is not None:
        log(
            f"{split.benchmark}/{split.split} gallery: {len(split.image_ids)} image embeddings "
            f"reused from {cache.entry_dir(key)}"
        )
    # At the gallery's batch size, which its cache key records: a score never mixes a gallery
    # embedded at one batch size with queries embedded at another (CacheKey says why it matters).
    texts = retriever.project_texts([q.text for q in split.queries], settings.batch_size)
    scored, submissions = score_split(split, projections, texts, output_dir, settings)
    return SplitResult(
        benchmark=split.benchmark,
        split=split.split,
        status=STATUS_SCORED if split.has_ground_truth else STATUS_SUBMISSION,
        metrics=scored,
        detail=left_out_note(split),
        gallery_version=version,
        queries=len(split.queries),
        gallery_images=split.gallery_size,
        queries_left_out=sum(split.discarded.values()),
        gallery_reused=reused,
        submissions=submissions,
        seconds=time.perf_counter() - started,
    )


def device_kind(device: torch.device | str) -> str:
    """Where forward passes run, as the gallery cache keys it: `cpu`, or the accelerator's type
    and model (`cuda NVIDIA H200`): another kind of device rounds embeddings differently."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda {torch.cuda.get_device_name(device)}"
    return device.type


def score_split(
    split: BenchmarkSplit,
    image_projections: np.ndarray,
    text_projections: np.ndarray,
    output_dir: Path,
    settings: EvaluationSettings = EvaluationSettings(),
) -> tuple[dict[str, float], list[Path]]:
    """Metrics (name -> percent) for a split with answers, or its server files without.

    `image_projections` are the raw projections of `split.image_ids`, in order;
    `text_projections` the raw projections of the queries' texts.
    """
    row_of = split.index_of()
    unit = normalize_rows(image_projections)
    references = np.array([row_of[q.reference_id] for q in split.queries], dtype=np.int64)
    queries = fuse_projections(image_projections[references], text_projections)
    targets = [[row_of[t] for t in q.targets] for q in split.queries]
    query_ids = [q.query_id for q in split.queries]
    kind = split.metric_kind

    check_server_gallery(split)
    if kind == "genecis":
        candidates = [[row_of[c] for c in q.candidates] for q in split.queries]
        recall = metrics.genecis_recall_at_k(candidate_scores(queries, unit, candidates))
        return _named("R", recall), []

    depth = {"circo": 50, "cirr": 51, "recall": 50, "heldout": 10}[kind]
    ranked = top_k(queries, unit[: split.gallery_size], depth, settings.query_batch_size).indices
    if kind == "circo":
        if split.has_ground_truth:
            circo = metrics.mean_average_precision_at_k(
                ranked, targets, metrics.CIRCO_KS, query_ids
            )
            return _named("mAP", circo), []
        path = output_dir / f"circo-{split.split}-submission.json"
        write_circo_submission(path, _id_rankings(split, query_ids, ranked))
        return {}, [path]
    if kind == "cirr":
        members = np.array([[row_of[m] for m in q.subset] for q in split.queries], dtype=np.int64)
        member_scores = np.stack(candidate_scores(queries, unit, members))
        if not split.has_ground_truth:
            paths = _cirr_submissions(
                split, query_ids, ranked, members, member_scores, references, output_dir
            )
            return {}, paths
        single = [t[0] for t in targets]
        recall = metrics.cirr_recall_at_k(ranked, references, single, metrics.CIRR_KS, query_ids)
        subset = metrics.cirr_recall_subset_at_k(
            members, member_scores, references, single, metrics.CIRR_SUBSET_KS, query_ids
        )
        return _named("R", recall) | _named("R_subset", subset) | cirr_average(recall, subset), []
    if kind == "recall":
        recall = metrics.recall_at_k(ranked, targets, metrics.FASHIONIQ_KS, query_ids)
        return _named("R", recall), []
    recall = metrics.recall_at_k(ranked, targets, metrics.HELDOUT_RECALL_KS, query_ids)
    average = metrics.mean_average_precision_at_k(
        ranked, targets, metrics.HELDOUT_MAP_KS, query_ids
    )
    return _named("R", recall) | _named("mAP", average), []


def _cirr_submissions(
    split: BenchmarkSplit,
    query_ids: list[str],
    ranked: np.ndarray,
    members: np.ndarray,
    member_scores: np.ndarray,
    references: np.ndarray,
    output_dir: Path,
) -> list[Path]:
    without_reference = metrics.remove_reference(ranked, references)
    subset = metrics.subset_rankings(members, member_scores, references)
    recall_path = output_dir / f"cirr-{split.split}-recall-submission.json"
    subset_path = output_dir / f"cirr-{split.split}-recall_subset-submission.json"
    write_cirr_submission(recall_path, "recall", _id_rankings(split, query_ids, without_reference))
    write_cirr_submission(subset_path, "recall_subset", _id_rankings(split, query_ids, subset))
    return [recall_path, subset_path]


def _id_rankings(
    split: BenchmarkSplit, query_ids: list[str], ranked: np.ndarray
) -> dict[str, list[str]]:
    """Rankings of gallery rows as image ids, padding dropped."""
    ids = split.image_ids
    return {q: [ids[i] for i in row if i >= 0] for q, row in zip(query_ids, ranked, strict=True)}


CIRR_AVERAGE = "Avg(R@5,R_subset@1)"
"""CIRR's headline (its leaderboard's "Avg"): the mean of Recall@5 and Recall_subset@1."""


def cirr_average(recall: Mapping[int, float], subset: Mapping[int, float]) -> dict[str, float]:
    """{CIRR_AVERAGE: (R@5 + R_subset@1) / 2}, as CIRR reports it."""
    return {CIRR_AVERAGE: (recall[5] + subset[1]) / 2.0}


# Results per query each server file lists, and what that asks of the gallery besides the
# query's own reference (CIRR deletes it from the ranking; CIRCO keeps it).
_SERVER_DEPTH = {"circo": (CIRCO_TOP, False), "cirr": (CIRR_TOP["recall"], True)}


def check_server_gallery(split: BenchmarkSplit) -> None:
    """Refuse, before anything is embedded, a test split whose gallery is too small for the
    server file (CIRCO: 50 results per query; CIRR: 50 besides the reference): a
    SubmissionError naming the gallery's size and the file that lists it."""
    if split.has_ground_truth or split.metric_kind not in _SERVER_DEPTH:
        return
    depth, reference_removed = _SERVER_DEPTH[split.metric_kind]
    gallery = set(split.gallery_ids)
    # Candidates a query can list: the gallery, less its reference where the ranking drops it.
    fewest = min(
        (
            split.gallery_size - 1
            if reference_removed and q.reference_id in gallery
            else split.gallery_size
            for q in split.queries
        ),
        default=split.gallery_size,
    )
    if fewest >= depth:
        return
    needed = depth + 1 if reference_removed else depth
    besides = " besides the query's reference" if reference_removed else ""
    source = f" (listed in {split.files[-1]})" if split.files else ""
    raise SubmissionError(
        f"{split.benchmark} {split.split}: the gallery is too small for the server file: it "
        f"holds {split.gallery_size} images{source}, and the server wants {depth} results per "
        f"query{besides}, so at least {needed}; is the image list complete?"
    )


def _named(prefix: str, values: Mapping[int, float]) -> dict[str, float]:
    return {f"{prefix}@{k}": v for k, v in values.items()}


def _mean_row(key: str, results: list[SplitResult]) -> SplitResult | None:
    """FashionIQ's and GeneCIS's headline: the mean over categories / tasks, all scored."""
    if key not in ("fashioniq-val", "genecis") or not results:
        return None
    if any(r.status != STATUS_SCORED for r in results):
        return None
    names = list(results[0].metrics)
    left_out = sum(r.queries_left_out for r in results)
    scored = sum(r.queries for r in results)
    detail = f"mean over {', '.join(r.split for r in results)}"
    if left_out:
        detail += f"; they scored {scored} of {scored + left_out} queries ({left_out} left out)"
    return SplitResult(
        benchmark=results[0].benchmark,
        split=MEAN_SPLIT,
        status=STATUS_SCORED,
        metrics={n: metrics.mean_of([r.metrics[n] for r in results]) for n in names},
        detail=detail,
        gallery_version="+".join(r.gallery_version or "" for r in results),
        queries=scored,
        gallery_images=sum(r.gallery_images for r in results),
        queries_left_out=left_out,
    )


# Why a protocol leaves queries out, in words (the code stays in the detail, for queries).
LEFT_OUT_REASONS = {
    "gallery_length_not_modal": (
        "a gallery of another length than the task's most common; GeneCIS's evaluation code "
        "batches one gallery length per task"
    ),
    "image_not_located": "an image of theirs is not in the corpus",
}


def left_out_note(split: BenchmarkSplit) -> str:
    """'9 of 12 queries scored; 3 left out: <code> (<why>)' when the split's protocol left
    queries out, else empty."""
    left_out = {why: n for why, n in split.discarded.items() if n}
    if not left_out:
        return ""
    total = len(split.queries) + sum(left_out.values())
    reasons = "; ".join(
        f"{n} left out: {why}" + (f" ({LEFT_OUT_REASONS[why]})" if why in LEFT_OUT_REASONS else "")
        for why, n in left_out.items()
    )
    return f"{len(split.queries)} of {total} queries scored; {reasons}"


# --- embedding images ------------------------------------------------------------------------


class _BenchmarkImages(Dataset):
    """Benchmark images as preprocessed tensors; a failure comes back as a message."""

    def __init__(self, refs: list[ImageRef], decoding: str, retriever: Retriever) -> None:
        self.refs = refs
        self.decoding = decoding
        self.preprocess = retriever.preprocess
        self.input_side_px = retriever.input_side_px

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str | None]:
        ref = self.refs[index]
        try:
            image = open_benchmark_image(ref, self.decoding, self.input_side_px)
            return self.preprocess(image), None
        except (ImageRejected, OSError, ValueError) as error:
            return None, f"{ref.uri}: {error}"


_FAILURES_SHOWN = 3  # unreadable images named in the error; the count covers them all


class BenchmarkImageError(RuntimeError):
    """A benchmark image that exists but cannot be read: scoring without it would be wrong."""


def _collate(
    items: list[tuple[torch.Tensor | None, str | None]],
) -> tuple[torch.Tensor | None, list[str]]:
    failures = [message for _, message in items if message is not None]
    pixels = [p for p, _ in items if p is not None]
    return (torch.stack(pixels) if pixels else None), failures


def embed_images(
    retriever: Retriever,
    split: BenchmarkSplit,
    settings: EvaluationSettings,
    log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Raw image projections of every image of `split`, in `split.image_ids` order."""
    loader = DataLoader(
        _BenchmarkImages(split.image_refs, split.image_decoding, retriever),
        batch_size=settings.batch_size,
        shuffle=False,
        num_workers=settings.num_workers,
        collate_fn=_collate,
        # Fork, not spawn, even inside Dagster's spawned step processes: workers only decode.
        multiprocessing_context=(
            "fork" if settings.num_workers > 0 and sys.platform.startswith("linux") else None
        ),
    )
    chunks: list[np.ndarray] = []
    failures: list[str] = []
    name = f"{split.benchmark}/{split.split}"
    with Progress(len(split.image_refs), f"{name} gallery", "images", log=log) as progress:
        for pixels, batch_failures in loader:
            if batch_failures and not failures and log is not None:
                log(
                    f"{name}: an image cannot be read ({batch_failures[0]}); reading the rest "
                    "without embedding them, to list every unreadable file at once"
                )
            failures += batch_failures
            if not failures:
                chunks.append(retriever.project_pixels(pixels))
            progress.update(len(batch_failures) + (0 if pixels is None else len(pixels)))
    if failures:
        # Raised here, not in a worker, so the message reaches the user intact.
        listed = "; ".join(failures[:_FAILURES_SHOWN])
        hidden = len(failures) - _FAILURES_SHOWN
        more = f" (and {hidden} more)" if hidden > 0 else ""
        raise BenchmarkImageError(
            f"{len(failures)} of {len(split.image_refs)} images of {name} cannot be read: "
            f"{listed}{more}; fix or replace the file(s)"
        )
    return np.concatenate(chunks).astype(np.float32, copy=False)

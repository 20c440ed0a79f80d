"""The one code path behind all three embedding tables (CLIP image, DINOv2 image, caption text).

`embed_rows` turns corpus rows into L2-normalised float16 vectors with any `LoadedEncoder`.
Only the way a batch is fed differs by modality: images are decoded either on the GPU
(`megapairs_assets.embeddings.device_input`: workers read JPEG bytes, nvJPEG decodes, the
device resizes) or by DataLoader workers on the CPU, and captions are batched as strings.
Normalising, the float16 cast, skipped-row bookkeeping, the on-disk table and its checks are
shared. Each batch's vectors are copied back asynchronously and collected one batch later, so
the host prepares the next batch while the device still runs the current one.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from megapairs_assets.corpus.images import (
    ImageFailure,
    ImageLimits,
    prepare_image_for_model,
)
from megapairs_assets.embeddings.device_input import (
    ImageDecode,
    ImageRowInputs,
    batch_bounds,
    default_num_workers,
    device_image_batches,
    tensor_geometry,
    uses_device_decode,
)
from megapairs_assets.embeddings.encoders import LoadedEncoder
from megapairs_assets.lib.progress import ProgressCallback
from megapairs_assets.lib.quality import CheckOutcome, outcome
from megapairs_assets.lib.storage import DataPath, read_arrow_table, write_arrow_atomic

SkippedRow = tuple[str, str, str]
"""(image_id, reason, detail) of a row that could not be embedded."""

# float16 keeps ~3 significant digits, so a unit vector's norm drifts by up to ~1e-3.
UNIT_NORM_TOLERANCE = 1e-2
PREFETCH_BATCHES_PER_WORKER = 2
NO_CAPTION = "no_caption"
INPUT_DIGEST_COLUMN = "input_digest"


@dataclass(frozen=True)
class EmbeddingResult:
    """Embeddings of the rows that could be embedded, in input order, plus the ones that could not.

    `vectors` is float16 (N, dim), L2-normalised in float32 before the cast. `items_per_s`
    counts embedded rows over the wall time of the whole call.
    """

    ids: list[str]
    vectors: np.ndarray
    skipped: list[SkippedRow]
    seconds: float
    items_per_s: float
    device_decoded: int = 0
    """Images decoded on the device (the rest of the embedded images went through the CPU)."""


@dataclass
class _Batch:
    """What one step of either modality yields: inputs for the encoder plus rows it skipped."""

    ids: list[str]
    inputs: torch.Tensor | list[str] | None
    skipped: list[SkippedRow] = field(default_factory=list)
    device_decoded: int = 0
    group: int = 0  # which group of rows (shard) the batch holds; a batch never spans two

    def pin_memory(self) -> _Batch:
        # DataLoader calls this on custom batch types when pin_memory=True.
        if isinstance(self.inputs, torch.Tensor):
            self.inputs = self.inputs.pin_memory()
        return self


def embed_rows(
    rows: pl.DataFrame,
    encoder: LoadedEncoder,
    limits: ImageLimits,
    batch_size: int,
    num_workers: int | None,
    device: torch.device,
    on_progress: ProgressCallback | None = None,
    image_decode: ImageDecode = "auto",
) -> EmbeddingResult:
    """Embed corpus rows (`image_id`, `source_uri`, `caption`, ...) with `encoder`.

    Image encoders read `source_uri`; an image that cannot be opened becomes a skipped row with
    the `ImageRejected` reason. Text encoders read `caption`; rows without one are skipped as
    `no_caption`. `on_progress` is called per batch with the number of rows finished.
    `image_decode` says where JPEGs are decoded (see `device_input.uses_device_decode`; "auto"
    is the GPU when its decoder works, else the CPU); `num_workers=None` picks the DataLoader
    worker count from the machine for that choice.
    """
    groups = embed_row_groups(
        [("rows", rows)],
        encoder,
        limits,
        batch_size,
        num_workers,
        device,
        on_progress=on_progress,
        image_decode=image_decode,
    )
    # Consumed to the end, so the loader and its workers finish before this returns.
    ((_, result),) = list(groups)
    return result


def embed_row_groups(
    groups: Sequence[tuple[str, pl.DataFrame]],
    encoder: LoadedEncoder,
    limits: ImageLimits,
    batch_size: int,
    num_workers: int | None,
    device: torch.device,
    on_progress: ProgressCallback | None = None,
    image_decode: ImageDecode = "auto",
) -> Iterator[tuple[str, EmbeddingResult]]:
    """`embed_rows` over several groups of rows (shards) as one input stream.

    One loader, one set of decode workers and one device queue carry on from a group to the
    next, so a group does not pay the pipeline's start-up (worker start, first batch) again:
    on the demo's 64-image shards, five per-shard calls took twice as long as one call over the
    same rows. Yields `(key, result)` per group, in the given order, as soon as every row of
    that group (and of the groups before it) is embedded or skipped; no batch spans two groups
    (`batch_bounds`). A group's `seconds` runs from the previous group's yield.
    """
    if not groups:
        return
    keys = [key for key, _ in groups]
    frames = [frame for _, frame in groups]
    if len(frames) > 1:
        # Only the columns the batches read, so shards whose tables differ elsewhere still stack.
        used = [c for c in ("image_id", "source_uri", "caption") if c in frames[0].columns]
        # `caption_issue` words an uncaptioned row's skip; a shard without it (an older table)
        # gets nulls, so its rows are worded as before.
        optional = [c for c in ("caption_issue",) if any(c in frame.columns for frame in frames)]
        rows = pl.concat(
            [
                frame.select(
                    *used,
                    *(
                        (pl.col(c) if c in frame.columns else pl.lit(None)).cast(pl.String).alias(c)
                        for c in optional
                    ),
                )
                for frame in frames
            ],
            how="vertical_relaxed",
        )
    else:
        rows = frames[0]
    sizes = [frame.height for frame in frames]
    states = [_GroupState(size) for size in sizes]
    if encoder.modality == "image":
        on_device = uses_device_decode(image_decode, device) and (
            tensor_geometry(encoder.preprocess) is not None
        )
        workers = default_num_workers(on_device) if num_workers is None else num_workers
        batches = _image_batches(
            rows, encoder, limits, batch_size, workers, device, on_device, sizes
        )
    else:
        batches = _text_batches(rows, batch_size, sizes)
    next_group = 0
    last_yield = time.perf_counter()
    # The previous batch: its vectors on their way to the host, and the batch itself.
    in_flight: tuple[_HostCopy, _Batch] | None = None

    def collect() -> None:
        if in_flight is not None:
            copy, batch = in_flight
            states[batch.group].add_vectors(batch.ids, copy.wait())
            if on_progress is not None:
                on_progress(len(batch.ids) + len(batch.skipped))

    def finished_groups() -> Iterator[tuple[str, EmbeddingResult]]:
        nonlocal next_group, last_yield
        while next_group < len(states) and states[next_group].complete:
            now = time.perf_counter()
            yield keys[next_group], states[next_group].result(encoder.dim, now - last_yield)
            states[next_group] = _GroupState(0)  # drop the finished group's vectors
            next_group, last_yield = next_group + 1, now

    yield from finished_groups()  # groups without rows
    for batch in batches:
        state = states[batch.group]
        state.skipped.extend(batch.skipped)
        state.device_decoded += batch.device_decoded
        if not batch.ids:
            if on_progress is not None and batch.skipped:
                on_progress(len(batch.skipped))
            yield from finished_groups()
            continue
        copy = _HostCopy.start(_embed_on_device(encoder, batch.inputs))
        # Waiting for the previous batch's copy leaves this batch's forward queued on the
        # device, so it runs while the host prepares the next batch.
        collect()
        in_flight = (copy, batch)
        yield from finished_groups()
    collect()
    in_flight = None
    yield from finished_groups()
    if next_group < len(states):
        raise RuntimeError(
            f"the input stream ended with group {keys[next_group]!r} incomplete "
            f"({states[next_group].done} of {states[next_group].expected} rows)"
        )


@dataclass
class _GroupState:
    """One group's results so far."""

    expected: int
    ids: list[str] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)
    device_decoded: int = 0

    @property
    def done(self) -> int:
        return len(self.ids) + len(self.skipped)

    @property
    def complete(self) -> bool:
        return self.done >= self.expected

    def add_vectors(self, ids: list[str], vectors: np.ndarray) -> None:
        self.ids.extend(ids)
        self.chunks.append(vectors)

    def result(self, dim: int, seconds: float) -> EmbeddingResult:
        vectors = np.concatenate(self.chunks) if self.chunks else np.zeros((0, dim), np.float16)
        return EmbeddingResult(
            ids=self.ids,
            vectors=vectors,
            skipped=self.skipped,
            seconds=seconds,
            items_per_s=len(self.ids) / seconds if seconds > 0 else 0.0,
            device_decoded=self.device_decoded,
        )


@dataclass(frozen=True)
class _HostCopy:
    """A device-to-host copy of one batch's vectors, queued behind that batch's work only."""

    host: torch.Tensor
    done: torch.cuda.Event | None

    @staticmethod
    def start(unit: torch.Tensor) -> _HostCopy:
        if unit.device.type != "cuda":
            return _HostCopy(unit, None)
        # Non-blocking into pinned memory; the event marks the end of this copy alone. A plain
        # .cpu() issued later would also wait for every batch queued after this one.
        host = torch.empty(unit.shape, dtype=unit.dtype, pin_memory=True)
        host.copy_(unit, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(unit.device))
        return _HostCopy(host, done)

    def wait(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
        return self.host.numpy()


def _embed_on_device(
    encoder: LoadedEncoder, inputs: torch.Tensor | list[str] | None
) -> torch.Tensor:
    """One batch's unit vectors as float16, left on the device (no host synchronisation)."""
    # Every loader already casts its model to the step's dtype, so no autocast: on one H100,
    # autocast around a bf16 ViT-L-14 cost 32% of its throughput (1,773 vs 2,602 images/s
    # forward only, benchmarks/results/gpu_suite.json) by inserting casts the model does not
    # need.
    with torch.inference_mode():
        if encoder.modality == "image":
            raw = encoder.encode_images(inputs)
        else:
            raw = encoder.encode_texts(inputs)
    if raw.ndim != 2 or raw.shape[1] != encoder.dim:
        raise ValueError(
            f"{encoder.model_id} returned vectors of shape {tuple(raw.shape)}, "
            f"expected (batch, {encoder.dim})"
        )
    # Normalised in float32: squaring float16 values loses precision (and overflows above 256).
    return torch.nn.functional.normalize(raw.float(), dim=-1).half()


def _text_batches(
    rows: pl.DataFrame, batch_size: int, group_sizes: Sequence[int]
) -> Iterator[_Batch]:
    """Captions in batches of at most `batch_size`, none spanning two groups of rows."""
    # The cast covers a shard whose captions are all null (a column of dtype Null).
    caption = pl.col("caption").cast(pl.String)
    has_caption = (caption.str.strip_chars().str.len_chars() > 0).fill_null(False)
    offset = 0
    for index, size in enumerate(group_sizes):
        group = rows.slice(offset, size)
        offset += size
        uncaptioned = group.filter(~has_caption)
        if uncaptioned.height:
            # The corpus says why a caption is missing when it knows (a broken sidecar file, a
            # caption that was not text); older tables have no such column.
            issues = (
                uncaptioned["caption_issue"].to_list()
                if "caption_issue" in uncaptioned.columns
                else [None] * uncaptioned.height
            )
            skipped = [
                (image_id, NO_CAPTION, issue or "caption is null or empty")
                for image_id, issue in zip(uncaptioned["image_id"].to_list(), issues, strict=True)
            ]
            yield _Batch(ids=[], inputs=None, skipped=skipped, group=index)
        captioned = group.filter(has_caption).select("image_id", "caption")
        for frame in captioned.iter_slices(batch_size):
            ids, captions = frame["image_id"].to_list(), frame["caption"].to_list()
            yield _Batch(ids=ids, inputs=captions, group=index)


class _ImageRows(ImageRowInputs, Dataset):
    """Corpus rows as decoded, preprocessed tensors; a failure is returned, never raised.

    Raising inside a DataLoader worker would end the whole pass, so a bad image comes back as
    (image_id, None, (reason, detail)) and `_collate_images` turns it into a skipped row.
    """

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, tuple[str, str] | None]:
        image_id = self.image_ids[index]
        # Never raises for one image (MemoryError included): a worker that raised would end
        # the whole pass, so a bad image becomes a skipped row with its reason.
        prepared = prepare_image_for_model(
            self.uris[index], self.limits, self.input_side_px, self.preprocess
        )
        if isinstance(prepared, ImageFailure):
            return image_id, None, (prepared.reason, prepared.detail)
        return image_id, prepared, None


def _collate_images(
    items: list[tuple[str, torch.Tensor | None, tuple[str, str] | None]],
) -> _Batch:
    loaded = [(image_id, pixels) for image_id, pixels, _ in items if pixels is not None]
    skipped = [(image_id, *failure) for image_id, _, failure in items if failure is not None]
    pixels = torch.stack([pixels for _, pixels in loaded]) if loaded else None
    return _Batch(ids=[image_id for image_id, _ in loaded], inputs=pixels, skipped=skipped)


def _image_batches(
    rows: pl.DataFrame,
    encoder: LoadedEncoder,
    limits: ImageLimits,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    decode_on_device: bool,
    group_sizes: Sequence[int],
) -> Iterator[_Batch]:
    """Decoded images in batches of at most `batch_size`, none spanning two groups of rows."""
    if encoder.preprocess is None:
        raise ValueError(f"image encoder {encoder.model_id} has no preprocess")
    bounds = batch_bounds(group_sizes, batch_size)
    if decode_on_device:
        device_batches = device_image_batches(
            rows,
            encoder.preprocess,
            encoder.input_size_px,
            limits,
            batch_size,
            num_workers,
            device,
            group_sizes,
        )
        # One batch per bound, in order (the same `batch_bounds` cut them).
        for bound, batch in zip(bounds, device_batches, strict=True):
            yield _Batch(batch.ids, batch.pixels, batch.skipped, batch.device_decoded, bound.group)
        return
    dataset = _ImageRows(
        rows["image_id"].to_list(),
        rows["source_uri"].to_list(),
        limits,
        encoder.input_size_px,
        encoder.preprocess,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=[range(bound.start, bound.stop) for bound in bounds],
        num_workers=num_workers,
        collate_fn=_collate_images,
        pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH_BATCHES_PER_WORKER if num_workers > 0 else None,
        multiprocessing_context=_worker_start_method() if num_workers > 0 else None,
    )
    for bound, batch in zip(bounds, loader, strict=True):
        batch.group = bound.group
        yield batch


def _worker_start_method() -> str | None:
    """Fork decode workers on Linux, even inside a spawned process.

    Dagster's multiprocess executor starts each step with `spawn`, and child processes inherit
    that start method, so DataLoader workers would re-import torch and the project: about 10 s
    per step on this 2-core machine for a 5-image shard. Forking is PyTorch's own default on
    Linux; the workers only decode and preprocess images and never touch CUDA.
    """
    return "fork" if sys.platform.startswith("linux") else None


# --- checks -------------------------------------------------------------------------------


def check_embeddings(
    ids: Sequence[str], vectors: np.ndarray, expected_ids: Sequence[str]
) -> list[CheckOutcome]:
    """Validate an embedding table: finite values, unit norm, exactly one row per expected id.

    Returns outcomes named `embeddings_finite`, `embeddings_unit_norm` and
    `embeddings_cover_inputs`; `expected_ids` are the inputs that should have been embedded
    (the corpus rows minus the skipped ones).
    """
    ids = list(ids)
    values = np.asarray(vectors, dtype=np.float32)
    values = values.reshape(len(values), values.shape[-1] if values.ndim == 2 else -1)
    finite_rows = np.isfinite(values).all(axis=1)
    norms = np.linalg.norm(np.where(np.isfinite(values), values, 0.0), axis=1)
    off_norm = finite_rows & (np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)

    def label(row: int) -> str:
        return ids[row] if row < len(ids) else f"row {row}"

    return [
        outcome(
            "embeddings_finite",
            [label(row) for row in np.flatnonzero(~finite_rows)],
            "no NaN or infinite values",
        ),
        outcome(
            "embeddings_unit_norm",
            [f"{label(row)} (norm {norms[row]:.4f})" for row in np.flatnonzero(off_norm)],
            f"every vector has L2 norm 1 (within {UNIT_NORM_TOLERANCE})",
        ),
        outcome(
            "embeddings_cover_inputs",
            _coverage_failures(ids, len(values), expected_ids),
            "one row per expected id, no extra or duplicate ids",
        ),
    ]


def _coverage_failures(ids: list[str], vector_rows: int, expected_ids: Sequence[str]) -> list[str]:
    failures: list[str] = []
    if vector_rows != len(ids):
        failures.append(f"{len(ids)} ids but {vector_rows} vectors")
    counts = Counter(ids)
    expected = set(expected_ids)
    failures += [f"duplicate {image_id} (x{n})" for image_id, n in counts.items() if n > 1]
    failures += [
        f"missing {image_id}" for image_id in dict.fromkeys(expected_ids) if image_id not in counts
    ]
    failures += [f"unexpected {image_id}" for image_id in counts if image_id not in expected]
    return failures


# --- table on disk ------------------------------------------------------------------------

EMBEDDING_COLUMN_DESCRIPTIONS: dict[str, str] = {
    "image_id": "the corpus image (image_corpus.image_id), one row per embedded image",
    "embedding": "its L2-normalised vector, float16 (the encoder's dimension); the footer names "
    "the model and the reuse key",
    INPUT_DIGEST_COLUMN: "digest of the input the vector was computed from (the image's sha256, "
    "or the caption), so a later run keeps the vector while that input is unchanged; null when "
    "the table was written without reuse keys",
}


def write_embedding_table(
    path: DataPath,
    ids: Sequence[str],
    vectors: np.ndarray,
    model_id: str,
    metadata: Mapping[str, str] | None = None,
    input_digests: Sequence[str] | None = None,
) -> None:
    """Write `image_id` + `embedding` (fixed_size_list<halffloat>[dim]) + `input_digest` to
    Parquet, atomically.

    The schema metadata records `model_id`, `dim` and any extra `metadata` (the shard's reuse
    keys, see `embeddings.reuse`), in the same file, so they can never disagree with the
    vectors. `input_digests` (one per id) say which input each vector came from, for reuse row
    by row; without them the column is null. The file appears complete or not at all
    (`write_atomic`: a rename on local disk, one upload of the finished object on a store).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float16)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"need one row of vectors per id: {len(ids)} ids, shape {vectors.shape}")
    if input_digests is not None and len(input_digests) != len(ids):
        raise ValueError(f"need one input digest per id: {len(ids)} ids, {len(input_digests)}")
    dim = vectors.shape[1]
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    digests = [None] * len(ids) if input_digests is None else list(input_digests)
    table = pa.table(
        {
            "image_id": pa.array(list(ids), type=pa.string()),
            "embedding": embedding,
            INPUT_DIGEST_COLUMN: pa.array(digests, type=pa.string()),
        }
    )
    table = table.replace_schema_metadata(
        {**(metadata or {}), "model_id": model_id, "dim": str(dim)}
    )
    # No dictionary encoding: ids are unique and float16 values nearly so, and with the
    # dictionaries a 20k x 768 table took about 1.8 x as long to write and 5 x to read, for a
    # file only 6 % smaller (benchmarks/README.md, "embedding table write").
    # Snappy, as before: zstd made these tables' reads 39 % slower (bench_table_checksums).
    write_arrow_atomic(table, path, use_dictionary=False, compression="snappy")


def read_embedding_table(path: DataPath) -> tuple[np.ndarray, np.ndarray]:
    """Read a table written by `write_embedding_table`.

    Returns (ids as a numpy object array of str, float16 vectors of shape (N, dim)).
    """
    return embedding_arrays(read_arrow_table(path, ["image_id", "embedding"]))


def embedding_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float16 vectors of shape (N, dim)) of an embedding table read into memory."""
    ids = table.column("image_id").to_numpy()
    embedding = table.column("embedding").combine_chunks()
    dim = embedding.type.list_size
    values = embedding.flatten().to_numpy(zero_copy_only=False)
    return ids, values.astype(np.float16, copy=False).reshape(-1, dim)

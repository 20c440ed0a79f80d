"""Training examples from the triplets Parquet: checked rows, step-addressed batches, a DataModule.

Input rows follow the MegaPairs release schema (method.md §6): `q_img` (image path or corpus
`source_uri`), `q_text` (instructions; one is sampled per step), `t_img` (the target image) and
`hns` (hard-negative images, `hns[0]` the query image), plus whatever id columns the triplets
asset writes. `prepare_triplets` keeps the rows a model can learn from and quarantines the rest
with a reason; it also keeps the evaluation's held-out query images out of training altogether:
their rows, the rows whose target is one of them (mined pairs are symmetric: the reverse of a
held-out pair) and their slots among other rows' hard negatives. Relative image paths (the
release layout) are resolved against an image root.

Batches are a pure function of (seed, step): the permutation of an epoch comes from the seed
and the epoch number, and the instruction and mined hard negatives of a row from (seed, step,
row). A run killed at step k and resumed from its checkpoint therefore sees exactly the batches
an uninterrupted run sees, and several devices each take their slice of the same global batch.

Hard negatives: the paper trains with 1 positive + 4 hard negatives per query (method.md §7)
and does not say which of a pair's mined negatives (the release lists five, the query image
first) are used at a step. Here the query image is always one (`hns[0]`: without it a retriever
learns to return the query) and the other `hard_negatives - 1` are drawn afresh at every step
from all of the row's mined ones, as BGE-style trainers sample a query's negatives: every mined
negative is used over an epoch, not always the same first few.
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl_lightning
import numpy as np
import polars as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from megapairs_assets.corpus.images import ImageLimits, ImageRejected, open_image_for_model
from megapairs_assets.lib.storage import DataPath, read_parquet
from megapairs_assets.training.config import DEFAULT_MAX_UNREADABLE_IMAGE_FRACTION

_ON_LINUX = sys.platform.startswith("linux")
TRIPLET_COLUMNS = ("q_img", "q_text", "t_img", "hns")
# The project's ids beside the release fields: the held-out split keys on query_id, and the
# image ids let the training step find the corpus's original files.
ID_COLUMNS = ("triplet_id", "pair_id", "query_id", "target_id", "hard_negative_ids")
PREFLIGHT_IMAGES = 16
QUARANTINE_SCHEMA = pl.Schema({"row": pl.Int64, "q_img": pl.String, "reason": pl.String})
QUARANTINE_REASONS = {
    "missing_query_image": "q_img is null or empty",
    "missing_target_image": "t_img is null or empty",
    "no_instruction": "q_text holds no non-empty instruction",
    "negatives_not_starting_with_query": "hns is empty or hns[0] is not q_img",
    "target_is_query": "t_img equals q_img",
    "target_in_negatives": "t_img is also one of the row's hard negatives",
}


class TripletDataError(ValueError):
    """Triplet input that cannot be trained on at all (wrong schema, too few usable rows)."""


@dataclass(frozen=True)
class PreparedTriplets:
    """Rows to train on (q_img, instructions, t_img, hns), the quarantined rows and counts."""

    rows: pl.DataFrame
    quarantine: pl.DataFrame
    input_rows: int
    heldout_rows: int
    # Rows whose target is a held-out query image, and hard negatives that were one (removed).
    heldout_target_rows: int = 0
    heldout_negatives: int = 0


def read_triplets(paths: Sequence[DataPath]) -> pl.DataFrame:
    """All triplet tables, concatenated in the given order; raises on a wrong schema."""
    if not paths:
        raise TripletDataError("no triplet tables given; materialize the triplets asset first")
    frames = []
    for path in paths:
        frame = read_parquet(path)
        missing = [c for c in TRIPLET_COLUMNS if c not in frame.columns]
        if missing:
            raise TripletDataError(
                f"{path} lacks triplet column(s) {', '.join(missing)}; expected the MegaPairs "
                f"release schema ({', '.join(TRIPLET_COLUMNS)})"
            )
        keep = [*TRIPLET_COLUMNS, *(c for c in ID_COLUMNS if c in frame.columns)]
        frames.append(frame.select(keep))
    return pl.concat(frames, how="diagonal_relaxed")


def resolve_image_paths(frame: pl.DataFrame, image_root: Path | None) -> pl.DataFrame:
    """Relative image paths (the release layout, `images/<shard>/<key>.jpg`) under `image_root`.

    Absolute paths and corpus URIs (`<tar>#<member>`, `file://...`) are left as they are.
    """
    if image_root is None:
        return frame
    root = str(image_root.resolve()).rstrip("/") + "/"

    def resolved(column: pl.Expr) -> pl.Expr:
        relative = ~(column.str.starts_with("/") | column.str.contains(r"^[A-Za-z][\w+.-]*://"))
        return pl.when(relative).then(pl.lit(root) + column).otherwise(column)

    return frame.with_columns(
        resolved(pl.col("q_img")).alias("q_img"),
        resolved(pl.col("t_img")).alias("t_img"),
        pl.col("hns").list.eval(resolved(pl.element())).alias("hns"),
    )


def prepare_triplets(
    frame: pl.DataFrame, heldout_fraction: float = 0.0, heldout_max_queries: int | None = None
) -> PreparedTriplets:
    """Keep trainable rows, quarantine the rest with a reason, keep held-out query images out.

    The held-out query images are evaluation's (`evaluation.heldout.held_out_query_keys` over
    all of `frame`, keyed by `query_id`, else `q_img`, capped at `heldout_max_queries` as the
    benchmark is), so an image the held-out benchmark queries with is never trained on: not as
    a query, not as a target (which drops the reverse of every held-out pair) and not as a hard
    negative (its slot is removed; the row keeps its others). Those beyond the cap are trained
    on like any other.
    """
    from megapairs_assets.evaluation.heldout import held_out_query_keys, query_key_column

    numbered = frame.with_row_index("row").with_columns(
        pl.col("row").cast(pl.Int64),
        pl.col("q_text")
        .list.eval(pl.element().str.strip_chars())
        .list.eval(pl.element().filter(pl.element().str.len_chars() > 0))
        .alias("instructions"),
    )
    reason = (
        pl.when(_blank("q_img"))
        .then(pl.lit("missing_query_image"))
        .when(_blank("t_img"))
        .then(pl.lit("missing_target_image"))
        .when(pl.col("instructions").is_null() | (pl.col("instructions").list.len() == 0))
        .then(pl.lit("no_instruction"))
        .when(
            pl.col("hns").is_null()
            | (pl.col("hns").list.len() == 0)
            | (pl.col("hns").list.first() != pl.col("q_img"))
        )
        .then(pl.lit("negatives_not_starting_with_query"))
        .when(pl.col("t_img") == pl.col("q_img"))
        .then(pl.lit("target_is_query"))
        .when(pl.col("hns").list.contains(pl.col("t_img")))
        .then(pl.lit("target_in_negatives"))
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias("reason")
    )
    checked = numbered.with_columns(reason)
    quarantine = checked.filter(pl.col("reason").is_not_null()).select("row", "q_img", "reason")
    good = checked.filter(pl.col("reason").is_null())
    heldout_rows = heldout_target_rows = heldout_negatives = 0
    if heldout_fraction > 0 and frame.height:
        # Over every row read, quarantined ones too: the benchmark's cap counts them as well.
        keys = numbered[query_key_column(numbered)].cast(pl.String)
        held = sorted(held_out_query_keys(keys.to_list(), heldout_fraction, heldout_max_queries))
        held_rows = keys.is_in(held).fill_null(False)
        # The images as this frame names them (paths or corpus URIs), for targets and negatives.
        held_images = numbered.filter(held_rows)["q_img"].drop_nulls().unique().sort().to_list()
        is_held_query = pl.col(query_key_column(numbered)).cast(pl.String).is_in(held)
        heldout_rows = good.filter(is_held_query.fill_null(False)).height
        good = good.filter(~is_held_query.fill_null(False))
        targets_held = pl.col("t_img").is_in(held_images)
        heldout_target_rows = good.filter(targets_held).height
        good = good.filter(~targets_held)
        # hns[0] is the row's own query image, not held out (its row would be gone).
        kept_negatives = pl.concat_list(
            pl.col("hns").list.first(),
            pl.col("hns")
            .list.slice(1)
            .list.eval(pl.element().filter(~pl.element().is_in(held_images))),
        )
        before = int(good["hns"].list.len().sum() or 0)
        good = good.with_columns(kept_negatives.alias("hns"))
        heldout_negatives = before - int(good["hns"].list.len().sum() or 0)
    rows = good.select("row", "q_img", "instructions", "t_img", "hns")
    return PreparedTriplets(
        rows=rows,
        quarantine=quarantine.cast(dict(QUARANTINE_SCHEMA)),
        input_rows=frame.height,
        heldout_rows=heldout_rows,
        heldout_target_rows=heldout_target_rows,
        heldout_negatives=heldout_negatives,
    )


def check_images_readable(
    rows: pl.DataFrame,
    max_unreadable_fraction: float = DEFAULT_MAX_UNREADABLE_IMAGE_FRACTION,
    sample: int = PREFLIGHT_IMAGES,
) -> None:
    """Open a sample of the rows' query and target images spread over all rows; raise when more
    than `max_unreadable_fraction` of them cannot be read.

    A few unreadable images cost their queries (the loss leaves them out); most of them
    unreadable is a wrong image root, an unmapped relative path or a corpus that moved, and
    hours of training on nothing. The training steps apply the same rule to every read
    (`callbacks.ImageReadGuard`); this sample catches it before the model is even loaded.
    """
    uris = pl.concat([rows["q_img"], rows["t_img"]]).unique(maintain_order=True)
    if uris.len() > sample:  # evenly spaced: the first shard's images alone could mislead
        uris = uris.gather(np.linspace(0, uris.len() - 1, sample).round().astype(np.int64))
    errors = []
    for uri in uris.to_list():
        try:
            open_image_for_model(uri, ImageLimits(), None)
        except (ImageRejected, OSError, ValueError) as exc:
            errors.append(f"{uri}: {exc}")
    if errors and len(errors) > max_unreadable_fraction * uris.len():
        raise TripletDataError(
            f"{len(errors)} of {uris.len()} sampled query and target images cannot be read "
            f"(max_unreadable_image_fraction allows {max_unreadable_fraction:.0%}); first: "
            f"{'; '.join(errors[:3])}. Relative paths need an image root, image ids the "
            "catalog knows, and the corpus files must still be where the corpus step read them"
        )


def _blank(column: str) -> pl.Expr:
    return pl.col(column).is_null() | (pl.col(column).str.len_chars() == 0)


def image_key(uri: str) -> int:
    """A stable int64 identity of an image path (equal paths, equal keys), for the loss masks."""
    digest = hashlib.blake2b(uri.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def instruction_index(seed: int, step: int, row: int, count: int) -> int:
    """Which of a row's `count` instructions step `step` uses (seeded, order independent).

    A keyed hash, not a generator per item: 2 us instead of 50 us, for every row of every step.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def mined_negative_indices(seed: int, step: int, row: int, count: int, wanted: int) -> list[int]:
    """Which of a row's `count` mined hard negatives (hns[1:]) step `step` uses: `wanted` of
    them (all when there are no more), drawn without replacement, seeded by (seed, step, row)
    like `instruction_index`, returned in list order."""
    if count <= wanted:
        return list(range(count))
    keys = [
        hashlib.blake2b(f"{seed}:{step}:{row}:hns{i}".encode(), digest_size=8).digest()
        for i in range(count)
    ]
    return sorted(sorted(range(count), key=keys.__getitem__)[:wanted])


class TripletImages(Dataset):
    """One query row as model inputs, addressed by (row, step).

    Returns `images` uint8 (K, 3, S, S) with slot 0 the target, slot 1 the query image and
    slots 2.. the other hard negatives (`hard_negatives - 1` of the row's mined ones, drawn for
    this step: `mined_negative_indices`); `valid` (K,) False for padding or an image that failed
    to load; `keys` (K,) image identities; `tokens` the sampled instruction, tokenized;
    `reads` how many images the row has (padding excluded), `failed` how many of them could not
    be loaded and `failed_uris` which (newline-separated, so batches collate them as strings).
    A bad image never raises: it comes back zeroed and invalid, and the loss leaves it out (or
    drops the whole query when it was the target or the query image).
    """

    def __init__(
        self,
        rows: pl.DataFrame,
        hard_negatives: int,
        pixels: Callable[[Image.Image], torch.Tensor],
        image_size_px: int,
        tokenizer: Callable[[list[str]], torch.Tensor],
        seed: int,
        cache_items: int = 0,
        limits: ImageLimits | None = None,
    ) -> None:
        self.targets: list[str] = rows["t_img"].to_list()
        self.instructions: list[list[str]] = rows["instructions"].to_list()
        # Every mined negative is kept (hns[0], the query image, is always used).
        self.negatives: list[list[str]] = [list(hns) for hns in rows["hns"].to_list()]
        self.hard_negatives = hard_negatives
        self.pixels = pixels
        self.image_size_px = image_size_px
        self.tokenizer = tokenizer
        self.seed = seed
        self.limits = limits or ImageLimits()
        self.cache_items = cache_items
        self._cache: OrderedDict[str, torch.Tensor | None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def images_per_query(self) -> int:
        return 1 + self.hard_negatives

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        row, step = item
        query_image, *mined = self.negatives[row]
        chosen = mined_negative_indices(self.seed, step, row, len(mined), self.hard_negatives - 1)
        uris = [self.targets[row], query_image, *(mined[i] for i in chosen)]
        shape = (3, self.image_size_px, self.image_size_px)
        images = torch.zeros((self.images_per_query, *shape), dtype=torch.uint8)
        valid = torch.zeros(self.images_per_query, dtype=torch.bool)
        keys = torch.zeros(self.images_per_query, dtype=torch.int64)
        failed: list[str] = []
        for slot, uri in enumerate(uris):
            pixels = self._load(uri)
            keys[slot] = image_key(uri)
            if pixels is None:
                failed.append(uri)
            else:
                images[slot] = pixels
                valid[slot] = True
        instructions = self.instructions[row]
        text = instructions[instruction_index(self.seed, step, row, len(instructions))]
        return {
            "images": images,
            "valid": valid,
            "keys": keys,
            "tokens": self.tokenizer([text])[0],
            "reads": len(uris),
            "failed": len(failed),
            "failed_uris": "\n".join(failed),
            "row": row,
            "step": step,
        }

    def _load(self, uri: str) -> torch.Tensor | None:
        if uri in self._cache:
            self._cache.move_to_end(uri)
            return self._cache[uri]
        try:
            image = open_image_for_model(uri, self.limits, self.image_size_px)
            pixels: torch.Tensor | None = self.pixels(image)
        except (ImageRejected, OSError, ValueError):
            pixels = None
        if self.cache_items:
            self._cache[uri] = pixels
            while len(self._cache) > self.cache_items:
                self._cache.popitem(last=False)
        return pixels


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this device's slice of the global batch of every step from the current step on.

    Step s uses rows `perm_e[j*G:(j+1)*G]` with e = s // steps_per_epoch, j = s % steps_per_epoch,
    G the global batch and perm_e a permutation seeded by (seed, e); the tail of an epoch that
    does not fill a batch is left out. The first step is read from `current_step()` when
    iteration starts (the Trainer's restored global step after a resume), so a resumed run
    continues with the batch the killed one was about to take.
    """

    def __init__(
        self,
        num_rows: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        max_steps: int,
        current_step: Callable[[], int],
    ) -> None:
        if num_rows < global_batch_size:
            raise TripletDataError(
                f"{num_rows} usable triplet rows are fewer than one batch of {global_batch_size}; "
                "lower batch_size or train on more triplets"
            )
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.max_steps = max_steps
        self.current_step = current_step
        self.steps_per_epoch = num_rows // global_batch_size
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return max(self.max_steps - self.current_step(), 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.current_step(), self.max_steps):
            yield [(int(row), step) for row in self.rows_of_step(step)]

    def rows_of_step(self, step: int) -> np.ndarray:
        """The rows this device trains on at `step`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._epoch_order = (epoch, order)
        start = index * self.global_batch_size + self.rank * self.local_batch_size
        return self._epoch_order[1][start : start + self.local_batch_size]


class TripletDataModule(pl_lightning.LightningDataModule):
    """The DataModule the Trainer draws batches from; see `StepBatchSampler` for the order."""

    def __init__(
        self,
        dataset: TripletImages,
        global_batch_size: int,
        max_steps: int,
        seed: int,
        num_workers: int,
        pin_memory: bool,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.max_steps = max_steps
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = StepBatchSampler(
            num_rows=len(self.dataset),
            global_batch_size=self.global_batch_size,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
            seed=self.seed,
            max_steps=self.max_steps,
            current_step=(lambda: trainer.global_step) if trainer else (lambda: 0),
        )
        workers = self.num_workers
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
            # Forked workers start in milliseconds even inside a spawned Dagster step (see
            # embeddings.compute); they only decode images and never touch CUDA.
            multiprocessing_context="fork" if workers > 0 and _ON_LINUX else None,
        )

"""Our own benchmark: triplets whose query images training never sees.

The split. A pair is held out when its query image is: `held_out_mask` hashes the query image
id (SHA-256 of a salted id, read as a number in [0, 1)) and holds it out when that number is
below `fraction`. The decision depends only on the id, never on the order, the shard or the
run, so the held-out set is the same everywhere; and every triplet of a held-out query image is
held out together, so training never sees that image as a query. With a cap on the number of
held-out query images (`max_queries`, the paper profile's 10,000) only the capped ones are held
out: `held_out_query_keys` is the one rule, and training and the benchmark both apply it to the
same triplet tables (`split_triplets`), so every query image training leaves out is scored and
none that is scored was trained on. `HELDOUT_SPLIT_VERSION` names the rule so both sides can
record it. Training also keeps the held-out query images out of its targets and hard negatives
(`training.data.prepare_triplets`): mined pairs are symmetric, so the reverse of a held-out
pair would otherwise be a training pair.

The benchmark. Each held-out triplet gives one query per instruction in `q_text`: the query
image plus that instruction, with the triplet's target image as the one correct answer. The
gallery is every distinct image of the held-out triplets (queries, targets and hard
negatives). Query images stay in the gallery: `hns[0]` is the query image, the hardest negative
MMRet trains against, so ranking it first is exactly the mistake the score should show. Scores:
Recall@1/5/10 and mAP@5 (CIRCO's definition with one ground truth).
Images are decoded as training decodes them (EXIF orientation applied: `CORPUS_DECODING`),
not as the public benchmarks' official loaders open theirs.

Columns read: the MegaPairs release schema, `q_img`, `q_text` (list of instructions or one
string), `t_img`, `hns` (list). The project's triplets also carry image ids (`query_id`,
`target_id`, `hard_negative_ids`): then images are keyed by id and located through the corpus
(the release paths are relative to an export folder that may not exist). The split hashes
`query_id` when present, else `q_img`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import polars as pl

from megapairs_assets.evaluation.benchmark import (
    CORPUS_DECODING,
    BenchmarkSplit,
    CirQuery,
    ImageRef,
)

HELDOUT_SPLIT_VERSION = "query-image-sha256-v1"
HELDOUT_SALT = "megapairs-heldout-v1"
TRIPLET_COLUMNS = ("q_img", "q_text", "t_img", "hns")


class HeldOutError(ValueError):
    """Triplets that cannot form the held-out benchmark (missing columns, nothing held out)."""


def held_out_score(query_image_ids: Iterable[str], salt: str = HELDOUT_SALT) -> np.ndarray:
    """Each id's position in [0, 1): the first 8 bytes of sha256(salt:id) over 2**64."""
    return np.array(
        [
            int.from_bytes(hashlib.sha256(f"{salt}:{image_id}".encode()).digest()[:8], "big")
            / 2.0**64
            for image_id in query_image_ids
        ],
        dtype=np.float64,
    )


def held_out_mask(query_image_ids: Sequence[str], fraction: float) -> np.ndarray:
    """True for ids whose pairs are held out (about `fraction` of distinct query images)."""
    _check_fraction(fraction)
    return held_out_score(query_image_ids) < fraction


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")


def is_held_out(query_image_id: str, fraction: float) -> bool:
    """One id's decision (the form a per-row filter takes, e.g. training's data preparation)."""
    return bool(held_out_mask([query_image_id], fraction)[0])


def query_key_column(triplets: pl.DataFrame) -> str:
    """The column the split hashes: `query_id` when present, else `q_img`."""
    if "query_id" in triplets.columns:
        return "query_id"
    if "q_img" in triplets.columns:
        return "q_img"
    raise HeldOutError("triplets have neither `query_id` nor `q_img`; cannot split them")


def held_out_query_keys(
    query_keys: Iterable[str | None], fraction: float, max_queries: int | None = None
) -> set[str]:
    """The held-out query image keys among `query_keys`: those whose hash is below `fraction`
    (`held_out_mask`), and with `max_queries` only that many of them, the lowest hashes first
    (so a smaller cap keeps a subset of a larger one). Nulls are never held out.

    The one rule training and the benchmark share: with a cap the result depends on which keys
    there are, so both apply it to all of the triplets (`split_triplets`).
    """
    _check_fraction(fraction)
    keys = sorted({key for key in query_keys if key is not None})
    scores = held_out_score(keys)
    order = [i for i in np.argsort(scores, kind="stable") if scores[i] < fraction]
    return {keys[i] for i in order[:max_queries]}


def split_triplets(
    triplets: pl.DataFrame, fraction: float, max_queries: int | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(training rows, held-out rows): the one split training and evaluation share; every
    triplet of a held-out query image (`held_out_query_keys`) is held out."""
    keys = triplets[query_key_column(triplets)].cast(pl.String)
    held = held_out_query_keys(keys.to_list(), fraction, max_queries)
    mask = keys.is_in(sorted(held)).fill_null(False)
    return triplets.filter(~mask), triplets.filter(mask)


ImageLocator = Callable[[list[str]], Mapping[str, str]]
"""Image keys -> where their pixels are (a corpus `source_uri` or a file path)."""

ID_COLUMNS = {"q_img": "query_id", "t_img": "target_id", "hns": "hard_negative_ids"}


def heldout_benchmark(
    triplets: pl.DataFrame,
    fraction: float,
    max_queries: int | None = None,
    locate: ImageLocator | None = None,
) -> BenchmarkSplit:
    """The held-out benchmark built from all triplets (see the module docstring).

    Images are keyed by the project's image ids when the frame has all of `query_id`,
    `target_id` and `hard_negative_ids`, else by the release paths (`q_img`, `t_img`, `hns`).
    `locate` maps keys to where the pixels are (default: the keys are paths already); a
    triplet with an image it cannot locate is left out and counted in `discarded`.
    `max_queries` caps the number of held-out query *images* kept (those with the lowest hash,
    so a smaller cap keeps a subset of a larger one); all their triplets stay.
    """
    missing = [column for column in TRIPLET_COLUMNS if column not in triplets.columns]
    if missing:
        raise HeldOutError(f"triplets lack the column(s) {missing}; expected {TRIPLET_COLUMNS}")
    key_column = query_key_column(triplets)
    _, held = split_triplets(triplets, fraction, max_queries)
    if held.height == 0:
        raise HeldOutError(
            f"no triplet is held out at fraction {fraction} ({triplets.height} triplets); raise "
            "the held-out fraction or generate more triplets"
        )
    by_id = all(column in held.columns for column in ID_COLUMNS.values())
    query_col, target_col, negatives_col = ID_COLUMNS.values() if by_id else ID_COLUMNS.keys()
    held = held.sort(key_column, target_col)
    all_keys = sorted(
        {*held[query_col], *held[target_col], *held[negatives_col].explode().drop_nulls()}
    )
    where = dict(locate(all_keys)) if locate is not None else {k: k for k in all_keys}
    image_ids: list[str] = []
    seen: set[str] = set()
    queries: list[CirQuery] = []
    unlocated = 0
    for row_number, row in enumerate(held.iter_rows(named=True)):
        keys = [row[query_col], row[target_col], *(row[negatives_col] or [])]
        if not all(key in where for key in keys):
            unlocated += 1
            continue
        for key in keys:
            if key not in seen:
                seen.add(key)
                image_ids.append(key)
        pair = row.get("pair_id") or f"{row[key_column]}->{row[target_col]}#{row_number}"
        for number, instruction in enumerate(_instructions(row["q_text"])):
            queries.append(
                CirQuery(
                    query_id=f"{pair}:{number}",
                    reference_id=row[query_col],
                    text=instruction,
                    targets=(row[target_col],),
                )
            )
    if not queries:
        raise HeldOutError(
            f"none of the {held.height} held-out triplets has instructions and locatable images "
            f"({unlocated} had an image that could not be located)"
        )
    return BenchmarkSplit(
        benchmark="heldout",
        split="heldout",
        metric_kind="heldout",
        image_ids=image_ids,
        image_refs=[ImageRef(where[key]) for key in image_ids],
        gallery_size=len(image_ids),
        queries=queries,
        has_ground_truth=True,
        discarded={"image_not_located": unlocated} if unlocated else {},
        image_decoding=CORPUS_DECODING,
    )


def _instructions(q_text: object) -> list[str]:
    if q_text is None:
        return []
    if isinstance(q_text, str):
        return [q_text] if q_text.strip() else []
    return [text for text in q_text if isinstance(text, str) and text.strip()]

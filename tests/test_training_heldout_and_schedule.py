"""What training is given and when: held-out images kept out of every role, the benchmark's
cap applied on both sides, mined hard negatives drawn per step, the learning rate each step
used."""

from __future__ import annotations

import collections
import copy
import os
import signal
from pathlib import Path

import polars as pl
import pytest
import torch
from test_training_support import OneThread, tiny_config, triplet_rows, write_images, write_triplets

from megapairs_assets.evaluation.heldout import held_out_query_keys, heldout_benchmark
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.callbacks import (
    StopCheckpoint,
    TrainingInterrupted,
    read_loss_curve,
)
from megapairs_assets.training.data import TripletImages, image_key, prepare_triplets
from megapairs_assets.training.module import linear_warmup_decay
from megapairs_assets.training.train import TRAINING_RECIPE, _what_changed, train_checkpoint


def symmetric_pairs(images: int = 40, negatives: int = 4) -> pl.DataFrame:
    """Mined pairs as the miner makes them: every pair in both directions (i -> i+1 and
    i+1 -> i), hard negatives the query image then the next images."""
    ids = [f"img{i:03d}" for i in range(images)]
    rows = []
    for i in range(images):
        for step in (1, -1):
            query, target = ids[i], ids[(i + step) % images]
            mined = [ids[(i + step * (2 + k)) % images] for k in range(negatives)]
            rows.append(
                {
                    "query_id": query,
                    "q_img": f"/c/{query}.jpg",
                    "q_text": ["make it so"],
                    "t_img": f"/c/{target}.jpg",
                    "hns": [f"/c/{query}.jpg", *(f"/c/{m}.jpg" for m in mined)],
                }
            )
    return pl.DataFrame(rows)


def test_heldout_query_images_are_no_training_target_nor_negative() -> None:
    """Mined pairs are symmetric: before, the reverse (t -> q) of many held-out pairs (q -> t)
    was a training pair, and held-out query images were training targets and negatives."""
    frame = symmetric_pairs()
    prepared = prepare_triplets(frame, heldout_fraction=0.3)
    held = held_out_query_keys(frame["query_id"].to_list(), 0.3)
    held_images = {f"/c/{key}.jpg" for key in held}
    assert 3 <= len(held) <= 25
    rows = prepared.rows
    assert prepared.quarantine.is_empty()
    assert held_images.isdisjoint(rows["q_img"]) and held_images.isdisjoint(rows["t_img"])
    assert held_images.isdisjoint(rows["hns"].explode())
    trained_pairs = set(zip(rows["q_img"], rows["t_img"], strict=True))
    heldout_pairs = frame.filter(pl.col("query_id").is_in(sorted(held)))
    for query, target in zip(heldout_pairs["q_img"], heldout_pairs["t_img"], strict=True):
        assert (target, query) not in trained_pairs
    # Every row is accounted for, and a row keeps its query image first and its other negatives.
    assert prepared.heldout_rows == heldout_pairs.height
    assert rows.height + prepared.heldout_rows + prepared.heldout_target_rows == frame.height
    assert prepared.heldout_negatives > 0
    assert all(hns[0] == q for q, hns in zip(rows["q_img"], rows["hns"], strict=True))
    assert rows["hns"].list.len().min() >= 1


def test_training_leaves_out_exactly_the_capped_heldout_queries_the_benchmark_scores() -> None:
    """The paper profile scores at most 10,000 held-out query images: before, training also
    dropped every one beyond the cap, so they were neither trained on nor scored."""
    frame = symmetric_pairs(images=60)
    # Without all the id columns the benchmark keys images by path: back to the query ids.
    scored_images = {q.reference_id for q in heldout_benchmark(frame, 0.5, max_queries=4).queries}
    scored = set(frame.filter(pl.col("q_img").is_in(sorted(scored_images)))["query_id"])
    prepared = prepare_triplets(frame, heldout_fraction=0.5, heldout_max_queries=4)
    trained_queries = set(frame["query_id"].gather(prepared.rows["row"]))
    assert len(scored) == 4 and scored.isdisjoint(trained_queries)
    beyond_cap = held_out_query_keys(frame["query_id"].to_list(), 0.5) - scored
    assert beyond_cap and beyond_cap <= trained_queries
    assert prepared.heldout_rows == frame.filter(pl.col("query_id").is_in(sorted(scored))).height


def test_each_step_draws_the_mined_negatives_with_the_query_image_always_first(
    tmp_path: Path,
) -> None:
    """The release lists five negatives (query image + 4 mined); with 4 slots (query image + 3)
    the first 3 mined ones used to be the only ones ever used."""
    images = write_images(tmp_path, 12)
    rows = prepare_triplets(triplet_rows(images, 2, negatives=5)).rows
    size = 16

    def pixels(image: object) -> torch.Tensor:
        return torch.zeros((3, size, size), dtype=torch.uint8)

    def dataset() -> TripletImages:
        return TripletImages(rows, 4, pixels, size, lambda texts: torch.zeros(1, 4), seed=7)

    first, again = dataset(), dataset()
    by_key = {image_key(uri): uri for uri in images}
    mined = rows["hns"][0].to_list()[1:]
    used = collections.Counter()
    for step in range(40):
        item = first[(0, step)]
        slots = [by_key[int(key)] for key in item["keys"]]
        assert slots[0] == rows["t_img"][0] and slots[1] == rows["q_img"][0]
        assert len(set(slots[2:])) == 3 and set(slots[2:]) <= set(mined)
        assert torch.equal(item["keys"], again[(0, step)]["keys"])  # a pure function of the step
        used.update(slots[2:])
    assert set(used) == set(mined)  # every mined negative is used, not always the same three
    assert min(used.values()) >= 15  # about 30 each out of 120 draws
    short = TripletImages(
        prepare_triplets(triplet_rows(images, 2, negatives=2)).rows,
        4, pixels, size, lambda texts: torch.zeros(1, 4), seed=7,
    )  # fmt: skip
    item = short[(0, 3)]
    assert item["valid"].tolist() == [True, True, True, False, False]  # fewer: padded
    assert item["reads"] == 3


def test_loss_curve_records_the_learning_rate_each_step_used(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    """Before, each row held the rate of the next step (Lightning moves the schedule on before
    the step's end) and the last row was always 0."""
    triplets = write_triplets(tmp_path, rows=8, images=10)
    config = tiny_config(demo_models_dir, max_steps=5, warmup_steps=2, learning_rate=1e-3)
    with OneThread():
        result = train_checkpoint("rates", config, [triplets], DataLayout(tmp_path / "home"))
    curve = read_loss_curve(result.outputs["loss_curve"])
    expected = [1e-3 * linear_warmup_decay(step - 1, 2, 5) for step in curve["step"]]
    assert curve["step"].to_list() == [1, 2, 3, 4, 5]
    assert curve["learning_rate"].to_list() == pytest.approx(expected)
    assert curve["learning_rate"][-1] > 0  # the last step still learns
    assert curve["learning_rate"].arg_max() == 2  # the peak, once, at step warmup_steps + 1


def test_a_checkpoint_of_the_earlier_recipe_starts_over_and_says_why() -> None:
    settings = {"learning_rate": 1e-3}
    data = {"rows": "r", "heldout_split": "h"}
    why = _what_changed(
        {"settings": settings, "data": data},
        {"settings": settings, "data": {**data, "recipe": TRAINING_RECIPE}},
    )
    assert f"training recipe mmret-clip-v1 -> {TRAINING_RECIPE}" in why


# --- several devices: the stop the parent passes on to its ranks, without processes ----------


class _Launcher:
    """Stands in for `ddp_spawn`'s launcher: records what it would do to the rank processes."""

    def __init__(self) -> None:
        self.killed: list[int] = []

    def kill(self, signum: int) -> None:
        self.killed.append(signum)


class _Strategy:
    def __init__(self, other_ranks_asked: bool = False) -> None:
        self.other_ranks_asked = other_ranks_asked

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        assert not all  # any rank asking stops them all
        return decision or self.other_ranks_asked


class _Rank:
    """The parts of a rank's Trainer that `StopCheckpoint` reads after a step."""

    world_size = 2

    def __init__(self, other_ranks_asked: bool = False) -> None:
        self.strategy = _Strategy(other_ranks_asked)
        self.should_stop = False


def _rank_copy(parent: StopCheckpoint) -> StopCheckpoint:
    """The callback as a spawned rank holds it: pickled state, the same shared memory, the
    parent being its parent process."""
    rank = copy.copy(parent)  # through __getstate__, as pickling into the rank goes
    rank._parent_pid = os.getppid()
    return rank


def test_several_devices_the_parents_signal_reaches_the_ranks_which_all_stop_after_a_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The logic the opt-in `test_training_ddp` runs with real rank processes: before, the
    parent of `ddp_spawn`'s ranks kept no handler, so the ranks never learnt of a Ctrl-C."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    launcher = _Launcher()
    try:
        # What a plain Python process has (a test worker may hold others).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        parent = StopCheckpoint(tmp_path / "last.ckpt")
        parent.forward_to_ranks(launcher)
        rank, trainer = _rank_copy(parent), _Rank()
        rank._agree_on_stop(trainer)  # no request yet: train on
        assert not trainer.should_stop
        os.kill(os.getpid(), signal.SIGTERM)  # `kill` of the parent
        assert parent.stop_requested and not launcher.killed
        rank._agree_on_stop(trainer)  # every rank, after its step
        assert trainer.should_stop  # Lightning ends training there, and the step is saved
        os.kill(os.getpid(), signal.SIGINT)  # a repeat while the ranks save: counted only
        monkeypatch.setattr(StopCheckpoint, "REPEAT_GRACE_S", 0.0)
        os.kill(os.getpid(), signal.SIGINT)
        assert parent.deferred_signals == 2 and not launcher.killed
        with pytest.raises(TrainingInterrupted, match="stopped at step 5"):
            parent.raise_interrupt("run: stopped at step 5 of 9")  # what the caller raises
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are back

        # A second Ctrl-C past the grace while the ranks still compute: they are killed, and
        # the run stops at once with the host's interruption.
        parent = StopCheckpoint(tmp_path / "last.ckpt")
        parent.forward_to_ranks(launcher)
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert launcher.killed == [signal.SIGKILL] and parent.stopped_at_once
        parent.restore_handler()

        # Another rank was signalled itself (a terminal's Ctrl-C reaches every process of its
        # group): this one stops after the same step, and the parent learns it after the fit.
        parent = StopCheckpoint(tmp_path / "last.ckpt")
        parent.forward_to_ranks(launcher)
        rank, trainer = _rank_copy(parent), _Rank(other_ranks_asked=True)
        rank._agree_on_stop(trainer)
        assert trainer.should_stop and not parent.stop_requested
        parent.collect_rank_stop()
        assert parent.stop_requested
        with pytest.raises(KeyboardInterrupt, match="stopped"):
            parent.raise_interrupt("run: stopped at step 2 of 9")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

"""Training logic without a Trainer: config checks, triplet rows, batch order, fusion, loss."""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from test_training_support import OneThread, tiny_config, triplet_rows, write_images

from megapairs_assets.evaluation.heldout import is_held_out, split_triplets
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.config import TrainingConfigError, resolve_config
from megapairs_assets.training.data import (
    StepBatchSampler,
    TripletDataError,
    TripletImages,
    image_key,
    prepare_triplets,
    resolve_image_paths,
)
from megapairs_assets.training.loss import (
    QUERY_IMAGE_SLOT,
    allowed_candidates,
    fused_infonce,
    positive_indices,
)
from megapairs_assets.training.module import MMRetCLIP, linear_warmup_decay
from megapairs_assets.training.train import train_checkpoint

# --- config errors fail before any work -------------------------------------------------------


def test_batch_not_divisible_by_devices_fails_with_the_fix(demo_models_dir: Path) -> None:
    config = tiny_config(demo_models_dir, batch_size=10, devices=4, accelerator="cpu")
    with pytest.raises(TrainingConfigError, match=r"batch_size=10 .* 4 devices .* e\.g\. 8"):
        resolve_config(config)


@pytest.mark.parametrize(
    ("model", "pretrained", "message"),
    [
        ("megapairs-tiny-clip", None, "no backbone weights"),
        ("megapairs-tiny-clip", "/nowhere/weights.pt", "backbone weights missing"),
        ("ViT-B-16-quickgelu", "openai", "not in the local cache.*hf download timm/"),
        ("ViT-B-16", "openai", "use 'ViT-B-16-quickgelu'"),
        ("ViT-B-61", "openai", "no model named 'ViT-B-61'.*ViT-B-16"),
    ],
)
def test_backbone_errors_name_the_fix(
    demo_models_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    pretrained: str | None,
    message: str,
) -> None:
    from huggingface_hub import constants

    # An empty Hugging Face cache, whatever this machine has downloaded before.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    config = tiny_config(demo_models_dir, model=model, pretrained=pretrained)
    with pytest.raises(TrainingConfigError, match=message):
        resolve_config(config, gpu_count=0)


def test_other_config_errors(demo_models_dir: Path) -> None:
    base = tiny_config(demo_models_dir)
    for overrides, message in [
        ({"hard_negatives": 0}, "the query image"),
        ({"warmup_steps": 6}, "warmup_steps=6 must be below max_steps=6"),
        ({"accelerator": "gpu", "devices": 1}, "1 GPUs per node were asked for but 0"),
        ({"strategy": "dpp"}, "Did you mean ddp"),
        ({"precision": "bf16-mixed"}, "on the CPU is slower"),
        ({"max_unreadable_image_fraction": 1.0}, "below 1 .a run with no image"),
    ]:
        with pytest.raises(TrainingConfigError, match=message):
            resolve_config(dataclasses.replace(base, **overrides), gpu_count=0)


def test_train_checkpoint_rejects_config_before_reading_data(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    config = tiny_config(demo_models_dir, batch_size=5, devices=2)
    started = time.perf_counter()
    with pytest.raises(TrainingConfigError, match="does not split evenly"):
        # The triplet file does not exist: reading it first would raise something else.
        train_checkpoint("c1", config, [tmp_path / "absent.parquet"], DataLayout(tmp_path))
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "data").exists()


def test_the_image_guard_is_no_science_setting(demo_models_dir: Path) -> None:
    """Loosening the guard after a failure resumes the same run: it decides whether a run may
    go on, not what it computes."""
    base = tiny_config(demo_models_dir)
    looser = dataclasses.replace(base, max_unreadable_image_fraction=0.9)
    assert looser.fingerprint({"rows": "r"}) == base.fingerprint({"rows": "r"})


def test_multi_device_auto_strategy_is_safe_inside_a_step(demo_models_dir: Path) -> None:
    resolved = resolve_config(tiny_config(demo_models_dir, devices=2), gpu_count=0)
    assert (resolved.strategy, resolved.per_device_batch_size) == ("ddp_spawn", 2)
    assert resolved.precision == "32-true" and not resolved.gradient_checkpointing


# --- triplet rows ---------------------------------------------------------------------------


def test_bad_rows_are_quarantined_with_reasons_and_heldout_queries_dropped() -> None:
    ids = [f"00000/{i:09d}" for i in range(40)]
    held = next(i for i in ids if is_held_out(i, 0.5))
    kept = next(i for i in ids if not is_held_out(i, 0.5))
    good = {"q_img": "a", "q_text": ["x", "y", "z"], "t_img": "b", "hns": ["a", "c"]}
    rows = [
        {**good, "query_id": kept},
        {**good, "query_id": held},
        {**good, "query_id": "r2", "q_text": ["  ", ""]},
        {**good, "query_id": "r3", "hns": ["c", "a"]},
        {**good, "query_id": "r4", "t_img": "a"},
        {**good, "query_id": "r5", "hns": ["a", "b"]},
        {**good, "query_id": "r6", "q_img": None},
    ]
    prepared = prepare_triplets(pl.DataFrame(rows), heldout_fraction=0.5)
    assert prepared.rows["row"].to_list() == [0]
    assert prepared.heldout_rows == 1
    assert dict(zip(*prepared.quarantine.select("row", "reason"), strict=True)) == {
        2: "no_instruction",
        3: "negatives_not_starting_with_query",
        4: "target_is_query",
        5: "target_in_negatives",
        6: "missing_query_image",
    }
    # Evaluation's own split function agrees on every good row.
    train_rows, heldout_rows = split_triplets(pl.DataFrame(rows[:2]), 0.5)
    assert train_rows["query_id"].to_list() == [kept]
    assert heldout_rows["query_id"].to_list() == [held]


def test_relative_image_paths_resolve_under_the_image_root(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "q_img": ["images/00000/a.jpg"],
            "q_text": [["x"]],
            "t_img": ["/abs/b.jpg"],
            "hns": [["images/00000/a.jpg", "/data/shard.tar#c.jpg", "file:///d.jpg"]],
        }
    )
    resolved = resolve_image_paths(frame, tmp_path).row(0, named=True)
    assert resolved["q_img"] == f"{tmp_path.resolve()}/images/00000/a.jpg"
    assert resolved["t_img"] == "/abs/b.jpg"
    assert resolved["hns"] == [resolved["q_img"], "/data/shard.tar#c.jpg", "file:///d.jpg"]


# --- batch order ---------------------------------------------------------------------------


def test_batches_are_a_function_of_the_step_and_ranks_split_them() -> None:
    def sampler(rank: int, world: int, start: int) -> StepBatchSampler:
        return StepBatchSampler(20, 8, rank, world, seed=3, max_steps=7, current_step=lambda: start)

    whole = list(sampler(0, 1, 0))
    assert len(whole) == 7
    assert [batch[0][1] for batch in whole] == list(range(7))  # each item carries its step
    rows = [[r for r, _ in batch] for batch in whole]
    # 2 full batches per epoch (the last 4 rows wait for a later epoch), no repeats within one,
    # and a new order every epoch.
    assert len(set(rows[0] + rows[1])) == 16
    assert rows[0:2] != rows[2:4]
    resumed = list(sampler(0, 1, 4))
    assert resumed == whole[4:]
    halves = [list(sampler(rank, 2, 0)) for rank in (0, 1)]
    for step in range(7):
        assert halves[0][step] + halves[1][step] == whole[step]


def test_linear_warmup_from_zero_to_one_peak_then_decay_to_zero() -> None:
    factors = [linear_warmup_decay(step, 4, 12) for step in range(13)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors.count(1.0) == 1  # the peak at step `warmup_steps` only, not two steps
    assert factors[11] > 0.0 and factors[12] == 0.0  # the last step (11) still learns
    assert all(a > b for a, b in itertools.pairwise(factors[4:]))
    assert linear_warmup_decay(0, 1, 10) == 0.5  # one warm-up step is a warm-up
    assert linear_warmup_decay(0, 0, 10) == 1.0  # none: the peak at once


# --- the science of one step -----------------------------------------------------------------


@pytest.fixture(scope="module")
def module(demo_models_dir: Path) -> MMRetCLIP:
    config = tiny_config(demo_models_dir)
    return MMRetCLIP(
        config.model, str(config.pretrained), 0.02, 1e-3, 0.0, 0, 10, gradient_checkpointing=False
    )


def _batch(module: MMRetCLIP, tmp_path: Path, rows: pl.DataFrame, negatives: int) -> dict:
    prepared = prepare_triplets(rows)
    dataset = TripletImages(
        prepared.rows, negatives, module.image_transform, 64, module.tokenizer, seed=0
    )
    items = [dataset[(row, 0)] for row in range(len(dataset))]
    return torch.utils.data.default_collate(items)


def test_fused_query_is_the_normalised_sum_of_raw_projections(
    module: MMRetCLIP, tmp_path: Path
) -> None:
    images = write_images(tmp_path, 4)
    batch = _batch(module, tmp_path, triplet_rows(images, 4), negatives=3)
    pixels = batch["images"][:, QUERY_IMAGE_SLOT]
    with torch.no_grad(), OneThread():
        fused = module.encode_queries(pixels, batch["tokens"])
        normalised = (pixels.float() - module.pixel_mean) / module.pixel_std
        image_raw = module.clip.encode_image(normalised)
        text_raw = module.clip.encode_text(batch["tokens"])
    expected = F.normalize(image_raw + text_raw, dim=-1)
    torch.testing.assert_close(fused, expected)
    # Not the sum of the normalised projections (a different rule, a different vector).
    other = F.normalize(F.normalize(image_raw, dim=-1) + F.normalize(text_raw, dim=-1), dim=-1)
    assert not torch.allclose(fused, other, atol=1e-3)


def test_query_image_is_among_each_querys_negatives(module: MMRetCLIP, tmp_path: Path) -> None:
    images = write_images(tmp_path, 6)
    rows = triplet_rows(images, 4, negatives=2)  # one row short of negatives: padded
    batch = _batch(module, tmp_path, rows, negatives=3)
    per_query = batch["images"].shape[1]
    keys, valid = batch["keys"].flatten(), batch["valid"].flatten()
    positive = positive_indices(4, per_query)
    allowed = allowed_candidates(keys, valid, positive)
    for query, q_img in enumerate(rows["q_img"]):
        slot = query * per_query + QUERY_IMAGE_SLOT
        assert keys[slot] == image_key(q_img)
        assert allowed[query, slot] and slot != positive[query]
        assert not valid[query * per_query + 3]  # the padding slot is never a candidate
        assert not allowed[:, query * per_query + 3].any()
    # Row 0's target (image 1) is row 1's query image: not a negative of row 0, but of row 1.
    assert not allowed[0, 1 * per_query + QUERY_IMAGE_SLOT]
    assert allowed[1, 1 * per_query + QUERY_IMAGE_SLOT]


def test_gathered_loss_over_two_devices_equals_the_single_device_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(6, 8, generator=generator), dim=-1).requires_grad_()
    candidates = F.normalize(torch.randn(18, 8, generator=generator), dim=-1).requires_grad_()
    keys = torch.arange(18)
    valid = torch.ones(18, dtype=torch.bool)
    weight = torch.tensor([1.0, 1, 0, 1, 1, 1])  # one query unusable, on the first device

    positive = positive_indices(6, 3)
    single = fused_infonce(
        queries, candidates, positive, allowed_candidates(keys, valid, positive), 0.02, weight, 5
    )
    (single_grad,) = torch.autograd.grad(single, candidates)

    total = torch.zeros(())
    for rank in (0, 1):
        local = slice(rank * 3, rank * 3 + 3)
        positive = positive_indices(3, 3, offset_rows=rank * 3)
        allowed = allowed_candidates(keys, valid, positive)
        loss = fused_infonce(
            queries[local], candidates, positive, allowed, 0.02, weight[local], 5, world_size=2
        )
        total = total + loss / 2  # DDP averages the devices' gradients
    (ddp_grad,) = torch.autograd.grad(total, candidates)
    torch.testing.assert_close(total, single)
    torch.testing.assert_close(ddp_grad, single_grad)


def test_training_refuses_rows_whose_images_cannot_be_read_at_all(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    rows = triplet_rows([f"images/{i}.png" for i in range(6)], 8)  # relative, no image root
    path = tmp_path / "triplets.parquet"
    rows.write_parquet(path)
    config = tiny_config(demo_models_dir)
    with pytest.raises(
        TripletDataError,
        match=r"6 of 6 sampled query and target images cannot be read .*images/0.png",
    ):
        train_checkpoint("c1", config, [path], DataLayout(tmp_path / "home"))


def test_loss_plot_is_a_png_with_matplotlib_else_a_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from megapairs_assets.training import plot

    curve = pl.DataFrame(
        {"step": range(1, 31), "loss": [5.0 - i / 10 for i in range(30)], "learning_rate": 1e-3}
    )
    if importlib.util.find_spec("matplotlib") is not None:
        markdown, png = plot.loss_plot_markdown(curve, tmp_path / "loss.png")
        assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert markdown.startswith("![training loss](data:image/png;base64,")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    markdown, png = plot.loss_plot_markdown(curve, tmp_path / "table.png")
    assert png is None and "| 30 | 2.1000 |" in markdown and len(markdown.splitlines()) == 14

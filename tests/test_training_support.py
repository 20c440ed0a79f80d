"""Builders shared by the training tests: tiny triplet tables over generated images.

(Named test_* so it sits with the training tests; it holds no tests itself.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import image_factory as factory
import polars as pl
import torch

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.training.config import TrainingConfig

INSTRUCTIONS = ("make it {c}", "the same thing but {c}", "show it in a {c} version")
COLOURS = ("red", "blue", "green", "tiny", "striped", "dark", "bright", "round")


def write_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """`count` distinct PNG files; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"img{index:03d}.png"
        factory.picture(seed * 1000 + index, (72, 64)).save(path)
        paths.append(str(path))
    return paths


def triplet_rows(images: list[str], rows: int, negatives: int = 4) -> pl.DataFrame:
    """Release-schema rows: query i, target i+1, hns = [query, i+2, i+3, ...], 3 instructions."""
    n = len(images)
    records = []
    for row in range(rows):
        query, target = row % n, (row + 1) % n
        colour = COLOURS[row % len(COLOURS)]
        records.append(
            {
                "pair_id": f"p{row:04d}",
                "query_id": f"q{query:03d}",
                "q_img": images[query],
                "q_text": [template.format(c=colour) for template in INSTRUCTIONS],
                "t_img": images[target],
                "hns": [images[query]] + [images[(row + 2 + k) % n] for k in range(negatives - 1)],
            }
        )
    return pl.DataFrame(records)


def write_triplets(root: Path, rows: int, images: int, negatives: int = 4) -> Path:
    """A triplet Parquet file of `rows` rows over `images` generated images."""
    paths = write_images(root / "images", images)
    path = root / "triplets.parquet"
    triplet_rows(paths, rows, negatives).write_parquet(path)
    return path


def tiny_config(models_dir: Path, **overrides: object) -> TrainingConfig:
    """The demo's tiny open_clip model, CPU, settings small enough for a test."""
    config = TrainingConfig(
        model=DEMO_CLIP_MODEL,
        pretrained=str(models_dir / f"{DEMO_CLIP_MODEL}.pt"),
        batch_size=4,
        hard_negatives=3,
        learning_rate=1e-3,
        weight_decay=0.0,
        warmup_steps=0,
        max_steps=6,
        accelerator="cpu",
        num_workers=0,
        checkpoint_every_n_steps=2,
        image_cache_items=256,
        cpu_threads=1,
    )
    return dataclasses.replace(config, **overrides)


class OneThread:
    """Run torch on one thread inside a test (a shared 2-core box thrashes with two)."""

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)

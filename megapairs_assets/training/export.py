"""The trained weights as an open_clip checkpoint, and the proof that open_clip loads them back.

The export is a folder in open_clip's own layout (`open_clip_config.json` next to
`open_clip_model.safetensors`), so both ways open_clip reads checkpoints work:

    open_clip.create_model(<model name>, pretrained="<dir>/open_clip_model.safetensors")
    open_clip.create_model("local-dir:<dir>")   # the config travels with the weights

`verify_export` loads it through `create_model` and checks that image and text embeddings of a
fixed probe are bit-identical to the trained model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megapairs_assets.embeddings.encoders import MODEL_CONFIGS_DIR
from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lib.storage import write_atomic

WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"
_PROBE_SEED = 0
_PROBE_TEXTS = ["a photo of the same object in red", "the same scene at night"]


@dataclass(frozen=True)
class ExportedCheckpoint:
    """Where the export lives and how to load it."""

    directory: Path
    weights: Path
    config: Path
    model_name: str

    def load_snippet(self) -> str:
        """Python that loads the checkpoint with a plain `import open_clip` (no project code).

        `local-dir:` first: the config travels with the weights, so it works for every model,
        including the project's own configs (the demo's tiny CLIP), which open_clip does not
        know by name in a fresh process. The by-name form is offered for open_clip's own models.
        """
        spec = f"local-dir:{self.directory}"
        snippet = (
            f"model, _, preprocess = open_clip.create_model_and_transforms({spec!r}); "
            f"tokenizer = open_clip.get_tokenizer({spec!r})"
        )
        if not (MODEL_CONFIGS_DIR / f"{self.model_name}.json").is_file():
            snippet += (
                f"  # or create_model_and_transforms({self.model_name!r}, "
                f"pretrained={str(self.weights)!r})"
            )
        return snippet


def export_open_clip(clip: torch.nn.Module, model_name: str, directory: Path) -> ExportedCheckpoint:
    """Write `clip`'s weights (float32, on CPU) and its open_clip config into `directory`."""
    import open_clip
    from safetensors.torch import save_file

    from megapairs_assets.embeddings.encoders import register_bundled_model_configs

    register_bundled_model_configs()
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: value.detach()
        .to("cpu", dtype=torch.float32 if value.is_floating_point() else None)
        .contiguous()
        .clone()
        for name, value in clip.state_dict().items()
    }
    weights = directory / WEIGHTS_NAME
    write_atomic(weights, lambda tmp: save_file(tensors, str(tmp)))
    visual = getattr(clip, "visual", None)
    preprocess = {
        "mean": list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        "std": list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
    }
    # The keys open_clip itself writes for a saved model (see its hub export).
    extra = getattr(visual, "preprocess_cfg", None) or {}
    preprocess.update({k: extra[k] for k in ("interpolation", "resize_mode") if k in extra})
    # open_clip reads model_cfg and preprocess_cfg; "model_name" (ignored by open_clip) lets
    # the retriever name the architecture. The sidecar does the same for the bare weights file.
    config = {
        "model_name": model_name,
        "model_cfg": open_clip.get_model_config(model_name),
        "preprocess_cfg": preprocess,
    }
    sidecar = weights.with_suffix(".json")
    write_atomic(sidecar, lambda tmp: tmp.write_text(json.dumps({"model_name": model_name}) + "\n"))
    # Written last: a folder with both config and weights is complete (retriever.discovery).
    config_path = directory / CONFIG_NAME
    write_atomic(config_path, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return ExportedCheckpoint(directory, weights, config_path, model_name)


def verify_export(
    exported: ExportedCheckpoint, trained: torch.nn.Module, image_size_px: int
) -> CheckOutcome:
    """Load the export through `open_clip.create_model` and compare probe embeddings exactly.

    Both models run on CPU in float32 and eval mode, so any difference is a real difference in
    weights or architecture (a lost key, a wrong activation), not numerics.
    """
    import open_clip

    from megapairs_assets.embeddings.encoders import register_bundled_model_configs

    register_bundled_model_configs()
    name = "open_clip_export_identical"
    try:
        loaded = open_clip.create_model(exported.model_name, pretrained=str(exported.weights))
    except Exception as exc:  # any load failure is exactly what this check reports
        return CheckOutcome(name, False, f"open_clip could not load the export: {exc}", 1)
    reference = trained.to("cpu", dtype=torch.float32)
    was_training = reference.training
    reference.eval()
    loaded.eval()
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    pixels = torch.randn((2, 3, image_size_px, image_size_px), generator=generator)
    tokens = open_clip.get_tokenizer(exported.model_name)(_PROBE_TEXTS)
    with torch.no_grad():
        pairs = {
            "image": (reference.encode_image(pixels), loaded.encode_image(pixels)),
            "text": (reference.encode_text(tokens), loaded.encode_text(tokens)),
        }
    reference.train(was_training)
    differing = [
        f"{side}: max |diff| {float((a - b).abs().max()):.3g}"
        for side, (a, b) in pairs.items()
        if not torch.equal(a, b)
    ]
    if differing:
        return CheckOutcome(
            name, False, "reloaded embeddings differ: " + "; ".join(differing), len(differing)
        )
    return CheckOutcome(
        name, True, "ok: open_clip.create_model reloads the export with identical embeddings"
    )

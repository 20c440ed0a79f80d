"""Names the Dagster wiring needs without importing torch or Lightning (definitions load fast).

`TRIPLETS_ASSET` is the generation stage's name, re-exported for the training wiring.
"""

from megapairs_assets.generation.common import TRIPLETS_ASSET

__all__ = ["ASSET_NAME", "TRAINING_CHECKS", "TRAINING_WARNINGS", "TRIPLETS_ASSET"]

ASSET_NAME = "mmret_clip_checkpoint"
TRAINING_CHECKS = {
    "open_clip_export_identical": "open_clip.create_model reloads the exported checkpoint with "
    "bit-identical image and text embeddings",
}
TRAINING_WARNINGS = {
    "loss_decreased": "Mean loss over the last 10% of steps is below that of the first 10%",
    "images_loaded": "Every image of every training step was read (a failed target or query "
    "image leaves its query out of the loss)",
}

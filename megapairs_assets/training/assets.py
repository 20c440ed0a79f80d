"""Dagster wiring of MMRet-CLIP checkpoints: one partition per named training config.

`mmret_clip_checkpoint` is partitioned by `training_configs` (dynamic: a name per config in the
training resource, registered by the CLI or by hand), so several variants train side by side,
each with its own lineage. Every partition reads all of the triplets (one model learns from
every shard). The export lands under `<data>/mmret_clip_checkpoint/<config>/open_clip/`, where
the evaluation's checkpoint sensor finds it.
"""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg

from megapairs_assets.lib.step import StepResult
from megapairs_assets.orchestration.partitions import step_placement
from megapairs_assets.orchestration.settings_version import fields, weights_label
from megapairs_assets.orchestration.shard_step import Stage, materialize_partitions
from megapairs_assets.training.config import (
    ALL_VISIBLE_GPUS,
    SCIENCE_SETTINGS,
    TrainingConfigError,
    check_config_name,
)
from megapairs_assets.training.names import (
    ASSET_NAME,
    TRAINING_CHECKS,
    TRAINING_WARNINGS,
    TRIPLETS_ASSET,
)

# To move with the resource to resources/training.py (see the report to the lead).
from resources.environment import ProfileError
from resources.evaluation import EvaluationResource
from resources.profiles import PAPER_TRAIN_DEVICES, train_devices
from resources.storage import LineageCatalogResource, StorageResource

# To move with the resource to resources/training.py (see the report to the lead).
from resources.training import TrainingResource

TRAINING_CONFIG_PARTITIONS_NAME = "training_configs"
training_config_partitions = dg.DynamicPartitionsDefinition(name=TRAINING_CONFIG_PARTITIONS_NAME)


def checkpoint_settings(resources: Any) -> dict[str, Any]:
    """What decides the checkpoints: each named config's model, start weights and recipe, and
    the held-out split kept out of training. Dagster's code version is per asset, so a change
    to one config marks every config's checkpoint as changed."""
    configs = {}
    for name, config in sorted(resources.training.configs.items()):
        recipe = fields(config, [name for name in SCIENCE_SETTINGS if name != "pretrained"])
        if config.pretrained:
            recipe["pretrained"] = weights_label(config.pretrained)
        configs[name] = recipe
    heldout = fields(resources.evaluation, ("heldout_fraction", "heldout_max_queries"))
    return {"configs": configs, **heldout}


STAGE = Stage(
    ASSET_NAME, "mmret-clip-v2", TRAINING_CHECKS, TRAINING_WARNINGS, settings=checkpoint_settings
)

# Host memory per training GPU: each device's process holds the model and its optimizer state on
# the CPU while it loads, and feeds its GPU from `num_workers` (8) image-decoding processes.
TRAINING_MEMORY_PER_GPU_GI = 24


def training_step_gpus() -> int:
    """GPUs one training step's pod asks for on Kubernetes.

    Tags are fixed per asset when the code location loads, while the GPU count is a field of
    each training config (one partition each). Every config of the paper profile uses the
    profile's setting (`MEGAPAIRS_TRAIN_DEVICES`, 8 by default), so the pod asks for that.
    `auto` (every visible GPU) asks for the paper's 8: a pod sees only the GPUs it asked for. A
    malformed value asks for 8 too; building the paper profile's resources names the error.
    """
    try:
        devices = train_devices()
    except ProfileError:
        return PAPER_TRAIN_DEVICES
    return PAPER_TRAIN_DEVICES if devices == ALL_VISIBLE_GPUS else devices


TRAINING_GPUS = training_step_gpus()


@dg.asset(
    name=ASSET_NAME,
    partitions_def=training_config_partitions,
    deps=[dg.AssetDep(TRIPLETS_ASSET, partition_mapping=dg.AllPartitionMapping())],
    group_name="training",
    code_version=STAGE.code_version,
    kinds={"pytorch", "open_clip"},
    pool="gpu",
    check_specs=STAGE.check_specs(),
    # One config per run: a training run holds its devices for hours.
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=1),
    # On Kubernetes: the paper profile's GPUs per run, and host memory to feed them.
    **step_placement(TRAINING_GPUS, f"{TRAINING_MEMORY_PER_GPU_GI * TRAINING_GPUS}Gi"),
)
def mmret_clip_checkpoint(
    context: dg.AssetExecutionContext,
    training: TrainingResource,
    evaluation: EvaluationResource,
    storage: StorageResource,
    catalog: LineageCatalogResource,
) -> dg.MaterializeResult:
    """An MMRet-CLIP retriever trained with Lightning on the triplets (method.md §7).

    Query = L2-normalise(raw image projection + raw text projection) of the query image and
    one instruction sampled per step; candidates are images; InfoNCE at temperature 0.02 over
    the batch's images plus each query's hard negatives (its query image first, the others
    drawn per step from its mined ones), gathered over devices. AdamW with linear warm-up and
    decay, counted in steps; all weights trained. The evaluation's held-out query images are
    never trained on (not as queries, targets or hard negatives). Exports an open_clip checkpoint
    (`create_model(name, pretrained=<weights>)` or `local-dir:<dir>`) plus the Lightning
    checkpoint; a killed run resumes from its last checkpoint when re-materialized (with the
    data root on an object store the checkpoint is uploaded as it is written, so a retry on
    another machine resumes too). More than `max_unreadable_image_fraction` of the image
    reads failing stops the run with the count and the first paths.
    """
    layout, lineage = storage.layout(), catalog.catalog()
    image_root = training.image_root

    # Torch and Lightning load only when a checkpoint is trained, not with the definitions.
    from megapairs_assets.training.step import train_config

    def step(config_name: str) -> StepResult:
        # A settings error names the profile's variable for the field (weights, devices).
        with training.hinted_errors(config_name):
            return train_config(
                config_name,
                training.config_for(config_name),
                layout,
                lineage,
                heldout_fraction=evaluation.heldout_fraction,
                heldout_max_queries=evaluation.heldout_max_queries,
                image_root=Path(image_root) if image_root else None,
                log=context.log.info,
            )

    return materialize_partitions(context, STAGE, step, lineage, storage.profile)


def build_training_configs_sensor(default_status: dg.DefaultSensorStatus) -> dg.SensorDefinition:
    """Keeps the `training_configs` partition set equal to the training resource's configs."""

    @dg.sensor(
        name="training_configs_sensor",
        minimum_interval_seconds=60,
        default_status=default_status,
    )
    def training_configs_sensor(
        context: dg.SensorEvaluationContext, training: TrainingResource
    ) -> dg.SensorResult | dg.SkipReason:
        """Registers each named training config as a partition and removes the partitions of
        configs the resource no longer has (nothing is trained here; a removed config's
        checkpoints, scores and history stay).

        A name that cannot be a partition key and a folder is left out and named in the tick's
        log.
        """
        valid, invalid = split_config_names(training.configs)
        for problem in invalid.values():
            context.log.warning(f"training config not registered: {problem}")
        known = context.instance.get_dynamic_partitions(TRAINING_CONFIG_PARTITIONS_NAME)
        new = [name for name in valid if name not in known]
        # A partition without a config could only fail (`Materialize all` would try it).
        gone = [name for name in known if name not in valid]
        if not new and not gone:
            refused = f"; {len(invalid)} invalid name(s) left out" if invalid else ""
            return dg.SkipReason(f"no new training config ({len(known)} known{refused})")
        requests: list[Any] = []
        if new:
            requests.append(training_config_partitions.build_add_request(new))
        if gone:
            context.log.info(f"training configs no longer in the resource, removed: {gone}")
            requests.append(training_config_partitions.build_delete_request(gone))
        return dg.SensorResult(dynamic_partitions_requests=requests)

    return training_configs_sensor


def register_training_configs(
    instance: dg.DagsterInstance, training: TrainingResource
) -> list[str]:
    """Add the resource's config names to the partition set (for `megapairs demo`); all names.

    Raises `TrainingConfigError`, registering nothing, when a name cannot be a partition key.
    """
    names, invalid = split_config_names(training.configs)
    if invalid:
        raise TrainingConfigError("; ".join(invalid.values()))
    known = set(instance.get_dynamic_partitions(TRAINING_CONFIG_PARTITIONS_NAME))
    new = [name for name in names if name not in known]
    if new:
        instance.add_dynamic_partitions(TRAINING_CONFIG_PARTITIONS_NAME, new)
    return names


def split_config_names(names: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """(names fit to be partition keys and folders, {bad name: why}), in the given order."""
    valid, invalid = [], {}
    for name in names:
        try:
            check_config_name(name)
        except TrainingConfigError as error:
            invalid[name] = str(error)
        else:
            valid.append(name)
    return valid, invalid

"""Train one named MMRet-CLIP config: the plain per-partition function of `mmret_clip_checkpoint`.

`train_checkpoint` checks the config (before reading any data), prepares the triplets (held-out
queries out, bad rows quarantined), runs the Lightning Trainer, exports an open_clip checkpoint,
proves open_clip reloads it with identical embeddings and returns a `StepResult`.

Outputs, under `<data>/mmret_clip_checkpoint/<config name>/` (with the data root on an object
store, training runs in `<home>/training/<config name>/` and the results are uploaded there;
the resume point, `lightning/last.ckpt`, is uploaded in the background each time it is written
(the step waits for the last upload before it ends or stops; failed uploads are warned about and
counted in `failed_uploads`) and fetched by a retry on a machine that lacks it:
`training.resume`. A finished config run again where the store already holds its export, made
from the checkpoint it holds (ETags recorded in `run.json`), downloads and exports nothing):

    open_clip/open_clip_model.safetensors + open_clip_config.json   the trained model
    lightning/last.ckpt      full training state (weights, optimizer, schedule, step)
    loss_curve.csv           step, loss, learning rate, step time
    loss.png                 when matplotlib is installed
    quarantine.parquet       triplet rows that could not be trained on, with a reason
    run.json                 the fingerprint of config + data the checkpoint belongs to, and
                             the step of the uploaded resume point

Re-running is safe: a run killed mid-way resumes from `lightning/last.ckpt` at the step it had
reached, with the same data order; a finished run re-materializes from its final checkpoint
without training again. A change of science settings or of the training rows (the fingerprint:
triplets, held-out split and image contents, not where the images sit, so a moved corpus
resumes; `training.content`) starts over, and withdraws the old export first. `last.ckpt` is
rewritten every `checkpoint_every_n_steps` and, when the run is stopped by SIGTERM or Ctrl-C
(Dagster's "terminate"), at the end of the step it was in (on several devices the signal reaches
the process that spawned the ranks, which passes it on; every rank stops after the same step and
exits), and the run fails with "<config>: stopped at step N of M; saved <path>; materialize it
again to resume from step N" (a second Ctrl-C more than 3 s after the first stops at once; an
earlier one is the same Ctrl-C forwarded by Dagster's executor); only SIGKILL loses the steps
since the last one (not a SIGKILL of the process that spawned several devices' ranks: they
notice it is gone, save the step they are in and exit). A loss that turns NaN or infinite stops
the run before anything is exported, and so does a run in which more than
`max_unreadable_image_fraction` of the image reads fail (the corpus images gone); fewer failures
cost their queries and are reported by the `images_loaded` check. `fit_s` counts the fit time of
every process that trained the checkpoint (carried inside it), `fit_s_this_run` this process's
part.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import (
    DataLayout,
    DataPath,
    is_local,
    write_atomic,
    write_parquet_atomic,
)
from megapairs_assets.training.callbacks import (
    RunRecord,
    StopCheckpoint,
    StopRequested,
    TrainingInterrupted,
    read_loss_curve,
)
from megapairs_assets.training.config import (
    SCIENCE_SETTINGS,
    ResolvedTraining,
    TrainingConfig,
    check_config_name,
    resolve_config,
)
from megapairs_assets.training.content import (
    HASH_CACHE_FILE,
    content_rows,
    image_contents,
    image_uris_of,
)
from megapairs_assets.training.data import (
    PreparedTriplets,
    TripletDataError,
    TripletDataModule,
    TripletImages,
    check_images_readable,
    prepare_triplets,
    read_triplets,
    resolve_image_paths,
)
from megapairs_assets.training.export import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    export_open_clip,
    verify_export,
)
from megapairs_assets.training.names import ASSET_NAME
from megapairs_assets.training.plot import (
    loss_plot_markdown,
    loss_sparkline_markdown,
    sample_curve,
)
from megapairs_assets.training.resume import (
    RESUME_POINT,
    CheckpointRecord,
    ResumePointMirror,
    clear_work_folder,
    fetch_resume_point,
    read_checkpoint_record,
    upload_file,
)

_LOSS_WINDOW_FRACTION = 0.1
# What a checkpoint's steps were computed with beyond settings and rows: v2 draws each step's
# mined hard negatives afresh (`data.mined_negative_indices`) and warms up from 0
# (`module.linear_warmup_decay`); v1 (no "recipe" in run.json) took the first ones and
# reached the peak a step early.
TRAINING_RECIPE = "mmret-clip-v2"


def checkpoint_dir(layout: DataLayout, config_name: str) -> DataPath:
    """Where one named config's outputs are published, under the data root."""
    check_config_name(config_name)
    return layout.asset_dir(ASSET_NAME) / config_name


def work_dir(layout: DataLayout, config_name: str) -> Path:
    """Where a config trains: its published folder on a local data root; with the data root on
    an object store, a local folder under `home` (Lightning checkpoints and the step log need a
    file system), from which the results are uploaded when training ends."""
    published = checkpoint_dir(layout, config_name)
    return published if is_local(published) else layout.home / "training" / config_name


def train_checkpoint(
    config_name: str,
    config: TrainingConfig,
    triplet_paths: Sequence[Path],
    layout: DataLayout,
    *,
    input_versions: Mapping[str, str] | None = None,
    heldout_fraction: float = 0.0,
    heldout_max_queries: int | None = None,
    image_root: Path | None = None,
    log: Callable[[str], None] | None = None,
    extra_callbacks: Sequence[Any] = (),
    gpu_count: int | None = None,
) -> StepResult:
    """Train (or resume, or re-export) the checkpoint of `config_name` on triplet tables.

    input_versions: "asset/partition" -> materialization id of each triplet table read; it is
        the data version recorded with the checkpoint (its fingerprint hashes the rows
        themselves, `rows_fingerprint`).
    heldout_fraction / heldout_max_queries: the evaluation's held-out share of query images and
        its cap on them; those images are not trained on (`evaluation.heldout`, the split both
        sides share; `data.prepare_triplets`).
    image_root: where relative image paths (the release layout) live.
    extra_callbacks: more Lightning callbacks (tests, profiling).
    Raises `TrainingConfigError` / `TripletDataError` before any training on bad settings or
    unusable input.
    """
    check_config_name(config_name)
    resolve_config(config, gpu_count=gpu_count)  # fail on settings before reading any data
    frame = resolve_image_paths(read_triplets(triplet_paths), image_root)
    return train_on_triplets(
        config_name,
        config,
        frame,
        layout,
        input_versions=input_versions,
        heldout_fraction=heldout_fraction,
        heldout_max_queries=heldout_max_queries,
        log=log,
        extra_callbacks=extra_callbacks,
        gpu_count=gpu_count,
    )


def train_on_triplets(
    config_name: str,
    config: TrainingConfig,
    triplets: pl.DataFrame,
    layout: DataLayout,
    *,
    input_versions: Mapping[str, str] | None = None,
    heldout_fraction: float = 0.0,
    heldout_max_queries: int | None = None,
    log: Callable[[str], None] | None = None,
    extra_callbacks: Sequence[Any] = (),
    gpu_count: int | None = None,
    image_hashes: Mapping[str, str] | None = None,
) -> StepResult:
    """`train_checkpoint` on triplet rows already read (image paths resolved).

    image_hashes: image path -> sha256 of its bytes where the caller knows it (the corpus
        catalog's `content_hash`); other images are hashed here (`training.content`). The
        run's fingerprint keys on image contents, not paths.
    """
    from megapairs_assets.evaluation.heldout import HELDOUT_SPLIT_VERSION

    check_config_name(config_name)
    say = log or _quiet
    resolved = resolve_config(config, gpu_count=gpu_count)
    say(
        f"{config_name}: global batch {config.batch_size} queries over {resolved.world_size} "
        f"{resolved.accelerator.upper()} device(s) ({resolved.devices} per node x "
        f"{config.num_nodes} node(s)): {resolved.per_device_batch_size} per device, "
        f"{resolved.strategy} strategy, {resolved.precision}"
    )
    prepared = prepare_triplets(triplets, heldout_fraction, heldout_max_queries)
    if prepared.rows.height < config.batch_size:
        raise TripletDataError(
            f"{prepared.rows.height} usable triplet rows ({prepared.input_rows} read, "
            f"{prepared.quarantine.height} quarantined, "
            f"{prepared.heldout_rows + prepared.heldout_target_rows} held out) are "
            f"fewer than one batch of {config.batch_size}; lower batch_size or add triplets"
        )
    check_images_readable(prepared.rows, config.max_unreadable_image_fraction)
    versions = dict(input_versions or {})
    say(f"{config_name}: {_data_summary(prepared, len(versions), config)}")
    split = f"{HELDOUT_SPLIT_VERSION}@{heldout_fraction}"
    if heldout_max_queries is not None:
        split += f"/max{heldout_max_queries}"
    out = work_dir(layout, config_name)
    # What is trained on, not which materializations held it nor where the images sit:
    # triplets re-materialized with the same content (every `megapairs demo` run) and a corpus
    # moved or remounted with the same bytes resume instead of training again.
    contents = image_contents(
        image_uris_of(prepared.rows), image_hashes or {}, out / HASH_CACHE_FILE, say
    )
    data = {
        "rows": rows_fingerprint(content_rows(prepared.rows, contents)),
        "heldout_split": split,
        # How batches and the schedule are drawn from the rows: a checkpoint of an older
        # recipe is not resumed under a newer one.
        "recipe": TRAINING_RECIPE,
    }
    fingerprint = config.fingerprint(data)
    state = {
        "fingerprint": fingerprint,
        "settings": config.science_settings(),
        "data": data,
        # For information only (not in the fingerprint): where the images were read from.
        "image_paths": rows_fingerprint(prepared.rows),
    }
    published_dir = checkpoint_dir(layout, config_name)
    _withdraw_stale_publication(published_dir, out, fingerprint, say)
    mirror = None
    if not (is_local(published_dir) and Path(published_dir) == out):
        finished = _published_export(published_dir, fingerprint, config.max_steps)
        if finished is not None:
            # A finished config run again on a machine that lacks it: nothing to download,
            # train or export; the result is read from what the store holds.
            return _published_result(
                config_name, config, resolved, prepared, triplets, versions, split,
                published_dir, out, finished, say,
            )  # fmt: skip
        # Training runs on local disk apart from the data root: keep the resume point there too.
        fetch_resume_point(published_dir, out, state, say)
        mirror = ResumePointMirror(published_dir, out, state, say)
    resume_from = _prepare_output_dir(out, state, say)

    started_at = time.time()  # wall clock: RunRecord counts on from it in rank processes too
    record = RunRecord(fingerprint, started_at)
    module, trainer = _fit(
        config_name, resolved, prepared, out, resume_from, say, extra_callbacks, record, mirror
    )
    measured_s = time.time() - started_at
    # Under ddp_spawn the steps ran in child processes; the checkpoint knows where they ended.
    final = read_checkpoint_record(out / RESUME_POINT)
    earlier_s = resume_from[1].fit_s if resume_from[1] else 0.0
    # The fit time is the one the final checkpoint carries (every process that trained it, up
    # to its last save), so the figures of a run and of its resumption add up.
    fit_s = final.fit_s if final and final.fingerprint == fingerprint else earlier_s + measured_s
    fit_s_this_run = max(fit_s - earlier_s, 0.0)
    final_step = final.step if final else trainer.global_step

    exported = export_open_clip(module.clip, config.model, out / "open_clip")
    export_check = verify_export(exported, module.clip, resolved.image_size_px)
    quarantine_path = out / "quarantine.parquet"
    write_parquet_atomic(prepared.quarantine, quarantine_path)
    curve = read_loss_curve(out / "loss_curve.csv")
    plot_markdown, png = loss_plot_markdown(curve, out / "loss.png")
    if mirror is not None:
        if not mirror.upload_if_behind(final_step):
            raise OSError(
                f"training {config_name!r} finished at step {final_step}, but its final resume "
                f"point could not be uploaded to {published_dir}; it is kept in "
                f"{out / RESUME_POINT}: materialize again to publish it (nothing is trained "
                "again)"
            )
        if mirror.failed_uploads:
            say(
                f"warning: {config_name}: {mirror.failed_uploads} upload(s) of the resume point "
                "failed during training (see above); the final one is published"
            )
    _write_json(
        out / "run.json",
        {
            **state,
            "complete": True,
            "resume_step": final_step,
            "fit_s": round(fit_s, 2),
            "export_check": export_check.detail if export_check.passed else None,
        },
    )
    published = _publish(out, published_dir)
    say(
        f"{config_name}: at step {final_step} after {fit_s_this_run:.1f} s of fitting here "
        f"({fit_s:.1f} s in all); {published}"
    )
    return _step_result(
        _RunFigures(
            config_name=config_name,
            config=config,
            resolved=resolved,
            prepared=prepared,
            triplets=triplets,
            versions=versions,
            split=split,
            fingerprint=fingerprint,
            published=published,
            lightning_checkpoint=(published if mirror else out) / RESUME_POINT,
            curve=curve,
            plot=(plot_markdown, png),
            export_check=export_check,
            final_step=final_step,
            fit_s=fit_s,
            fit_s_this_run=fit_s_this_run,
            resumed_from_step=resume_from[1].step if resume_from[1] else 0,
            failed_uploads=mirror.failed_uploads if mirror is not None else 0,
            failed_image_examples=_failed_image_examples(trainer),
            load_with=exported.load_snippet(),
        )
    )


def _published_result(
    config_name: str,
    config: TrainingConfig,
    resolved: ResolvedTraining,
    prepared: PreparedTriplets,
    triplets: pl.DataFrame,
    versions: dict[str, str],
    split: str,
    published: DataPath,
    out: Path,
    remote: dict[str, Any],
    say: Callable[[str], None],
) -> StepResult:
    """The result of a finished config whose export the store holds (`_published_export`):
    only the loss curve (kilobytes) is downloaded; the checkpoint and export stay put."""
    out.mkdir(parents=True, exist_ok=True)
    curve_path = out / "loss_curve.csv"
    source = published / "loss_curve.csv"
    if source.exists():
        write_atomic(curve_path, lambda tmp: source.fs.get_file(source.path, str(tmp)))
    curve = read_loss_curve(curve_path)
    step = int(remote["resume_step"])
    say(
        f"{config_name}: already trained ({step} of {config.max_steps} steps) and exported to "
        f"{published / 'open_clip'} from the checkpoint published there; nothing downloaded, "
        "trained or exported"
    )
    fit_s = float(remote.get("fit_s") or 0.0)
    return _step_result(
        _RunFigures(
            config_name=config_name,
            config=config,
            resolved=resolved,
            prepared=prepared,
            triplets=triplets,
            versions=versions,
            split=split,
            fingerprint=str(remote["fingerprint"]),
            published=published,
            lightning_checkpoint=published / RESUME_POINT,
            curve=curve,
            plot=loss_plot_markdown(curve, out / "loss.png"),
            export_check=CheckOutcome(
                "open_clip_export_identical",
                True,
                f"{remote['export_check']} (checked when it was exported; the export and its "
                "checkpoint are unchanged in the store since)",
            ),
            final_step=step,
            fit_s=fit_s,
            fit_s_this_run=0.0,
            resumed_from_step=step,
            failed_uploads=0,
            failed_image_examples=(),
            load_with=(
                f"download {published / 'open_clip'} to a folder, then "
                "open_clip.create_model_and_transforms('local-dir:<that folder>')"
            ),
        )
    )


@dataclass(frozen=True)
class _RunFigures:
    """What a step's result is made of, whether it trained or found its export published."""

    config_name: str
    config: TrainingConfig
    resolved: ResolvedTraining
    prepared: PreparedTriplets
    triplets: pl.DataFrame
    versions: dict[str, str]
    split: str
    fingerprint: str
    published: DataPath
    lightning_checkpoint: DataPath
    curve: pl.DataFrame
    plot: tuple[str | None, Path | None]  # (Markdown, local PNG) of the loss curve
    export_check: CheckOutcome
    final_step: int
    fit_s: float
    fit_s_this_run: float
    resumed_from_step: int
    failed_uploads: int
    failed_image_examples: tuple[str, ...]
    load_with: str


def _step_result(run: _RunFigures) -> StepResult:
    """The StepResult of a finished config (its outputs, counts, checks and figures)."""
    config, prepared, published, curve = run.config, run.prepared, run.published, run.curve
    plot_markdown, png = run.plot
    return StepResult(
        partition=run.config_name,
        outputs={
            "open_clip_weights": published / "open_clip" / WEIGHTS_NAME,
            "open_clip_dir": published / "open_clip",
            # Uploaded beside the export when training ran apart from the data root.
            "lightning_checkpoint": run.lightning_checkpoint,
            "loss_curve": published / "loss_curve.csv",
            "quarantine": published / "quarantine.parquet",
            **({"loss_plot": published / png.name} if png else {}),
        },
        # Shown as `rows_<name>` on the asset page (so no `_rows` here); steps are no rows.
        row_counts={
            "training": prepared.rows.height,
            "quarantined": prepared.quarantine.height,
            "heldout": prepared.heldout_rows,
            "heldout_target": prepared.heldout_target_rows,
        },
        row_count_key="training",
        row_count_label="training rows",
        config={
            **config.as_dict(),
            "heldout_split": run.split,
            "resolved_strategy": run.resolved.strategy,
            "resolved_precision": run.resolved.precision,
            "per_device_batch_size": run.resolved.per_device_batch_size,
            "gradient_checkpointing_on": run.resolved.gradient_checkpointing,
        },
        model_ids={
            "base": _model_id(config.model, config.pretrained),
            "trained": f"open_clip:{config.model}@{ASSET_NAME}/{run.config_name}/{run.fingerprint}",
        },
        input_versions=run.versions,
        outcomes=[
            run.export_check,
            _loss_decreased(curve),
            _images_loaded(curve, config.max_unreadable_image_fraction, run.failed_image_examples),
        ],
        preview=sample_curve(curve.select("step", "loss", "learning_rate")),
        metadata={
            **_throughput(curve, config.batch_size, config.hard_negatives),
            **_loss_summary(curve),
            "steps": run.final_step,
            "fit_s": round(run.fit_s, 2),
            "fit_s_this_run": round(run.fit_s_this_run, 2),
            "failed_uploads": run.failed_uploads,
            "resumed_from_step": run.resumed_from_step,
            "epochs": round(run.final_step * config.batch_size / prepared.rows.height, 2),
            "device": _device_label(run.resolved),
            "settings": _science_settings(config),
            **_quarantine_reasons(prepared.quarantine),
            "fingerprint": run.fingerprint,
            "load_with": run.load_with,
        },
        markdown={"loss_curve": loss_sparkline_markdown(curve), "loss_plot": plot_markdown},
        rows={
            "quarantine_log": _quarantine_log_rows(
                prepared.quarantine, run.triplets, run.config_name
            )
        },
    )


def _data_summary(prepared: PreparedTriplets, tables: int, config: TrainingConfig) -> str:
    """What the run trains on, said before it starts (a paper run takes hours)."""
    rows = prepared.rows.height
    read = f" from {tables} triplet table(s)" if tables else ""
    reasons = _quarantine_reasons(prepared.quarantine).get("quarantine_reasons", {})
    why = f" ({', '.join(f'{r} x{n}' for r, n in reasons.items())})" if reasons else ""
    epochs = config.max_steps * config.batch_size / rows
    held = f"{prepared.heldout_rows} held out for evaluation"
    if prepared.heldout_target_rows or prepared.heldout_negatives:
        held += (
            f" (and {prepared.heldout_target_rows} whose target is a held-out query image; "
            f"{prepared.heldout_negatives} hard negatives that were one removed)"
        )
    return (
        f"{rows} training rows of {prepared.input_rows} read{read}; {held}, "
        f"{prepared.quarantine.height} quarantined{why}; "
        f"{config.max_steps} steps of {config.batch_size} queries = {epochs:.1f} epochs"
    )


def _science_settings(config: TrainingConfig) -> dict[str, Any]:
    """The settings that decide what is learnt (the hardware ones are in `device`)."""
    settings = config.as_dict()
    return {name: settings[name] for name in SCIENCE_SETTINGS}


def _device_label(resolved: ResolvedTraining) -> str:
    """Where it trained, e.g. "gpu x8 (NVIDIA H100 80GB HBM3), bf16-mixed, ddp_spawn"."""
    label = f"{resolved.accelerator} x{resolved.world_size}"
    if resolved.accelerator == "gpu":
        import torch

        if torch.cuda.is_available():
            label += f" ({torch.cuda.get_device_name(0)})"
    return f"{label}, {resolved.precision}, {resolved.strategy} strategy"


def _quarantine_reasons(quarantine: pl.DataFrame) -> dict[str, dict[str, int]]:
    """{"quarantine_reasons": {reason: rows}}, or nothing when no row was quarantined."""
    if quarantine.is_empty():
        return {}
    counts = quarantine["reason"].value_counts(sort=True)
    return {"quarantine_reasons": dict(zip(counts["reason"], counts["count"], strict=True))}


def _quarantine_log_rows(
    quarantine: pl.DataFrame, triplets: pl.DataFrame, config_name: str
) -> pl.DataFrame:
    """The quarantined triplet rows for the catalog's `quarantine_log` (shard = the config):
    keyed by triplet id where the tables have one, else by row number in the rows read."""
    from megapairs_assets.training.data import QUARANTINE_REASONS

    ids = (
        triplets["triplet_id"].cast(pl.String)
        if "triplet_id" in triplets.columns
        else pl.Series("triplet_id", [None] * triplets.height, dtype=pl.String)
    )
    keys = [ids[row] or f"row {row}" for row in quarantine["row"].to_list()]
    return pl.DataFrame(
        {
            "stage": ASSET_NAME,
            "shard": config_name,
            "key": keys,
            "source_uri": quarantine["q_img"],
            "reason": quarantine["reason"],
            "detail": quarantine["reason"].replace_strict(QUARANTINE_REASONS, default=None),
        },
        schema={
            "stage": pl.String,
            "shard": pl.String,
            "key": pl.String,
            "source_uri": pl.String,
            "reason": pl.String,
            "detail": pl.String,
        },
    )


def _fit(
    config_name: str,
    resolved: ResolvedTraining,
    prepared: PreparedTriplets,
    out: Path,
    resume_from: tuple[Path | None, CheckpointRecord | None],
    say: Callable[[str], None],
    extra_callbacks: Sequence[Any],
    record: RunRecord,
    mirror: ResumePointMirror | None = None,
) -> tuple[Any, Any]:
    import lightning.pytorch as pl_lightning
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

    from megapairs_assets.training.module import MMRetCLIP

    config = resolved.config
    pl_lightning.seed_everything(config.seed, workers=True, verbose=False)
    module = MMRetCLIP(
        model_name=config.model,
        pretrained=str(config.pretrained),
        temperature=config.temperature,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        max_steps=config.max_steps,
        gradient_checkpointing=resolved.gradient_checkpointing,
    )
    dataset = TripletImages(
        prepared.rows,
        hard_negatives=config.hard_negatives,
        pixels=module.image_transform,
        image_size_px=resolved.image_size_px,
        tokenizer=module.tokenizer,
        seed=config.seed,
        cache_items=config.image_cache_items,
    )
    datamodule = TripletDataModule(
        dataset,
        global_batch_size=config.batch_size,
        max_steps=config.max_steps,
        seed=config.seed,
        num_workers=config.num_workers,
        pin_memory=resolved.accelerator == "gpu",
    )
    resume_path, resumed = resume_from
    if resume_path is not None and resumed is not None:
        if resumed.step >= config.max_steps:
            say(
                f"{config_name}: already trained ({resumed.step} of {config.max_steps} steps) "
                f"with these settings and rows; exporting {resume_path} without training"
            )
        else:
            say(
                f"{config_name}: resuming from {resume_path} at step {resumed.step} of "
                f"{config.max_steps}"
            )
    threads = config.cpu_threads if resolved.accelerator == "cpu" else None
    last = out / RESUME_POINT
    # Where a retry finds the state: the upload when there is one (another machine may retry).
    saved_in = f"{last} and {mirror.published / RESUME_POINT}" if mirror else str(last)
    stop = StopCheckpoint(last)
    with _quiet_lightning(), _torch_threads(threads):
        trainer = _trainer(
            config, resolved, out, say, config_name, [stop, *extra_callbacks], record, mirror
        )
        if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            # `ddp_spawn`: the ranks run in child processes; a signal here must reach them.
            stop.forward_to_ranks(trainer.strategy.launcher)
        try:
            _fit_until_stopped(trainer, module, datamodule, resume_path, mirror, stop)
            stop.collect_rank_stop()
        except SIGTERMException:
            # Lightning ends a SIGTERM'd fit with SystemExit(None): exit status 0, as if the
            # run had finished. Say what happened and fail the step instead.
            stop.restore_handler()
            raise TrainingInterrupted(
                f"training {config_name!r} stopped on SIGTERM after step {trainer.global_step} "
                f"of {config.max_steps}; its state is saved in {saved_in} (step "
                f"{_saved_step(last)}): materialize it again to resume from there"
            ) from None
        except BaseException as error:
            stop.restore_handler()
            if stop.stopped_at_once:  # a second request: stopped mid-step, before any save
                error.args = (_stop_message(config_name, config.max_steps, last, saved_in),)
            raise
    if stop.stop_requested:  # also when the interrupt came after the last step
        message = _stop_message(config_name, config.max_steps, last, saved_in)
        say(message)
        # The host's own interruption (Dagster's, KeyboardInterrupt) with the message as its
        # text, so the failure (`megapairs status`, the run's log) says how to go on. Repeated
        # signals stay deferred until here: the message is never cut off.
        stop.raise_interrupt(message)
    stop.restore_handler()
    return module, trainer


def _fit_until_stopped(
    trainer: Any,
    module: Any,
    datamodule: Any,
    resume_path: Path | None,
    mirror: ResumePointMirror | None,
    stop: StopCheckpoint,
) -> None:
    """`trainer.fit`, returning normally when a stop request ended it (`StopRequested`)."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
    except StopRequested:
        pass  # Ctrl-C (or Dagster's terminate) with the step's state saved: the caller raises
    finally:
        # The upload of the last resume point finishes before the step says where its state
        # is, on every way out (the end, SIGTERM, Ctrl-C, an error).
        if mirror is not None:
            mirror.wait()


def _stop_message(config_name: str, max_steps: int, last: Path, saved_in: str) -> str:
    """What a stopped run says: the step its resume point holds, where, and how to go on."""
    step = _saved_step(last)
    if step is None:
        return (
            f"{config_name}: stopped before any checkpoint was saved (of {max_steps} steps); "
            "materialize it again to train from the start"
        )
    return (
        f"{config_name}: stopped at step {step} of {max_steps}; saved {saved_in}; "
        f"materialize it again to resume from step {step}"
    )


def _trainer(
    config: TrainingConfig,
    resolved: ResolvedTraining,
    out: Path,
    say: Callable[[str], None],
    config_name: str,
    extra_callbacks: Sequence[Any],
    record: RunRecord | None = None,
    mirror: ResumePointMirror | None = None,
) -> Any:
    """The Trainer: hardware from the resolved config, checkpoints and logs under `out`.

    `extra_callbacks` run after the project's own (the stop checkpoint, tests' probes).
    `record` stores the run's fingerprint and fit time in every checkpoint; `mirror` uploads
    every `last.ckpt` written (the data root on an object store).
    """
    import lightning.pytorch as pl_lightning
    from lightning.pytorch.callbacks import ModelCheckpoint

    from megapairs_assets.training.callbacks import (
        FinalCheckpoint,
        ImageReadGuard,
        SameFolderCheckpointIO,
        StepProgress,
        StopOnNonFiniteLoss,
        TrainingLog,
        UploadsFinished,
    )

    lightning_dir = out / "lightning"
    return pl_lightning.Trainer(
        **resolved.trainer_kwargs(),
        plugins=[SameFolderCheckpointIO(mirror)],
        max_steps=config.max_steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # Batches are addressed by step and sliced per rank by StepBatchSampler itself.
        use_distributed_sampler=False,
        default_root_dir=str(lightning_dir),
        callbacks=[
            ModelCheckpoint(
                dirpath=str(lightning_dir),
                save_top_k=0,
                save_last=True,
                every_n_train_steps=config.checkpoint_every_n_steps,
                # Always `last.ckpt`: after a resume from another folder (a fetched resume
                # point, a moved home) it would otherwise write `last-v1.ckpt` beside it, and
                # the resume point would stay behind.
                enable_version_counter=False,
            ),
            TrainingLog(out / "loss_curve.csv"),
            # Before the NaN stop: a step whose images all failed has no loss to speak of.
            ImageReadGuard(config_name, config.max_unreadable_image_fraction),
            StopOnNonFiniteLoss(config_name, config.learning_rate, config.temperature),
            record or RunRecord(""),
            StepProgress(f"training {config_name}", say),
            FinalCheckpoint(lightning_dir / "last.ckpt", config.checkpoint_every_n_steps),
            *extra_callbacks,
            # Last: the checkpoints of the end or of a stop are queued before it waits.
            *([UploadsFinished(mirror)] if mirror is not None else []),
        ],
    )


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` torch threads (None: unchanged), restoring the count after."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_PUBLISHED_FILES = ("loss_curve.csv", "loss.png", "quarantine.parquet", "run.json")


def _publish(work: Path, published: DataPath) -> DataPath:
    """Copy the results to the data root when training ran elsewhere (an object store).

    The export's config is uploaded last, so a reader never sees a config beside old weights.
    `run.json` goes last of all, naming what the store then says about the content of each
    export file and of the resume point (`published_objects`: ETag and size), so a later run
    can tell that the export there is still the one made from that checkpoint
    (`_published_export`).
    """
    if is_local(published) and Path(published) == work:
        return published
    names = [f"open_clip/{p.name}" for p in sorted((work / "open_clip").iterdir())]
    names.sort(key=lambda name: name.endswith(CONFIG_NAME))
    names += [name for name in _PUBLISHED_FILES if (work / name).is_file() and name != "run.json"]
    for name in names:
        upload_file(work / name, published / name)
    exported = [name for name in names if name.startswith("open_clip/")]
    stamps = {name: _object_stamp(published / name) for name in [*exported, RESUME_POINT]}
    state = _read_json(work / "run.json")
    if all(stamps.values()):  # a store that names content (S3's ETag); else never skipped
        state["published_objects"] = stamps
        _write_json(work / "run.json", state)
    upload_file(work / "run.json", published / "run.json")
    return published


# What must be among a finished run's `published_objects` for its export to be reused.
_EXPORT_OBJECTS = {RESUME_POINT, f"open_clip/{WEIGHTS_NAME}", f"open_clip/{CONFIG_NAME}"}


def _object_stamp(path: DataPath) -> str | None:
    """What the store says about an object's content (ETag or MD5, and size; one HEAD), None
    when it names no content (a store without ETags) or the object is missing."""
    try:
        info = path.fs.info(path.path)
    except (FileNotFoundError, OSError):
        return None
    content = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return f"{content}:{info.get('size')}" if content else None


def _published_export(
    published: DataPath, fingerprint: str, max_steps: int
) -> dict[str, Any] | None:
    """The published `run.json` when the store already holds this run's finished export, made
    from the resume point it holds (every object as `_publish` left it); else None.

    "Finished" is what it is on the training machine: a `run.json` of this fingerprint marked
    complete at (or past) `max_steps`, here with its export verified when it was made.
    """
    remote = _read_json(published / "run.json")
    objects = remote.get("published_objects")
    step = remote.get("resume_step")
    if (
        remote.get("fingerprint") != fingerprint
        or remote.get("complete") is not True
        or not isinstance(step, int)
        or step < max_steps
        or not remote.get("export_check")
        or not isinstance(objects, dict)
        or not _EXPORT_OBJECTS.issubset(objects)
    ):
        return None
    if any(_object_stamp(published / name) != stamp for name, stamp in objects.items()):
        return None  # replaced since (by hand, or a run that failed half-way): export again
    return remote


def _withdraw_stale_publication(
    published: DataPath, work: Path, fingerprint: str, say: Callable[[str], None]
) -> None:
    """Remove results and the resume point another fingerprint published to an object store
    before training anew.

    On a local data root `_prepare_output_dir` already cleared them (the folders are one). On
    an object store the old export would otherwise stay there for the whole new run, and for
    good if it fails, as this config's checkpoint: the evaluation would find and score it.
    """
    if is_local(published) and Path(published) == work:
        return
    if _read_json(published / "run.json").get("fingerprint") == fingerprint:
        return
    # The config first: an export folder without it is incomplete to every reader.
    export = published / "open_clip"
    names = [p.name for p in export.iterdir()] if export.exists() else []
    names.sort(key=lambda name: name != CONFIG_NAME)
    stale = [
        *(export / name for name in names),
        published / RESUME_POINT,
        *(published / name for name in _PUBLISHED_FILES),
    ]
    removed = [path for path in stale if path.exists()]
    for path in removed:
        path.unlink()
    if removed:
        say(f"removed the results of earlier settings or data from {published}")


def rows_fingerprint(rows: pl.DataFrame) -> str:
    """A hash of the training rows, in order. Polars keeps its row hash stable within one
    version only, so after a polars upgrade a checkpoint at worst trains again from scratch."""
    digest = hashlib.sha256()
    for seed in (0, 1):  # two 64-bit hashes per row: collisions are out of the question
        digest.update(rows.hash_rows(seed=seed).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def _prepare_output_dir(
    out: Path, state: dict[str, Any], say: Callable[[str], None]
) -> tuple[Path | None, CheckpointRecord | None]:
    """Clear outputs of another fingerprint than `state`'s; return (checkpoint to resume, its
    record). `state` (fingerprint, science settings, data) becomes `run.json`."""
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "run.json"
    previous = _read_json(state_path)
    last = out / RESUME_POINT
    if previous.get("fingerprint") != state["fingerprint"]:
        if previous or last.exists():
            say(
                f"{out}: {_what_changed(previous, state)} since the last run; training from scratch"
            )
        # The old export goes too: the checkpoint sensor must not score it as this config's.
        clear_work_folder(out)
        _write_json(state_path, {**state, "complete": False})
        return None, None
    if previous.get("image_paths") not in (None, state["image_paths"]):
        say(
            f"{out}: the training images moved since the last run (same contents): its "
            "checkpoint still applies"
        )
    if not last.is_file():
        if previous.get("complete"):
            say(
                f"{last} is gone (deleted to save space?); the finished run cannot be exported "
                "again without it, so it trains again from scratch with the same settings"
            )
        return None, None
    record = read_checkpoint_record(last)
    if record is None or record.fingerprint not in (None, state["fingerprint"]):
        # None: written before checkpoints carried their fingerprint; run.json vouches for it.
        aside = last.with_name(f"last.ckpt.unusable-{int(time.time())}")
        last.rename(aside)
        why = "cannot be read" if record is None else "belongs to another run"
        say(f"{last} {why}; moved to {aside.name} and training from scratch")
        return None, None
    return last, record


def _what_changed(previous: dict[str, Any], current: dict[str, Any]) -> str:
    """Why a run starts over, e.g. "learning_rate 0.0005 -> 0.001; the training rows changed"."""
    old_settings, new_settings = previous.get("settings"), current["settings"]
    if old_settings is None:  # written before run.json kept them
        return "settings or data changed"
    changes = [
        f"{name} {old_settings.get(name)!r} -> {value!r}"
        for name, value in new_settings.items()
        if old_settings.get(name) != value
    ]
    old_data, new_data = previous.get("data", {}), current["data"]
    if old_data.get("rows") != new_data["rows"]:
        changes.append("the training rows changed (triplets, held-out split or image contents)")
    elif old_data.get("heldout_split") != new_data["heldout_split"]:
        changes.append(
            f"held-out split {old_data.get('heldout_split')} -> {new_data['heldout_split']}"
        )
    if old_data.get("recipe") != new_data.get("recipe"):
        changes.append(
            f"training recipe {old_data.get('recipe') or 'mmret-clip-v1'} -> "
            f"{new_data.get('recipe')} (how hard negatives are drawn, the warm-up)"
        )
    return "; ".join(changes) or "settings or data changed"


def _saved_step(path: Path) -> int | None:
    record = read_checkpoint_record(path)
    return record.step if record else None


class _quiet_lightning:
    """Silence Lightning's start-up banners and advice that do not apply to this setup."""

    _ADVICE = (
        # Batches are addressed by step (StepBatchSampler), so a mid-epoch resume is exact.
        r".*resuming from a checkpoint that ended before the epoch ended.*",
        # A finished run re-materializes from its last checkpoint with no batches left.
        r".*Total length of .* across ranks is zero.*",
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
        r".*does not have many workers.*",
        r".*`max_epochs=-1`.*",
        r".*Checkpoint directory .* exists and is not empty.*",
        # A resume point fetched onto another machine (or home): the folder differs, by design.
        r".*The dirpath has changed from .* won't be reloaded.*",
        r".*The number of training batches .* is smaller than the logging interval.*",
    )

    def __enter__(self) -> None:
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        for pattern in self._ADVICE:
            warnings.filterwarnings("ignore", message=pattern)
        self._loggers = {}
        for name in ("lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            self._loggers[name] = logger.level
            logger.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        for name, level in self._loggers.items():
            logging.getLogger(name).setLevel(level)
        self._warnings.__exit__(*exc)


def _throughput(curve: pl.DataFrame, batch_size: int, hard_negatives: int) -> dict[str, float]:
    """Median step time of the steps this process timed, as queries and images per second."""
    timed = curve["step_s"].drop_nans().drop_nulls() if curve.height else pl.Series([])
    if timed.len() == 0:
        return {}
    median_s = float(timed.median())
    return {
        "median_step_s": round(median_s, 4),
        "samples_per_s": round(batch_size / median_s, 2),
        "images_per_s": round(batch_size * (1 + hard_negatives) / median_s, 2),
    }


def _loss_summary(curve: pl.DataFrame) -> dict[str, float]:
    if curve.is_empty():
        return {}
    first, last = _loss_windows(curve)
    return {"loss_first_steps": round(first, 4), "loss_last_steps": round(last, 4)}


def _loss_windows(curve: pl.DataFrame) -> tuple[float, float]:
    window = max(1, math.ceil(curve.height * _LOSS_WINDOW_FRACTION))
    return float(curve["loss"].head(window).mean()), float(curve["loss"].tail(window).mean())


def _loss_decreased(curve: pl.DataFrame) -> CheckOutcome:
    """Mean loss of the last 10% of steps is below that of the first 10%."""
    name = "loss_decreased"
    if curve.height < 2:
        return CheckOutcome(name, False, "fewer than 2 logged steps", 1)
    first, last = _loss_windows(curve)
    passed = last < first
    detail = f"mean loss {first:.4f} over the first steps -> {last:.4f} over the last"
    return CheckOutcome(
        name, passed, ("ok: " if passed else "not decreasing: ") + detail, 0 if passed else 1
    )


def _quiet(message: str) -> None:
    """The default log: nothing (a module-level function, so `ddp_spawn` can pickle it)."""


def _failed_image_examples(trainer: Any) -> tuple[str, ...]:
    """A few images this process failed to read (none known when ranks ran in children)."""
    from megapairs_assets.training.callbacks import ImageReadGuard

    guards = [c for c in trainer.callbacks if isinstance(c, ImageReadGuard)]
    return tuple(guards[0].examples) if guards else ()


def _images_loaded(
    curve: pl.DataFrame, max_unreadable_fraction: float, examples: tuple[str, ...] = ()
) -> CheckOutcome:
    """Every image of every step loaded (a failed target or query image drops its query)."""
    name = "images_loaded"
    failed = int(curve["failed_images"].sum()) if curve.height else 0
    dropped = int(curve["dropped_queries"].sum()) if curve.height else 0
    if not failed:
        return CheckOutcome(name, True, "ok: every image of every step was read")
    reads = int(curve["image_reads"].sum()) if curve.height else 0
    share = f" of {reads} ({failed / reads:.1%})" if reads else ""
    return CheckOutcome(
        name,
        False,
        f"{failed}{share} image reads failed over {curve.height} steps; {dropped} queries were "
        "left out of the loss (their target or query image); the rest trained (a run stops "
        f"when more than {max_unreadable_fraction:.0%} fail: max_unreadable_image_fraction)",
        failed,
        examples,
    )


def _model_id(model: str, pretrained: str | None) -> str:
    if pretrained and Path(pretrained).is_file():
        pretrained = "/".join(Path(pretrained).resolve().parts[-2:])
    return f"open_clip:{model}" + (f"@{pretrained}" if pretrained else "")


def _read_json(path: DataPath) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))

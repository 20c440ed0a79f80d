"""Uploads of the resume point run beside training, and a finished config is not fetched again.

With the data root on moto's S3 server (127.0.0.1; the fixture of
tests/test_training_newuser_resume_store.py), observed with boto3:

- a slow store does not slow the steps: uploads happen while training goes on, one at a time
  (never two of one key at once), a newer resume point replaces a waiting older one, and the
  end of the fit, or a stop, waits for the last one;
- a failed upload is a warning and a count in the result; the local checkpoint stays and the
  final resume point is still published;
- a finished config run again on a fresh machine downloads neither its checkpoint nor exports
  it again while the store holds the export made from it; a replaced export is made again.

Slowness and failures are injected into `resume.upload_file` (the faults); the uploads
themselves are real.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl_lightning
import pytest

# `s3`: the moto server fixture, registered in this module by the import.
from test_training_newuser_resume_store import BUCKET, _LostAfter, _object, s3  # noqa: F401
from test_training_support import OneThread, tiny_config, write_triplets

from megapairs_assets.training import resume
from megapairs_assets.training.train import train_checkpoint
from resources.storage import StorageResource

UPLOAD_DELAY_S = 0.6


class _StepClock(pl_lightning.Callback):
    """The step training is at, readable from the upload thread."""

    def __init__(self) -> None:
        self.step = 0

    def on_train_batch_end(self, trainer: pl_lightning.Trainer, *args: object) -> None:
        self.step = trainer.global_step


class _Store:
    """`resume.upload_file` with a slow (or failing) checkpoint upload, watching overlaps."""

    def __init__(self, clock: _StepClock, fail_first: int = 0) -> None:
        self.clock = clock
        self.fail_first = fail_first
        self.real = resume.upload_file
        self.lock = threading.Lock()
        self.in_flight: dict[str, int] = {}
        self.most_at_once: dict[str, int] = {}
        self.checkpoint_uploads: list[tuple[int, int]] = []  # (training step at start, at end)
        self.attempts = 0

    def upload_file(self, source: Path, target) -> None:
        key = str(target)
        with self.lock:
            self.in_flight[key] = self.in_flight.get(key, 0) + 1
            self.most_at_once[key] = max(self.most_at_once.get(key, 0), self.in_flight[key])
        try:
            if key.endswith(resume.RESUME_POINT):
                self.attempts += 1
                started = self.clock.step
                time.sleep(UPLOAD_DELAY_S)
                if self.attempts <= self.fail_first:
                    raise OSError("the store is unreachable (injected)")
                self.real(source, target)
                self.checkpoint_uploads.append((started, self.clock.step))
            else:
                self.real(source, target)
        finally:
            with self.lock:
                self.in_flight[key] -= 1


def _layout(tmp_path: Path, endpoint: str, prefix: str) -> Callable[[str], object]:
    def layout(machine: str):
        return StorageResource(
            home=str(tmp_path / machine), data_root=f"s3://{BUCKET}/{prefix}", endpoint_url=endpoint
        ).layout()

    return layout


def test_uploads_run_beside_training_one_at_a_time_and_the_end_waits_for_the_last(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    demo_models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, client = request.getfixturevalue("s3")
    prefix = f"bg-{uuid.uuid4().hex[:8]}"
    clock = _StepClock()
    store = _Store(clock)
    monkeypatch.setattr(resume, "upload_file", store.upload_file)
    triplets = write_triplets(tmp_path, rows=8, images=10)
    config = tiny_config(demo_models_dir, max_steps=6, checkpoint_every_n_steps=1)
    said: list[str] = []
    with OneThread():
        result = train_checkpoint(
            "bg",
            config,
            [triplets],
            _layout(tmp_path, endpoint, prefix)("pod"),
            log=said.append,
            extra_callbacks=[clock, _Slow(0.15)],
        )
    # Training went on during uploads: some step ended while a checkpoint was uploading.
    assert any(end > start for start, end in store.checkpoint_uploads), store.checkpoint_uploads
    # Six checkpoints, but a newer one replaced a waiting older one: fewer uploads than saves.
    assert 1 < len(store.checkpoint_uploads) < 6, store.checkpoint_uploads
    # One worker: never two uploads of one key at the same time.
    assert set(store.most_at_once.values()) == {1}, store.most_at_once
    # The end waited for the last one: the store holds step 6, complete.
    folder = f"{prefix}/data/mmret_clip_checkpoint/bg"
    final = json.loads(_object(client, f"{folder}/run.json"))
    assert final["complete"] is True and final["resume_step"] == 6
    assert result.metadata["failed_uploads"] == 0
    work = tmp_path / "pod/training/bg"
    assert not (work / resume.UPLOAD_SNAPSHOTS).exists()  # frozen copies cleaned up
    assert [p.name for p in (work / "lightning").iterdir()] == ["last.ckpt"]


class _Slow(pl_lightning.Callback):
    def __init__(self, step_s: float) -> None:
        self.step_s = step_s

    def on_train_batch_start(self, *args: object) -> None:
        time.sleep(self.step_s)


def test_a_stop_waits_for_the_upload_in_flight(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    demo_models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, client = request.getfixturevalue("s3")
    prefix = f"stop-{uuid.uuid4().hex[:8]}"
    store = _Store(_StepClock())
    monkeypatch.setattr(resume, "upload_file", store.upload_file)
    triplets = write_triplets(tmp_path, rows=8, images=10)
    config = tiny_config(demo_models_dir, max_steps=4, checkpoint_every_n_steps=2)
    with OneThread(), pytest.raises(RuntimeError, match="the pod was lost"):
        train_checkpoint(
            "stop",
            config,
            [triplets],
            _layout(tmp_path, endpoint, prefix)("pod"),
            extra_callbacks=[_LostAfter(3)],  # lost right after the checkpoint of step 2
        )
    # The upload of step 2 (slower than step 3) finished before the step gave up.
    uploaded = json.loads(_object(client, f"{prefix}/data/mmret_clip_checkpoint/stop/run.json"))
    assert uploaded["resume_step"] == 2


def test_a_failed_upload_is_a_warning_and_a_count_and_loses_nothing(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    demo_models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, client = request.getfixturevalue("s3")
    prefix = f"fail-{uuid.uuid4().hex[:8]}"
    store = _Store(_StepClock(), fail_first=1)
    monkeypatch.setattr(resume, "upload_file", store.upload_file)
    triplets = write_triplets(tmp_path, rows=8, images=10)
    config = tiny_config(demo_models_dir, max_steps=4, checkpoint_every_n_steps=2)
    said: list[str] = []
    with OneThread():
        result = train_checkpoint(
            "fail", config, [triplets], _layout(tmp_path, endpoint, prefix)("pod"), log=said.append
        )
    warnings = [line for line in said if line.startswith("warning:")]
    assert any("could not upload the resume point of step 2" in line for line in warnings), said
    assert any("1 upload(s) of the resume point failed" in line for line in warnings), said
    assert result.metadata["failed_uploads"] == 1
    assert (tmp_path / "pod/training/fail/lightning/last.ckpt").is_file()
    final = json.loads(_object(client, f"{prefix}/data/mmret_clip_checkpoint/fail/run.json"))
    assert final["complete"] is True and final["resume_step"] == 4


def test_a_finished_config_on_a_fresh_machine_downloads_and_exports_nothing(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    demo_models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, client = request.getfixturevalue("s3")
    prefix = f"done-{uuid.uuid4().hex[:8]}"
    layout = _layout(tmp_path, endpoint, prefix)
    triplets = write_triplets(tmp_path, rows=8, images=10)
    config = tiny_config(demo_models_dir, max_steps=2, checkpoint_every_n_steps=2)
    with OneThread():
        first = train_checkpoint("done", config, [triplets], layout("pod1"))
    folder = f"{prefix}/data/mmret_clip_checkpoint/done"
    weights_key = f"{folder}/open_clip/open_clip_model.safetensors"
    before = client.head_object(Bucket=BUCKET, Key=weights_key)

    fetched: list[str] = []
    real_fetch = resume.fetch_resume_point
    monkeypatch.setattr(
        "megapairs_assets.training.train.fetch_resume_point",
        lambda *args: fetched.append("fetch") or real_fetch(*args),
    )
    said: list[str] = []
    with OneThread():
        again = train_checkpoint("done", config, [triplets], layout("pod2"), log=said.append)
    assert fetched == [] and not (tmp_path / "pod2/training/done/lightning").exists()
    assert any("nothing downloaded, trained or exported" in line for line in said), said
    after = client.head_object(Bucket=BUCKET, Key=weights_key)
    assert after["LastModified"] == before["LastModified"]  # not uploaded again
    assert again.row_counts == first.row_counts and again.outputs == first.outputs
    assert again.metadata["fit_s"] == first.metadata["fit_s"]
    assert all(outcome.passed for outcome in again.outcomes[:1])
    assert again.metadata["fit_s_this_run"] == 0.0

    # The export replaced in the store (another content): fetched and exported again.
    client.put_object(Bucket=BUCKET, Key=weights_key, Body=b"not the export")
    said.clear()
    with OneThread():
        train_checkpoint("done", config, [triplets], layout("pod3"), log=said.append)
    assert fetched == ["fetch"]
    assert any("fetched the resume point of step 2" in line for line in said), said
    assert _object(client, weights_key) != b"not the export"

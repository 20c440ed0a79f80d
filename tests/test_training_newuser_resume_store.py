"""A training step retried on another machine, with the data root on an S3-compatible store
(moto's server on 127.0.0.1, observed with boto3, a client independent of the code's s3fs).

- every `last.ckpt` written is uploaded under the config's folder (one PUT, no temporary key),
  with the loss curve and a `run.json` naming its fingerprint and step;
- a retry on a machine with an empty `$MEGAPAIRS_HOME` fetches it and resumes at that step,
  with the whole loss curve and the fit time of both processes (`fit_s`, `fit_s_this_run`);
- a resume point of other settings is never fetched: it is withdrawn with the old results, and
  one whose embedded fingerprint disagrees with `run.json` is refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl_lightning
import pytest
import torch
from test_training_support import OneThread, tiny_config, write_triplets

from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.training.callbacks import read_loss_curve
from megapairs_assets.training.resume import fetch_resume_point
from megapairs_assets.training.train import train_checkpoint
from resources.storage import StorageResource

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

BUCKET = "megapairs-resume"
# Any value: moto accepts every key, and real credentials must never reach a test.
_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[str, object]]:
    """(endpoint URL, boto3 client) of a moto server holding an empty bucket."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as env:
        for name, value in _FAKE_AWS_ENV.items():
            env.setenv(name, value)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            yield endpoint, client
        finally:
            server.stop()


def _keys(client, prefix: str) -> list[str]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def _object(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


class _LostAfter(pl_lightning.Callback):
    """Slow steps (measurable fit time), then the machine is lost before step `lost_at`."""

    def __init__(self, lost_at: int, step_s: float = 0.0) -> None:
        self.lost_at, self.step_s = lost_at, step_s

    def on_train_batch_start(self, trainer: pl_lightning.Trainer, *args: object) -> None:
        if trainer.global_step + 1 >= self.lost_at:
            raise RuntimeError("the pod was lost")
        time.sleep(self.step_s)


def test_a_retry_on_a_fresh_machine_resumes_from_the_uploaded_checkpoint(
    s3, tmp_path: Path, demo_models_dir: Path
) -> None:
    endpoint, client = s3
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    triplets = write_triplets(tmp_path, rows=8, images=10)
    config = tiny_config(demo_models_dir, max_steps=4, checkpoint_every_n_steps=2)

    def layout(machine: str) -> DataLayout:
        home = tmp_path / machine
        return StorageResource(
            home=str(home), data_root=f"s3://{BUCKET}/{prefix}", endpoint_url=endpoint
        ).layout()

    folder = f"{prefix}/data/mmret_clip_checkpoint/remote"
    # The first machine trains steps 1-2 (checkpoint at 2) and is lost at step 3.
    with OneThread(), pytest.raises(RuntimeError, match="the pod was lost"):
        train_checkpoint(
            "remote", config, [triplets], layout("pod1"), extra_callbacks=[_LostAfter(3, 0.25)]
        )
    keys = _keys(client, folder)
    assert f"{folder}/lightning/last.ckpt" in keys
    assert [k for k in keys if ".tmp-" in k] == []
    uploaded = json.loads(_object(client, f"{folder}/run.json"))
    assert uploaded["resume_step"] == 2 and uploaded["complete"] is False
    checkpoint = torch.load(io.BytesIO(_object(client, f"{folder}/lightning/last.ckpt")))
    assert checkpoint["global_step"] == 2
    assert checkpoint["callbacks"]["RunRecord"]["fingerprint"] == uploaded["fingerprint"]
    assert checkpoint["callbacks"]["RunRecord"]["fit_s"] >= 0.5  # two steps of >= 0.25 s
    shutil.rmtree(tmp_path / "pod1")  # the retry runs where nothing of pod1 is

    said: list[str] = []
    with OneThread():
        result = train_checkpoint("remote", config, [triplets], layout("pod2"), log=said.append)
    assert result.metadata["resumed_from_step"] == 2 and result.metadata["steps"] == 4
    assert any("fetched the resume point of step 2" in line for line in said), said
    # Every checkpoint after the fetch went to last.ckpt (the resume point), no `last-v1.ckpt`.
    assert [p.name for p in (tmp_path / "pod2/training/remote/lightning").iterdir()] == [
        "last.ckpt"
    ]
    # The curve is whole: the first machine's steps came back with the checkpoint.
    assert read_loss_curve(tmp_path / "pod2/training/remote/loss_curve.csv")["step"].to_list() == [
        1,
        2,
        3,
        4,
    ]
    # fit_s: both machines' fit time; fit_s_this_run: the second's alone.
    earlier = checkpoint["callbacks"]["RunRecord"]["fit_s"]
    assert result.metadata["fit_s_this_run"] > 0
    assert result.metadata["fit_s"] == pytest.approx(
        earlier + result.metadata["fit_s_this_run"], abs=0.02
    )
    final = json.loads(_object(client, f"{folder}/run.json"))
    assert final["complete"] is True and final["resume_step"] == 4
    final_checkpoint = torch.load(io.BytesIO(_object(client, f"{folder}/lightning/last.ckpt")))
    assert final_checkpoint["global_step"] == 4
    assert str(result.outputs["lightning_checkpoint"]).startswith("s3://")

    # New settings on a third machine: the old resume point is withdrawn, never resumed, even
    # when the new run fails before writing its own.
    said.clear()
    changed = dataclasses.replace(config, learning_rate=config.learning_rate * 10)
    with OneThread(), pytest.raises(RuntimeError, match="the pod was lost"):
        train_checkpoint(
            "remote",
            changed,
            [triplets],
            layout("pod3"),
            log=said.append,
            extra_callbacks=[_LostAfter(1)],
        )
    assert not any("fetched" in line or "resuming" in line for line in said), said
    assert _keys(client, f"{folder}/lightning/") == []
    assert f"{folder}/run.json" not in _keys(client, folder)
    assert [k for k in _keys(client, prefix) if ".tmp-" in k] == []


def test_a_resume_point_whose_embedded_fingerprint_disagrees_is_not_used(
    tmp_path: Path,
) -> None:
    """`run.json` and the checkpoint are two objects: the checkpoint's own record decides."""
    layout = DataLayout(tmp_path / "home", data_root=f"memory://{uuid.uuid4().hex}/m")
    published = layout.asset_dir("mmret_clip_checkpoint") / "c"
    state = {"fingerprint": "aaaa", "settings": {}, "data": {}}
    (published / "run.json").write_text(json.dumps({**state, "resume_step": 3}))
    local = tmp_path / "ckpt"
    torch.save({"global_step": 3, "callbacks": {"RunRecord": {"fingerprint": "bbbb"}}}, local)
    (published / "lightning").mkdir(parents=True, exist_ok=True)
    (published / "lightning" / "last.ckpt").write_bytes(local.read_bytes())
    work = tmp_path / "work"
    said: list[str] = []

    assert fetch_resume_point(published, work, state, said.append) is None
    assert not (work / "lightning" / "last.ckpt").exists()
    assert "not this run's aaaa" in said[0]

    torch.save({"global_step": 3, "callbacks": {"RunRecord": {"fingerprint": "aaaa"}}}, local)
    (published / "lightning" / "last.ckpt").write_bytes(local.read_bytes())
    assert fetch_resume_point(published, work, state, said.append) == 3
    assert json.loads((work / "run.json").read_text())["fingerprint"] == "aaaa"

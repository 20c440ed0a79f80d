"""Which GPU a step takes: the launcher's LOCAL_RANK, and clear errors for GPUs not there.

No GPU is needed: torch's view of the GPUs is replaced, since only the choice is under test.
"""

from __future__ import annotations

import pytest
import torch

from megapairs_assets.lib.errors import ConfigurationError
from resources.device import DeviceResource


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_auto_takes_the_launchers_local_rank(two_gpus, monkeypatch) -> None:
    assert DeviceResource().torch_device() == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert DeviceResource().torch_device() == torch.device("cuda:1")
    assert DeviceResource().torch_dtype() is torch.bfloat16


def test_a_gpu_index_past_the_visible_ones_is_refused_with_the_count(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ConfigurationError, match=r"LOCAL_RANK asks for cuda:3 .* only 2 GPU"):
        DeviceResource().torch_device()
    with pytest.raises(ConfigurationError, match=r"device asks for cuda:2 .* only 2 GPU"):
        DeviceResource(device="cuda:2").torch_device()
    assert DeviceResource(device="cuda:1").torch_device() == torch.device("cuda:1")


def test_a_bad_device_name_or_rank_is_a_configuration_error(two_gpus, monkeypatch) -> None:
    with pytest.raises(ConfigurationError, match="not a torch device name"):
        DeviceResource(device="gpu0").torch_device()
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(ConfigurationError, match="not a GPU index"):
        DeviceResource().torch_device()


def test_without_a_gpu_auto_is_the_cpu_whatever_the_rank(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert DeviceResource().torch_device() == torch.device("cpu")
    with pytest.raises(ConfigurationError, match="no CUDA GPU is visible"):
        DeviceResource(device="cuda").torch_device()

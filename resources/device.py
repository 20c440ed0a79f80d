"""Which accelerator a step uses, injected into GPU assets as a Dagster resource."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

import dagster as dg

from megapairs_assets.lib.errors import ConfigurationError

if TYPE_CHECKING:
    import torch

# torch is imported where a device is asked for, not here: resources.profiles imports this
# module, and commands that never run a model (`megapairs lineage`, `config`, `--help`) would
# otherwise pay ~1.4 s and ~0.5 GB for torch before doing anything.
_DTYPE_NAMES = ("float32", "float16", "bfloat16")


class DeviceResource(dg.ConfigurableResource):
    """Device and numeric precision for model forward passes.

    `device="auto"` picks a visible GPU, else the CPU: `cuda:$LOCAL_RANK` when a launcher
    (torchrun, Lightning, Ray Train) set one, else `cuda:0`. Several steps sharing one
    multi-GPU machine each get their own GPU by the usual means: one GPU per pod (the k8s
    executor), or `CUDA_VISIBLE_DEVICES` per worker. `dtype="auto"` picks bfloat16 on a GPU
    (fast tensor cores, fp32 range) and float32 on the CPU (where half precision is slower,
    not faster).
    """

    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            if not torch.cuda.is_available():
                return torch.device("cpu")
            return _checked_cuda(torch.device("cuda", _local_rank()), "LOCAL_RANK")
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise ConfigurationError(
                f"device {self.device!r} is not a torch device name (auto, cpu, cuda, cuda:N)"
            ) from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigurationError(
                f"device {self.device!r} was asked for but no CUDA GPU is visible"
            )
        return _checked_cuda(device, "device") if device.type == "cuda" else device

    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        assert self.dtype in _DTYPE_NAMES  # the Literal field type already refuses others
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        """`cuda:0 (NVIDIA H100 80GB HBM3), bfloat16`; on the CPU it says why the CPU, since a
        GPU step that lands on a machine without a visible GPU (a pod without a GPU request,
        `CUDA_VISIBLE_DEVICES` empty) still runs, many times slower."""
        import torch

        device = self.torch_device()
        dtype = str(self.torch_dtype()).removeprefix("torch.")
        if device.type == "cuda":
            return f"{device} ({torch.cuda.get_device_name(device)}), {dtype}"
        why = " (no CUDA GPU visible)" if self.device == "auto" else ""
        return f"{device}{why}, {dtype}"


def _local_rank() -> int:
    """This process's GPU index from a launcher's LOCAL_RANK (0 when none set it)."""
    value = os.environ.get("LOCAL_RANK", "0").strip() or "0"
    if not value.isdigit():
        raise ConfigurationError(f"LOCAL_RANK={value!r} is not a GPU index (0, 1, ...)")
    return int(value)


def _checked_cuda(device: torch.device, setting: str) -> torch.device:
    """`device` when its index names a visible GPU; otherwise a ConfigurationError saying how
    many are visible (an index past them would fail later inside CUDA, less clearly)."""
    import torch

    visible = torch.cuda.device_count()
    if device.index is not None and device.index >= visible:
        raise ConfigurationError(
            f"{setting} asks for {device} but only {visible} GPU(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})"
        )
    return device

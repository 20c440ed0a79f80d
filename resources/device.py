"""Which accelerator a step uses, injected into GPU assets as a Dagster resource."""

from __future__ import annotations

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

    `device="auto"` picks `cuda:0` when a GPU is visible, else the CPU; `dtype="auto"` picks
    bfloat16 on a GPU (fast tensor cores, fp32 range) and float32 on the CPU (where half
    precision is slower, not faster).
    """

    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigurationError(
                f"device {self.device!r} was asked for but no CUDA GPU is visible"
            )
        return device

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

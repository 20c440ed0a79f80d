"""Pad gated-MLP hidden widths to a tensor-core-friendly multiple, with the same outputs.

EVA02-L-14's SwiGLU MLP is 2730 wide (1024 x 8/3). On an H200 its products at that width ran at
223-257 TFLOP/s against 714-763 at 2736 (benchmarks/README.md, "GPU"): cuBLAS picks slow kernels
when an inner dimension is not a multiple of 8. The MLP is two thirds of the model's FLOPs.

Padding is exact: the extra hidden units get zero weights and biases, so both gate and value are
0 there and SiLU(0) * 0 = 0; the sub-layer LayerNorm (EVA's `scale_mlp`) is replaced by one
that normalises over the real units only and writes 0 into the padding, and `fc2` gets zero
input columns for the padding. Works on timm's `SwiGLU` (what open_clip's EVA towers use); other
modules are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

# Tensor cores want inner dimensions in multiples of 8 elements for 16-bit types.
TENSOR_CORE_MULTIPLE = 8


class PrefixLayerNorm(nn.Module):
    """LayerNorm over the first `features` of the last dimension; the rest must be 0 and stays 0.

    The mean and variance are those of the real units: padding adds nothing to the sum, and its
    `(0 - mean)^2` terms are taken back out of the sum of squares. Zero weight and bias on the
    padding keep its output 0.
    """

    def __init__(self, norm: nn.LayerNorm, padded_features: int) -> None:
        super().__init__()
        (features,) = norm.normalized_shape
        self.features = int(features)
        self.eps = float(norm.eps)
        like = norm.weight if norm.weight is not None else torch.empty(0)
        weight = torch.zeros(padded_features, dtype=like.dtype, device=like.device)
        bias = torch.zeros_like(weight)
        with torch.no_grad():
            weight[: self.features] = norm.weight if norm.weight is not None else 1.0
            if norm.bias is not None:
                bias[: self.features] = norm.bias
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        n_padding = hidden.shape[-1] - self.features
        values = hidden.float()
        mean = values.sum(dim=-1, keepdim=True) / self.features
        centered = values - mean
        squares = centered.square().sum(dim=-1, keepdim=True) - n_padding * mean.square()
        variance = squares.clamp_min(0) / self.features
        normed = centered * torch.rsqrt(variance + self.eps)
        return (normed * self.weight.float() + self.bias.float()).to(hidden.dtype)


def pad_gated_mlp_widths(model: nn.Module, multiple: int = TENSOR_CORE_MULTIPLE) -> int:
    """Pad every timm `SwiGLU` in `model` whose hidden width is not a multiple of `multiple`.

    In place; returns how many were padded. The model's outputs do not change beyond float
    rounding of the LayerNorm's statistics.
    """
    from timm.layers import SwiGLU

    padded = 0
    for module in model.modules():
        if not isinstance(module, SwiGLU):
            continue
        width = module.fc1_g.out_features
        target = width + (-width % multiple)
        if target == width:
            continue
        if not isinstance(module.norm, nn.LayerNorm | nn.Identity):
            continue  # a norm we cannot restrict to the real units: keep the module exact
        module.fc1_g = _pad_linear_outputs(module.fc1_g, target)
        module.fc1_x = _pad_linear_outputs(module.fc1_x, target)
        if isinstance(module.norm, nn.LayerNorm):
            module.norm = PrefixLayerNorm(module.norm, target)
        module.fc2 = _pad_linear_inputs(module.fc2, target)
        padded += 1
    return padded


def _pad_linear_outputs(linear: nn.Linear, out_features: int) -> nn.Linear:
    """`linear` with extra output units whose weights and bias are 0."""
    padded = _new_linear(linear, linear.in_features, out_features)
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[: linear.out_features] = linear.weight
        if linear.bias is not None and padded.bias is not None:
            padded.bias.zero_()
            padded.bias[: linear.out_features] = linear.bias
    return padded


def _pad_linear_inputs(linear: nn.Linear, in_features: int) -> nn.Linear:
    """`linear` reading extra input features with weight 0."""
    padded = _new_linear(linear, in_features, linear.out_features)
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[:, : linear.in_features] = linear.weight
        if linear.bias is not None and padded.bias is not None:
            padded.bias.copy_(linear.bias)
    return padded


def _new_linear(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    linear = nn.Linear(
        in_features,
        out_features,
        bias=like.bias is not None,
        device=like.weight.device,
        dtype=like.weight.dtype,
    )
    linear.requires_grad_(like.weight.requires_grad)
    return linear

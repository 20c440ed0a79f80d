"""Padding gated-MLP widths for tensor cores leaves a model's outputs unchanged."""

from __future__ import annotations

import pytest
import torch
from timm.layers import SwiGLU
from timm.models.eva import Eva
from torch import nn

from megapairs_assets.embeddings.mlp_padding import PrefixLayerNorm, pad_gated_mlp_widths


def _randomise(module: nn.Module) -> None:
    # Non-trivial norm weights and biases, so a padding that leaked into the statistics or the
    # output would show.
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.5)


def test_a_padded_swiglu_computes_the_same_function() -> None:
    torch.manual_seed(0)
    mlp = SwiGLU(in_features=16, hidden_features=27, norm_layer=nn.LayerNorm)
    _randomise(mlp)
    inputs = torch.randn(5, 7, 16)
    expected = mlp(inputs)

    assert pad_gated_mlp_widths(mlp) == 1
    assert mlp.fc1_g.out_features == mlp.fc1_x.out_features == mlp.fc2.in_features == 32
    assert isinstance(mlp.norm, PrefixLayerNorm)
    torch.testing.assert_close(mlp(inputs), expected, atol=1e-5, rtol=1e-5)
    # Aligned already: nothing to do the second time.
    assert pad_gated_mlp_widths(mlp) == 0


def test_padding_without_a_sub_layer_norm() -> None:
    torch.manual_seed(1)
    mlp = SwiGLU(in_features=8, hidden_features=13, norm_layer=None)
    _randomise(mlp)
    inputs = torch.randn(3, 8)
    expected = mlp(inputs)
    assert pad_gated_mlp_widths(mlp, multiple=16) == 1
    assert mlp.fc2.in_features == 16
    torch.testing.assert_close(mlp(inputs), expected, atol=1e-5, rtol=1e-5)


def test_an_eva_tower_with_padded_mlps_gives_the_same_embeddings() -> None:
    # EVA02's shape in miniature: SwiGLU with the sub-layer norm, 64 x 8/3 = 170 hidden units.
    torch.manual_seed(2)
    model = Eva(
        img_size=28,
        patch_size=14,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_ratio=4 * 2 / 3,
        swiglu_mlp=True,
        scale_mlp=True,
        use_rot_pos_emb=True,
        num_classes=0,
    ).eval()
    _randomise(model)
    images = torch.randn(4, 3, 28, 28)
    with torch.inference_mode():
        expected = model(images)
    assert pad_gated_mlp_widths(model) == 2
    with torch.inference_mode():
        padded = model(images)
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_prefix_norm_matches_layer_norm_in_half_precision(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    norm = nn.LayerNorm(10)
    _randomise(norm)
    values = torch.randn(6, 10) * 3 + 1
    expected = norm(values)
    prefix = PrefixLayerNorm(norm, 16)
    padded_values = torch.cat([values, torch.zeros(6, 6)], dim=1).to(dtype)
    out = prefix.to(dtype)(padded_values)
    assert out.dtype == dtype
    assert torch.equal(out[:, 10:], torch.zeros(6, 6, dtype=dtype))
    torch.testing.assert_close(out[:, :10].float(), expected, atol=0.05, rtol=0.05)

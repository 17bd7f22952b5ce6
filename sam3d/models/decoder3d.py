"""Multi-layer-aggregation 3D decoder: neck maps + prompted map + small image -> logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_in_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [
        nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.InstanceNorm3d(out_ch),
        nn.ReLU(inplace=True),
    ]


class MLADecoder3D(nn.Module):
    """The anchor's multi-layer aggregation head (VIT_MLAHead_h), any crop size.

    Each of ``num_levels`` maps ``B x in_dim x h x w x d`` goes through two Conv3d 3^3 with
    InstanceNorm + ReLU and is upsampled (trilinear, ``align_corners=True``) to the size of
    the small image ``B x 1 x 2h x 2w x 2d``; the levels and the image are concatenated,
    fused by a Conv3d 3^3 (IN, ReLU) and a Conv3d 3^3 to ``num_classes`` channels, and
    upsampled to the crop: ``B x num_classes x H x W x D``.
    """

    def __init__(
        self, in_dim: int = 256, dim: int = 128, num_classes: int = 2, num_levels: int = 4
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(*_conv_in_relu(in_dim, dim), *_conv_in_relu(dim, dim))
            for _ in range(num_levels)
        )
        self.cls = nn.Sequential(
            *_conv_in_relu(num_levels * dim + 1, dim),
            nn.Conv3d(dim, num_classes, kernel_size=3, padding=1, bias=False),
        )

    def forward(
        self,
        maps: Sequence[torch.Tensor],
        image_small: torch.Tensor,
        out_shape: tuple[int, int, int],
    ) -> torch.Tensor:
        """Level maps, the downsampled image, the crop size -> ``B x classes x H x W x D``."""
        if len(maps) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} maps, got {len(maps)}")
        size = tuple(image_small.shape[2:])
        levels = [
            F.interpolate(head(m), size=size, mode="trilinear", align_corners=True)
            for head, m in zip(self.heads, maps)
        ]
        x = self.cls(torch.cat([*levels, image_small.to(levels[0].dtype)], dim=1))
        return F.interpolate(x, size=tuple(out_shape), mode="trilinear", align_corners=True)

"""Multi-layer-aggregation 3D decoder: neck maps + prompted map + small image -> logits.

Only the last (prompted) map depends on the clicks. The fuse conv is linear in its
concatenated input, so its response to the other maps and the image is computed once per
crop (:meth:`MLADecoder3D.context`) and each click adds only the prompted map's part
(:meth:`MLADecoder3D.decode`): a further click skips three of the four heads and three
quarters of the biggest convolution.
"""

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
    upsampled to the crop: ``B x num_classes x H x W x D``. The last level is the prompted one.
    """

    def __init__(
        self, in_dim: int = 256, dim: int = 128, num_classes: int = 2, num_levels: int = 4
    ) -> None:
        super().__init__()
        self.dim = dim
        self.heads = nn.ModuleList(
            nn.Sequential(*_conv_in_relu(in_dim, dim), *_conv_in_relu(dim, dim))
            for _ in range(num_levels)
        )
        self.cls = nn.Sequential(
            *_conv_in_relu(num_levels * dim + 1, dim),
            nn.Conv3d(dim, num_classes, kernel_size=3, padding=1, bias=False),
        )

    def _level(self, i: int, m: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        return F.interpolate(self.heads[i](m), size=size, mode="trilinear", align_corners=True)

    def context(self, maps: Sequence[torch.Tensor], image_small: torch.Tensor) -> torch.Tensor:
        """The fuse conv's response to the unprompted maps and image: ``B x dim x 2h x 2w x 2d``.

        Args:
            maps: the ``num_levels - 1`` unprompted maps, ``B x in_dim x h x w x d``.
            image_small: ``B x 1 x 2h x 2w x 2d``.
        """
        if len(maps) != len(self.heads) - 1:
            raise ValueError(f"expected {len(self.heads) - 1} unprompted maps, got {len(maps)}")
        size = tuple(image_small.shape[2:])
        parts = [self._level(i, m, size) for i, m in enumerate(maps)]
        parts.append(image_small.to(parts[0].dtype if parts else image_small.dtype))
        w = self.cls[0].weight
        n_prev = len(maps) * self.dim
        w_ctx = torch.cat([w[:, :n_prev], w[:, -1:]], dim=1)  # all but the prompted level
        return F.conv3d(torch.cat(parts, dim=1), w_ctx, padding=1)

    def decode(
        self,
        prompted: torch.Tensor,
        context: torch.Tensor,
        out_shape: tuple[int, int, int],
        dense: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompted map ``B x in_dim x h x w x d`` and :meth:`context` -> ``B x K x H x W x D``.

        ``dense``: an optional ``B x dim x 2h x 2w x 2d`` added to the fused map before its
        InstanceNorm (the mask prompt's fine part, :class:`~sam3d.models.volumetric.
        mask_prompt3d.MaskPrompt3D`); None is the reference decoder.
        """
        level = self._level(len(self.heads) - 1, prompted, tuple(context.shape[2:]))
        n_prev = (len(self.heads) - 1) * self.dim
        w_level = self.cls[0].weight[:, n_prev : n_prev + self.dim]
        x = F.conv3d(level, w_level, padding=1) + context.to(level.dtype)
        if dense is not None:
            x = x + dense.to(x.dtype)
        x = self.cls[3](self.cls[2](self.cls[1](x)))  # IN, ReLU, classifier conv
        return F.interpolate(x, size=tuple(out_shape), mode="trilinear", align_corners=True)

    def forward(
        self,
        maps: Sequence[torch.Tensor],
        image_small: torch.Tensor,
        out_shape: tuple[int, int, int],
    ) -> torch.Tensor:
        """All maps (prompted last), the small image, the crop size -> logits, in one pass."""
        if len(maps) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} maps, got {len(maps)}")
        return self.decode(maps[-1], self.context(maps[:-1], image_small), out_shape)

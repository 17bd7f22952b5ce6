"""Small layers shared by the volumetric model: LayerNorm3d, the spatial adapter, 3D windows.

Token grids are channel-last, ``B x H x W x D x C``; feature maps are channel-first,
``B x C x H x W x D`` (MONAI's layout, slice axis last).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class LayerNorm3d(nn.Module):
    """LayerNorm over the channels of a ``B x C x H x W x D`` map (SAM's LayerNorm2d in 3D).

    Runs through ``F.layer_norm`` so autocast computes it in float32.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 4, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 4, 1, 2, 3)


class Adapter3d(nn.Module):
    """Spatial adapter at a block's input: a bottleneck with a 3x3x3 depthwise conv, residual.

    ``Linear(dim -> mid) -> ReLU -> depthwise Conv3d 3^3 -> ReLU -> Linear(mid -> dim) -> ReLU``,
    added to the input (the anchor's function, including its last ReLU).
    Input and output: ``B x H x W x D x dim`` tokens.
    """

    def __init__(self, dim: int, mid_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, mid_dim)
        self.conv = nn.Conv3d(mid_dim, mid_dim, kernel_size=3, padding=1, groups=mid_dim)
        self.linear2 = nn.Linear(mid_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.linear1(x))
        out = F.relu(self.conv(out.permute(0, 4, 1, 2, 3))).permute(0, 2, 3, 4, 1)
        return x + F.relu(self.linear2(out))


def pad_to_windows(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad a ``B x H x W x D x C`` grid at the far end to multiples of ``window_size``.

    Returns the padded grid and the padding per axis ``(ph, pw, pd)``.
    """
    h, w, d = x.shape[1:4]
    pads = tuple((window_size - s % window_size) % window_size for s in (h, w, d))
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    return x, pads  # type: ignore[return-value]


def window_partition3d(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``B x H x W x D x C`` (sides multiples of the window) -> ``(B * nW) x ws^3 x C``."""
    ws = window_size
    return rearrange(x, "b (h i) (w j) (d k) c -> (b h w d) (i j k) c", i=ws, j=ws, k=ws)


def window_unpartition3d(
    windows: torch.Tensor, window_size: int, grid: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition3d` for a padded grid of sides ``grid``."""
    ws = window_size
    h, w, d = (s // ws for s in grid)
    return rearrange(
        windows, "(b h w d) (i j k) c -> b (h i) (w j) (d k) c", h=h, w=w, d=d, i=ws, j=ws, k=ws
    )


def shift_regions(grid: tuple[int, int, int], window_size: int, shift: int) -> torch.Tensor:
    """Swin region ids of a cyclically shifted, padded grid, per axis: ``H x W x D x 3`` (0, 1, 2).

    After ``torch.roll(-shift)`` the last ``shift`` tokens of each axis come from the other end;
    tokens of different regions must not attend to each other.
    """
    ids = []
    for n in grid:
        r = torch.zeros(n, dtype=torch.long)
        r[n - window_size : n - shift] = 1
        r[n - shift :] = 2
        ids.append(r)
    hh, ww, dd = torch.meshgrid(*ids, indexing="ij")
    return torch.stack([hh, ww, dd], dim=-1)


def padding_indicator(
    grid: tuple[int, int, int], pads: tuple[int, int, int], shift: int
) -> torch.Tensor | None:
    """``H x W x D``, 1 where a token of the padded (and shifted) grid is padding; or None."""
    if not any(pads):
        return None
    h, w, d = grid
    ind = torch.zeros(h, w, d)
    ind[h - pads[0] :] = 1
    ind[:, w - pads[1] :] = 1
    ind[:, :, d - pads[2] :] = 1
    if shift:
        ind = torch.roll(ind, shifts=(-shift, -shift, -shift), dims=(0, 1, 2))
    return ind

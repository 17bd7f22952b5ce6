"""SAM-Med3D's image encoder: a plain 3D ViT (cubic patches, window / global attention with
3-axis decomposed relative position, absolute position table) and a conv neck.

State-dict keys are the official ones (``patch_embed.proj``, ``pos_embed``, ``blocks.N.attn.
rel_pos_{d,h,w}``, ``neck.{0..3}``), so official and medim weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``B x X x Y x Z x C`` -> windows ``(B * n) x w x w x w x C`` and the padded sides.

    Sides are zero-padded at the end to multiples of ``window``; the padded tokens stay in
    the windows as keys and values (the reference attends to them, so we must too).
    """
    b, sx, sy, sz, c = x.shape
    pads = [(window - s % window) % window for s in (sx, sy, sz)]
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    px, py, pz = sx + pads[0], sy + pads[1], sz + pads[2]
    x = x.view(b, px // window, window, py // window, window, pz // window, window, c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, c)
    return x, (px, py, pz)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int, int], size: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * n) x w^3 x C`` -> ``B x X x Y x Z x C``."""
    px, py, pz = padded
    n = (px // window) * (py // window) * (pz // window)
    b = windows.shape[0] // n
    x = windows.view(b, px // window, py // window, pz // window, window, window, window, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, px, py, pz, -1)
    return x[:, : size[0], : size[1], : size[2]].contiguous()


def real_rows(
    size: tuple[int, int, int], window: int, device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """Flat in-window indices of the tokens that are real (not padding) in some window of a
    grid ``size`` partitioned by :func:`window_partition`; None when all are.

    Padded tokens are keys and values of the reference's attention, but their outputs are
    cropped away, so only these queries need computing (the published 8^3 grid in one
    14^3 window: 512 of 2744).
    """
    if all(s % window == 0 for s in size):
        return None
    ones = torch.ones(1, *size, 1, device=device)
    windows, _ = window_partition(ones, window)
    real = windows.reshape(windows.shape[0], -1).amax(0) > 0
    return torch.nonzero(real).flatten()


def relative_table(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """Rows of a relative-position table ``L x C`` for every (query, key) pair: ``q x k x C``.

    A table of another length than ``2 * max(q, k) - 1`` is resized linearly (as SAM does).
    """
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T[None], size=length, mode="linear")[0].T
    q = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    return table[(q - k + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


class Attention3D(nn.Module):
    """Multi-head self-attention over a ``B x X x Y x Z x C`` token block with a decomposed
    relative-position bias along each of the three axes (MViTv2 / SAM, one more axis).

    Args:
        dim: token width.
        num_heads: heads.
        size: the block's side in tokens (the window, or the whole grid for global blocks);
            the relative tables have ``2 * size - 1`` rows.
    """

    def __init__(self, dim: int, num_heads: int, size: tuple[int, int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * size[0] - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size[1] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size[2] - 1, head_dim))

    def position_bias(
        self, q: torch.Tensor, size: tuple[int, int, int], rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``q`` ``(B*heads) x N x c`` -> additive bias ``(B*heads) x R x N`` (N = X*Y*Z) for the
        query tokens ``rows`` (flat indices, R of them; None: all N).

        The reference's bias, not MViTv2's: each axis's term ``R_a[q, k]`` (query token
        ``q = (x, y, z)``, relative index ``k`` along axis a) is added along the key's
        *last* axis, and the y and z terms are taken at the query's z position replaced by
        the key's first and second coordinates (SAM's 2D indexing ``rel[..., None]`` applied
        to 5D tensors). Its trained weights expect exactly this, so we keep it; it needs a
        cubic block (the reference's only case).
        """
        s = size[0]
        if not size[0] == size[1] == size[2]:
            raise ValueError(f"SAM-Med3D attention needs a cubic token block, got {size}")
        n = s**3
        if rows is None:
            rows = torch.arange(n, device=q.device)
        r = q.reshape(q.shape[0], s, s, s, -1)
        bias_x = torch.einsum("bxyzc,xkc->bxyzk", r, relative_table(s, s, self.rel_pos_d))
        bias_y = torch.einsum("bxyzc,ykc->bxyzk", r, relative_table(s, s, self.rel_pos_h))
        bias_z = torch.einsum("bxyzc,zkc->bxyzk", r, relative_table(s, s, self.rel_pos_w))
        column = rows // s  # the query's (x, y) as one index
        bh = q.shape[0]
        # axes: b, query row, kx, ky, kz
        bias = (
            bias_x.reshape(bh, n, s)[:, rows, None, None, :]
            + bias_y.reshape(bh, s * s, s, s)[:, column, :, None, :]
            + bias_z.reshape(bh, s * s, s, s)[:, column, None, :, :]
        )
        return bias.reshape(bh, len(rows), n)

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``B x X x Y x Z x C`` -> same shape; with ``rows`` (flat token indices) only those
        queries are computed and the other outputs are zeros (padding the caller drops)."""
        b, sx, sy, sz, c = x.shape
        n = sx * sy * sz
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, -1).unbind(0)
        bias = self.position_bias(q, (sx, sy, sz), rows)
        q_rows = q if rows is None else q[:, rows]
        # written out as the reference does: SDPA's fused kernels round differently
        attn = ((q_rows * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        out = attn @ v
        if rows is not None:
            out = out.new_zeros(q.shape).index_copy_(1, rows, out)
        out = out.view(b, self.num_heads, sx, sy, sz, -1).permute(0, 2, 3, 4, 1, 5)
        return self.proj(out.reshape(b, sx, sy, sz, c))


class Mlp(nn.Module):
    """``lin2(GELU(lin1(x)))`` (SAM's MLPBlock)."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Block3D(nn.Module):
    """Pre-norm ViT block: window (``window > 0``) or global attention, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window: int, grid: int) -> None:
        super().__init__()
        self.window = window
        side = window if window > 0 else grid
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention3D(dim, num_heads, (side, side, side))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x X x Y x Z x C`` -> same shape."""
        h = self.norm1(x)
        if self.window > 0:
            size = tuple(x.shape[1:4])
            h, padded = window_partition(h, self.window)
            h = self.attn(h, real_rows(size, self.window, x.device))
            h = window_unpartition(h, self.window, padded, size)
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class LayerNorm3d(nn.Module):
    """LayerNorm over the channels of ``B x C x X x Y x Z``, in the reference's arithmetic.

    :class:`sam3d.models.volumetric.blocks.LayerNorm3d` computes the same function through
    ``F.layer_norm``; its rounding differs by ~1e-6, which the neck's 3^3 conv over 384
    channels and the final norm amplify past 1e-5 at the published size, so SAM-Med3D's
    modules use this one (same ``weight`` / ``bias`` keys).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class PatchEmbed3D(nn.Module):
    """``B x 1 x S x S x S`` -> tokens ``B x S/p x S/p x S/p x C`` (one p^3 Conv3d)."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class ImageEncoder3D(nn.Module):
    """``B x 1 x S x S x S`` crops -> image embedding ``B x out_dim x S/p x S/p x S/p``.

    Args:
        img_size: crop side S in voxels (the absolute position table is built for it).
        patch_size: patch side p (a p^3 Conv3d with stride p).
        embed_dim, depth, num_heads, mlp_ratio: the ViT.
        window_size: window side in tokens of the non-global blocks (the grid is zero-padded
            to a multiple of it; official: 14 over an 8^3 grid, so one padded window).
        global_attn_indexes: blocks with global attention.
        out_dim: neck width (the prompt embedding width).
    """

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        out_dim: int = 384,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(
                embed_dim,
                num_heads,
                mlp_ratio,
                0 if i in global_attn_indexes else window_size,
                grid,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_dim, kernel_size=1, bias=False),
            LayerNorm3d(out_dim),
            nn.Conv3d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 1 x S x S x S`` -> ``B x out_dim x S/p x S/p x S/p``."""
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))

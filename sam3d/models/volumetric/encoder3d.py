"""3D image encoder built from SAM's ViT: folded patch embedding, 3D windows, adapters, necks.

The function is the 3DSAM-adapter encoder's (docs/REFERENCES.md section 1); the computation is
cheaper in two places, each with a ``reference`` switch that runs the anchor's formulation:

- Patch embedding. The anchor upsamples the crop x4 (trilinear, ``align_corners=False``),
  runs SAM's 16x16/stride-16 patch conv on every slice and merges depth with a depthwise
  conv (kernel = stride = 16). All three are linear, so they fold into ONE Conv3d with
  kernel 6 and stride 4 over the crop padded by one voxel (replicate): see
  :func:`upsample_fold_matrix`. The folded kernel is recomputed from SAM's 2D weights
  (frozen) and the depth conv (trainable) at every call, so the parameters keep the
  anchor's shapes; no 512^3 intermediate is ever built.
- Window attention. The decomposed relative position (three axes), the Swin shift mask
  and the padding mask are all sums of per-axis terms, so they are appended to the
  queries and keys as extra channels (``q . onehot(k_axis)`` picks the term) and the
  attention runs in ``scaled_dot_product_attention`` without a materialised bias.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn
from torch.utils.checkpoint import checkpoint

from sam3d.models.attention import attend, attend_with_bias
from sam3d.models.sam.checkpoint import LoadReport
from sam3d.models.volumetric.backbone import VolumeEncoder
from sam3d.models.volumetric.blocks import (
    Adapter3d,
    LayerNorm3d,
    pad_to_windows,
    padding_indicator,
    shift_regions,
    window_partition3d,
    window_unpartition3d,
)

# The anchor's shift-mask value: logits of tokens from another region get -100.
MASK_PENALTY = 100.0

# (grid, pads, shift, window, device) -> per-window region ids and padding, built once.
_MASK_CACHE: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}


def upsample_fold_matrix(patch_size: int, upsample: int) -> tuple[torch.Tensor, int, int]:
    """1D weights of ``upsample x`` linear interpolation seen by one patch of ``patch_size``.

    Upsampled sample ``v`` of token ``t`` reads the source at
    ``(patch_size * t + v + 0.5) / upsample - 0.5`` (``align_corners=False``), which is
    ``stride * t + offset(v)`` with ``stride = patch_size / upsample``: the same pattern for
    every token, so a patch conv after the upsample is a conv of stride ``stride`` on the
    source. Border clamping of ``F.interpolate`` equals replicate padding of the source.

    Returns ``M`` (``patch_size x K``, ``M[v, a]`` the weight of source tap ``a``), and the
    left and right replicate padding of the source.
    """
    if patch_size % upsample:
        raise ValueError(f"patch_size {patch_size} must be a multiple of upsample {upsample}")
    stride = patch_size // upsample
    src = (torch.arange(patch_size, dtype=torch.float64) + 0.5) / upsample - 0.5
    lo = torch.floor(src).long()
    frac = src - lo
    first, last = int(lo.min()), int(lo.max()) + 1
    m = torch.zeros(patch_size, last - first + 1, dtype=torch.float64)
    rows = torch.arange(patch_size)
    m[rows, lo - first] += 1 - frac
    m[rows, lo + 1 - first] += frac
    return m, -first, last - stride + 1


class PatchEmbed3D(nn.Module):
    """SAM's 2D patch conv applied slice-wise to an upsampled crop, plus a depth conv, folded.

    Parameters keep the anchor's shapes: ``proj`` is SAM's ``Conv2d(3, C, 16, 16)`` (frozen),
    ``slice_embed`` the trainable depthwise ``Conv3d(C, C, (1, 1, 16), groups=C)`` along the
    slicing axis D. The single CT channel stands for SAM's three repeated input channels.
    """

    def __init__(self, embed_dim: int, patch_size: int = 16, upsample: int = 4) -> None:
        super().__init__()
        self.patch_size, self.upsample = patch_size, upsample
        self.stride = patch_size // upsample
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.slice_embed = nn.Conv3d(
            embed_dim,
            embed_dim,
            kernel_size=(1, 1, patch_size),
            stride=(1, 1, patch_size),
            groups=embed_dim,
        )
        m, self.pad_lo, self.pad_hi = upsample_fold_matrix(patch_size, upsample)
        self.register_buffer("fold_matrix", m, persistent=False)
        self.reference = False

    def folded_weight(
        self, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The one 3D kernel ``C x 1 x K x K x K`` and bias ``C`` equal to the three steps."""
        with torch.autocast(self.proj.weight.device.type, enabled=False):
            m = self.fold_matrix.to(dtype)
            w2d = self.proj.weight.to(dtype).sum(1)  # C x p x p: the 3 channels are equal
            wd = self.slice_embed.weight.to(dtype).flatten(1)  # C x p along D
            w_in_plane = torch.einsum("cuv,ua,vb->cab", w2d, m, m)
            w_depth = wd @ m  # C x K
            weight = w_in_plane[..., None] * w_depth[:, None, None, :]
            bias = self.proj.bias.to(dtype) * wd.sum(1) + self.slice_embed.bias.to(dtype)
        return weight.unsqueeze(1), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 1 x H x W x D`` crop -> ``B x H/4 x W/4 x D/4 x C`` tokens."""
        if self.reference:
            return self.forward_reference(x)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        weight, bias = self.folded_weight(dtype)
        if not torch.is_autocast_enabled(x.device.type):
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        lo, hi = self.pad_lo, self.pad_hi
        x = F.pad(x, (lo, hi, lo, hi, lo, hi), mode="replicate")
        x = F.conv3d(x, weight, bias, stride=self.stride)
        return x.permute(0, 2, 3, 4, 1)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The anchor's formulation: x4 upsample, 2D conv per slice, depth conv (slow, big)."""
        b = x.shape[0]
        up = F.interpolate(x, scale_factor=self.upsample, mode="trilinear", align_corners=False)
        slices = up.expand(-1, 3, -1, -1, -1).permute(0, 4, 1, 2, 3).flatten(0, 1)
        tok = self.proj(slices)  # (B * D_up) x C x h x w
        tok = tok.unflatten(0, (b, -1)).permute(0, 2, 3, 4, 1)  # B x C x h x w x D_up
        return self.slice_embed(tok).permute(0, 2, 3, 4, 1)


class WindowAttention3D(nn.Module):
    """Multi-head attention in cubic windows with 3-axis decomposed relative position.

    ``rel_pos_h/w`` are SAM's tables at SAM's size (``2 * 14 - 1`` in windowed blocks,
    ``2 * 64 - 1`` in global ones) and are interpolated to ``2 * window - 1`` on use, as SAM's
    ``get_rel_pos`` does; ``rel_pos_d`` is new. Blocks with ``shift > 0`` use a Swin cyclic
    shift and mask. Grids that are not multiples of the window are zero-padded and the
    padding is masked out of the keys.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift: int = 0,
        rel_pos_size: int = 27,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size, self.shift = window_size, shift
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(rel_pos_size, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(rel_pos_size, self.head_dim))
        self.rel_pos_d = nn.Parameter(torch.zeros(rel_pos_size, self.head_dim))
        self.reference = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x D x C`` -> ``B x H x W x D x C``."""
        b, h, w, d, _ = x.shape
        ws, shift = self.window_size, self.shift
        x, pads = pad_to_windows(x, ws)
        grid = tuple(x.shape[1:4])
        if shift:
            x = torch.roll(x, shifts=(-shift,) * 3, dims=(1, 2, 3))
        out = self._attend(window_partition3d(x, ws), b, grid, pads)
        x = window_unpartition3d(out, ws, grid)
        if shift:
            x = torch.roll(x, shifts=(shift,) * 3, dims=(1, 2, 3))
        return x[:, :h, :w, :d]

    def _window_masks(
        self, b: int, grid: tuple[int, int, int], pads: tuple[int, int, int], device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-window region ids ``(B*nW) x n x 3`` (shifted blocks) and padding ``(B*nW) x n``.

        Built once per grid and device (a small cache on the module, not state).
        """
        key = (grid, pads, self.shift, self.window_size, str(device))
        if key not in _MASK_CACHE:
            ws = self.window_size
            regions = pad = None
            if self.shift:
                r = shift_regions(grid, ws, self.shift)
                regions = window_partition3d(r[None], ws).to(device)
            pad_grid = padding_indicator(grid, pads, self.shift)
            if pad_grid is not None:
                pad = window_partition3d(pad_grid[None, ..., None], ws)[..., 0].to(device)
            if len(_MASK_CACHE) > 64:
                _MASK_CACHE.clear()
            _MASK_CACHE[key] = (regions, pad)
        regions, pad = _MASK_CACHE[key]
        if regions is not None:
            regions = regions.repeat(b, 1, 1)
        if pad is not None:
            pad = pad.repeat(b, 1)
        return regions, pad

    def _attend(
        self, x: torch.Tensor, b: int, grid: tuple[int, int, int], pads: tuple[int, int, int]
    ) -> torch.Tensor:
        """``(B*nW) x n x C`` windows -> same shape."""
        bw, n, _ = x.shape
        ws, nh, hd = self.window_size, self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(bw, n, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)
        rq = q.reshape(bw, nh, ws, ws, ws, hd)
        rh = get_rel_pos(ws, ws, self.rel_pos_h).to(q.dtype)
        rw = get_rel_pos(ws, ws, self.rel_pos_w).to(q.dtype)
        rd = get_rel_pos(ws, ws, self.rel_pos_d).to(q.dtype)
        rel_h = torch.einsum("bnhwdc,hkc->bnhwdk", rq, rh).reshape(bw, nh, n, ws)
        rel_w = torch.einsum("bnhwdc,wkc->bnhwdk", rq, rw).reshape(bw, nh, n, ws)
        rel_d = torch.einsum("bnhwdc,dkc->bnhwdk", rq, rd).reshape(bw, nh, n, ws)
        regions, pad = self._window_masks(b, grid, pads, x.device)
        if self.reference:
            out = self._attend_reference(q, k, v, rel_h, rel_w, rel_d, regions, pad)
        else:
            out = self._attend_fused(q, k, v, rel_h, rel_w, rel_d, regions, pad)
        return self.proj(out.transpose(1, 2).reshape(bw, n, nh * hd))

    def _attend_fused(self, q, k, v, rel_h, rel_w, rel_d, regions, pad) -> torch.Tensor:
        """The same attention with the bias and masks folded into q / k
        (:func:`sam3d.models.attention.attend_with_bias`)."""
        bw, nh, n, hd = q.shape
        ws = self.window_size
        axis = torch.arange(n, device=q.device)
        key_pos = torch.stack([axis // (ws * ws), (axis // ws) % ws, axis % ws], dim=-1)
        onehot = F.one_hot(key_pos, ws).to(q.dtype).flatten(-2)  # n x 3ws
        q_extra = [torch.cat([rel_h, rel_w, rel_d], dim=-1)]
        k_extra = [onehot.expand(bw, nh, n, 3 * ws)]
        if regions is not None:
            # +100 per axis whose region matches: equal, up to a per-query constant that
            # softmax ignores, to the anchor's -100 for a token of another region.
            reg = F.one_hot(regions, 3).to(q.dtype).flatten(-2)[:, None].expand(bw, nh, n, 9)
            q_extra.append(reg * MASK_PENALTY)
            k_extra.append(reg)
        if pad is not None:
            q_extra.append(q.new_full((bw, nh, n, 1), -MASK_PENALTY))
            k_extra.append(pad.to(q.dtype)[:, None, :, None].expand(bw, nh, n, 1))
        return attend_with_bias(
            q, k, v, torch.cat(q_extra, dim=-1), torch.cat(k_extra, dim=-1), self.scale
        )

    def _attend_reference(self, q, k, v, rel_h, rel_w, rel_d, regions, pad) -> torch.Tensor:
        """The anchor's explicit attention: full ``n x n`` logits plus bias and mask."""
        bw, nh, n, _ = q.shape
        ws = self.window_size
        bias = (
            rel_h.view(bw, nh, n, ws, 1, 1)
            + rel_w.view(bw, nh, n, 1, ws, 1)
            + rel_d.view(bw, nh, n, 1, 1, ws)
        ).reshape(bw, nh, n, n)
        if regions is not None:
            rid = regions[..., 0] * 9 + regions[..., 1] * 3 + regions[..., 2]
            differ = rid[:, :, None] != rid[:, None, :]
            bias = bias - MASK_PENALTY * differ[:, None].to(bias.dtype)
        if pad is not None:
            bias = bias - MASK_PENALTY * pad[:, None, None, :].to(bias.dtype)
        return attend(q, k, v, mask=bias, scale=self.scale, reference=True)


class Block3D(nn.Module):
    """SAM's ViT block on a 3D token grid, with a spatial adapter at its input."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift: int,
        rel_pos_size: int,
        adapter_dim: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.adapter = Adapter3d(dim, adapter_dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = WindowAttention3D(dim, num_heads, window_size, shift, rel_pos_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x D x C`` -> same."""
        x = self.adapter(x)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _neck(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(dim, out_dim, kernel_size=1, bias=False),
        LayerNorm3d(out_dim),
        nn.Conv3d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
        LayerNorm3d(out_dim),
    )


# Parameters that come from SAM and stay frozen (the anchor's recipe).
SAM_FROZEN_SUFFIXES = (
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "attn.rel_pos_h",
    "attn.rel_pos_w",
    "mlp.lin1.weight",
    "mlp.lin1.bias",
    "mlp.lin2.weight",
    "mlp.lin2.bias",
)
SAM_FROZEN_NAMES = ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed")


class ImageEncoder3D(VolumeEncoder):
    """SAM ViT in 3D: ``B x 1 x H x W x D`` crop -> neck maps ``B x neck_dim x H/4 x W/4 x D/4``.

    Args:
        embed_dim, depth, num_heads, global_attn_indexes: the SAM ViT's shape (from
            ``configs/sam``, no default here).
        sam_window_size, sam_img_size, patch_size: the SAM encoder the weights come from
            (global blocks only differ in the size of their relative-position tables;
            every block here uses 3D windows).
        upsample: the anchor's in-plane/depth upsampling factor (a token covers
            ``patch_size / upsample`` voxels per axis).
        crop_size: the crop the depth embedding and pooled position grid are built for.
        window_size, shift_size: 3D window side and Swin shift (blocks 0, 2, 4, ... shift).
        adapter_dim: adapter bottleneck width.
        neck_blocks: 1-based block numbers after which a neck map is taken.
        neck_dim: channels of the neck maps.
        use_checkpoint: recompute blocks in backward (activation checkpointing): True for
            every block, an int ``k`` for the first ``k`` blocks (less memory, less recompute).
        freeze_sam: freeze the SAM-derived weights (patch conv, position, qkv/proj/MLP, h/w
            relative position) as the anchor does.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        global_attn_indexes: Sequence[int],
        sam_window_size: int = 14,
        sam_img_size: int = 1024,
        patch_size: int = 16,
        upsample: int = 4,
        crop_size: int = 128,
        window_size: int = 8,
        shift_size: int = 4,
        adapter_dim: int = 384,
        neck_blocks: Sequence[int] = (3, 6, 9, 12),
        neck_dim: int = 256,
        mlp_ratio: float = 4.0,
        use_checkpoint: bool | int = False,
        freeze_sam: bool = True,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed3D(embed_dim, patch_size, upsample)
        self.voxels_per_token = patch_size // upsample
        if crop_size % self.voxels_per_token:
            raise ValueError(f"crop_size {crop_size} is not a multiple of {self.voxels_per_token}")
        self.base_grid = crop_size // self.voxels_per_token
        sam_grid = sam_img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, sam_grid, sam_grid, embed_dim))
        # The anchor (ImageEncoderViT_3d_v2) starts the depth embedding at ones.
        self.depth_embed = nn.Parameter(torch.ones(1, self.base_grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(
                embed_dim,
                num_heads,
                window_size,
                shift=shift_size if i % 2 == 0 else 0,
                rel_pos_size=2 * (sam_grid if i in global_attn_indexes else sam_window_size) - 1,
                adapter_dim=adapter_dim,
                mlp_ratio=mlp_ratio,
            )
            for i in range(depth)
        )
        self.neck_blocks = [int(i) for i in neck_blocks]
        if any(not 1 <= i <= depth for i in self.neck_blocks):
            raise ValueError(f"neck_blocks {self.neck_blocks} must lie in 1..{depth}")
        self.necks = nn.ModuleList(_neck(embed_dim, neck_dim) for _ in self.neck_blocks)
        self.out_channels = int(neck_dim)
        self.num_levels = len(self.neck_blocks)
        self.use_checkpoint = use_checkpoint
        if freeze_sam:
            self.freeze_sam_weights()

    def load_pretrained(self, state: Mapping[str, torch.Tensor]) -> LoadReport:
        """SAM's image-encoder weights in (:func:`.mapping.map_sam_to_encoder3d`)."""
        from sam3d.models.volumetric.mapping import map_sam_to_encoder3d

        return map_sam_to_encoder3d(dict(state), self)

    def freeze_pretrained(self) -> None:
        self.freeze_sam_weights()

    def freeze_sam_weights(self) -> None:
        """Freeze SAM's weights; every other parameter trains (the anchor's recipe)."""
        for name, p in self.named_parameters():
            p.requires_grad = not (name in SAM_FROZEN_NAMES or name.endswith(SAM_FROZEN_SUFFIXES))

    @property
    def checkpointed_blocks(self) -> int:
        """How many leading blocks ``use_checkpoint`` recomputes in backward."""
        flag = self.use_checkpoint
        if flag is True or flag is False:
            return len(self.blocks) if flag else 0
        return max(0, min(int(flag), len(self.blocks)))

    def position_embedding(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """``1 x h x w x d x C``: SAM's 2D embedding pooled to the token grid, plus depth."""
        h, w, d = grid
        base = self.base_grid
        pos = F.adaptive_avg_pool2d(self.pos_embed.permute(0, 3, 1, 2), base)
        if (h, w) != (base, base):
            pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
        depth = self.depth_embed.transpose(1, 2)  # 1 x C x base
        if d != base:
            depth = F.interpolate(depth, size=d, mode="linear", align_corners=False)
        return pos.permute(0, 2, 3, 1)[:, :, :, None, :] + depth.transpose(1, 2)[:, None, None]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``B x 1 x H x W x D`` (sides multiples of 4) -> maps ``B x neck_dim x h x w x d``."""
        x = self.patch_embed(x)
        x = x + self.position_embedding(tuple(x.shape[1:4])).to(x.dtype)
        maps = []
        for i, blk in enumerate(self.blocks, start=1):
            if i <= self.checkpointed_blocks and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in self.neck_blocks:
                neck = self.necks[self.neck_blocks.index(i)]
                maps.append(neck(x.permute(0, 4, 1, 2, 3)))
        return maps

    def set_reference(self, enabled: bool) -> None:
        """Run the anchor's formulation (explicit upsample + per-slice conv, explicit attention)."""
        self.patch_embed.reference = enabled
        for blk in self.blocks:
            blk.attn.reference = enabled

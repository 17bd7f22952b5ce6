"""SAM-Med3D's mask decoder: SAM's two-way transformer over a 3D token grid, then a x4
transposed-conv upscaling and per-mask hypernetwork MLPs; low-resolution logits out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sam3d.models.volumetric.sammed3d.image_encoder3d import LayerNorm3d, Mlp


class Upsample2x3d(nn.ConvTranspose3d):
    """``ConvTranspose3d(kernel_size=2, stride=2)`` as one matrix product (same weights).

    With a stride equal to the kernel every input voxel writes its own 2^3 output block, so
    the transposed convolution is an einsum and a reshape; PyTorch's CPU kernel for it
    spends most of its time allocating column buffers (5x slower on the tiny decoder).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x Cin x X x Y x Z`` -> ``B x Cout x 2X x 2Y x 2Z``."""
        b, _, sx, sy, sz = x.shape
        out = torch.einsum("bcxyz,coijk->boxiyjzk", x, self.weight)
        out = out.reshape(b, self.out_channels, 2 * sx, 2 * sy, 2 * sz)
        return out + self.bias[None, :, None, None, None]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (SAM's hypernetwork / IoU MLP)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1)
        outs = [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class TokenAttention(nn.Module):
    """Multi-head attention with q / k / v projected to ``dim / downsample`` channels.

    ``q`` ``B x Nq x dim``, ``k`` and ``v`` ``B x Nk x dim`` -> ``B x Nq x dim``.
    """

    def __init__(self, dim: int, num_heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        if inner % num_heads:
            raise ValueError(f"{num_heads} heads must divide the attention width {inner}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            self._heads(self.q_proj(q)),
            self._heads(self.k_proj(k)),
            self._heads(self.v_proj(v)),
        )
        # written out: a handful of tokens, where SDPA's CPU kernel costs ms per call
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        out = attn @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayBlock(nn.Module):
    """Tokens self-attend, attend to the image, MLP, then the image attends to the tokens."""

    def __init__(
        self, dim: int, num_heads: int, mlp_dim: int, downsample: int, skip_first_pe: bool
    ) -> None:
        super().__init__()
        self.self_attn = TokenAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, num_heads, downsample)
        self.skip_first_pe = skip_first_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries ``B x Nq x C``, keys ``B x Nk x C`` (+ their position codes) -> both updated."""
        if self.skip_first_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """SAM's two-way transformer on a flattened 3D image embedding."""

    def __init__(
        self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample: int = 2
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayBlock(dim, num_heads, mlp_dim, downsample, skip_first_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = TokenAttention(dim, num_heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image and image_pe ``B x C x X x Y x Z``, tokens ``B x N x C`` ->
        (tokens ``B x N x C``, image tokens ``B x XYZ x C``)."""
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MaskDecoder3D(nn.Module):
    """Image embedding + prompts -> low-resolution mask logits ``B x 1 x 4X x 4Y x 4Z``.

    Args:
        dim: the transformer width (= the prompt embedding width).
        num_multimask_outputs: extra mask tokens (official 3; only the first mask is used).
        depth, num_heads, mlp_dim: the two-way transformer (official 2, 8, 2048).
        iou_head_depth, iou_head_hidden_dim: the IoU MLP (official 3, 256).
    """

    def __init__(
        self,
        dim: int,
        num_multimask_outputs: int = 3,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer3D(depth, dim, num_heads, mlp_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            Upsample2x3d(dim, dim // 4),
            LayerNorm3d(dim // 4),
            nn.GELU(),
            Upsample2x3d(dim // 4, dim // 8),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding ``B x C x X x Y x Z`` (or 1 x ... for every prompt), position code
        ``1 x C x X x Y x Z``, sparse ``B x N x C``, dense ``B x C x X x Y x Z`` ->
        (logits ``B x M x 4X x 4Y x 4Z``, IoU ``B x M``); M = 1, or 3 with ``multimask_output``.
        """
        out = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out[None].expand(sparse.shape[0], -1, -1), sparse], dim=1)
        n = tokens.shape[0]
        src = image if image.shape[0] == n else image.repeat_interleave(n, dim=0)
        src = src + dense
        pos = image_pe if image_pe.shape[0] == n else image_pe.repeat_interleave(n, dim=0)
        b, c, sx, sy, sz = src.shape
        hs, src = self.transformer(src, pos, tokens)
        iou_out, mask_out = hs[:, 0], hs[:, 1 : 1 + self.num_mask_tokens]
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, sx, sy, sz))
        hyper = torch.stack(
            [mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, ux, uy, uz = up.shape
        masks = (hyper @ up.reshape(b, c, ux * uy * uz)).reshape(b, -1, ux, uy, uz)
        iou = self.iou_prediction_head(iou_out)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]

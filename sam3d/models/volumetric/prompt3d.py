"""Visual-sampler prompt encoder: clicks read tokens from the feature map, queries condition it.

Each click (voxel coordinate in the crop) reads one token from the last neck map by
trilinear sampling; a learned label embedding marks it positive or negative. Per block,
learnable global queries self-attend together with the click tokens, cross-attend to the
image tokens, and the image tokens then cross-attend to the queries: the output is the
image embedding conditioned on the clicks (the anchor's visual sampler, plus labels,
any number of clicks and batches with different click counts padded with label -1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from torch import nn

from sam3d.models.attention import attend, merge_heads, split_heads

PAD_LABEL = -1


class Attention(nn.Module):
    """SAM's prompt attention (projections to ``dim / downsample_rate``) on fused SDPA.

    ``mask``: bool ``B x 1 x Nq x Nk`` or broadcastable, True where a key may be attended.
    """

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide {internal}")
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``B x Nq x dim``, ``B x Nk x dim``, ``B x Nk x dim`` -> ``B x Nq x dim``."""
        h = self.num_heads
        q, k, v = (
            split_heads(self.q_proj(q), h),
            split_heads(self.k_proj(k), h),
            split_heads(self.v_proj(v), h),
        )
        return self.out_proj(merge_heads(attend(q, k, v, mask=mask)))


class PromptBlock(nn.Module):
    """One block: [queries; clicks] self-attention, queries -> image, MLP, image -> queries."""

    def __init__(
        self, dim: int, num_heads: int, mlp_dim: int, num_queries: int, downsample_rate: int = 2
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.global_query = nn.Parameter(0.1 * torch.randn(1, num_queries, dim))
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)
        self.norm4 = nn.LayerNorm(dim)

    def forward(
        self, image: torch.Tensor, clicks: torch.Tensor, click_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens ``B x HWD x C``, click tokens ``B x N x C``, valid ``B x N`` -> updated."""
        b = image.shape[0]
        g = self.num_queries
        tokens = torch.cat([self.global_query.expand(b, -1, -1).to(clicks.dtype), clicks], dim=1)
        key_ok = torch.cat([click_valid.new_ones(b, g), click_valid], dim=1)[:, None, None, :]
        tokens = self.norm1(tokens + self.self_attn(tokens, tokens, tokens, mask=key_ok))
        queries, clicks = tokens[:, :g], tokens[:, g:]
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries, image, image))
        queries = self.norm3(queries + self.mlp(queries))
        image = self.norm4(image + self.cross_attn_image_to_token(image, queries, queries))
        return image, clicks


def points_to_grid(points_vox: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Voxel coordinates ``B x N x 3`` (i, j, k) in a crop of ``image_shape`` -> grid_sample grid.

    Voxel centres map to ``(p + 0.5) * 2 / size - 1`` (``align_corners=False``); grid_sample
    wants (x, y, z) = (k, j, i). Returns ``B x 1 x 1 x N x 3``.
    """
    size = torch.tensor(image_shape, dtype=points_vox.dtype, device=points_vox.device)
    norm = (points_vox + 0.5) * 2 / size - 1
    return norm.flip(-1)[:, None, None]


def sample_point_tokens(
    image_embedding: torch.Tensor, points_vox: torch.Tensor, image_shape: tuple[int, int, int]
) -> torch.Tensor:
    """Trilinearly sample ``B x C x h x w x d`` at voxel clicks ``B x N x 3`` -> ``B x N x C``.

    Sampling runs in float32 at least (grid_sample wants one dtype; clicks need precision).
    """
    b, c = image_embedding.shape[:2]
    if points_vox.shape[1] == 0:
        return image_embedding.new_zeros(b, 0, c)
    dtype = torch.promote_types(image_embedding.dtype, torch.float32)
    grid = points_to_grid(points_vox.to(dtype), image_shape)
    sampled = F.grid_sample(image_embedding.to(dtype), grid, mode="bilinear", align_corners=False)
    return sampled.flatten(2).transpose(1, 2).to(image_embedding.dtype)  # 5D bilinear: trilinear


class PromptEncoder3D(nn.Module):
    """Condition an image embedding ``B x C x h x w x d`` on labelled clicks.

    Args:
        dim: channels of the image embedding (the neck width).
        depth: number of :class:`PromptBlock`.
        num_heads, mlp_dim: attention heads and MLP width.
        num_queries: learnable global queries per block.
        downsample_rate: width reduction of the cross-attentions (SAM's 2).
    """

    def __init__(
        self,
        dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        num_queries: int = 10,
        downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.label_embed = nn.Embedding(2, dim)  # 0 negative, 1 positive
        self.blocks = nn.ModuleList(
            PromptBlock(dim, num_heads, mlp_dim, num_queries, downsample_rate) for _ in range(depth)
        )

    def forward(
        self,
        image_embedding: torch.Tensor,
        points_vox: torch.Tensor,
        point_labels: torch.Tensor,
        image_shape: tuple[int, int, int],
    ) -> torch.Tensor:
        """Prompt the embedding.

        Args:
            image_embedding: ``B x C x h x w x d`` (the last neck map).
            points_vox: ``B x N x 3`` float voxel coordinates (i, j, k) in the crop.
            point_labels: ``B x N`` long, 1 positive, 0 negative, -1 padding (ignored).
            image_shape: the crop's ``(H, W, D)`` in voxels.

        Returns:
            ``B x C x h x w x d`` conditioned embedding.
        """
        b, c, h, w, d = image_embedding.shape
        if points_vox.ndim != 3 or points_vox.shape[0] != b or points_vox.shape[-1] != 3:
            raise ValueError(f"points must be B x N x 3 with B={b}, got {tuple(points_vox.shape)}")
        if point_labels.shape != points_vox.shape[:2]:
            raise ValueError(
                f"point_labels {tuple(point_labels.shape)} must be B x N = "
                f"{tuple(points_vox.shape[:2])}"
            )
        clicks = sample_point_tokens(image_embedding, points_vox, image_shape)
        valid = point_labels != PAD_LABEL
        clicks = clicks + self.label_embed(point_labels.clamp(min=0).long()).to(clicks.dtype)
        image = image_embedding.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            image, clicks = blk(image, clicks, valid)
        return image.transpose(1, 2).reshape(b, c, h, w, d)

"""SAM-Med3D's prompt encoder: clicks as random-Fourier position codes plus a label
embedding, a previous low-resolution mask as a dense embedding.

Two of the reference's conventions are kept on purpose, because its weights were trained
with them: the code of a position is ``[sin, cos, sin]`` of the projected coordinates, and
the dense grid's first two code components run along the grid's second and first axes
while a click's run along its first and second (SAM's 2D (x, y) order carried into 3D).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sam3d.models.volumetric.sammed3d.image_encoder3d import LayerNorm3d


class RandomPositionCode3D(nn.Module):
    """Random-Fourier position code: coordinates in [0, 1]^3 -> ``... x 3 * num_feats``."""

    def __init__(self, num_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, num_feats))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """``... x 3`` in [0, 1] -> ``... x 3 * num_feats``."""
        proj = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([proj.sin(), proj.cos(), proj.sin()], dim=-1)

    def grid(self, size: tuple[int, int, int]) -> torch.Tensor:
        """The code of every token centre of an ``X x Y x Z`` grid: ``C x X x Y x Z``."""
        sx, sy, sz = size
        dev = self.positional_encoding_gaussian_matrix.device
        ax = [(torch.arange(s, device=dev, dtype=torch.float32) + 0.5) / s for s in size]
        along0 = ax[0][:, None, None].expand(sx, sy, sz)
        along1 = ax[1][None, :, None].expand(sx, sy, sz)
        along2 = ax[2][None, None, :].expand(sx, sy, sz)
        # the reference's order: component 0 runs along axis 1 and component 1 along axis 0
        coords = torch.stack([along1 * sy / sx, along0 * sx / sy, along2], dim=-1)
        return self.encode(coords).permute(3, 0, 1, 2)

    def points(self, points: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """Voxel coordinates ``B x N x 3`` in a crop of ``size`` voxels -> ``B x N x C``."""
        scale = torch.tensor(size, dtype=torch.float32, device=points.device)
        return self.encode(points.float() / scale)


class PromptEncoder3D(nn.Module):
    """Clicks and a previous mask -> sparse ``B x N x C`` and dense ``B x C x X x Y x Z``.

    Args:
        embed_dim: C (divisible by 3: the position code has ``C / 3`` frequencies).
        embedding_size: the image embedding's grid ``(X, Y, Z)``.
        input_size: the crop's side in voxels ``(S, S, S)``.
        mask_in_chans: channels of the mask downscaling (official 16).

    The mask input is ``B x 1 x 4X x 4Y x 4Z`` logits (the decoder's low-resolution output).
    """

    def __init__(
        self,
        embed_dim: int,
        embedding_size: tuple[int, int, int],
        input_size: tuple[int, int, int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        if embed_dim % 3:
            raise ValueError(f"the prompt embedding width must be divisible by 3, got {embed_dim}")
        self.embed_dim = embed_dim
        self.embedding_size = tuple(embedding_size)
        self.input_size = tuple(input_size)
        self.pe_layer = RandomPositionCode3D(embed_dim // 3)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(2)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    @property
    def mask_size(self) -> tuple[int, int, int]:
        """The mask input's side: four times the embedding grid."""
        return tuple(4 * s for s in self.embedding_size)  # type: ignore[return-value]

    def dense_pe(self) -> torch.Tensor:
        """Position code of the image embedding's tokens ``1 x C x X x Y x Z``."""
        return self.pe_layer.grid(self.embedding_size)[None]

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``B x N x 3`` voxel clicks, ``B x N`` labels (1, 0, -1 padding) -> ``B x (N+1) x C``.

        A padding click is appended (no boxes are given), as the reference does.
        """
        b = points.shape[0]
        points = torch.cat([points.float() + 0.5, points.new_zeros(b, 1, 3).float()], dim=1)
        labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)[..., None]
        code = self.pe_layer.points(points, self.input_size)
        code = torch.where(labels == -1, self.not_a_point_embed.weight, code)
        code = code + (labels == 0) * self.point_embeddings[0].weight
        return code + (labels == 1) * self.point_embeddings[1].weight

    def forward(
        self,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse ``B x (N+1) x C`` (empty ``B x 0 x C`` without clicks) and dense
        ``B x C x X x Y x Z`` embeddings; ``masks`` None: the learned no-mask embedding."""
        if points is not None:
            b = points.shape[0]
        else:
            b = masks.shape[0] if masks is not None else 1
        dev = self.no_mask_embed.weight.device
        if points is not None:
            sparse = self.embed_points(points, labels)
        else:
            sparse = torch.empty(b, 0, self.embed_dim, device=dev)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(
                b, -1, *self.embedding_size
            )
        return sparse, dense

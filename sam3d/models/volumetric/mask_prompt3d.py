"""Dense mask prompt: the previous prediction comes back as an input (SAM's mask prompt, 3D).

SAM embeds a low-resolution mask with ``mask_downscaling`` (strided convs, LayerNorm,
GELU, 1x1 conv to the embedding width) and adds it to the image embedding before the
two-way transformer. :class:`MaskPrompt3D` does the same for :class:`~sam3d.models.
volumetric.sam3d.Sam3D` at two places:

- ``tokens``: added to the prompt map (``B x neck_dim x h x w x d``, one value per token)
  before the prompt encoder, so the click tokens sampled there and the global queries see
  which part of the crop is already segmented (SAM's place);
- ``fine``: added to the decoder's fused map (``B x decoder_dim x 2h x 2w x 2d``) before its
  InstanceNorm, so the previous boundary can be kept at the decoder's resolution, which a
  token-level embedding (4 voxels a token) cannot.

Both outputs come from zero-initialised convs: a model built or loaded without trained
mask-prompt weights gives exactly the outputs it gives without a mask prompt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sam3d.models.volumetric.blocks import LayerNorm3d


class MaskPrompt3D(nn.Module):
    """Embed a foreground probability ``B x 1 x H x W x D`` for the prompt map and the decoder.

    Args:
        token_dim: channels of the prompt map (the neck width).
        fine_dim: channels of the decoder's fused map.
        voxels_per_token: crop voxels per token edge (a power of two, at least 2); the fine
            map has two tokens' resolution (``voxels_per_token / 2`` voxels a cell).
        hidden: channels of the downscaling convs (SAM: 4 then 16).

    Call: ``mask`` ``B x 1 x H x W x D`` probabilities in [0, 1] ->
    ``(tokens B x token_dim x H/v x W/v x D/v, fine B x fine_dim x 2H/v x 2W/v x 2D/v)``.
    """

    def __init__(
        self, token_dim: int, fine_dim: int, voxels_per_token: int, hidden: int = 16
    ) -> None:
        super().__init__()
        v = int(voxels_per_token)
        if v < 2 or v & (v - 1):
            raise ValueError(f"voxels_per_token must be a power of two >= 2, got {v}")
        steps = int(math.log2(v))
        self.voxels_per_token = v
        widths = [1] + [max(4, hidden // 2 ** (steps - 1 - i)) for i in range(steps)]
        down: list[nn.Module] = []
        for i in range(steps):
            down += [
                nn.Conv3d(widths[i], widths[i + 1], kernel_size=2, stride=2),
                LayerNorm3d(widths[i + 1]),
                nn.GELU(),
            ]
        # the fine map is one stride-2 step before the tokens
        self.to_fine = nn.Sequential(*down[: 3 * (steps - 1)])
        self.to_tokens = nn.Sequential(*down[3 * (steps - 1) :])
        self.fine_width = widths[steps - 1]
        self.fine_proj = nn.Conv3d(self.fine_width + 1, fine_dim, kernel_size=3, padding=1)
        self.token_proj = nn.Conv3d(widths[steps], token_dim, kernel_size=1)
        for proj in (self.fine_proj, self.token_proj):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if mask.ndim != 5 or mask.shape[1] != 1:
            raise ValueError(f"mask_prompt must be B x 1 x H x W x D, got {tuple(mask.shape)}")
        v = self.voxels_per_token
        if any(s % v for s in mask.shape[2:]):
            raise ValueError(f"mask_prompt sides {tuple(mask.shape[2:])} must be multiples of {v}")
        x = mask.to(self.fine_proj.weight.dtype) - 0.5  # centred: 0 and 1 are opposite
        fine = self.to_fine(x)
        # the mask itself at the fine resolution as well: its exact boundary, cheaply
        small = F.avg_pool3d(x, kernel_size=v // 2) if v > 2 else x
        fine_out = self.fine_proj(torch.cat([fine, small], dim=1))
        return self.token_proj(self.to_tokens(fine)), fine_out


def mask_prompt_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """2-class logits ``B x 2 x H x W x D`` -> the mask prompt ``B x 1 x H x W x D``
    (the foreground probability, detached: a prompt, not a path for gradients)."""
    return torch.softmax(logits.detach().float(), dim=1)[:, 1:2]

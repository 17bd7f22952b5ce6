"""SamMed3D: SAM-Med3D behind the interface of :class:`~sam3d.models.volumetric.sam3d.Sam3D`
(encode a crop once, decode clicks many times, 2-class logits at the crop's size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sam3d.models.protocol import parameter_groups
from sam3d.models.volumetric.sammed3d.image_encoder3d import ImageEncoder3D
from sam3d.models.volumetric.sammed3d.mask_decoder3d import MaskDecoder3D
from sam3d.models.volumetric.sammed3d.prompt_encoder3d import PromptEncoder3D

# a probability mask prompt is turned into logits with this clamp (sigmoid(+-9.2) = 1e-4)
_PROB_EPS = 1e-4


def foreground_zscore(images: torch.Tensor) -> torch.Tensor:
    """Z-score each crop ``B x 1 x H x W x D`` with the mean and SD (unbiased) of its voxels
    > 0 (torchio ``ZNormalization(masking_method=lambda x: x > 0)``); a crop with fewer than
    two such voxels, or with SD 0, is left as it is (torchio refuses it)."""
    out = []
    for crop in images:
        values = crop[crop > 0].float()
        if values.numel() < 2 or float(values.std()) == 0.0:
            out.append(crop)
            continue
        out.append(((crop.float() - values.mean()) / values.std()).to(crop.dtype))
    return torch.stack(out)


@dataclass
class SamMed3DFeatures:
    """What :meth:`SamMed3D.encode` keeps for prompting.

    Attributes:
        embedding: the image embedding ``B x C x X x Y x Z`` (crop / patch tokens).
        image_shape: the crop's ``(H, W, D)`` in voxels.
    """

    embedding: torch.Tensor
    image_shape: tuple[int, int, int]

    def to(self, *args, **kwargs) -> SamMed3DFeatures:
        return SamMed3DFeatures(self.embedding.to(*args, **kwargs), self.image_shape)

    def select(self, index: int | slice | torch.Tensor) -> SamMed3DFeatures:
        """Features of some batch items (e.g. ``features.select(slice(0, 1))``)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return SamMed3DFeatures(self.embedding[index], self.image_shape)


class SamMed3D(nn.Module):
    """SAM-Med3D (uni-medical): 3D ViT encoder, point / mask prompts, SAM's mask decoder.

    Inputs are crops ``B x 1 x S x S x S`` (``S = crop_size``), z-scored as the reference
    does (see :mod:`sam3d.models.volumetric.sammed3d.build`); clicks are voxel coordinates
    (i, j, k) in the crop, in the tensor's axis order. :meth:`decode` returns 2-class logits
    ``B x 2 x S x S x S``: background 0 and the reference's logit, upsampled trilinearly as
    it does, so a softmax gives its sigmoid and argmax its 0.5 threshold.

    The previous mask goes back in as the reference feeds it: low-resolution logits
    (``S / 4`` a side) through the prompt encoder; with no previous mask the reference's
    inference feeds zeros (not the learned no-mask embedding), and so does :meth:`decode`.
    """

    def __init__(
        self,
        image_encoder: ImageEncoder3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.crop_size = int(image_encoder.img_size)
        self.config = dict(config or {})
        self.preset = self.config
        self.load_report = None

    @property
    def voxels_per_token(self) -> int:
        return self.image_encoder.patch_size

    def encode(self, images: torch.Tensor) -> SamMed3DFeatures:
        """``B x 1 x S x S x S`` crops -> :class:`SamMed3DFeatures` (runs the ViT once).

        With ``input_norm="foreground_zscore"`` (the presets') each crop is first z-scored
        over its voxels > 0 (:func:`foreground_zscore`), as the reference's inference does.
        """
        shape = tuple(int(s) for s in images.shape[2:])
        if images.ndim != 5 or images.shape[1] != 1 or shape != (self.crop_size,) * 3:
            raise ValueError(
                f"images must be B x 1 x {self.crop_size}^3 (SAM-Med3D's crop), "
                f"got {tuple(images.shape)}"
            )
        if self.config.get("input_norm", "none") == "foreground_zscore":
            images = foreground_zscore(images)
        return SamMed3DFeatures(self.image_encoder(images), shape)

    def empty_mask(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """The reference's first-click mask input: zeros ``B x 1 x S/4 x S/4 x S/4``."""
        return torch.zeros(batch, 1, *self.prompt_encoder.mask_size, device=device)

    def decode_low_res(
        self,
        features: SamMed3DFeatures,
        points: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        low_res_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The reference's prompt step: low-resolution logits ``B x 1 x S/4 x S/4 x S/4``.

        ``low_res_mask``: the previous step's output (or :meth:`empty_mask`); None uses the
        learned no-mask embedding, as the reference's prompt encoder does without a mask.
        """
        sparse, dense = self.prompt_encoder(points, point_labels, low_res_mask)
        logits, _ = self.mask_decoder(
            features.embedding, self.prompt_encoder.dense_pe(), sparse, dense
        )
        return logits

    def low_res_prompt(self, mask_prompt: torch.Tensor) -> torch.Tensor:
        """A previous foreground probability ``B x 1 x H x W x D`` at the crop's size ->
        the reference's mask input: logits at ``S / 4`` a side (area-averaged)."""
        logits = torch.logit(mask_prompt.float().clamp(_PROB_EPS, 1 - _PROB_EPS))
        return F.interpolate(logits, size=self.prompt_encoder.mask_size, mode="area")

    def decode(
        self,
        features: SamMed3DFeatures,
        points: torch.Tensor,
        point_labels: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt kept features with clicks and, optionally, the previous mask.

        Args:
            features: from :meth:`encode`.
            points: ``B x N x 3`` float voxel coordinates (i, j, k) in the crop.
            point_labels: ``B x N`` long: 1 positive, 0 negative, -1 padding. None: all 1.
            mask_prompt: the previous foreground probability ``B x 1 x H x W x D`` at the
                crop's size (:meth:`low_res_prompt`), or None (the reference's zeros).

        Returns:
            logits ``B x 2 x H x W x D`` (background 0, foreground the reference's logit).
        """
        if point_labels is None:
            point_labels = torch.ones(points.shape[:2], dtype=torch.long, device=points.device)
        b = points.shape[0]
        if mask_prompt is None:
            low = self.empty_mask(b, points.device)
        else:
            low = self.low_res_prompt(mask_prompt)
        logits = self.decode_low_res(features, points, point_labels, low.to(points.device))
        return self.to_two_class(logits, features.image_shape)

    @staticmethod
    def to_two_class(low_res: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """``B x 1 x h x w x d`` low-resolution logits -> ``B x 2 x H x W x D`` (trilinear
        upsampling as the reference's inference, background channel 0)."""
        up = F.interpolate(low_res, size=tuple(size), mode="trilinear", align_corners=False)
        return torch.cat([torch.zeros_like(up), up], dim=1)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Named optimizer groups: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``."""
        return parameter_groups(
            image_encoder=self.image_encoder,
            prompt_encoder=self.prompt_encoder,
            mask_decoder=self.mask_decoder,
        )

    def forward(
        self,
        images: torch.Tensor,
        points: torch.Tensor,
        point_labels: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``decode(encode(images), ...)``: logits ``B x 2 x H x W x D``."""
        return self.decode(self.encode(images), points, point_labels, mask_prompt)

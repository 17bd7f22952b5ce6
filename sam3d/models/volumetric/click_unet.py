"""The click-channel UNet baseline (DeepEdit / nnInteractive style) with Sam3D's interface.

A MONAI ``UNet`` whose input channels are the crop, a positive-click map, a negative-click
map and the previous mask:

    [image, G+, G-, previous]  B x 4 x H x W x D  ->  UNet  ->  logits B x 2 x H x W x D

``G+`` / ``G-`` are the maxima over the clicks of Gaussians (``sigma`` voxels) or of
disks (radius ``sigma`` voxels), -1 padding ignored; ``previous`` is the mask prompt (the
previous prediction as foreground probability in [0, 1], ``B x 1 x H x W x D``), zero
when none is given. ``encode`` only keeps the crop, so the whole network runs on each
``decode``: this is the baseline's cost, and why Sam3D caches its encoder instead.

The interface is :class:`~sam3d.models.volumetric.sam3d.Sam3D`'s (``encode``, ``decode
(features, points, point_labels, mask_prompt)``, ``forward``, ``crop_size``, ``config``),
so the bundle's trainer, the interactive training loop, :class:`ClickSession` and the
click evaluation drive it unchanged; it is the registry kind ``click_unet``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sam3d.models.protocol import parameter_groups
from sam3d.presets import read_preset

DEFAULTS: dict[str, Any] = {
    "crop_size": 32,
    "channels": [16, 32, 64, 128],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    "heatmap": "gaussian",  # or "disk"
    "sigma": 3.0,  # voxels: the Gaussian's SD or the disk's radius
    "previous_mask": True,
    "num_classes": 2,
}


def click_maps(
    shape: tuple[int, int, int],
    points: torch.Tensor,
    point_labels: torch.Tensor,
    sigma: float,
    kind: str = "gaussian",
) -> torch.Tensor:
    """``B x 2 x H x W x D`` positive and negative click maps in [0, 1].

    ``points`` ``B x N x 3`` voxel coordinates, ``point_labels`` ``B x N`` (1 / 0 / -1).
    A Gaussian is separable, so each click costs three 1D profiles and an outer product.
    """
    b, n = points.shape[:2]
    dev = points.device
    prof = []
    for a, size in enumerate(shape):
        d = torch.arange(size, device=dev, dtype=torch.float32)[None, None] - points[..., a, None]
        prof.append(d.float() ** 2)  # B x N x size
    d2 = prof[0][..., :, None, None] + prof[1][..., None, :, None] + prof[2][..., None, None, :]
    if kind == "gaussian":
        g = torch.exp(-d2 / (2.0 * sigma**2))
    elif kind == "disk":
        g = (d2 <= sigma**2).float()
    else:
        raise ValueError(f"heatmap must be 'gaussian' or 'disk', got {kind!r}")
    out = []
    for value in (1, 0):
        keep = (point_labels == value).float()[:, :, None, None, None]
        out.append((g * keep).amax(1) if n else g.new_zeros((b, *shape)))
    return torch.stack(out, 1)


class ClickUNet(nn.Module):
    """Click-channel UNet; shapes as :class:`Sam3D` (crops ``B x 1 x H x W x D``,
    clicks in crop voxels, logits ``B x 2 x H x W x D``). ``crop_size`` is the training
    crop (the inferer's window); any side divisible by the strides' product works."""

    def __init__(
        self,
        crop_size: int = 32,
        channels: tuple[int, ...] | list[int] = (16, 32, 64, 128),
        strides: tuple[int, ...] | list[int] = (2, 2, 2),
        num_res_units: int = 2,
        heatmap: str = "gaussian",
        sigma: float = 3.0,
        previous_mask: bool = True,
        num_classes: int = 2,
    ) -> None:
        from monai.networks.nets import UNet

        super().__init__()
        if heatmap not in ("gaussian", "disk"):
            raise ValueError(f"heatmap must be 'gaussian' or 'disk', got {heatmap!r}")
        self.crop_size = int(crop_size)
        self.heatmap, self.sigma = heatmap, float(sigma)
        self.previous_mask = bool(previous_mask)
        # what the interactive loop checks before feeding a previous prediction back
        self.mask_prompt: str | None = "channel" if self.previous_mask else None
        self.net = UNet(
            spatial_dims=3,
            in_channels=4 if self.previous_mask else 3,
            out_channels=int(num_classes),
            channels=tuple(int(c) for c in channels),
            strides=tuple(int(s) for s in strides),
            num_res_units=int(num_res_units),
        )
        self.config: dict[str, Any] = {
            "crop_size": self.crop_size, "channels": [int(c) for c in channels],
            "strides": [int(s) for s in strides], "num_res_units": int(num_res_units),
            "heatmap": heatmap, "sigma": self.sigma, "previous_mask": self.previous_mask,
            "num_classes": int(num_classes),
        }  # fmt: skip

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Keeps the crop ``B x 1 x H x W x D`` (the UNet needs the clicks from its input on)."""
        if images.ndim != 5 or images.shape[1] != 1:
            raise ValueError(f"images must be B x 1 x H x W x D, got {tuple(images.shape)}")
        return images

    def decode(
        self,
        features: torch.Tensor,
        points: torch.Tensor,
        point_labels: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``B x classes x H x W x D`` for clicks ``B x N x 3`` (labels ``B x N``: 1,
        0, -1 padding; None: all positive) and an optional previous mask ``B x 1 x H x W x D``
        (foreground probability)."""
        image = features
        if point_labels is None:
            point_labels = torch.ones(points.shape[:2], dtype=torch.long, device=points.device)
        shape = tuple(int(s) for s in image.shape[2:])
        maps = click_maps(shape, points.to(image.device), point_labels.to(image.device),
                          self.sigma, self.heatmap).to(image.dtype)  # fmt: skip
        parts = [image, maps]
        if self.previous_mask:
            if mask_prompt is None:
                mask_prompt = image.new_zeros((image.shape[0], 1, *shape))
            elif mask_prompt.shape != (image.shape[0], 1, *shape):
                raise ValueError(
                    f"mask_prompt must be B x 1 x {shape}, got {tuple(mask_prompt.shape)}"
                )
            parts.append(mask_prompt.to(image.dtype))
        return self.net(torch.cat(parts, 1))

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Named optimizer groups (:func:`sam3d.models.protocol.parameter_groups`): ``net``."""
        return parameter_groups(net=self.net)

    def forward(
        self,
        images: torch.Tensor,
        points: torch.Tensor,
        point_labels: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.decode(self.encode(images), points, point_labels, mask_prompt)


def build_click_unet(preset: str | dict[str, Any] = "tiny", **overrides: Any) -> ClickUNet:
    """A :class:`ClickUNet` from a preset of ``configs/click_unet/`` or a config dict."""
    cfg = dict(preset) if isinstance(preset, dict) else read_preset("click_unet", preset)
    cfg.update(overrides)
    cfg.pop("name", None)
    cfg.pop("description", None)
    return ClickUNet(**{**DEFAULTS, **cfg})

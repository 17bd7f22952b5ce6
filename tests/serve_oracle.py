"""An oracle click model for the viewer's tests: the component of similar intensity under a click.

It has the interface :class:`~sam3d.inference.windows.WindowPredictor` uses
(``crop_size``, ``encode``, ``decode``), so a real :class:`ClickSession` runs through
preprocessing, windows, stitching and inversion exactly as with a trained model.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


class BrightComponentOracle(torch.nn.Module):
    """Segments, per positive click, the connected region whose intensity is within ``tol``
    of the click's (median of its 3^3 neighbourhood); a negative click removes its region.

    Args:
        tol: intensity tolerance in the model's input units (z-scored HU).
        crop_size: window size in grid voxels.
    """

    def __init__(self, tol: float, crop_size: int = 64) -> None:
        super().__init__()
        self.tol, self.crop_size = float(tol), int(crop_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 1 x H x W x D`` -> the images themselves (the "features")."""
        return images.float().clone()

    def region(self, img: np.ndarray, point: np.ndarray) -> np.ndarray:
        p = np.clip(np.round(point).astype(int), 0, np.asarray(img.shape) - 1)
        lo, hi = np.maximum(p - 1, 0), p + 2
        ref = float(np.median(img[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]))
        comp, _ = ndimage.label(np.abs(img - ref) < self.tol)
        return comp == comp[tuple(p)] if comp[tuple(p)] else np.zeros(img.shape, bool)

    def decode(
        self, features: torch.Tensor, points: torch.Tensor, point_labels: torch.Tensor
    ) -> torch.Tensor:
        """Clicks ``B x N x 3``, labels ``B x N`` -> logits ``B x 2 x H x W x D``.

        Points are in window voxels."""
        out = []
        for b in range(features.shape[0]):
            img = features[b, 0].cpu().numpy()
            fg = np.zeros(img.shape, bool)
            pts, labs = points[b].cpu().numpy(), point_labels[b].cpu().numpy()
            for p in pts[labs == 1]:
                fg |= self.region(img, p)
            for p in pts[labs == 0]:
                fg &= ~self.region(img, p)
            x = torch.as_tensor(fg, dtype=torch.float32) * 20.0 - 10.0
            out.append(torch.stack([-x, x]))
        return torch.stack(out).to(features.device)

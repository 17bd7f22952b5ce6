"""One-resample spatial augmentation of training crops: zoom, rotation, flips, rot90 and
the random crop in a single ``grid_sample`` per key.

MONAI's ``RandZoomd`` + ``RandRotated`` + ``RandSpatialCropd`` + three ``RandFlipd`` +
``RandRotate90d`` resample a crop several times and cost most of a CPU training step on
small crops; :class:`RandCropAffined` draws the same parameters (same probabilities and
ranges) and composes them into one affine map from crop voxels to input voxels.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable


def crop_affine_grid(
    in_shape: Sequence[int], out_shape: Sequence[int], matrix: np.ndarray, shift: np.ndarray
) -> torch.Tensor:
    """The ``grid_sample`` grid (``1 x o0 x o1 x o2 x 3``, align_corners=True) that reads the
    input voxel ``c_in + shift + matrix @ (x - c_out)`` for each output voxel ``x``
    (``c`` = the centres, ``(s - 1) / 2``)."""
    c_in = (np.asarray(in_shape, dtype=np.float64) - 1) / 2
    c_out = (np.asarray(out_shape, dtype=np.float64) - 1) / 2
    axes = [torch.arange(s, dtype=torch.float64) - c for s, c in zip(out_shape, c_out)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # o0 x o1 x o2 x 3
    src = grid @ torch.as_tensor(matrix, dtype=torch.float64).T + torch.as_tensor(c_in + shift)
    size = torch.as_tensor(np.maximum(np.asarray(in_shape, dtype=np.float64) - 1, 1))
    norm = 2 * src / size - 1
    return norm.flip(-1)[None].float()  # grid_sample's (x, y, z) = (axis 2, 1, 0)


class RandCropAffined(Randomizable, MapTransform):
    """Random zoom, rotation, flips, rot90 and crop of ``keys`` (channel-first 3D) at once.

    Args:
        keys: image first, then labels (resampled nearest).
        crop_size: the output side (or three).
        zoom_prob, zoom_range: zoom factor uniform in the range (> 1 magnifies), as
            ``RandZoomd``'s ``min_zoom`` / ``max_zoom``.
        rotate_prob, rotate_deg: rotation uniform in +-``rotate_deg`` in the plane of the
            first two axes (the axial plane of an RAS volume), as ``RandRotated``'s
            ``range_x``.
        flip_prob: per axis, as three ``RandFlipd``.
        rot90_prob: a rotation by 90, 180 or 270 degrees in the plane of the first two axes.
        max_shift: the crop centre's offset from the input centre, uniform in +- this many
            voxels per axis; default ``(input side - crop side) / 2`` (``RandSpatialCropd``).
        modes: per key ``"bilinear"`` or ``"nearest"``; default bilinear for the first key.

    Out-of-volume samples take the border value. Outputs are float32 tensors.
    """

    def __init__(
        self,
        keys: KeysCollection,
        crop_size: int | Sequence[int],
        zoom_prob: float = 0.0,
        zoom_range: Sequence[float] = (1.0, 1.0),
        rotate_prob: float = 0.0,
        rotate_deg: float = 0.0,
        flip_prob: float = 0.0,
        rot90_prob: float = 0.0,
        max_shift: float | Sequence[float] | None = None,
        modes: Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.crop = (
            (int(crop_size),) * 3 if isinstance(crop_size, int) else tuple(map(int, crop_size))
        )
        self.zoom_prob, self.zoom_range = float(zoom_prob), tuple(map(float, zoom_range))
        self.rotate_prob, self.rotate_deg = float(rotate_prob), float(rotate_deg)
        self.flip_prob, self.rot90_prob = float(flip_prob), float(rot90_prob)
        self.max_shift = max_shift
        self.modes = list(modes) if modes is not None else None
        self.matrix = np.eye(3)
        self.shift = np.zeros(3)

    def randomize(self, in_shape: Sequence[int]) -> None:
        m = np.eye(3)
        if self.R.rand() < self.zoom_prob:
            m = m / self.R.uniform(*self.zoom_range)  # magnify: read a smaller input region
        if self.R.rand() < self.rotate_prob:
            a = math.radians(self.R.uniform(-self.rotate_deg, self.rotate_deg))
            rot = np.array(
                [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]]
            )
            m = rot @ m
        flips = np.where(self.R.rand(3) < self.flip_prob, -1.0, 1.0)
        m = m @ np.diag(flips)
        if self.R.rand() < self.rot90_prob:
            k = int(self.R.randint(1, 4))
            a = k * math.pi / 2
            c, s = round(math.cos(a)), round(math.sin(a))
            m = m @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)
        if self.max_shift is None:
            limit = np.maximum((np.asarray(in_shape) - np.asarray(self.crop)) / 2, 0)
        else:
            limit = np.broadcast_to(np.asarray(self.max_shift, dtype=np.float64), (3,))
        self.shift = np.floor(self.R.uniform(-limit, limit + 1e-9) + 0.5)
        self.matrix = m

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        in_shape = tuple(int(s) for s in d[keys[0]].shape[1:])
        self.randomize(in_shape)
        grid = crop_affine_grid(in_shape, self.crop, self.matrix, self.shift)
        for i, key in enumerate(keys):
            mode = self.modes[i] if self.modes else ("bilinear" if i == 0 else "nearest")
            x = torch.as_tensor(d[key]).float()
            if tuple(x.shape[1:]) != in_shape:
                raise ValueError(f"{key} has shape {tuple(x.shape)}, {keys[0]} {in_shape}")
            out = F.grid_sample(
                x[None], grid.to(x.device), mode=mode, padding_mode="border", align_corners=True
            )
            d[key] = out[0]
        return d

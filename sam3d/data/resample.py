"""Resampling onto the grid with bounded memory: MONAI's ``Spacingd``, slab by slab.

MONAI's ``Spacingd`` resamples the whole volume at once in float64: a coordinate grid of
the whole output plus float64 copies, about 61 bytes per output voxel (4.8 GiB to open a
512x512x200 CT at 1 mm). :class:`BoundedSpacingd` computes the same linear resampling
(border padding, ``align_corners=False``: the output voxel ``v`` reads the input at
``xform @ v``) in float32, a slab of output slices at a time, into one preallocated
output: the temporaries are bounded by the slab. Where the grids are axis-aligned (after
``Orientationd`` every non-oblique image), trilinear interpolation is done as three 1D
interpolations; oblique grids use ``torch.nn.functional.grid_sample`` per slab.

The geometry (output shape, affine) and the recorded operation come from MONAI's own
``Spacingd`` run lazily, so ``Invertd`` inverts the result as it inverts ``Spacingd``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Spacingd
from monai.transforms.lazy.utils import affine_from_pending
from monai.utils import LazyAttr

# output voxels per slab: the slab's temporaries stay around 10 x 4 bytes x this
SLAB_VOXELS = 1 << 18


def _axis_weights(
    n_out: int, scale: float, shift: float, n_in: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear interpolation along one axis: output ``i`` reads input ``scale * i + shift``.

    Border padding (the coordinate clamped to ``[0, n_in - 1]``), as ``grid_sample``.
    Returns the lower and upper input indices (long) and the upper weight (float32).
    """
    src = np.clip(scale * np.arange(n_out, dtype=np.float64) + shift, 0.0, n_in - 1.0)
    i0 = np.floor(src)
    w = src - i0
    i0 = i0.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    return as_t(i0, torch.long), as_t(i1, torch.long), as_t(w, torch.float32)


def _lerp_axis(x: torch.Tensor, dim: int, i0: torch.Tensor, i1: torch.Tensor, w: torch.Tensor):
    shape = [1] * x.ndim
    shape[dim] = -1
    lo = x.index_select(dim, i0)
    hi = x.index_select(dim, i1)
    hi -= lo
    hi *= w.view(shape)
    lo += hi
    return lo


def resample_linear(
    image: torch.Tensor,
    xform: np.ndarray | torch.Tensor,
    shape: Sequence[int],
    slab_voxels: int = SLAB_VOXELS,
) -> torch.Tensor:
    """Linear resampling of ``image`` (``C x I x J x K``) onto an ``shape`` grid, in slabs.

    Args:
        image: the input, any float dtype (computed in float32), on any device.
        xform: 4 x 4, output voxel -> input voxel (MONAI's ``solve(src_affine, dst_affine)``).
        shape: the output's spatial shape.
        slab_voxels: output voxels computed at a time (bounds the temporaries).

    Returns:
        float32 ``C x shape``; border padding, ``align_corners=False`` (voxel centres).
    """
    x = np.asarray(torch.as_tensor(xform).detach().cpu().double().numpy(), dtype=np.float64)
    img = image if image.dtype == torch.float32 else image.float()
    c, n_in = img.shape[0], [int(s) for s in img.shape[1:]]
    shape = [int(s) for s in shape]
    out = torch.empty((c, *shape), dtype=torch.float32, device=img.device)
    lin = x[:3, :3]
    if np.allclose(lin, np.diag(np.diag(lin)), rtol=0, atol=1e-9):
        # slabs along the first axis: contiguous input rows, whole planes selected per step
        ns = max(1, slab_voxels // max(1, shape[1] * shape[2]))
        ax = [_axis_weights(shape[a], lin[a, a], x[a, 3], n_in[a], img.device) for a in range(3)]
        i0, i1, w0 = ax[0]
        for s0 in range(0, shape[0], ns):
            s1 = min(shape[0], s0 + ns)
            lo, hi = int(i0[s0:s1].min()), int(i1[s0:s1].max()) + 1
            t = _lerp_axis(img[:, lo:hi], 1, i0[s0:s1] - lo, i1[s0:s1] - lo, w0[s0:s1])
            t = _lerp_axis(t, 2, *ax[1])
            out[:, s0:s1] = _lerp_axis(t, 3, *ax[2])
        return out
    ks = max(1, slab_voxels // max(1, shape[0] * shape[1]))
    size = torch.tensor(n_in, dtype=torch.float64, device=img.device)
    lin_t = torch.as_tensor(lin, dtype=torch.float64, device=img.device)
    off_t = torch.as_tensor(x[:3, 3], dtype=torch.float64, device=img.device)
    ii = torch.arange(shape[0], dtype=torch.float64, device=img.device)
    jj = torch.arange(shape[1], dtype=torch.float64, device=img.device)
    for k0 in range(0, shape[2], ks):
        kk = torch.arange(k0, min(shape[2], k0 + ks), dtype=torch.float64, device=img.device)
        vox = torch.stack(torch.meshgrid(ii, jj, kk, indexing="ij"), -1)  # I' x J' x k x 3
        src = vox @ lin_t.T + off_t
        grid = ((2 * src + 1) / size - 1).flip(-1).float()  # grid_sample wants (k, j, i)
        res = F.grid_sample(
            img[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False
        )
        out[..., k0 : k0 + len(kk)] = res[0]
    return out


class BoundedSpacingd(MapTransform, InvertibleTransform):
    """``Spacingd(keys, pixdim, mode="bilinear")`` with the memory of its output, not 15x it.

    The output grid, affine and recorded operation are MONAI's (its ``Spacingd`` run
    lazily); the values are :func:`resample_linear`'s, equal to ``Spacingd``'s within
    float32 rounding. ``inverse`` is ``Spacingd``'s, so ``Invertd`` works unchanged. The
    output is always a new tensor (never a view of the input), so the steps after it may
    work in place.
    """

    def __init__(
        self,
        keys: Any,
        pixdim: Sequence[float] | float,
        slab_voxels: int = SLAB_VOXELS,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spacing = Spacingd(keys, pixdim=pixdim, mode="bilinear")
        self.slab_voxels = slab_voxels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, MetaTensor):
                raise TypeError(f"BoundedSpacingd needs a MetaTensor (its affine), got {type(img)}")
            lazy = self.spacing({key: img}, lazy=True)[key]  # geometry and record only
            pending = lazy.pending_operations
            if len(pending) != 1:
                raise RuntimeError(f"expected one pending resampling, got {len(pending)}")
            op = pending[0]
            affine = lazy.peek_pending_affine()
            shape = [int(s) for s in op[LazyAttr.SHAPE]]
            xform = affine_from_pending(op)
            same = list(img.shape[1:]) == shape and np.allclose(
                np.asarray(torch.as_tensor(xform).cpu()), np.eye(4), atol=1e-6
            )
            if same:  # a new tensor all the same: what follows may work in place
                values = img.as_tensor().to(torch.float32, copy=True)
            else:
                values = resample_linear(img.as_tensor(), xform, shape, self.slab_voxels)
            out = MetaTensor(values, meta=dict(img.meta))
            out.applied_operations = list(img.applied_operations)
            out.affine = torch.as_tensor(affine, dtype=torch.float64)
            out.push_applied_operation(op)
            d[key] = out
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.spacing.inverse(data)  # the recorded operation is this Spacingd's

"""Shared pieces of the phantom families: affines, smooth random fields, world-mm grids,
painting helpers and the seeded, atomic writers of NIfTI and PNG files."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sam3d.data.io import atomic_write
from sam3d.errors import Sam3DError


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """3 x 3 rotation about a unit axis (Rodrigues)."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def make_affine(
    spacing_mm: tuple[float, float, float],
    shape_vox: tuple[int, int, int],
    orientation: str,
    center_world: tuple[float, float, float] = (0.0, 0.0, 0.0),
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """A 4 x 4 RAS+ affine whose volume centre sits at ``center_world``.

    ``orientation`` is an axis-code string ("RAS", "LPS", "LAS", ...) or "oblique"
    (LPS or RAS tilted by 5-15 degrees about a random axis; needs ``rng``).
    """
    import nibabel.orientations as nio

    if orientation == "oblique":
        rng = rng if rng is not None else np.random.default_rng(0)
        base = np.diag([-1.0, -1.0, 1.0]) if rng.random() < 0.5 else np.eye(3)
        angle = np.deg2rad(rng.uniform(5.0, 15.0))
        rot = _rotation(rng.normal(size=3), angle) @ base
    else:
        try:
            ornt = nio.axcodes2ornt(tuple(orientation))
        except Exception as e:
            raise Sam3DError(
                f"unknown orientation {orientation!r}: use 'oblique' or axis codes like 'RAS'"
            ) from e
        if len(orientation) != 3 or np.isnan(ornt).any():
            raise Sam3DError(f"unknown orientation {orientation!r}: use 'oblique' or e.g. 'RAS'")
        rot = np.zeros((3, 3))
        for vox_axis, (world_axis, flip) in enumerate(ornt):
            rot[int(world_axis), vox_axis] = flip
    m = rot @ np.diag(np.asarray(spacing_mm, dtype=float))
    affine = np.eye(4)
    affine[:3, :3] = m
    center_vox = (np.asarray(shape_vox, dtype=float) - 1) / 2
    affine[:3, 3] = np.asarray(center_world, dtype=float) - m @ center_vox
    return affine


def _interp_matrix(n_out: int, n_in: int, width: float) -> np.ndarray:
    """Row-normalised Gaussian weights mapping ``n_in`` coarse samples to ``n_out`` fine ones."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)[:, None]
    w = np.exp(-0.5 * ((pos - np.arange(n_in)[None, :]) / width) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], spacing_mm: tuple[float, ...], cell_mm: float
) -> np.ndarray:
    """Unit-variance smooth random field with correlation length ~ ``cell_mm``.

    Separable Gaussian interpolation of coarse white noise: three small matrix
    products, much faster than ``ndimage.zoom`` + ``gaussian_filter`` on 512^2 x 100.
    """
    coarse_shape = [max(2, int(np.ceil(n * s / cell_mm)) + 2) for n, s in zip(shape, spacing_mm)]
    f = rng.standard_normal(coarse_shape).astype(np.float32)
    # Expand the last axis first: the biggest product (axis 0) comes last and needs no copy.
    for axis in reversed(range(len(shape))):
        w = _interp_matrix(shape[axis], coarse_shape[axis], 0.7)
        w /= np.sqrt((w**2).sum(axis=1, keepdims=True))  # unit variance per output sample
        g = np.moveaxis(f, axis, 0)  # a copy only while f is still small (axis > 0)
        out = w @ g.reshape(g.shape[0], -1)  # one 2D BLAS product
        f = np.moveaxis(out.reshape(shape[axis], *g.shape[1:]), 0, axis)
    return np.ascontiguousarray(f)


class _Grid:
    """World coordinates (relative to an anatomy centre) of index boxes of one volume."""

    def __init__(self, affine: np.ndarray, shape: tuple[int, int, int], center: np.ndarray):
        self.affine = affine
        self.shape = shape
        self.center = center
        self.inv = np.linalg.inv(affine)

    def box(self, world_lo: np.ndarray, world_hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box (slices) covering the world-space box [lo, hi] (relative coords)."""
        lo, hi = np.asarray(world_lo, float), np.asarray(world_hi, float)
        corners = np.array(list(itertools.product(*zip(lo, hi))))
        vox = (self.inv[:3, :3] @ (corners + self.center).T).T + self.inv[:3, 3]
        a = np.maximum(np.floor(vox.min(axis=0)).astype(int) - 1, 0)
        b = np.minimum(np.ceil(vox.max(axis=0)).astype(int) + 2, self.shape)
        if np.any(b <= a):
            return None
        return tuple(slice(int(i), int(j)) for i, j in zip(a, b))

    def coords(self, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
        """x, y, z (relative world mm) of the box, broadcastable, only as big as needed."""
        idx = [np.arange(s.start, s.stop, dtype=np.float64) for s in box]
        out = []
        for r in range(3):
            acc: Any = np.float32(self.affine[r, 3] - self.center[r])
            for d in range(3):
                c = self.affine[r, d]
                if abs(c) > 1e-9:
                    shp = [1, 1, 1]
                    shp[d] = -1
                    acc = acc + (c * idx[d]).astype(np.float32).reshape(shp)
            out.append(
                np.asarray(acc, dtype=np.float32).reshape([1, 1, 1]) if np.ndim(acc) == 0 else acc
            )
        return out


def _paint(
    target: np.ndarray,
    value: int,
    box: tuple[slice, slice, slice] | None,
    mask: np.ndarray,
    only_where: tuple[int, ...] | None = None,
) -> np.ndarray | None:
    """Write ``value`` into ``target[box]`` where ``mask`` (broadcast) holds; return that mask."""
    if box is None:
        return None
    view = target[box]
    m = np.broadcast_to(mask, view.shape)
    if only_where is not None:
        m = m & np.isin(view, only_where)
    view[m] = value
    return m


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float
) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype: Any) -> None:
    """Write a NIfTI with ``affine`` as both qform and sform (code 1), atomically."""
    import nibabel as nib

    data = np.asarray(array)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(dtype)
    atomic_write(Path(path), lambda tmp: nib.save(img, str(tmp)))


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, atomically (row = H axis)."""
    from PIL import Image

    atomic_write(Path(path), lambda tmp: Image.fromarray(np.asarray(array)).save(tmp, format="PNG"))


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a dataset generated with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _iter_cases(n: int, progress: bool, desc: str) -> Iterator[int]:
    from tqdm.auto import tqdm

    yield from tqdm(range(n), desc=desc, disable=not progress, unit="case")

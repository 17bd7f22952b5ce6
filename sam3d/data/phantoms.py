"""Synthetic data: abdominal CT volumes with kidney lesions, and fundus-like vessel images.

Everything is deterministic for a seed. The CT anatomy is defined in world
millimetres (RAS+) and sampled through the image affine, so different spacings
and orientations (RAS, LPS, oblique) show the same body. Labels follow the KiTS
convention: 0 background, 1 organ (kidney), 2 tumour; tumours lie inside the
organ. The vessel images are RGB with dark branching trees on a textured
background inside a circular field of view; their labels are binary.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from sam3d.data.io import atomic_write
from sam3d.errors import Sam3DError

# Tissue codes of CTPhantom.tissue; HU ranges are drawn per case from TISSUE_HU.
TISSUES = (
    "air",
    "fat",
    "muscle",
    "bowel",
    "liver",
    "vessel",
    "bone",
    "marrow",
    "csf",
    "disc",
    "organ",
    "tumour",
)
T = {name: code for code, name in enumerate(TISSUES)}
TISSUE_HU = {
    "air": (-1000.0, -1000.0),
    "fat": (-115.0, -85.0),
    "muscle": (40.0, 60.0),
    "bowel": (20.0, 40.0),
    "liver": (55.0, 75.0),
    "vessel": (140.0, 220.0),  # contrast-enhanced aorta
    "bone": (800.0, 1100.0),  # cortical rim and posterior elements
    "marrow": (350.0, 500.0),  # cancellous vertebral body
    "csf": (5.0, 20.0),
    "disc": (70.0, 100.0),
    "organ": (30.0, 50.0),
    "tumour": (30.0, 50.0),  # replaced per lesion by organ +- contrast
}
# Amplitude (HU) of the smooth texture per tissue.
TEXTURE_HU = {"fat": 8.0, "muscle": 6.0, "bowel": 12.0, "liver": 5.0, "organ": 4.0}
LESION_CONTRAST_HU = (35.0, 72.0)  # |tumour - organ|, before blur and noise
LESION_DIAMETER_MM = (10.0, 60.0)
NOMINAL_FOV_MM = 300.0  # in-plane field of view the nominal anatomy is sized for
SLICE_SPACINGS_MM = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
ORIENTATIONS = ("RAS", "LPS", "oblique")
MAX_INPLANE_VOX = 512


@dataclass
class Lesion:
    """One lesion as generated (world mm, RAS+)."""

    center_world: tuple[float, float, float]
    center_vox: tuple[float, float, float]
    diameter_mm: float  # diameter of the sphere that bounds the lobulated shape
    contrast_hu: float


@dataclass
class CTPhantom:
    """A synthetic abdominal CT volume.

    ``image_hu`` and ``label`` are indexed (i, j, k) with the slice axis last;
    ``affine`` maps (i, j, k, 1) to RAS+ world mm (nibabel convention).
    """

    image_hu: np.ndarray  # float32 (I, J, K)
    label: np.ndarray  # uint8 (I, J, K): 0 background, 1 organ, 2 tumour
    affine: np.ndarray  # float64 (4, 4)
    spacing_mm: tuple[float, float, float]
    orientation: str
    tissue: np.ndarray | None = None  # uint8 (I, J, K): codes of TISSUES
    lesions: list[Lesion] = field(default_factory=list)


@dataclass
class VesselPhantom:
    """A fundus-like 2D image with branching vessels."""

    image: np.ndarray  # float32 (H, W, 3) in [0, 1], vessels darker
    label: np.ndarray  # uint8 (H, W) in {0, 1}
    fov: np.ndarray  # bool (H, W): the circular field of view
    n_trees: int = 0  # number of drawn trees = 8-connected components of label


# --------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------- CT phantom


def _resolve_geometry(
    rng: np.random.Generator,
    shape_vox: tuple[int, int, int] | None,
    spacing_mm: tuple[float, float, float] | None,
    fov_mm: float,
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if spacing_mm is None:
        if shape_vox is None:
            s_in = float(rng.uniform(0.6, 1.0))
        else:  # fit the requested grid to the field of view, +-10 %
            s_in = float(fov_mm / max(shape_vox[0], shape_vox[1]) * rng.uniform(0.9, 1.1))
        spacing_mm = (s_in, s_in, float(rng.choice(SLICE_SPACINGS_MM)))
    spacing_mm = tuple(float(s) for s in spacing_mm)  # type: ignore[assignment]
    if shape_vox is None:
        n_in = int(min(MAX_INPLANE_VOX, round(fov_mm / spacing_mm[0])))
        n_sl = int(round(rng.uniform(120.0, 180.0) / spacing_mm[2]))
        shape_vox = (n_in, int(min(MAX_INPLANE_VOX, round(fov_mm / spacing_mm[1]))), max(8, n_sl))
    shape_vox = tuple(int(n) for n in shape_vox)  # type: ignore[assignment]
    if len(shape_vox) != 3 or len(spacing_mm) != 3:
        raise Sam3DError("shape_vox and spacing_mm must have three entries (i, j, k)")
    if min(shape_vox) < 4 or min(spacing_mm) <= 0:
        raise Sam3DError(f"phantom too small or spacing not positive: {shape_vox}, {spacing_mm}")
    return shape_vox, spacing_mm  # type: ignore[return-value]


def make_ct_phantom(
    seed: int,
    shape_vox: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
    orientation: str | None = None,
    n_lesions: int | None = None,
    fov_mm: float = NOMINAL_FOV_MM,
    noise_hu: float | None = None,
    n_organs: int | None = None,
) -> CTPhantom:
    """A synthetic abdominal CT volume with kidneys and lobulated kidney lesions.

    Args:
        seed: everything is drawn from ``np.random.default_rng(seed)``.
        shape_vox: (I, J, K); None: ``fov_mm`` / in-plane spacing (<= 512) by 120-180 mm.
        spacing_mm: (si, sj, sk); None: in-plane 0.6-1.0 mm (or ``fov_mm``/shape when a
            shape is given), slices 1.25-5 mm.
        orientation: "RAS", "LPS", "oblique" or any axis codes; None: drawn.
        n_lesions: 0-3 lesions when None. Each is a union of balls inside a bounding ball
            10-60 mm (and at least 3 voxels) across, clipped to the organ, with an HU
            contrast of 35-72 against it. Fewer are placed when the organ has no room.
        fov_mm: in-plane field of view the anatomy is sized for; anatomy shrinks
            (never grows) when the grid covers less than this.
        noise_hu: standard deviation of the (slightly smoothed) noise; None: 8-18 HU.
        n_organs: number of kidneys (1 or 2); None: 2 with probability 0.85.

    Returns:
        CTPhantom with image_hu float32 (I, J, K), label uint8 (I, J, K) and a RAS+ affine.
    """
    rng = np.random.default_rng(seed)
    shape, spacing = _resolve_geometry(rng, shape_vox, spacing_mm, fov_mm)
    if orientation is None:
        orientation = str(rng.choice(ORIENTATIONS))
    center = np.array([rng.uniform(-40, 40), rng.uniform(-40, 40), rng.uniform(-400, 100)])
    affine = make_affine(spacing, shape, orientation, center, rng)

    # Anatomy scale: shrink to fit a small in-plane field of view.
    extent = np.abs(affine[:3, :3]) @ (np.asarray(shape, float) - 1)
    scale = float(min(1.0, min(extent[0], extent[1]) / fov_mm))
    grid = _Grid(affine, shape, center)
    z_half = extent[2] / 2 + 1.0
    tissue = np.zeros(shape, dtype=np.uint8)
    label = np.zeros(shape, dtype=np.uint8)
    hu = {name: float(rng.uniform(*TISSUE_HU[name])) for name in TISSUES}

    def cyl_box(cx: float, cy: float, rx: float, ry: float):
        return grid.box(np.array([cx - rx, cy - ry, -z_half]), np.array([cx + rx, cy + ry, z_half]))

    def paint_ellipse(code: int, cx, cy, rx, ry, only_where=None):
        box = cyl_box(cx, cy, rx, ry)
        if box is None:
            return
        x, y, _ = grid.coords(box)
        _paint(tissue, code, box, _ellipse(x, y, cx, cy, rx, ry), only_where)

    # Body wall: skin-fat, muscle, then the abdominal cavity (fat with bowel).
    a, b = rng.uniform(125, 145) * scale, rng.uniform(95, 112) * scale
    t_fat, t_mus = rng.uniform(8, 25) * scale, rng.uniform(8, 14) * scale
    a2, b2 = a - t_fat - t_mus, b - t_fat - t_mus
    paint_ellipse(T["fat"], 0, 0, a, b)
    paint_ellipse(T["muscle"], 0, 0, a - t_fat, b - t_fat)
    paint_ellipse(T["fat"], 0, 0, a2, b2)
    bowel = smooth_field(rng, shape, spacing, 14.0 * max(scale, 0.5)) > rng.uniform(0.0, 0.5)
    tissue[(tissue == T["fat"]) & bowel] = T["bowel"]
    # Bowel only inside the cavity: repaint the subcutaneous fat ring.
    box = cyl_box(0, 0, a, b)
    if box is not None:
        x, y, _ = grid.coords(box)
        ring = _ellipse(x, y, 0, 0, a, b) & ~_ellipse(x, y, 0, 0, a - t_fat, b - t_fat)
        _paint(tissue, T["fat"], box, ring)
    cavity = (T["fat"], T["bowel"])

    # Liver on the patient's right (+x in RAS), upper part of the volume.
    lc = np.array([0.45 * a2, 0.15 * b2, rng.uniform(60, 90) * scale])
    lr = np.array([0.5 * a2, 0.7 * b2, 90 * scale])
    box = grid.box(lc - lr, lc + lr)
    if box is not None:
        x, y, z = grid.coords(box)
        m = ((x - lc[0]) / lr[0]) ** 2 + ((y - lc[1]) / lr[1]) ** 2 + (
            (z - lc[2]) / lr[2]
        ) ** 2 <= 1
        _paint(tissue, T["liver"], box, m, cavity)

    # Spine, with paraspinal and psoas muscles and the aorta around it.
    vrx, vry = rng.uniform(18, 22) * scale, rng.uniform(15, 18) * scale
    ys = -b2 + vry + 18 * scale
    yc = ys - vry - 9 * scale  # spinal canal
    for side in (-1, 1):
        paint_ellipse(T["muscle"], side * 26 * scale, yc - 10 * scale, 20 * scale, 22 * scale)
        paint_ellipse(
            T["muscle"], side * (vrx + 10 * scale), ys + 3 * scale, 11 * scale, 11 * scale
        )
    r_ao = rng.uniform(9, 12) * scale
    paint_ellipse(T["vessel"], -8 * scale, ys + vry + r_ao + 3 * scale, r_ao, r_ao)
    rim = max(2.5 * scale, 1.0 * max(spacing[0], spacing[1]))
    paint_ellipse(T["bone"], 0, yc, 13 * scale, 13 * scale)  # lamina ring
    paint_ellipse(T["bone"], 0, yc - 16 * scale, 5 * scale, 12 * scale)  # spinous process
    paint_ellipse(T["csf"], 0, yc, 7 * scale, 7 * scale)
    box = cyl_box(0, ys, vrx, vry)
    if box is not None:
        x, y, z = grid.coords(box)
        body = _ellipse(x, y, 0, ys, vrx, vry)
        inner = _ellipse(x, y, 0, ys, vrx - rim, vry - rim)
        period, disc = 34 * scale, 8 * scale
        in_disc = np.mod(z - rng.uniform(0, period), period) < disc
        _paint(tissue, T["bone"], box, body)
        _paint(tissue, T["marrow"], box, inner & ~in_disc)
        _paint(tissue, T["disc"], box, inner & in_disc)

    # Kidneys: tilted ellipsoids either side of the spine, clipped to the cavity.
    if n_organs is None:
        n_organs = 2 if rng.random() < 0.85 else 1
    sides = [1, -1] if n_organs == 2 else [int(rng.choice([-1, 1]))]
    for side in sides:
        kc = np.array(
            [
                side * rng.uniform(52, 60) * scale,
                ys + rng.uniform(5, 12) * scale,
                rng.uniform(-12, 12) * scale,
            ]
        )
        semi = np.array([rng.uniform(25, 30), rng.uniform(17, 21), rng.uniform(45, 55)]) * scale
        rot = _rotation(np.array([0, 0, 1.0]), side * np.deg2rad(rng.uniform(20, 40)))
        rot = _rotation(np.array([0, 1.0, 0]), np.deg2rad(rng.uniform(-10, 10))) @ rot
        box = grid.box(kc - semi.max(), kc + semi.max())
        if box is None:
            continue
        x, y, z = grid.coords(box)
        d = (x - kc[0], y - kc[1], z - kc[2])
        q = sum((sum(rot[r, c] * d[r] for r in range(3)) / semi[c]) ** 2 for c in range(3))
        m = (q <= 1.0) & _ellipse(x, y, 0, 0, a2, b2)
        _paint(tissue, T["organ"], box, m)
        _paint(label, 1, box, m)

    lesions = _place_lesions(rng, label, tissue, grid, spacing, n_lesions)

    # Intensities: per-tissue HU + texture, lesions, then smoothed noise.
    lut = np.array([hu[name] for name in TISSUES], dtype=np.float32)
    amp = np.array([TEXTURE_HU.get(name, 0.0) for name in TISSUES], dtype=np.float32)
    texture = smooth_field(rng, shape, spacing, 6.0)
    image = lut[tissue] + amp[tissue] * texture
    for les, (box, m) in lesions:  # each lesion its own contrast, a little heterogeneous
        image[box][m] = hu["organ"] + les.contrast_hu + 3.0 * texture[box][m]
    del texture
    sigma_vox = (0.6, 0.6, 0.0)
    noise_sd = float(rng.uniform(8.0, 18.0)) if noise_hu is None else float(noise_hu)
    image += rng.standard_normal(shape, dtype=np.float32) * np.float32(
        noise_sd / _smoothing_gain(sigma_vox)
    )
    image = ndimage.gaussian_filter(image, sigma_vox, mode="nearest", truncate=3.0)
    np.clip(image, -1024.0, 3071.0, out=image)
    return CTPhantom(
        image_hu=image.astype(np.float32, copy=False),
        label=label,
        affine=affine,
        spacing_mm=spacing,
        orientation=orientation,
        tissue=tissue,
        lesions=[les for les, _ in lesions],
    )


def _smoothing_gain(sigma_vox: tuple[float, ...]) -> float:
    """Factor by which a Gaussian filter of these sigmas scales white-noise std."""
    gain = 1.0
    for s in sigma_vox:
        if s > 0:
            delta = np.zeros(31)
            delta[15] = 1.0
            gain *= float(np.sqrt((ndimage.gaussian_filter1d(delta, s, truncate=3.0) ** 2).sum()))
    return gain


def _place_lesions(
    rng: np.random.Generator,
    label: np.ndarray,
    tissue: np.ndarray,
    grid: _Grid,
    spacing: tuple[float, float, float],
    n_lesions: int | None,
) -> list[tuple[Lesion, tuple[tuple[slice, slice, slice], np.ndarray]]]:
    """Lobulated lesions (unions of balls that all contain the centre) inside the organ.

    A lesion of radius r has its centre at least 0.7 r deep in the organ and is
    clipped to it; lesions keep a gap of two voxels between their bounding balls.
    """
    if n_lesions is None:
        n_lesions = int(rng.integers(0, 4))
    if n_lesions == 0 or not label.any():
        return []
    organ = label == 1
    nz = np.argwhere(organ)
    lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
    crop = np.pad(organ[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], 1)
    depth = ndimage.distance_transform_edt(crop, sampling=spacing)[1:-1, 1:-1, 1:-1]
    cand = np.argwhere(depth > 0) + lo
    cand_depth = depth[depth > 0]
    r_min = max(LESION_DIAMETER_MM[0], 3.0 * max(spacing)) / 2
    r_max = min(LESION_DIAMETER_MM[1] / 2, cand_depth.max() / 0.7)
    if r_max < r_min:
        return []
    placed: list[tuple[Lesion, tuple[tuple[slice, slice, slice], np.ndarray]]] = []
    gap = 2 * max(spacing)
    for _ in range(n_lesions):
        for _attempt in range(50):
            r = float(rng.uniform(r_min, r_max))
            ok = cand_depth >= 0.7 * r
            if not ok.any():
                continue
            vox = cand[ok][rng.integers(ok.sum())].astype(float)
            c_world = grid.affine[:3, :3] @ vox + grid.affine[:3, 3]
            if any(
                np.linalg.norm(c_world - np.asarray(p.center_world)) < r + p.diameter_mm / 2 + gap
                for p, _ in placed
            ):
                continue
            break
        else:
            continue
        rel = c_world - grid.center
        box = grid.box(rel - r, rel + r)
        x, y, z = grid.coords(box)
        m = (x - rel[0]) ** 2 + (y - rel[1]) ** 2 + (z - rel[2]) ** 2 <= (0.6 * r) ** 2
        for _lobe in range(int(rng.integers(2, 6))):
            delta = rng.uniform(0.15, 0.45) * r
            u = rng.normal(size=3)
            lc = rel + delta * u / np.linalg.norm(u)
            lr = rng.uniform(max(1.05 * delta, 0.4 * r), r - delta)
            m = m | ((x - lc[0]) ** 2 + (y - lc[1]) ** 2 + (z - lc[2]) ** 2 <= lr**2)
        m = np.broadcast_to(m, label[box].shape) & (label[box] == 1)
        if not m.any():
            continue
        label[box][m] = 2
        tissue[box][m] = T["tumour"]
        contrast = float(rng.uniform(*LESION_CONTRAST_HU)) * (1 if rng.random() < 0.35 else -1)
        les = Lesion(
            center_world=tuple(float(v) for v in c_world),
            center_vox=tuple(float(v) for v in vox),
            diameter_mm=2 * r,
            contrast_hu=contrast,
        )
        placed.append((les, (box, m)))
    return placed


# --------------------------------------------------------------------------- vessels


def make_vessel_phantom(seed: int, size: tuple[int, int] = (256, 256)) -> VesselPhantom:
    """A fundus-like RGB image with 2-4 dark branching vessel trees from an optic disc.

    Trees are recursive random walks whose width (4-5 px at the root, at least 1 px)
    shrinks at each branching; a branch stops at the edge of the circular field of
    view or before it would touch another branch, so every tree is one 8-connected
    component (``n_trees`` of them) and the label's largest inscribed radius stays
    near half the widest vessel.

    Returns:
        VesselPhantom: image float32 (H, W, 3) in [0, 1], label uint8 (H, W), fov bool (H, W).
    """
    rng = np.random.default_rng(seed)
    h, w = int(size[0]), int(size[1])
    if h < 32 or w < 32:
        raise Sam3DError(f"vessel phantom size must be at least 32 x 32, got {size}")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    radius = 0.46 * min(h, w)
    rho = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    fov = rho <= radius
    px = min(h, w) / 256.0  # lengths scale with the image; widths stay in pixels

    side = 1 if rng.random() < 0.5 else -1  # optic disc left or right of the centre
    disc = np.array([cy + rng.uniform(-0.05, 0.05) * h, cx + side * 0.28 * min(h, w)])
    disc_r = 0.075 * min(h, w)

    owner = np.zeros((h, w), dtype=np.int32)  # branch id (from 1) of each painted pixel
    tree_map = np.zeros((h, w), dtype=np.int32)  # tree id (from 1) of each painted pixel
    width_map = np.zeros((h, w), dtype=np.float32)
    n_trees = int(rng.integers(2, 5))
    # Arcades: temporal (towards the centre) up and down, then nasal up and down.
    base = np.pi if side > 0 else 0.0
    angles = [base - 0.9, base + 0.9, base + np.pi - 0.7, base + np.pi + 0.7][:n_trees]
    next_id = [0]

    def walk(
        p: np.ndarray, angle: float, width: float, depth: int, grace: float, tree: int
    ) -> None:
        bid = next_id[0] = next_id[0] + 1
        length = rng.uniform(25, 60) * px * (0.8**depth)
        step, travelled, curv = 0.5, 0.0, rng.normal(0, 0.01)
        while travelled < length:
            r = max(width / 2, 0.75)
            y0, x0 = p
            if np.hypot(y0 - cy, x0 - cx) > radius - r - 2:
                return
            ys0, ys1 = int(max(0, np.floor(y0 - r - 2))), int(min(h, np.ceil(y0 + r + 3)))
            xs0, xs1 = int(max(0, np.floor(x0 - r - 2))), int(min(w, np.ceil(x0 + r + 3)))
            d = np.hypot(yy[ys0:ys1, xs0:xs1] - y0, xx[ys0:ys1, xs0:xs1] - x0)
            own, trees = owner[ys0:ys1, xs0:xs1], tree_map[ys0:ys1, xs0:xs1]
            near = d <= r + 1.5  # a one-pixel gap keeps trees and branches apart
            if np.any(near & (trees > 0) & (trees != tree)):
                return  # would touch another tree
            if travelled > grace and np.any(near & (own > 0) & (own != bid)):
                return  # would touch another branch of this tree
            hit = (d <= r) & (own == 0)
            own[hit] = bid
            trees[hit] = tree
            width_map[ys0:ys1, xs0:xs1][hit] = width
            p = p + step * np.array([np.sin(angle), np.cos(angle)])
            curv = 0.9 * curv + rng.normal(0, 0.004)
            angle += curv
            travelled += step
        if width * 0.8 < 1.0 or depth >= 7:
            return
        turn = 1 if rng.random() < 0.5 else -1
        g = width + 3.0
        # Monopodial branching: the parent continues, a thinner side branch leaves.
        walk(
            p,
            angle + turn * np.deg2rad(rng.uniform(5, 20)),
            width * rng.uniform(0.8, 0.9),
            depth + 1,
            g,
            tree,
        )
        side_w = width * rng.uniform(0.45, 0.7)
        if side_w >= 1.0:
            walk(p, angle - turn * np.deg2rad(rng.uniform(40, 75)), side_w, depth + 1, g, tree)

    for tree, a0 in enumerate(angles, start=1):
        start = disc + max(0.5 * disc_r, 8.0) * np.array([np.sin(a0), np.cos(a0)])
        walk(start, a0, rng.uniform(4.0, 5.0), 0, 0.0, tree)

    label = ((owner > 0) & fov).astype(np.uint8)
    n_trees = len(np.unique(tree_map[label > 0]))  # trees that found room to grow

    # Background: orange-red fundus colour, smooth texture, vignetting, bright disc, dark macula.
    tex = smooth_field(rng, (h, w), (1.0, 1.0), 24.0 * px)
    color = np.array([rng.uniform(0.75, 0.9), rng.uniform(0.35, 0.45), rng.uniform(0.12, 0.2)])
    shade = (1.0 + 0.06 * tex) * (1.0 - 0.35 * (rho / radius) ** 2)
    disc_glow = np.exp(-(((yy - disc[0]) ** 2 + (xx - disc[1]) ** 2) / (2 * disc_r**2)))
    mac = np.array([cy, cx - side * 0.05 * min(h, w)])
    macula = np.exp(-(((yy - mac[0]) ** 2 + (xx - mac[1]) ** 2) / (2 * (1.5 * disc_r) ** 2)))
    img = color[None, None, :] * (shade * (1 - 0.3 * macula))[..., None]
    img = img + 0.45 * disc_glow[..., None] * np.array([1.0, 0.9, 0.6])
    # Vessels: darker, more so in green, thin ones fainter; slightly blurred edges.
    contrast = np.clip(0.25 + 0.07 * width_map, 0.0, 0.65) * label
    contrast = ndimage.gaussian_filter(contrast, 0.6)
    img = img * (1.0 - contrast[..., None] * np.array([0.55, 1.0, 0.8]))
    img = img + rng.normal(0, 0.015, img.shape)
    img = np.clip(img, 0.0, 1.0) * fov[..., None]
    return VesselPhantom(image=img.astype(np.float32), label=label, fov=fov, n_trees=n_trees)


# --------------------------------------------------------------------------- datasets


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


def split_cases(n: int) -> tuple[list[int], list[int], list[int]]:
    """Deterministic 60/20/20 split of case indices, at least one case each when n >= 3."""
    if n < 3:
        return list(range(min(n, 1))), list(range(1, n)), []
    n_val = max(1, round(0.2 * n))
    n_test = max(1, round(0.2 * n))
    n_train = n - n_val - n_test
    return (
        list(range(n_train)),
        list(range(n_train, n_train + n_val)),
        list(range(n_train + n_val, n)),
    )


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a dataset generated with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _iter_cases(n: int, progress: bool, desc: str) -> Iterator[int]:
    from tqdm.auto import tqdm

    yield from tqdm(range(n), desc=desc, disable=not progress, unit="case")


def write_phantom_dataset(
    kind: str,
    out: Path | str,
    n: int,
    seed: int = 0,
    progress: bool = False,
    **kwargs: Any,
) -> Path:
    """Write ``n`` phantoms as an MSD-style dataset and return its ``dataset.json`` path.

    ct: ``imagesTr/phantom_XXX.nii.gz`` (int16 HU) and ``labelsTr/phantom_XXX.nii.gz``
    (uint8: 0 background, 1 kidney, 2 tumour). vessels: ``imagesTr/vessel_XXX.png``
    (RGB), ``labelsTr/vessel_XXX.png`` (uint8 0/1) and ``fovTr/vessel_XXX.png`` (0/1).
    ``dataset.json`` lists ``training``/``validation``/``test`` (60/20/20) with paths
    relative to it. ``kwargs`` go to :func:`make_ct_phantom` / :func:`make_vessel_phantom`.
    """
    if kind not in ("ct", "vessels"):
        raise Sam3DError(f"unknown phantom kind {kind!r}: use 'ct' or 'vessels'")
    if int(n) < 1:
        raise Sam3DError(f"the number of cases must be at least 1, got {n}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Sam3DError(f"cannot create the output folder {out}: {e.strerror}") from e
    entries: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    for i in _iter_cases(int(n), progress, f"phantoms ({kind})"):
        s = case_seed(seed, i)
        if kind == "ct":
            ph = make_ct_phantom(s, **kwargs)
            name = f"phantom_{i:03d}.nii.gz"
            save_nifti(ph.image_hu, ph.affine, out / "imagesTr" / name, np.int16)
            save_nifti(ph.label, ph.affine, out / "labelsTr" / name, np.uint8)
            entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            cases.append(
                {
                    "case": name,
                    "seed": s,
                    "shape_vox": list(ph.image_hu.shape),
                    "spacing_mm": [round(v, 4) for v in ph.spacing_mm],
                    "orientation": ph.orientation,
                    "lesion_diameters_mm": [round(les.diameter_mm, 2) for les in ph.lesions],
                }
            )
        else:
            vp = make_vessel_phantom(s, **kwargs)
            name = f"vessel_{i:03d}.png"
            save_png(np.rint(vp.image * 255).astype(np.uint8), out / "imagesTr" / name)
            save_png(vp.label, out / "labelsTr" / name)
            save_png(vp.fov.astype(np.uint8), out / "fovTr" / name)
            entries.append(
                {
                    "image": f"./imagesTr/{name}",
                    "label": f"./labelsTr/{name}",
                    "fov": f"./fovTr/{name}",
                }
            )
            cases.append({"case": name, "seed": s, "n_trees": vp.n_trees})
    train, val, test = split_cases(int(n))
    meta: dict[str, Any] = {
        "name": "sam3d-phantom-ct" if kind == "ct" else "sam3d-phantom-vessels",
        "description": f"synthetic data from sam3d.data.phantoms (seed {seed})",
        "reference": "sam3d",
        "licence": "CC0",
        "tensorImageSize": "3D" if kind == "ct" else "2D",
        "modality": {"0": "CT"} if kind == "ct" else {"0": "fundus RGB"},
        "labels": {"0": "background", "1": "kidney", "2": "tumour"}
        if kind == "ct"
        else {"0": "background", "1": "vessel"},
        "numTraining": len(train) + len(val),
        "numTest": len(test),
        "training": [entries[i] for i in train],
        "validation": [entries[i] for i in val],
        "test": [entries[i] for i in test],
        "phantom": {"kind": kind, "seed": seed, "cases": cases},
    }
    path = out / "dataset.json"
    text = json.dumps(meta, indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path

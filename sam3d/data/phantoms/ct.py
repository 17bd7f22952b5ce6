"""Synthetic abdominal CT volumes with kidney lesions.

Everything is deterministic for a seed. The anatomy is defined in world
millimetres (RAS+) and sampled through the image affine, so different spacings
and orientations (RAS, LPS, oblique) show the same body. Labels follow the KiTS
convention: 0 background, 1 organ (kidney), 2 tumour; tumours lie inside the
organ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from sam3d.data.phantoms.common import _ellipse, _Grid, _paint, _rotation, make_affine, smooth_field
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

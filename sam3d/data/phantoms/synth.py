"""Domain-randomised training volumes, SynthSeg-style: the object under the click.

Each volume is a random label map (a body, 2-6 organ blobs, 1-5 lesions) painted with a
random intensity per label and per volume, then blurred, bias-corrupted and noised, on a
random grid (spacing 0.5-5 mm per axis) in a random orientation (RAS, LPS, oblique).
Nothing but the local contrast at the click tells a lesion from its neighbours: a lesion
may be brighter or darker than its host, sit in an organ or in the body wall, and touch
another lesion (each lesion keeps its own instance id, so that the target is always the
clicked lesion alone).

Shapes are drawn in millimetres: organs are ellipsoids 20-140 mm across with a perturbed
surface; lesions (5-60 mm, capped by the field of view) are unions of 1-4 ellipsoidal
lobes with a random-field-perturbed surface, from round to irregular.

Intensities are HU-like and fall inside the kits window (-54..247 HU) so the kits
preprocessing (window, z-score, body crop at -500 HU) applies unchanged: air -1000 HU
outside the body; body, organs and lesions -40..240 HU; each lesion at least
``min_contrast_hu`` from its host.

Labels (KiTS-style, the kits bundle's ``tumour_label`` 2): 0 background, 1 organ,
2 lesion; instances: 0 none, 1..L one id per lesion. This family is for training; its
held-out split is its own seeds. The second, held-out generator is :mod:`.heldout`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from sam3d.data.phantoms.common import make_affine, smooth_field
from sam3d.errors import Sam3DError

AIR_HU = -1000.0
TISSUE_RANGE_HU = (-40.0, 240.0)
LESION_DIAMETER_MM = (5.0, 60.0)
SPACING_RANGE_MM = (0.5, 5.0)
ORIENTATIONS = ("RAS", "LPS", "oblique")


@dataclass
class SynthLesion:
    """One lesion as generated: its instance id, centre (voxels), diameter, intensity."""

    instance: int
    center_vox: tuple[float, float, float]
    diameter_mm: float
    intensity_hu: float
    host_hu: float
    touching: int  # instance id of the lesion it was placed against, 0 if none


@dataclass
class SynthPhantom:
    """A domain-randomised volume; arrays are indexed (i, j, k), ``affine`` to RAS+ mm."""

    image_hu: np.ndarray  # float32 (I, J, K)
    label: np.ndarray  # uint8: 0 background, 1 organ, 2 lesion
    instances: np.ndarray  # uint16: 0 none, 1..L lesion ids
    affine: np.ndarray  # float64 4 x 4
    spacing_mm: tuple[float, float, float]
    orientation: str
    lesions: list[SynthLesion] = field(default_factory=list)


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _geometry(
    rng: np.random.Generator,
    shape_vox: tuple[int, int, int] | None,
    spacing_mm: tuple[float, float, float] | None,
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """In-plane spacing 0.5-2 mm, slices 0.5-5 mm (log-uniform); 96-128 voxels in plane,
    slices covering 60-100 % of the in-plane field of view (16-128)."""
    if spacing_mm is None:
        sxy = _loguniform(rng, 0.5, 2.0)
        spacing_mm = (sxy, sxy, _loguniform(rng, *SPACING_RANGE_MM))
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise Sam3DError(f"spacing_mm must be three positive values, got {spacing_mm}")
    if shape_vox is None:
        n = int(rng.integers(96, 129))
        k = int(np.clip(round(n * spacing[0] / spacing[2] * rng.uniform(0.6, 1.0)), 16, 128))
        shape_vox = (n, n, k)
    shape = tuple(int(s) for s in shape_vox)
    if len(shape) != 3 or min(shape) < 8:
        raise Sam3DError(f"shape_vox must be three sides of at least 8 voxels, got {shape_vox}")
    return shape, spacing  # type: ignore[return-value]


def _axes_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    """Broadcastable mm coordinates of the voxel centres, 0 at the volume centre."""
    out = []
    for a, (n, s) in enumerate(zip(shape, spacing)):
        shp = [1, 1, 1]
        shp[a] = n
        out.append(((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s).reshape(shp))
    return out


def _box(
    center_mm: np.ndarray, radius_mm: float, shape: tuple[int, ...], spacing: tuple[float, ...]
) -> tuple[slice, ...] | None:
    lo, hi = [], []
    for c, r, n, s in zip(center_mm, [radius_mm] * 3, shape, spacing):
        c_vox = c / s + (n - 1) / 2
        a, b = int(np.floor(c_vox - r / s)) - 1, int(np.ceil(c_vox + r / s)) + 2
        lo.append(max(a, 0))
        hi.append(min(b, n))
    if any(b <= a for a, b in zip(lo, hi)):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _blob(
    rng: np.random.Generator,
    axes: list[np.ndarray],
    box: tuple[slice, ...],
    spacing: tuple[float, ...],
    center_mm: np.ndarray,
    radius_mm: float,
    n_lobes: int,
    roughness: float,
) -> np.ndarray:
    """Bool mask over ``box``: a union of ellipsoidal lobes (all near the centre) whose
    surface a smooth random field moves by up to ``roughness`` of the radius."""
    x, y, z = (ax[tuple(box[a] if d == a else slice(None) for d in range(3))]
               for a, ax in enumerate(axes))  # fmt: skip
    best = None
    for lobe in range(n_lobes):
        if lobe == 0:
            c, semi = center_mm, rng.uniform(0.6, 1.0, size=3) * radius_mm
        else:
            u = rng.normal(size=3)
            delta = rng.uniform(0.2, 0.5) * radius_mm
            c = center_mm + delta * u / np.linalg.norm(u)
            semi = rng.uniform(0.35, 1.0 - 0.5 * delta / radius_mm, size=3) * radius_mm
        r2 = ((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2 + ((z - c[2]) / semi[2]) ** 2
        best = r2 if best is None else np.minimum(best, r2)
    shape = tuple(s.stop - s.start for s in box)
    assert best is not None
    best = np.broadcast_to(best, shape)
    if roughness > 0:
        f = smooth_field(rng, shape, spacing, max(radius_mm * 0.6, 2 * max(spacing)))
        return np.sqrt(best) <= 1.0 + roughness * np.clip(f, -2.5, 2.5) / 2.5
    return best <= 1.0


def _random_voxel(rng: np.random.Generator, tissue: np.ndarray, least: int) -> np.ndarray | None:
    """A uniform voxel whose tissue code is at least ``least`` (rejection sampling)."""
    for _ in range(500):
        v = np.array([rng.integers(n) for n in tissue.shape])
        if tissue[tuple(v)] >= least:
            return v
    return None


def make_synth_phantom(
    seed: int,
    shape_vox: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
    orientation: str | None = None,
    n_lesions: int | None = None,
    n_organs: int | None = None,
    touching: float = 0.35,
    min_contrast_hu: float = 25.0,
    lesion_diameter_mm: tuple[float, float] = LESION_DIAMETER_MM,
) -> SynthPhantom:
    """One domain-randomised volume for ``seed`` (deterministic).

    Args:
        seed: the case's seed.
        shape_vox / spacing_mm: the grid (default drawn: see :func:`_geometry`).
        orientation: "RAS", "LPS", "oblique" or any axis code; default drawn of the three.
        n_lesions: default 1-5; n_organs: default 2-6.
        touching: probability that a lesion is placed against the previous one.
        min_contrast_hu: least |lesion - host| intensity difference.
        lesion_diameter_mm: range of the lesions' bounding diameter (log-uniform), capped
            at 45 % of the smallest field-of-view side and at least two voxels.
    """
    rng = np.random.default_rng(int(seed))
    shape, spacing = _geometry(rng, shape_vox, spacing_mm)
    orientation = orientation or str(rng.choice(ORIENTATIONS))
    axes = _axes_mm(shape, spacing)
    fov = np.asarray(shape, float) * np.asarray(spacing)
    x, y = axes[0], axes[1]

    # body: an elliptic cylinder with a perturbed outline; 30 % fill the field of view
    scale = rng.uniform(0.55, 0.8) if rng.random() < 0.3 else rng.uniform(0.32, 0.47)
    bx, by = fov[0] * scale, fov[1] * rng.uniform(0.8, 1.0) * scale
    outline = smooth_field(rng, shape[:2], spacing[:2], 0.3 * min(fov[:2]))[..., None]
    body = ((x / bx) ** 2 + (y / by) ** 2)[..., :1] <= (1.0 + 0.08 * outline) ** 2
    body = np.broadcast_to(body, shape)
    tissue = np.where(body, 1, 0).astype(np.uint8)  # 0 air, 1 body, 2.. organs

    # organs: perturbed ellipsoids inside the body, later ones over earlier ones
    n_organs = int(rng.integers(2, 7)) if n_organs is None else int(n_organs)
    for o in range(n_organs):
        r = rng.uniform(10.0, max(12.0, 0.3 * min(fov[:2])))
        c = np.array([rng.uniform(-0.6, 0.6) * bx, rng.uniform(-0.6, 0.6) * by,
                      rng.uniform(-0.4, 0.4) * fov[2]])  # fmt: skip
        box = _box(c, r * 1.3, shape, spacing)
        if box is None:
            continue
        m = _blob(rng, axes, box, spacing, c, r, int(rng.integers(1, 3)), rng.uniform(0.05, 0.2))
        view = tissue[box]
        view[m & (view > 0)] = 2 + o

    label = np.where(tissue >= 2, 1, 0).astype(np.uint8)
    instances = np.zeros(shape, dtype=np.uint16)
    intensity = {0: AIR_HU, 1: rng.uniform(*TISSUE_RANGE_HU)}
    for o in range(n_organs):
        intensity[2 + o] = rng.uniform(*TISSUE_RANGE_HU)

    # lesions: in an organ (70 %) or anywhere in the body, or against the previous one
    n_lesions = int(rng.integers(1, 6)) if n_lesions is None else int(n_lesions)
    d_min = max(lesion_diameter_mm[0], 2.0 * max(spacing))
    d_max = max(d_min, min(lesion_diameter_mm[1], 0.45 * float(fov.min())))
    has_organ = bool(label.any())
    lesions: list[SynthLesion] = []
    lesion_hu: dict[int, float] = {}
    for _ in range(n_lesions):
        d = _loguniform(rng, d_min, d_max) if d_max > d_min else d_min
        r = d / 2
        against = lesions[-1] if lesions and rng.random() < touching else None
        if against is not None:
            u = rng.normal(size=3)
            u[2] *= 0.5
            c_prev = (np.asarray(against.center_vox) - (np.asarray(shape) - 1) / 2) * spacing
            c = c_prev + u / np.linalg.norm(u) * (against.diameter_mm / 2 + r) * rng.uniform(
                0.6, 0.85
            )
        else:
            least = 2 if has_organ and rng.random() < 0.7 else 1
            v = _random_voxel(rng, tissue, least)
            if v is None:
                continue
            c = (v - (np.asarray(shape) - 1) / 2) * spacing
        box = _box(c, r * 1.3, shape, spacing)
        if box is None:
            continue
        m = _blob(rng, axes, box, spacing, c, r, int(rng.integers(1, 5)), rng.uniform(0.0, 0.35))
        m = m & (tissue[box] > 0) & (instances[box] == 0)
        if m.sum() < 4:
            continue
        host_codes = tissue[box][m]
        host = float(np.mean([intensity[int(t)] for t in np.unique(host_codes)]))
        contrast = rng.uniform(min_contrast_hu, max(min_contrast_hu, 120.0))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        value = host + sign * contrast
        lo, hi = TISSUE_RANGE_HU
        if not lo <= value <= hi:
            value = host - sign * contrast
        value = float(np.clip(value, lo, hi))
        inst = len(lesions) + 1
        instances[box][m] = inst
        label[box][m] = 2
        lesion_hu[inst] = value
        center_vox = tuple(float(v) for v in np.argwhere(m).mean(0) + [s.start for s in box])
        lesions.append(SynthLesion(inst, center_vox, float(d), value, host,
                                   against.instance if against is not None else 0))  # fmt: skip

    # image: per-label intensity + texture, then blur, bias field and noise
    lut = np.zeros(int(tissue.max()) + 1, dtype=np.float32)
    for code, v in intensity.items():
        if code < len(lut):
            lut[code] = v
    image = lut[tissue]
    for inst, v in lesion_hu.items():
        image[instances == inst] = v
    inside = tissue > 0
    texture = smooth_field(rng, shape, spacing, rng.uniform(3.0, 15.0))
    image += np.where(inside, rng.uniform(0.0, 12.0) * texture, 0.0).astype(np.float32)
    sigma = rng.uniform(0.0, 1.2)
    if sigma > 0.2:
        image = ndimage.gaussian_filter(image, sigma=sigma * min(spacing) / np.asarray(spacing),
                                        truncate=2.5)  # fmt: skip
    bias = smooth_field(rng, shape, spacing, 0.6 * float(fov.max()))
    lo = TISSUE_RANGE_HU[0]
    gain = 1.0 + rng.uniform(0.0, 0.12) * np.clip(bias, -2.5, 2.5)
    image = np.where(inside, lo + (image - lo) * gain, image)
    image += rng.normal(0.0, rng.uniform(2.0, 25.0), size=shape).astype(np.float32)

    affine = make_affine(spacing, shape, orientation, rng=rng)
    return SynthPhantom(
        image.astype(np.float32), label, instances, affine, spacing, orientation, lesions
    )

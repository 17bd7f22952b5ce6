"""The held-out second generator: CT-like upper-abdomen volumes for evaluation ONLY.

Training must never use this family. It exists to measure whether a model learnt "the
object under the click" rather than the training generator's look: it is written apart
from the training generators (:mod:`.ct`, :mod:`.synth`) and shares with them only the
affine and file helpers of :mod:`.common`. Its registry entry says ``training=False``;
the kits glue refuses it and a test checks that no training default names it.

What differs from the training families:

- anatomy: liver, spleen, lung bases above a domed diaphragm, spine, aorta, a fat /
  muscle body wall, drawn in RAS world mm and sampled through the affine (no kidneys);
- lesions (8-45 mm, 1-3 per volume, in the liver or the spleen): *spiculated* (a core
  with radial spikes), *cystic* (a water-dense core with an enhancing rim), *multi-lobed*
  (metaballs: a thresholded sum of inverse-square fields);
- intensities: a contrast phase per volume (non-enhanced or portal venous, organ HU from
  it), lesions enhancing (brighter than the organ) or hypodense (darker), heterogeneous;
  noise from white noise low-passed by a Gaussian filter (not :func:`smooth_field`);
- grids: 0.7x0.7x5, 0.8x0.8x1 or 1.5x1.5x2.5 mm, RAS or LPS; thick slices average
  sub-slices (partial volume).

Labels (the kits convention): 0 background, 1 organ (liver, spleen), 2 lesion;
instances: 0 none, 1..L one id per lesion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from sam3d.data.phantoms.common import make_affine

GRIDS_MM = ((0.7, 0.7, 5.0), (0.8, 0.8, 1.0), (1.5, 1.5, 2.5))
HELDOUT_ORIENTATIONS = ("RAS", "LPS")
LESION_KINDS = ("spiculated", "cystic", "multilobed")
LESION_DIAMETER_MM = (8.0, 45.0)
# organ HU (low, high) per contrast phase
ORGAN_HU = {
    "non-contrast": {"liver": (50.0, 65.0), "spleen": (40.0, 52.0), "aorta": (35.0, 45.0)},
    "portal": {"liver": (95.0, 125.0), "spleen": (105.0, 130.0), "aorta": (150.0, 220.0)},
}


@dataclass
class HeldoutLesion:
    instance: int
    kind: str  # spiculated / cystic / multilobed
    organ: str  # liver / spleen
    diameter_mm: float
    enhancing: bool  # brighter than its organ (cystic: the rim)
    contrast_hu: float  # lesion (cystic: core) minus organ


@dataclass
class HeldoutPhantom:
    image_hu: np.ndarray  # float32 (I, J, K)
    label: np.ndarray  # uint8: 0 background, 1 organ, 2 lesion
    instances: np.ndarray  # uint16: 0 none, 1..L
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    orientation: str
    phase: str
    lesions: list[HeldoutLesion] = field(default_factory=list)


def _lowpass_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox) -> np.ndarray:
    """Unit-variance correlated noise: Gaussian-filtered white noise, renormalised."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return f / max(float(f.std()), 1e-6)


def _ellipsoid(p: list[np.ndarray], c, semi) -> np.ndarray:
    return sum(((p[a] - c[a]) / semi[a]) ** 2 for a in range(3))


def _box(
    inv: np.ndarray, c: np.ndarray, r: float, shape: tuple[int, ...]
) -> tuple[slice, ...] | None:
    """Index box of the world cube ``c`` +- ``r`` mm (``inv``: the inverse affine)."""
    corners = np.array([[c[0] + sx * r, c[1] + sy * r, c[2] + sz * r]
                        for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])  # fmt: skip
    vox = corners @ inv[:3, :3].T + inv[:3, 3]
    lo = np.maximum(np.floor(vox.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(vox.max(0)).astype(int) + 2, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _lesion_mask(
    rng: np.random.Generator, kind: str, p: list[np.ndarray], c: np.ndarray, r: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mask of a lesion of radius ~``r`` mm at world ``c``; for cystic also its core."""
    d = [p[a] - c[a] for a in range(3)]
    dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-6
    if kind == "spiculated":
        core = 0.6 * r
        mask = dist <= core
        for _ in range(int(rng.integers(6, 13))):
            u = rng.normal(size=3)
            u /= np.linalg.norm(u)
            along = d[0] * u[0] + d[1] * u[1] + d[2] * u[2]
            perp = np.sqrt(np.maximum(dist**2 - along**2, 0.0))
            length = rng.uniform(0.8, 1.0) * r
            width = rng.uniform(0.12, 0.22) * r * np.clip(1 - along / length, 0, 1)
            mask |= (along > 0) & (along <= length) & (perp <= np.maximum(width, 0.0))
        return mask, None
    if kind == "cystic":
        semi = rng.uniform(0.8, 1.0, size=3) * r
        q = _ellipsoid(p, c, semi)
        rim = rng.uniform(1.5, 3.5)
        return q <= 1.0, q <= ((r - rim) / r) ** 2
    # multilobed: metaballs
    field_ = np.zeros(np.broadcast(*d).shape, np.float32)
    for i in range(int(rng.integers(3, 7))):
        off = np.zeros(3) if i == 0 else rng.normal(size=3) * 0.35 * r
        rb = rng.uniform(0.3, 0.5) * r
        q = sum((p[a] - c[a] - off[a]) ** 2 for a in range(3))
        field_ += rb**2 / (q + 1e-3)
    return field_ >= 1.0, None


def make_heldout_phantom(
    seed: int,
    grid_mm: tuple[float, float, float] | None = None,
    orientation: str | None = None,
    n_lesions: int | None = None,
    fov_mm: tuple[float, float, float] | None = None,
    phase: str | None = None,
) -> HeldoutPhantom:
    """One held-out volume for ``seed``: never for training (see the module docstring).

    Args:
        grid_mm: voxel size; default one of :data:`GRIDS_MM`.
        orientation: "RAS" or "LPS" (default drawn).
        n_lesions: 1-3 by default.
        fov_mm: field of view (mm) around the chosen organ; default 110-140 in plane,
            70-100 along the slices.
        phase: "non-contrast" or "portal" (default drawn).
    """
    rng = np.random.default_rng([int(seed), 0xD1CE])
    spacing = tuple(float(v) for v in (grid_mm or GRIDS_MM[int(rng.integers(len(GRIDS_MM)))]))
    orientation = orientation or str(rng.choice(HELDOUT_ORIENTATIONS))
    phase = phase or ("portal" if rng.random() < 0.6 else "non-contrast")
    hu = {k: float(rng.uniform(*v)) for k, v in ORGAN_HU[phase].items()}
    fov = np.asarray(fov_mm or (rng.uniform(110, 140), rng.uniform(110, 140), rng.uniform(70, 100)))
    shape = tuple(max(8, int(round(f / s))) for f, s in zip(fov, spacing))

    # organs in RAS mm (x: patient left, y: anterior, z: superior), body centred at 0
    liver_c = np.array([-65.0, 5.0, 0.0]) + rng.normal(0, 5, 3)
    liver_s = np.array([85.0, 80.0, 70.0]) * rng.uniform(0.9, 1.1, 3)
    spleen_c = np.array([90.0, -35.0, 20.0]) + rng.normal(0, 5, 3)
    spleen_s = np.array([30.0, 55.0, 50.0]) * rng.uniform(0.85, 1.15, 3)
    target = "liver" if rng.random() < 0.65 else "spleen"
    organ_c, organ_s = (liver_c, liver_s) if target == "liver" else (spleen_c, spleen_s)
    center = organ_c + rng.uniform(-0.3, 0.3, 3) * organ_s * np.array([1, 1, 0.5])
    affine = make_affine(spacing, shape, orientation, center_world=tuple(center))

    inv = np.linalg.inv(affine)
    sub = max(1, int(round(spacing[2] / 1.0))) if spacing[2] > 2.0 else 1
    offsets = (np.arange(sub) + 0.5) / sub - 0.5  # sub-slices of a thick slice, in slices
    ii = np.arange(shape[0], dtype=np.float32)[:, None, None]
    jj = np.arange(shape[1], dtype=np.float32)[None, :, None]
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    instances = np.zeros(shape, np.uint16)
    lesion_plan = []
    n_lesions = int(rng.integers(1, 4)) if n_lesions is None else int(n_lesions)
    half = 0.35 * fov
    for _ in range(n_lesions):
        kind = str(rng.choice(LESION_KINDS))
        d = float(np.exp(rng.uniform(*np.log(LESION_DIAMETER_MM))))
        d = min(d, 0.5 * float(min(fov)))
        c = center
        for _try in range(50):  # a centre inside the organ and well inside the field of view
            cand = center + rng.uniform(-1, 1, 3) * half
            below_dome = cand[2] + d / 2 < 55.0 - 0.0025 * (cand[0] ** 2 + (cand[1] - 10) ** 2)
            cut = target == "spleen" or cand[0] + d / 2 < 15 - 0.4 * cand[1]
            if _ellipsoid(list(cand), organ_c, organ_s) <= 0.5 and below_dome and cut:
                c = cand
                break
        enhancing = bool(rng.random() < 0.45)
        contrast = float(rng.uniform(30, 80) * (1 if enhancing else -1))
        if kind == "cystic":  # the core is water, the rim enhances in the portal phase
            enhancing = phase == "portal"
            rim = hu[target] + (rng.uniform(40, 80) if enhancing else 10.0)
            values = (rim, float(rng.uniform(0, 20)))
            contrast = values[1] - hu[target]
        else:
            values = (hu[target] + contrast, 0.0)
        lesion_plan.append((kind, d, c, enhancing, contrast, values, int(rng.integers(1 << 31))))
    tex_sigma = 2.0 / np.asarray(spacing)
    texture = _lowpass_noise(rng, shape, tex_sigma)
    hetero = _lowpass_noise(rng, shape, 4.0 / np.asarray(spacing))

    for o, off in enumerate(offsets):
        kk = (np.arange(shape[2], dtype=np.float32) + off)[None, None, :]
        p = []
        for r in range(3):  # world mm, each term only where the affine has it (broadcast)
            acc = np.float32(affine[r, 3])
            for coeff, idx in zip(affine[r, :3], (ii, jj, kk)):
                if abs(coeff) > 1e-9:
                    acc = acc + np.float32(coeff) * idx
            p.append(acc if np.ndim(acc) else np.full((1, 1, 1), acc, np.float32))
        x, y, z = p
        body_q = (x / 165.0) ** 2 + ((y + 5) / 120.0) ** 2
        img = np.full(np.broadcast(x, y, z).shape, -1000.0, np.float32)
        img = np.where(body_q <= 1.0, -100.0, img)  # subcutaneous fat
        img = np.where(body_q <= 0.85, 45.0, img)  # muscle wall
        img = np.where(body_q <= 0.75, -70.0 + 60.0 * (texture > 0.3), img)  # fat + bowel
        dome = 55.0 - 0.0025 * (x**2 + (y - 10) ** 2)
        lung = (z > dome) & (body_q <= 0.75)
        img = np.where(lung, -850.0, img)
        liver = (_ellipsoid(p, liver_c, liver_s) <= 1.0) & (x < 15 - 0.4 * y) & ~lung
        spleen = (_ellipsoid(p, spleen_c, spleen_s) <= 1.0) & ~lung
        img = np.where(liver, hu["liver"], img)
        img = np.where(spleen, hu["spleen"], img)
        vert = (x**2 + (y + 70) ** 2) <= 20.0**2
        img = np.where(vert, 380.0, img)
        img = np.where(vert & ((x**2 + (y + 70) ** 2) >= 17.0**2), 750.0, img)
        img = np.where(((x - 20) ** 2 + (y + 40) ** 2) <= 12.0**2, hu["aorta"], img)
        organ = {"liver": liver, "spleen": spleen}
        lab = np.where(liver | spleen, 1, 0).astype(np.uint8)
        inst = np.zeros(lab.shape, np.uint16)
        for n, (kind, d, c, _, _, values, lseed) in enumerate(lesion_plan, start=1):
            box = _box(inv, c, d / 2 + 2.0, shape)
            if box is None:
                continue
            pb = [a[tuple(box[k] if a.shape[k] > 1 else slice(None) for k in range(3))]
                  for a in p]  # fmt: skip
            m, core = _lesion_mask(np.random.default_rng(lseed), kind, pb, c, d / 2)
            m = m & organ[target][box] & (inst[box] == 0)
            view = img[box]
            if core is not None:
                view[m] = values[0]
                view[m & core] = values[1]
            else:
                view[m] = (values[0] + 12.0 * hetero[box])[m]
            lab[box][m] = 2
            inst[box][m] = n
        image += img / len(offsets)
        if o == len(offsets) // 2:  # labels: the thick slice's centre
            label, instances = lab, inst
    # organ texture and noise
    image += np.where(label > 0, 4.0 * texture, 0.0).astype(np.float32)
    image += rng.normal(0.0, rng.uniform(8.0, 20.0), size=shape).astype(np.float32)

    # instance ids 1..L in order of the lesions that are present
    lesions: list[HeldoutLesion] = []
    remap = np.zeros(len(lesion_plan) + 1, np.uint16)
    for n, (kind, d, _, enhancing, contrast, _, _) in enumerate(lesion_plan, start=1):
        if (instances == n).sum() < 8:  # clipped away by the organ or an earlier lesion
            label[instances == n] = 1
            continue
        remap[n] = len(lesions) + 1
        lesions.append(HeldoutLesion(int(remap[n]), kind, target, d, enhancing, contrast))
    instances = remap[instances]
    return HeldoutPhantom(
        image.astype(np.float32), label, instances, affine, spacing, orientation, phase, lesions
    )

"""Seeded T2-weighted-MRI-like pelvis volumes with a prostate label, from six "sites".

Anatomy is drawn in world mm (RAS, centred on the gland): body outline with a
subcutaneous fat rim, pelvic fat, obturator muscles, a lobulated prostate (peripheral
zone brighter than the central gland, as on T2), the bladder above and in front, the
rectum behind with a dark air lumen. A *site* (:data:`SITES`, after the six cross-site
prostate sets of the DeSAM paper) sets everything a scanner and protocol change: tissue
intensities (contrast, style), an intensity gamma and scale, a smooth multiplicative bias
field (plus an endorectal-coil hot spot behind the gland for coil sites), Rician noise, a
blur, the in-plane field of view, the in-plane spacing and the slice thickness. Training
on one site and testing on the others is then a real domain shift.

Label: 1 prostate, 0 elsewhere. Images are float32, in each site's own intensity scale.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sam3d.data.io import atomic_write
from sam3d.data.phantoms.common import (
    _iter_cases,
    case_seed,
    make_affine,
    save_nifti,
    smooth_field,
)
from sam3d.errors import Sam3DError

TISSUES = ("fat", "muscle", "pz", "cg", "bladder", "rectum_wall", "air")

# Site styles. Intensities are T2-like in 0..1 before gamma, bias, noise and scale.
SITES: dict[str, dict[str, Any]] = {
    "A": {  # 3T, body coil: clean, high resolution
        "tissue": {"fat": 0.85, "muscle": 0.3, "pz": 0.75, "cg": 0.45, "bladder": 1.0,
                   "rectum_wall": 0.35, "air": 0.03},
        "gamma": 1.0, "scale": 1000.0, "bias": 0.10, "coil": 0.0, "noise": 0.02,
        "blur_vox": 0.0, "fov_mm": 160.0, "spacing_mm": 0.8, "slice_mm": 3.0,
    },
    "B": {  # 1.5T: lower SNR, flatter contrast
        "tissue": {"fat": 0.8, "muscle": 0.35, "pz": 0.62, "cg": 0.5, "bladder": 0.95,
                   "rectum_wall": 0.4, "air": 0.05},
        "gamma": 1.0, "scale": 600.0, "bias": 0.2, "coil": 0.0, "noise": 0.07,
        "blur_vox": 0.5, "fov_mm": 180.0, "spacing_mm": 1.0, "slice_mm": 4.0,
    },
    "C": {  # another vendor's style: fat darker than the gland, small field of view
        "tissue": {"fat": 0.45, "muscle": 0.25, "pz": 0.8, "cg": 0.65, "bladder": 0.9,
                   "rectum_wall": 0.3, "air": 0.05},
        "gamma": 0.8, "scale": 255.0, "bias": 0.15, "coil": 0.0, "noise": 0.04,
        "blur_vox": 0.0, "fov_mm": 120.0, "spacing_mm": 0.6, "slice_mm": 3.5,
    },
    "D": {  # large field of view, compressed intensities
        "tissue": {"fat": 0.9, "muscle": 0.4, "pz": 0.7, "cg": 0.5, "bladder": 1.0,
                   "rectum_wall": 0.4, "air": 0.05},
        "gamma": 0.6, "scale": 2000.0, "bias": 0.25, "coil": 0.0, "noise": 0.03,
        "blur_vox": 0.7, "fov_mm": 220.0, "spacing_mm": 1.2, "slice_mm": 3.0,
    },
    "E": {  # endorectal coil: a strong hot spot behind the gland
        "tissue": {"fat": 0.8, "muscle": 0.3, "pz": 0.7, "cg": 0.45, "bladder": 0.9,
                   "rectum_wall": 0.5, "air": 0.02},
        "gamma": 1.2, "scale": 1500.0, "bias": 0.1, "coil": 1.5, "noise": 0.03,
        "blur_vox": 0.0, "fov_mm": 140.0, "spacing_mm": 0.5, "slice_mm": 3.0,
    },
    "F": {  # noisy, low resolution
        "tissue": {"fat": 0.75, "muscle": 0.35, "pz": 0.6, "cg": 0.5, "bladder": 0.85,
                   "rectum_wall": 0.4, "air": 0.05},
        "gamma": 1.0, "scale": 400.0, "bias": 0.3, "coil": 0.0, "noise": 0.10,
        "blur_vox": 1.0, "fov_mm": 200.0, "spacing_mm": 1.4, "slice_mm": 4.5,
    },
}  # fmt: skip


@dataclass
class ProstatePhantom:
    """One volume: ``image`` float32 ``I x J x K`` (K the slice axis), ``label`` uint8,
    RAS ``affine``, ``spacing_mm``, ``site``, gland semi-axes ``gland_mm``."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    site: str
    gland_mm: tuple[float, float, float]


def site_style(site: str) -> dict[str, Any]:
    """The style dict of a site letter (``A`` .. ``F``)."""
    if site not in SITES:
        raise Sam3DError(f"unknown prostate site {site!r}: use one of {', '.join(SITES)}")
    return SITES[site]


def make_prostate_phantom(
    seed: int,
    site: str = "A",
    in_plane_vox: int | None = None,
    n_slices: int = 16,
) -> ProstatePhantom:
    """A seeded pelvis volume of ``site``.

    Args:
        seed: the anatomy and noise seed (the same seed gives the same anatomy at every
            site: only the site's style changes).
        site: ``A`` .. ``F`` (:data:`SITES`).
        in_plane_vox: override the site's in-plane size (pixels per side; the spacing
            becomes ``fov / in_plane_vox``), e.g. small volumes for CPU tests.
        n_slices: slices along K at the site's slice thickness.
    """
    style = site_style(site)
    rng = np.random.default_rng(seed)
    fov = float(style["fov_mm"])
    n_xy = int(in_plane_vox) if in_plane_vox else int(round(fov / style["spacing_mm"]))
    if n_xy < 16 or n_slices < 1:
        raise Sam3DError(f"phantom too small: {n_xy} px in plane, {n_slices} slices")
    spacing = (fov / n_xy, fov / n_xy, float(style["slice_mm"]))
    shape = (n_xy, n_xy, int(n_slices))
    # world coordinates (mm) of voxel centres; x right, y anterior, z superior
    ax = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*ax, indexing="ij")

    # anatomy: shared by all sites for one seed
    a = rng.uniform(18, 26)  # gland semi-axes (mm): left-right, antero-posterior, cranio-caudal
    b = rng.uniform(13, 19)
    c = rng.uniform(14, 22)
    cx, cy = rng.uniform(-6, 6, 2)
    lobes = smooth_field(rng, shape, spacing, 15.0)
    r_gland = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + (z / c) ** 2)
    gland = r_gland + 0.08 * lobes < 1.0
    pz = gland & (r_gland > 0.55) & (y < cy + 0.3 * b)  # outer, posterior zone
    body = ((x / (0.46 * 160)) ** 2 + ((y + 5) / (0.34 * 160)) ** 2) < 1.0
    inner = ((x / (0.46 * 160 - 14)) ** 2 + ((y + 5) / (0.34 * 160 - 14)) ** 2) < 1.0
    muscle = body & ~inner  # body wall below the fat rim is drawn as muscle-ish
    rect_c = (cx + rng.uniform(-3, 3), cy - b - rng.uniform(10, 14))
    r_rect = np.hypot(x - rect_c[0], y - rect_c[1])
    rectum = r_rect < 12
    lumen = r_rect < rng.uniform(4, 7)
    bl_c = (cx, cy + b + rng.uniform(8, 14), c + rng.uniform(5, 15))
    bladder = (
        ((x - bl_c[0]) / 30) ** 2 + ((y - bl_c[1]) / 22) ** 2 + ((z - bl_c[2]) / 25) ** 2
    ) < 1
    obturator = (np.abs(np.abs(x - cx) - (a + 22)) < 8) & (np.abs(y - cy) < 25)

    t = style["tissue"]
    img = np.full(shape, t["fat"], np.float32)
    img[~body] = 0.0
    img[muscle | (obturator & body)] = t["muscle"]
    img[bladder & inner] = t["bladder"]
    img[rectum & inner] = t["rectum_wall"]
    img[lumen & inner] = t["air"]
    tex = smooth_field(rng, shape, spacing, 4.0)
    img[gland] = (t["cg"] + 0.06 * tex[gland]).astype(np.float32)
    img[pz] = (t["pz"] + 0.05 * tex[pz]).astype(np.float32)
    label = gland.astype(np.uint8)

    # the site: contrast style, bias field, coil, blur, noise, scale
    img = np.clip(img, 0, None) ** style["gamma"]
    bias = 1.0 + style["bias"] * smooth_field(rng, shape, spacing, 90.0)
    if style["coil"]:
        d = np.hypot(x - rect_c[0], y - rect_c[1])
        bias = bias + style["coil"] * np.exp(-d / 25.0)
    img = img * bias
    if style["blur_vox"]:
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(img, (style["blur_vox"], style["blur_vox"], 0))
    sigma = style["noise"]
    real = img + sigma * rng.standard_normal(shape)
    img = np.sqrt(real**2 + (sigma * rng.standard_normal(shape)) ** 2)  # Rician magnitude
    img = (img * style["scale"]).astype(np.float32)
    affine = make_affine(spacing, shape, "RAS")
    return ProstatePhantom(img, label, affine, spacing, site, (a, b, c))


def write_prostate_dataset(
    out: str | Path,
    n_per_site: int,
    sites: Sequence[str] = tuple(SITES),
    seed: int = 0,
    progress: bool = False,
    **kwargs: Any,
) -> Path:
    """Write ``n_per_site`` volumes for each site as NIfTI; returns ``dataset.json``.

    ``imagesTr/site<S>_<i>.nii.gz`` (float32) and ``labelsTr/...`` (uint8); every case
    is listed under ``training`` with its ``site`` (the leave-sites-out split is the
    bundle's: :func:`sam3d.apps.prostate.prostate_datalist`). Case ``i`` of every site
    shares one anatomy seed. ``kwargs`` go to :func:`make_prostate_phantom`.
    """
    out = Path(out)
    for s in sites:
        site_style(s)
    if int(n_per_site) < 1:
        raise Sam3DError(f"n_per_site must be at least 1, got {n_per_site}")
    entries, cases = [], []
    for k in _iter_cases(len(sites) * int(n_per_site), progress, "phantoms (prostate)"):
        site, i = sites[k // int(n_per_site)], k % int(n_per_site)
        s = case_seed(seed, i)
        ph = make_prostate_phantom(s, site, **kwargs)
        name = f"site{site}_{i:03d}.nii.gz"
        save_nifti(ph.image, ph.affine, out / "imagesTr" / name, np.float32)
        save_nifti(ph.label, ph.affine, out / "labelsTr" / name, np.uint8)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "site": site})
        cases.append({"case": name, "seed": s, "site": site,
                      "spacing_mm": [round(v, 4) for v in ph.spacing_mm]})  # fmt: skip
    meta = {
        "name": "sam3d-phantom-prostate",
        "description": f"synthetic multi-site prostate MRI from sam3d.data.phantoms (seed {seed})",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "T2w-like MRI"},
        "labels": {"0": "background", "1": "prostate"},
        "sites": list(sites),
        "numTraining": len(entries),
        "training": entries,
        "phantom": {"kind": "prostate", "seed": seed, "cases": cases},
    }
    path = out / "dataset.json"
    text = json.dumps(meta, indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def save_site_preview(
    path: str | Path,
    seed: int = 0,
    sites: Sequence[str] = tuple(SITES),
    dpi: int = 110,
    **kwargs: Any,
) -> Path:
    """PNG of the middle slice of one anatomy (``seed``) at every site, side by side, the
    prostate outlined; each panel in its own intensity range and physical size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sites), figsize=(2.6 * len(sites), 3.0))
    for ax, site in zip(np.atleast_1d(axes), sites):
        ph = make_prostate_phantom(seed, site, **kwargs)
        k = ph.image.shape[2] // 2
        half = ph.image.shape[0] * ph.spacing_mm[0] / 2
        ext = (-half, half, -half, half)
        # rows of the array are x (i), columns y (j): show y up, x right
        ax.imshow(ph.image[:, :, k].T, cmap="gray", origin="lower", extent=ext)
        ax.contour(ph.label[:, :, k].T, [0.5], colors="orange", linewidths=0.8,
                   origin="lower", extent=ext)  # fmt: skip
        st = SITES[site]
        ax.set_title(f"site {site}: {st['fov_mm']:.0f} mm FOV\n"
                     f"{ph.spacing_mm[0]:.2f} mm, noise {st['noise']}", fontsize=8)  # fmt: skip
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
    return path

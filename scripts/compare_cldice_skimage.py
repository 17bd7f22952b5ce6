"""clDice with our skeleton vs scikit-image's on thin, noisy and shifted masks.

Prints the largest differences (ours - scikit-image) per family of cases, the
sweep behind the table in docs/METRICS.md ("Skeleton and clDice"):

    python scripts/compare_cldice_skimage.py --family 3d     # noisy 3D lines and tubes
    python scripts/compare_cldice_skimage.py --family 2d     # noisy 2D lines
    python scripts/compare_cldice_skimage.py --family shift  # vessels shifted by 1 px

CPU only; a few minutes per family on one core.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
from scipy import ndimage
from skimage.morphology import skeletonize as sk_skeletonize

from sam3d.data.phantoms import make_vessel_phantom
from sam3d.metrics.cldice import compute_cldice


def cldice_skimage(pred: np.ndarray, gt: np.ndarray) -> float:
    sp, sg = sk_skeletonize(pred) > 0, sk_skeletonize(gt) > 0
    tprec, tsens = (sp & gt).sum() / sp.sum(), (sg & pred).sum() / sg.sum()
    return float(2 * tprec * tsens / (tprec + tsens))


def cldice_ours(pred: np.ndarray, gt: np.ndarray) -> float:
    return float(compute_cldice(torch.from_numpy(pred), torch.from_numpy(gt)))


def segment(shape, p0, p1, radius: float) -> np.ndarray:
    """Voxels within ``radius`` of the segment p0-p1."""
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    t = np.clip(((g - p0) @ (p1 - p0)) / ((p1 - p0) @ (p1 - p0)), 0, 1)
    return np.linalg.norm(g - (p0 + t[..., None] * (p1 - p0)), axis=-1) <= radius


def noisy(rng: np.random.Generator, mask: np.ndarray, sigma: float, thr: float) -> np.ndarray:
    """Flip the voxels of smoothed-noise blobs near the mask (adds blobs, cuts holes)."""
    n = ndimage.gaussian_filter(rng.random(mask.shape), sigma) > thr
    return mask ^ (n & ndimage.binary_dilation(mask, iterations=3))


def cases(family: str, seeds: int):
    grid = list(itertools.product([0.5, 1.0, 1.5], [1.0, 1.5], [0.53, 0.56]))
    for seed in range(seeds):
        if family == "3d":
            for r, sigma, thr in grid:
                rng = np.random.default_rng(seed)
                for name, p0, p1 in (
                    ("diagonal", (4, 4, 4), (35, 35, 35)),
                    ("tube", (4, 20, 20), (35, 20, 20)),
                ):
                    gt = segment((40, 40, 40), p0, p1, r)
                    yield (name, seed, r, sigma, thr), noisy(rng, gt, sigma, thr), gt
        elif family == "2d":
            for r, sigma, thr in grid:
                rng = np.random.default_rng(seed)
                gt = segment((96, 96), (8, 10), (88, 80), r)
                yield ("line", seed, r, sigma, thr), noisy(rng, gt, sigma, thr), gt
        else:
            for size in (96, 128, 256):
                gt = make_vessel_phantom(seed, size=(size, size)).label > 0
                for axis in (0, 1):
                    yield ("vessels", seed, size, axis), np.roll(gt, 1, axis=axis), gt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=["3d", "2d", "shift"], default="2d")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [
        (cldice_ours(p, g) - cldice_skimage(p, g), key)
        for key, p, g in cases(args.family, args.seeds)
    ]
    rows.sort(key=lambda r: -abs(r[0]))
    print(f"clDice ours - scikit-image, family {args.family}, CPU, {len(rows)} cases")
    for diff, key in rows[: args.top]:
        print(f"  {diff:+.3f}  {key}")
    print(f"  |diff| > 0.02 in {sum(abs(d) > 0.02 for d, _ in rows)} of {len(rows)}")


if __name__ == "__main__":
    main()

"""Our NSD / HD95 / ASSD against MONAI's defaults and MONAI's ``use_subvoxels=True`` NSD.

Ours follow DeepMind's surface-distance (surfels on the voxel-corner grid, each weighted
by its area); MONAI's default measures between the centres of boundary voxels, unweighted.
Prints the absolute gaps over seeded pairs of ellipsoids (a prediction shifted and scaled
from its reference) at an anisotropic spacing. CPU; a few seconds.

    python scripts/compare_monai_surface.py [--pairs 40] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_hausdorff_distance,
)
from monai.metrics import compute_surface_dice as monai_nsd

from sam3d.metrics.surface import compute_assd, compute_hd95, compute_surface_dice

SHAPE = (40, 40, 24)
SPACING = (1.0, 1.0, 2.5)
TOLERANCE = 2.0


def ellipsoid(centre, radii) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    d = ((grid - np.asarray(centre)) * np.asarray(SPACING)) / np.asarray(radii)
    return (d**2).sum(-1) <= 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    for _ in range(args.pairs):
        centre = np.asarray(SHAPE) / 2 + rng.uniform(-3, 3, 3)
        radii = rng.uniform(5, 12, 3)
        gt = ellipsoid(centre, radii)
        pred = ellipsoid(centre + rng.uniform(-2, 2, 3), radii * rng.uniform(0.8, 1.2, 3))
        g, p = torch.from_numpy(gt), torch.from_numpy(pred)
        ours = (
            float(compute_surface_dice(p, g, SPACING, TOLERANCE)),
            float(compute_hd95(p, g, SPACING)),
            float(compute_assd(p, g, SPACING)),
        )
        oh_p = torch.stack([~p, p])[None].float()
        oh_g = torch.stack([~g, g])[None].float()
        kw = {"include_background": False, "spacing": SPACING}
        monai_default = (
            float(monai_nsd(oh_p, oh_g, [TOLERANCE], **kw)),
            float(compute_hausdorff_distance(oh_p, oh_g, percentile=95, **kw)),
            float(compute_average_surface_distance(oh_p, oh_g, symmetric=True, **kw)),
        )
        subvoxel_nsd = float(monai_nsd(oh_p, oh_g, [TOLERANCE], use_subvoxels=True, **kw))
        rows.append((*ours, *monai_default, subvoxel_nsd))
    a = np.asarray(rows)
    print(f"{args.pairs} ellipsoid pairs, {SHAPE} voxels at {SPACING} mm, NSD at {TOLERANCE} mm")
    for i, name in enumerate(("NSD", "HD95 (mm)", "ASSD (mm)")):
        gap = np.abs(a[:, i] - a[:, 3 + i])
        print(
            f"{name:10s} ours vs MONAI default: mean |gap| {gap.mean():.4f}, max {gap.max():.4f} "
            f"(ours mean {a[:, i].mean():.4f}, MONAI {a[:, 3 + i].mean():.4f})"
        )
    gap = np.abs(a[:, 0] - a[:, 6])
    print(f"NSD        ours vs MONAI use_subvoxels=True: max |gap| {gap.max():.2e}")


if __name__ == "__main__":
    main()

"""Fundus-like vessel images: RGB, dark branching trees on a textured background inside a
circular field of view; binary labels. Deterministic for a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sam3d.data.phantoms.common import smooth_field
from sam3d.errors import Sam3DError


@dataclass
class VesselPhantom:
    """A fundus-like 2D image with branching vessels."""

    image: np.ndarray  # float32 (H, W, 3) in [0, 1], vessels darker
    label: np.ndarray  # uint8 (H, W) in {0, 1}
    fov: np.ndarray  # bool (H, W): the circular field of view
    n_trees: int = 0  # number of drawn trees = 8-connected components of label


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

"""Surface and topology metrics: ours against the references, same pair, same process.

    python scripts/bench_metrics.py [--device cuda|cpu] [--size 512 512 160]
                                    [--spacing 0.8 0.8 2.5] [--tolerance 2] [--repeats 3]

The label pair (``--pair``): a large lobulated body-like outline (default) or the
kidney + lesion label of a CT phantom, and a "prediction" made from it by eating and
growing the boundary with a smooth random field (a 1-3 voxel disagreement). Times,
per metric:

- NSD: ours (on ``--device``) against MONAI ``compute_surface_dice(use_subvoxels=True)``
  on the same device (it uses cuCIM there when installed, scipy otherwise) and
  against DeepMind's ``surface-distance`` (CPU, the reference values);
- HD95 and ASSD: ours against DeepMind's;
- clDice (both skeletons + the score): ours against scikit-image ``skeletonize``
  (CPU).

Prints the device, the values, their differences, and time ratios (reference time /
our time). Default size: 512x512x160 on CUDA, 256x256x80 on the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from sam3d.data.phantoms import make_ct_phantom, smooth_field
from sam3d.metrics.cldice import compute_cldice
from sam3d.metrics.surface import compute_assd, compute_hd95, compute_surface_dice

# surface-distance 0.1 still uses names that NumPy 2 removed.
np.Inf = np.inf  # noqa: NPY201
np.NaN = np.nan  # noqa: NPY201


def _time(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, object]:
    """Median seconds over ``repeats`` runs after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def make_pair(size, spacing_mm, kind: str = "body", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(reference, prediction) bool masks of ``size`` voxels.

    ``body``: one large lobulated ellipsoid filling much of the field of view (like a
    body or liver outline: a large surface, as the reference measurements used);
    ``kidneys``: the organ + lesion label of a CT phantom (small surfaces).
    The prediction eats and grows the reference's boundary by 1-3 voxels where a
    smooth random field is high / low.
    """
    rng = np.random.default_rng(seed)
    if kind == "kidneys":
        ph = make_ct_phantom(seed, shape_vox=tuple(size), spacing_mm=tuple(spacing_mm))
        gt = ph.label > 0
    else:
        grid = np.ogrid[tuple(slice(0, n) for n in size)]
        radius = [0.40 * size[0], 0.33 * size[1], 0.42 * size[2]]
        r2 = sum(((g - n / 2) / r) ** 2 for g, n, r in zip(grid, size, radius))
        lobes = smooth_field(rng, tuple(size), tuple(spacing_mm), 30.0)
        gt = r2 + 0.15 * lobes < 1.0
    field = smooth_field(rng, gt.shape, tuple(spacing_mm), 8.0)
    band = ndimage.binary_dilation(gt, iterations=2) & ~ndimage.binary_erosion(gt, iterations=2)
    pred = (gt & ~(band & (field > 0.8))) | (band & (field < -0.8))
    return gt, pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, nargs=3, default=None)
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5])
    ap.add_argument("--tolerance", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 on the CPU)"
    )
    ap.add_argument("--pair", choices=["body", "kidneys"], default="body")
    ap.add_argument("--skip-cldice", action="store_true")
    ap.add_argument("--skip-monai", action="store_true")
    args = ap.parse_args()
    dev = args.device
    # many small ops: on a shared CPU one thread is steadier (and faster) than several
    if args.threads or dev == "cpu":
        torch.set_num_threads(args.threads or 1)
    size = args.size or ([512, 512, 160] if dev == "cuda" else [256, 256, 80])
    spacing, tol = args.spacing, args.tolerance

    gt, pred = make_pair(size, spacing, args.pair)
    name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "CPU"
    print(f"device: {dev} ({name}); torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(
        f"pair: {size} voxels at {spacing} mm, tolerance {tol} mm; gt {gt.sum()} / pred "
        f"{pred.sum()} voxels"
    )
    p_t = torch.from_numpy(pred).to(dev)
    g_t = torch.from_numpy(gt).to(dev)
    rows = []

    import surface_distance as sd

    t_dm, dm = _time(lambda: sd.compute_surface_distances(gt, pred, spacing), 1, "cpu")
    dm_nsd = float(sd.compute_surface_dice_at_tolerance(dm, tol))
    dm_hd = float(sd.compute_robust_hausdorff(dm, 95))
    dm_assd = float(np.mean(sd.compute_average_surface_distance(dm)))

    t_ours, nsd = _time(lambda: compute_surface_dice(p_t, g_t, spacing, tol), args.repeats, dev)
    rows.append(("NSD", t_ours, float(nsd), "DeepMind (CPU)", t_dm, dm_nsd))
    if not args.skip_monai:
        from monai.metrics import compute_surface_dice as monai_nsd

        p2 = torch.stack([~p_t, p_t])[None].float()
        g2 = torch.stack([~g_t, g_t])[None].float()
        try:
            t_mo, mo = _time(
                lambda: monai_nsd(p2, g2, [tol], spacing=spacing, use_subvoxels=True),
                args.repeats,
                dev,
            )
            rows.append(
                ("NSD", t_ours, float(nsd), f"MONAI subvoxels ({dev})", t_mo, float(mo[0, 0]))
            )
        except Exception as err:  # e.g. no cuCIM for MONAI's GPU path
            print(f"MONAI compute_surface_dice failed on {dev}: {err}")
    t_hd, hd = _time(lambda: compute_hd95(p_t, g_t, spacing), args.repeats, dev)
    rows.append(("HD95 mm", t_hd, float(hd), "DeepMind (CPU)", t_dm, dm_hd))
    t_as, assd = _time(lambda: compute_assd(p_t, g_t, spacing), args.repeats, dev)
    rows.append(("ASSD mm", t_as, float(assd), "DeepMind (CPU)", t_dm, dm_assd))

    if not args.skip_cldice:
        from skimage.morphology import skeletonize as sk_skeletonize

        def sk_cldice() -> float:
            sp, sg = sk_skeletonize(pred) > 0, sk_skeletonize(gt) > 0
            tprec, tsens = (sp & gt).sum() / sp.sum(), (sg & pred).sum() / sg.sum()
            return float(2 * tprec * tsens / (tprec + tsens))

        t_sk, ref_cl = _time(sk_cldice, 1, "cpu")
        t_cl, cl = _time(lambda: compute_cldice(p_t, g_t), max(1, args.repeats - 1), dev)
        rows.append(("clDice", t_cl, float(cl), "scikit-image (CPU)", t_sk, ref_cl))

    print()
    print(f"| metric | ours ({dev}) | value | reference | ref time | ref value | |diff| | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for metric, t, v, ref, tr, vr in rows:
        print(
            f"| {metric} | {t * 1e3:.1f} ms | {v:.6f} | {ref} | {tr * 1e3:.1f} ms | {vr:.6f} "
            f"| {abs(v - vr):.2e} | x{tr / t:.1f} |"
        )


if __name__ == "__main__":
    main()

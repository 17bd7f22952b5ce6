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

Ours and each reference run alternately (A B A B ..., ``--repeats`` rounds, after one
warm-up of ours); prints the device, the values, their differences, and the time ratio
(reference / ours) as the median and spread of the round-by-round ratios. Default size:
512x512x160 on CUDA, 256x256x80 on the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchtime import alternate, ratio_summary  # noqa: E402

from sam3d.data.phantoms import make_ct_phantom, smooth_field
from sam3d.metrics.cldice import compute_cldice
from sam3d.metrics.surface import compute_assd, compute_hd95, compute_surface_dice

# surface-distance 0.1 still uses names that NumPy 2 removed.
np.Inf = np.inf  # noqa: NPY201
np.NaN = np.nan  # noqa: NPY201


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

    sync = torch.cuda.synchronize if dev == "cuda" else None
    rounds = max(1, args.repeats)

    def deepmind():
        return sd.compute_surface_distances(gt, pred, spacing)

    dm = deepmind()
    dm_nsd = float(sd.compute_surface_dice_at_tolerance(dm, tol))
    dm_hd = float(sd.compute_robust_hausdorff(dm, 95))
    dm_assd = float(np.mean(sd.compute_average_surface_distance(dm)))

    def pair(ours: Callable[[], object], reference: Callable[[], object]):
        ours()  # warm-up (kernels, caches); the reference ran once already
        a, b = alternate(ours, reference, rounds=rounds, warmup=0, sync=sync)
        return a, ours(), b

    t_ours, nsd, t_dm = pair(lambda: compute_surface_dice(p_t, g_t, spacing, tol), deepmind)
    rows.append(("NSD", t_ours, float(nsd), "DeepMind (CPU)", t_dm, dm_nsd))
    if not args.skip_monai:
        from monai.metrics import compute_surface_dice as monai_nsd

        p2 = torch.stack([~p_t, p_t])[None].float()
        g2 = torch.stack([~g_t, g_t])[None].float()

        def monai() -> torch.Tensor:
            return monai_nsd(p2, g2, [tol], spacing=spacing, use_subvoxels=True)

        try:
            mo = monai()
            t_o2, _, t_mo = pair(lambda: compute_surface_dice(p_t, g_t, spacing, tol), monai)
            rows.append(
                ("NSD", t_o2, float(nsd), f"MONAI subvoxels ({dev})", t_mo, float(mo[0, 0]))
            )
        except Exception as err:  # e.g. no cuCIM for MONAI's GPU path
            print(f"MONAI compute_surface_dice failed on {dev}: {err}")
    t_hd, hd, t_dm = pair(lambda: compute_hd95(p_t, g_t, spacing), deepmind)
    rows.append(("HD95 mm", t_hd, float(hd), "DeepMind (CPU)", t_dm, dm_hd))
    t_as, assd, t_dm = pair(lambda: compute_assd(p_t, g_t, spacing), deepmind)
    rows.append(("ASSD mm", t_as, float(assd), "DeepMind (CPU)", t_dm, dm_assd))

    if not args.skip_cldice:
        from skimage.morphology import skeletonize as sk_skeletonize

        def sk_cldice() -> float:
            sp, sg = sk_skeletonize(pred) > 0, sk_skeletonize(gt) > 0
            tprec, tsens = (sp & gt).sum() / sp.sum(), (sg & pred).sum() / sg.sum()
            return float(2 * tprec * tsens / (tprec + tsens))

        ref_cl = sk_cldice()
        t_cl, cl, t_sk = pair(lambda: compute_cldice(p_t, g_t), sk_cldice)
        rows.append(("clDice", t_cl, float(cl), "scikit-image (CPU)", t_sk, ref_cl))

    print()
    print(
        f"| metric | ours ({dev}), median | value | reference | ref time, median | ref value "
        "| |diff| | ratio ref / ours: median [min-max] over alternating rounds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for metric, t, v, ref, tr, vr in rows:
        s = ratio_summary(tr, t)
        print(
            f"| {metric} | {statistics.median(t) * 1e3:.1f} ms | {v:.6f} | {ref} | "
            f"{statistics.median(tr) * 1e3:.1f} ms | {vr:.6f} | {abs(v - vr):.2e} | "
            f"x{s['median']:.2f} [x{s['min']:.2f}-x{s['max']:.2f}], {s['rounds']} rounds |"
        )


if __name__ == "__main__":
    main()

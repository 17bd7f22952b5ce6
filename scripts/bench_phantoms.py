"""Phantom generation speed: a full-size CT case, and our smooth field against scipy's.

    python scripts/bench_phantoms.py [--shape 512 512 100] [--repeats 3]

Prints seconds per CT phantom (RAS and oblique affines) and per 512 x 512 vessel
image, and the smooth random field (separable Gaussian products) against the
obvious reference (``ndimage.zoom`` of coarse noise + ``gaussian_filter``) on the
same grid. CPU only: nothing here runs on a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from scipy import ndimage

from sam3d.data.phantoms import make_ct_phantom, make_vessel_phantom, smooth_field


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _reference_field(rng, shape, spacing_mm, cell_mm):
    coarse = [max(2, int(np.ceil(n * s / cell_mm)) + 2) for n, s in zip(shape, spacing_mm)]
    f = rng.standard_normal(coarse).astype(np.float32)
    f = ndimage.gaussian_filter(f, 0.7)
    f = ndimage.zoom(f, [n / c for n, c in zip(shape, coarse)], order=1)
    return f / f.std()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 100))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 2.0))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    print(f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    make_ct_phantom(0, shape_vox=(64, 64, 16))  # warm-up
    for orientation in ("RAS", "oblique"):
        t = _best(
            lambda o=orientation: make_ct_phantom(
                1, shape_vox=shape, spacing_mm=spacing, orientation=o, n_lesions=3
            ),
            args.repeats,
        )
        print(f"CT phantom {shape} {orientation}: {t:.2f} s")
    t = _best(lambda: make_vessel_phantom(1, size=(512, 512)), args.repeats)
    print(f"vessel phantom (512, 512): {t:.2f} s")
    rng = np.random.default_rng(0)
    ours = _best(lambda: smooth_field(rng, shape, spacing, 6.0), args.repeats)
    ref = _best(lambda: _reference_field(rng, shape, spacing, 6.0), args.repeats)
    print(
        f"smooth field {shape}: ours {ours:.3f} s, zoom+gaussian {ref:.3f} s, "
        f"speed-up x{ref / ours:.1f}"
    )


if __name__ == "__main__":
    main()

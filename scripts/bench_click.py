"""What a further click costs as the volume grows: the same window on a small and a large grid.

Two open :class:`ClickSession` s on synthetic volumes at 1 mm (the grid is the volume: no
resampling), one small (128^3 by default) and one large (400x400x500), the same random
tiny Sam3D, window growth off (one window a click). After a first click (which encodes the
window) each session gets further clicks a few voxels from the first, so the same window is
decoded again; the clicks of the two sessions alternate (A B A B ...) and the CPU seconds of
each are taken (one torch thread: the process's CPU time follows the work, not the load of
the shared cores). Prints both medians and the ratio large / small (median and spread over
the rounds); the goal is <= 1.5. A third session (512x512x200 by default) checks the other
goal, a further click <= 30 ms CPU whatever the history: it gets ``--history`` clicks
(random, positive and negative, some undone) before the timed ones.

    python scripts/bench_click.py                       # 128^3 vs 400x400x500, 512x512x200
    python scripts/bench_click.py --small 64 64 64 --large 200 200 250 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchtime import alternate, ratio_line, timed  # noqa: E402

from sam3d.data.pipelines import load_dataset_preset  # noqa: E402
from sam3d.inference import ClickSession, WindowGrowth  # noqa: E402
from sam3d.models import build_sam3d  # noqa: E402


def volume(shape: tuple[int, int, int]) -> MetaTensor:
    """Soft tissue (40 HU) with a bright 30 mm cube in the middle, 1 mm, RAS."""
    img = torch.full((1, *shape), 40.0)
    c = [s // 2 for s in shape]
    img[0, c[0] - 15 : c[0] + 15, c[1] - 15 : c[1] + 15, c[2] - 15 : c[2] + 15] = 200.0
    return MetaTensor(img, affine=torch.eye(4, dtype=torch.float64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--small", type=int, nargs=3, default=[128, 128, 128])
    ap.add_argument("--large", type=int, nargs=3, default=[400, 400, 500])
    ap.add_argument("--history-shape", type=int, nargs=3, default=[512, 512, 200])
    ap.add_argument("--history", type=int, default=30, help="clicks before the timed ones")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"device: CPU, torch {torch.__version__}, {torch.get_num_threads()} thread")
    torch.manual_seed(0)
    model = build_sam3d(args.preset).eval()
    dataset = load_dataset_preset("kits")
    growth = WindowGrowth(enabled=False)
    rng = np.random.default_rng(0)

    def open_session(shape) -> tuple[ClickSession, list[int], float]:
        t, s = timed(
            lambda: ClickSession(model, volume(tuple(shape)), dataset, "cpu", growth=growth)
        )
        centre = [n // 2 for n in shape]
        s.click(centre)
        return s, centre, t

    def further(session: ClickSession, centre: list[int]):
        def click() -> None:
            p = [c + int(rng.integers(-3, 4)) for c in centre]
            session.click(p, positive=bool(rng.random() < 0.7))

        return click

    small, c_small, t_small = open_session(args.small)
    large, c_large, t_large = open_session(args.large)
    print(
        f"opened {tuple(args.small)} in {t_small:.2f} s and {tuple(args.large)} in "
        f"{t_large:.2f} s (wall); model {args.preset}, crop {model.crop_size}, one window a click"
    )
    a, b = alternate(
        further(large, c_large), further(small, c_small), rounds=args.rounds, clock="cpu"
    )
    assert large.windows == [large.windows[0]] and small.encode_calls == large.encode_calls == 1
    print(ratio_line(f"further click, {tuple(args.large)} / {tuple(args.small)}", a, b, "ms"))
    del small, large

    hist, c_hist, _ = open_session(args.history_shape)
    for n in range(args.history):  # a history: clicks anywhere, some undone
        p = [float(rng.uniform(0, s - 1)) for s in args.history_shape]
        hist.click(p, positive=bool(rng.random() < 0.7))
        if n % 5 == 4:
            hist.undo()
    times = [timed(further(hist, c_hist), "cpu")[0] for _ in range(args.rounds)]
    print(
        f"further click on {tuple(args.history_shape)} after {args.history} clicks "
        f"({len(hist.windows)} window(s) now, {hist.encode_calls} encoded in the session): "
        f"median {statistics.median(times) * 1e3:.1f} ms CPU, max {max(times) * 1e3:.1f} ms "
        f"over {len(times)} (goal <= 30 ms)"
    )


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s wall")

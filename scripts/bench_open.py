"""Opening a volume: the inference chain's CPU time and memory peak, ours against MONAI's.

Ours: ``sam3d.data.pipelines.inference_transforms`` (``BoundedSpacingd`` + ``WindowZScored``);
the reference: the same chain with MONAI's ``Spacingd`` + ``ScaleIntensityRanged`` +
``NormalizeIntensityd`` (what it was before). Each run is a fresh process (the peak resident
set size, ``VmHWM``, is per process) on a synthetic CT-like volume (float32, in memory, no
file), CPU, one torch thread; runs alternate ours / reference for ``--rounds`` rounds.
Prints per run the CPU seconds of the chain and its peak memory above the process with the
input loaded, in GiB and as a multiple of the float32 output grid; then the ratios' median
and spread.

    python scripts/bench_open.py                          # 512x512x200 at 0.8x0.8x2.5 mm
    python scripts/bench_open.py --shape 256 256 160 --spacing 0.7 0.7 2.5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, Orientationd, Spacingd
from sam3d.data.pipelines import inference_transforms, intensity_transforms, load_dataset_preset

kind = sys.argv[1]
shape, spacing = [int(v) for v in sys.argv[2:5]], [float(v) for v in sys.argv[5:8]]
preset = load_dataset_preset("kits")
if kind == "ours":
    chain = inference_transforms(preset)
else:
    chain = Compose([EnsureTyped("image", dtype=torch.float32),
                     Orientationd("image", axcodes="RAS"),
                     Spacingd("image", pixdim=preset["spacing_mm"], mode="bilinear"),
                     *intensity_transforms(preset)])
aff = torch.as_tensor(np.diag([*spacing, 1.0]))
chain({"image": MetaTensor(torch.zeros(1, 8, 8, 4), affine=aff)})  # first-call costs
img = MetaTensor(torch.full((1, *shape), 40.0), affine=aff)
img[0, shape[0] // 4 : 3 * shape[0] // 4, shape[1] // 4 : 3 * shape[1] // 4] = 300.0

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024

Path("/proc/self/clear_refs").write_text("5")
base = status("VmRSS:")
t0 = time.process_time()
out = chain({"image": img})["image"]
cpu = time.process_time() - t0
print(json.dumps({"cpu_s": cpu, "peak": status("VmHWM:") - base, "grid": out.numel() * 4,
                  "shape": list(out.shape[1:])}))
"""


def run(kind: str, shape, spacing) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), kind, *map(str, shape), *map(str, spacing)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"CPU, 1 torch thread; {tuple(args.shape)} at {tuple(args.spacing)} mm -> 1 mm")
    ours, ref = [], []
    for r in range(args.rounds):  # A B A B ...
        for kind, acc in (("ours", ours), ("monai", ref)):
            got = run(kind, args.shape, args.spacing)
            acc.append(got)
            print(
                f"round {r + 1} {kind:5s}: grid {got['shape']}, {got['cpu_s']:.2f} CPU-s, peak "
                f"+{got['peak'] / 2**30:.3f} GiB = {got['peak'] / got['grid']:.2f}x the float32 "
                "grid"
            )
    for what in ("cpu_s", "peak"):
        ratios = [a[what] / b[what] for a, b in zip(ours, ref)]
        print(
            f"{what} ours / MONAI: median x{statistics.median(ratios):.3f} "
            f"[x{min(ratios):.3f}-x{max(ratios):.3f}] over {len(ratios)} alternating rounds; "
            f"ours median {statistics.median(a[what] for a in ours):.3g}, MONAI median "
            f"{statistics.median(b[what] for b in ref):.3g}"
        )


if __name__ == "__main__":
    main()

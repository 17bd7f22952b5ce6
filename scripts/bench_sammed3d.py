"""Time a first click against further clicks of SAM-Med3D on the same window.

Two levels, random weights, one process:

- model: first click = ``encode`` + ``decode`` of one crop (one positive click, the
  reference's zero mask); further click = ``decode`` on the cached features with all clicks
  so far and the previous prediction as the mask prompt (prompt encoder + mask decoder);
- session: a :class:`ClickSession` on a CT phantom (``make_ct_phantom``) written as NIfTI:
  first click on a fresh session (encode, decode, stitch, inversion to the original grid),
  then further clicks in the same window (no encoder).

Goal (issue 29): a further click costs <= 10 % of a first click (CPU, tiny).

    python scripts/bench_sammed3d.py                        # tiny, CPU
    python scripts/bench_sammed3d.py --preset vit_b_ori --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from sam3d.data.phantoms import make_ct_phantom
from sam3d.data.pipelines import load_dataset_preset
from sam3d.inference import ClickSession, WindowGrowth
from sam3d.models.registry import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def model_level(model, device: torch.device, repeats: int) -> tuple[list[float], list[float]]:
    n = model.crop_size
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 1, n, n, n, generator=g) * 100 + 50).to(device)
    clicks = torch.tensor([[[n / 2, n / 2, n / 2], [n / 3, n / 2, n / 2], [n / 2, n / 3, n / 2]]])
    labels = torch.tensor([[1, 0, 1]])
    clicks, labels = clicks.to(device), labels.to(device)
    firsts, furthers = [], []
    with torch.inference_mode():
        for r in range(repeats + 1):  # the first round warms up
            feats = None

            def first():
                nonlocal feats
                feats = model.encode(x)
                return model.decode(feats, clicks[:, :1], labels[:, :1])

            t_first = _time(first, device)
            prob = torch.softmax(model.decode(feats, clicks[:, :1], labels[:, :1]), 1)[:, 1:]
            t_further = [
                _time(
                    lambda k=k, f=feats, p=prob: model.decode(f, clicks[:, :k], labels[:, :k], p),
                    device,
                )
                for k in (2, 3)
            ]
            if r:
                firsts.append(t_first)
                furthers += t_further
    return firsts, furthers


def session_level(model, device: torch.device, repeats: int) -> tuple[list[float], list[float]]:
    dataset = load_dataset_preset("sammed3d")
    side = model.crop_size * 1.5  # one window of the 1.5 mm grid, in mm
    shape = tuple(int(side / s) for s in (1.0, 1.0, 2.0))
    ph = make_ct_phantom(0, shape_vox=shape, spacing_mm=(1.0, 1.0, 2.0), n_lesions=1)
    lesion = np.argwhere(ph.label == 2)
    centre = lesion.mean(0) if len(lesion) else np.array(shape) / 2
    firsts, furthers = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.nii.gz"
        nib.save(nib.Nifti1Image(ph.image_hu.astype(np.int16), ph.affine), path)
        growth = WindowGrowth(enabled=False)
        for r in range(repeats + 1):
            session = ClickSession(model, path, dataset, device=device, growth=growth)
            t_first = _time(lambda s=session: s.click(tuple(centre)), device)
            t_further = [
                _time(lambda d=d, s=session: s.click(tuple(centre + d), positive=d[0] > 0), device)
                for d in (np.array([2.0, 0, 0]), np.array([-2.0, 1, 0]))
            ]
            assert session.encode_calls == 1
            if r:
                firsts.append(t_first)
                furthers += t_further
    return firsts, furthers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--levels", nargs="+", default=["model", "session"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("sammed3d", args.preset).to(device).eval()
    print(
        f"SAM-Med3D {args.preset} (crop {model.crop_size}^3), random weights, {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    levels = {"model": model_level, "session": session_level}
    for name in args.levels:
        firsts, furthers = levels[name](model, device, args.repeats)
        for stat, fn in (("median", statistics.median), ("min", min)):
            f, g = fn(firsts), fn(furthers)
            print(
                f"{name:8s} {stat:6s} first click {1000 * f:9.1f} ms   further click "
                f"{1000 * g:8.1f} ms   further / first {100 * g / f:5.1f} %"
            )


if __name__ == "__main__":
    main()

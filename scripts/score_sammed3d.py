"""Score a SAM-Med3D checkpoint with iterative clicks on CT phantoms: Dice after 1..K clicks.

The checkpoint is an official ``.pth`` (``model_state_dict``, e.g. ``sam_med3d_turbo.pth``)
or one in sam3d's trained format; it runs through :class:`ClickSession` as ``sam3d segment``
does (its dataset preset: for official files the reference's 1.5 mm grid and per-crop
z-score). Clicks follow the reference's ``ritm`` rule: the first at the lesion's interior
point, each next one at the interior point of the error region (positive where the lesion
was missed, negative where the mask leaked), with the previous mask fed back. Data: CT
phantoms (``make_ct_phantom``, lesions of KiTS label 2), never seen by any checkpoint; no
real images are needed, so scores are not comparable with the paper's.

    python scripts/score_sammed3d.py --checkpoint sam_med3d_turbo.pth --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from sam3d.data.clicks import interior_point
from sam3d.data.phantoms import make_ct_phantom
from sam3d.inference import ClickSession, WindowGrowth, load_model_for_inference


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def score_case(model, dataset, path: Path, gt: np.ndarray, clicks: int, device) -> dict:
    session = ClickSession(model, path, dataset, device=device, growth=WindowGrowth())
    dices, seconds = [], []
    point, label = interior_point(gt), 1
    for _ in range(clicks):
        t0 = time.perf_counter()
        pred = session.click(tuple(float(c) for c in point), positive=bool(label))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
        pred = pred.cpu().numpy().astype(bool)
        dices.append(dice(pred, gt))
        error = pred ^ gt
        if not error.any():
            break
        point = interior_point(error)
        label = int(gt[tuple(point)])
    while len(dices) < clicks:  # exact before the last click: it stays exact
        dices.append(dices[-1])
    return {"dice": dices, "seconds": seconds, "encode_calls": session.encode_calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, meta = load_model_for_inference(args.checkpoint, device)
    dataset = meta["dataset"]
    print(
        f"{type(model).__name__} {model.config.get('name')} from {args.checkpoint} on {device}; "
        f"grid {dataset['spacing_mm']} mm; {args.cases} CT phantoms (held out: generated, "
        f"never trained on), {args.clicks} clicks"
    )
    report = getattr(model, "load_report", None)
    if report is not None:
        print(f"load report: {report.summary()}")
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.cases):
            ph = make_ct_phantom(1000 + seed, n_lesions=1)
            gt = ph.label == 2
            if not gt.any():
                continue
            path = Path(tmp) / f"case_{seed}.nii.gz"
            nib.save(nib.Nifti1Image(ph.image_hu.astype(np.int16), ph.affine), path)
            cases.append(score_case(model, dataset, path, gt, args.clicks, device))
            print(f"case {seed}: Dice per click {[round(d, 3) for d in cases[-1]['dice']]}")
    mean = [statistics.mean(c["dice"][k] for c in cases) for k in range(args.clicks)]
    first = statistics.median(c["seconds"][0] for c in cases)
    further = [s for c in cases for s in c["seconds"][1:]]
    print("mean Dice after 1..K clicks: " + ", ".join(f"{d:.3f}" for d in mean))
    print(
        f"first click {first:.3f} s (median), further click "
        f"{statistics.median(further) if further else float('nan'):.3f} s"
    )
    if args.json:
        out = {
            "checkpoint": str(args.checkpoint),
            "device": str(device),
            "data": "make_ct_phantom seeds 1000.., lesion label 2 (held out, generated)",
            "mean_dice_per_click": mean,
            "cases": cases,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

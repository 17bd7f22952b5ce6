"""TopoLoRA-SAM on 2D vessel phantoms with and without the clDice term, through the retina
bundle's own trainer and evaluator.

Every run is ``bundles/retina/train.json`` with the same overrides (seed, data, epochs)
except ``lambda_cldice`` of the loss BCE + Dice + lambda * soft clDice; the best epoch is
chosen on the bundle's validation split (carved from the training cases) and scored by
``evaluate.json`` on the test split at native size: Dice and clDice (hard skeleton), mean
over images.

    python scripts/train_vessels_ablation.py --sam-checkpoint sam_vit_b_01ec64.pth   # GPU
    python scripts/train_vessels_ablation.py --preset tiny --sam-checkpoint tiny_sam.pth \\
        --image-size 256 --size 96 --epochs 4 --cases 10 --device cpu               # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "retina"


def run_bundle(files: list[str], workflow: str, **overrides) -> ConfigWorkflow:
    """One run of the retina bundle's config(s), as ``python -m monai.bundle run`` does."""
    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / f) for f in files],
        workflow_type=workflow,
        logging_file=str(BUNDLE / "logging.conf"),
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def train_and_score(lam: float, args, data: Path, root: Path) -> dict:
    common = {
        "bundle_root": str(root),
        "dataset_dir": str(data),
        "phantom_cases": args.cases,
        "phantom_size": [args.size, args.size],
        "sam_checkpoint": args.sam_checkpoint,
        "model_config#sam": args.preset,
        "model_config#image_size": args.image_size,
        "model_config#checkpoint_encoder": args.checkpoint_encoder,
        "seed": args.seed,
        "num_workers": 0,
        "amp": args.amp and args.device == "cuda",
        "device": f"$torch.device('{args.device}')",
        "mlflow_enabled": False,
    }
    t0 = time.perf_counter()
    run_bundle(
        ["train.json"],
        "train",
        **common,
        lambda_cldice=lam,
        max_epochs=args.epochs,
        learning_rate=args.lr,
        resume=False,
    )
    train_s = time.perf_counter() - t0
    ev = run_bundle(["train.json", "evaluate.json"], "infer", **common)
    metrics = ev.evaluator.state.metrics
    return {
        "lambda_cldice": lam,
        "dice": float(metrics["val_dice"]),
        "cldice": float(metrics["val_cldice"]),
        "train_s": train_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="vit_b", help="SAM preset (configs/sam/)")
    ap.add_argument("--sam-checkpoint", default=None, help="official SAM weights (else random)")
    ap.add_argument("--image-size", type=int, default=1024, help="SAM input side")
    ap.add_argument("--size", type=int, default=256, help="phantom side in pixels")
    ap.add_argument("--cases", type=int, default=24, help="phantoms (60/20/20 split)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--checkpoint-encoder", action="store_true")
    ap.add_argument("--no-amp", dest="amp", action="store_false")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (else a temp dir)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"device: {name} | SAM {args.preset} (weights: {args.sam_checkpoint or 'random'}) | "
        f"input {args.image_size} | {args.cases} phantoms of {args.size}^2 | "
        f"{args.epochs} epochs of bundles/retina/train.json, lr {args.lr:g}, seed {args.seed}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        data = out / "data"
        rows = [train_and_score(lam, args, data, out / f"lambda_{lam:g}") for lam in args.lambdas]
    print(f"{'loss':28s} {'Dice':>7s} {'clDice':>7s} {'train s':>8s}   (test split, native size)")
    for r in rows:
        lam = r["lambda_cldice"]
        label = "BCE + Dice" if lam == 0 else f"BCE + Dice + {lam:g} clDice"
        print(f"{label:28s} {r['dice']:7.4f} {r['cldice']:7.4f} {r['train_s']:8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "args": vars(args) | {"json": None},
                                         "rows": rows}, indent=2, default=str))  # fmt: skip
    assert all(math.isfinite(r["dice"]) for r in rows)


if __name__ == "__main__":
    main()

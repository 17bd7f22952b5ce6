"""Our default recipe against the reference's (``bundles/<name>/reference.json``) on the
phantoms: same seed, data, epochs and scoring, through the bundle's own trainer.

For each recipe the bundle trains (``train.json`` [+ ``reference.json``]) on the training
split, keeps its best epoch by the recipe's own rule on the validation split (carved from
the training cases), and the checkpoint is scored on the held-out test split (phantoms of
the same generator, never seen in training) by OUR ``evaluate.json`` scoring, so the two
rows differ only in training; ``--reference-scoring`` adds the reference's scoring
(``evaluate.json`` + ``reference.json``) of each checkpoint as a second column.

    python scripts/bench_recipes.py --bundle retina --sam-checkpoint tiny_sam.pth --preset tiny
    python scripts/bench_recipes.py --bundle echo --sam-checkpoint sam_vit_b_01ec64.pth  # GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def run_bundle(bundle: str, files: list[str], workflow: str, **overrides) -> ConfigWorkflow:
    """One run of a bundle's config(s), as ``python -m monai.bundle run`` does."""
    wf = ConfigWorkflow(
        config_file=[str(BUNDLES / bundle / f) for f in files],
        workflow_type=workflow,
        logging_file=str(BUNDLES / bundle / "logging.conf"),
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def overrides(args, data: Path, root: Path) -> dict[str, Any]:
    """The data, model size, seed and device of every run of ``args.bundle``."""
    common: dict[str, Any] = {
        "bundle_root": str(root),
        "dataset_dir": str(data),
        "sam_checkpoint": args.sam_checkpoint,
        "seed": args.seed,
        "num_workers": 0,
        "device": f"$torch.device('{args.device}')",
        "mlflow_enabled": False,
    }
    if args.bundle == "retina":
        common.update({"model_config#sam": args.preset, "model_config#image_size": args.image_size,
                       "phantom_cases": args.cases, "phantom_size": [args.size] * 2})  # fmt: skip
    elif args.bundle == "echo":
        common.update({"model_preset": args.preset, "phantom_cases": args.cases,
                       "phantom_size": [args.size] * 2})  # fmt: skip
    elif args.bundle == "prostate":
        from sam3d.models.planar.desam import desam_preset

        common.update({"model_config": {**desam_preset(args.preset), "image_size": args.image_size},
                       "phantom": {"n_per_site": args.cases, "in_plane_vox": args.size,
                                   "n_slices": 8, "seed": args.seed, "sites": ["A", "B", "C"]},
                       "eval_mode": args.eval_mode})  # fmt: skip
    return common


def score(args, files: list[str], common: dict[str, Any], root: Path) -> float:
    """Test-split score of the checkpoint in ``root``: mean Dice (per image / per patient)."""
    ev = run_bundle(args.bundle, files, "infer", **common)
    if args.bundle == "prostate":
        with open(root / "eval" / "metrics_per_site.csv") as f:
            return float(next(r for r in csv.DictReader(f) if r["site"] == "all")["dice_mean"])
    metrics = ev.evaluator.state.metrics  # echo's evaluate names the split (test_*)
    return float(metrics["test_dice"] if "test_dice" in metrics else metrics["val_dice"])


def train_and_score(recipe: str, args, data: Path, root: Path) -> dict[str, Any]:
    common = overrides(args, data, root)
    # "default", "reference", or the path of another overlay (one item of a recipe)
    extra = {"default": [], "reference": ["reference.json"]}.get(
        recipe, [str(Path(recipe).resolve())]
    )
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    run_bundle(args.bundle, ["train.json", *extra], "train", **common,
               max_epochs=args.epochs, resume=False)  # fmt: skip
    row = {"recipe": recipe, "train_s": time.perf_counter() - t0}
    row["dice"] = score(args, ["train.json", "evaluate.json"], common, root)
    if args.reference_scoring:  # the checkpoint's own slice preprocessing kept
        keep = {"interpolation": "bilinear"} if args.bundle == "prostate" and not extra else {}
        row["dice_ref_scoring"] = score(
            args, ["train.json", "evaluate.json", "reference.json"], {**common, **keep}, root
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", choices=["retina", "echo", "prostate"], required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="vit_b", help="model preset (SAM preset for retina)")
    ap.add_argument("--sam-checkpoint", default=None, help="official SAM weights (else random)")
    ap.add_argument(
        "--image-size", type=int, default=1024, help="SAM input side (retina, prostate)"
    )
    ap.add_argument("--size", type=int, default=256, help="phantom side in pixels")
    ap.add_argument("--cases", type=int, default=20, help="phantoms (prostate: per site)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-mode", default="box", help="prostate: grid or box")
    ap.add_argument("--reference-scoring", action="store_true")
    ap.add_argument(
        "--recipes",
        nargs="+",
        default=["default", "reference"],
        help="default, reference, or overlay JSON paths (one item each)",
    )
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (else a temp dir)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"device: {name} | bundles/{args.bundle} | preset {args.preset} (SAM weights: "
        f"{args.sam_checkpoint or 'random'}) | {args.cases} phantoms of {args.size} px | "
        f"{args.epochs} epochs, seed {args.seed}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        rows = [train_and_score(r, args, out / "data", out / Path(r).stem) for r in args.recipes]
    cols = "dice" + (" | reference scoring" if args.reference_scoring else "")
    print(f"{'recipe':10s} {'train s':>8s}  test-split Dice ({cols}; our scoring first)")
    for r in rows:
        ref = f" | {r['dice_ref_scoring']:.4f}" if "dice_ref_scoring" in r else ""
        print(f"{Path(r['recipe']).stem:10s} {r['train_s']:8.1f}  {r['dice']:.4f}{ref}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "args": vars(args) | {"json": None},
                                         "rows": rows}, indent=2, default=str))  # fmt: skip
    assert all(math.isfinite(r["dice"]) for r in rows)


if __name__ == "__main__":
    main()

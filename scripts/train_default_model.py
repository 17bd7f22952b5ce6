"""Train the model that ``sam3d segment`` / ``sam3d serve`` use when no ``--checkpoint`` is
given: the tiny Sam3D, trained by the kits bundle's recipe (interactive click training with
the mask prompt) on synthetic volumes only, on a CPU.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python scripts/train_default_model.py \\
        --out sam3d/weights/tiny_synth.pt

Deterministic for a seed (data generation, splits, augmentation, click rounds); the wall
time depends on the machine. The checkpoint's metadata say what it was trained on, for how
long, and the command that made it (``sam3d info`` shows them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The shipped model's recipe: what the bundle's CPU defaults are, trained longer.
RECIPE = {
    "preset": "tiny",
    "click_training": "interactive",
    "max_rounds": 6,
    "spacing_mm": 1.5,
    "batch_size": 2,
    "samples_per_volume": 4,
    "learning_rate": 1e-3,
    "weight_decay": 1e-4,
}


def _family_default() -> str:
    from sam3d.data import phantoms

    names = getattr(phantoms, "family_names", None)
    return "synth" if names is not None and "synth" in names(training=True) else "ct"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "sam3d" / "weights" / "tiny_synth.pt"))
    ap.add_argument("--work", default="/tmp/sam3d_default_model", help="data and run folder")
    ap.add_argument("--family", default=None, help="phantom family (default: synth, else ct)")
    ap.add_argument("--cases", type=int, default=60, help="phantom volumes (60/20/20 split)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--val-interval", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=RECIPE["learning_rate"])
    ap.add_argument("--click-training", default=RECIPE["click_training"])
    ap.add_argument(
        "--val-clicks", type=int, default=0, help="click-curve validation (0: one click only)"
    )
    ap.add_argument(
        "--network",
        default="sam3d",
        choices=["sam3d", "click_unet"],
        help="click_unet: the click-channel UNet baseline, same recipe and budget",
    )
    args = ap.parse_args(argv)

    import torch
    from monai.bundle import ConfigWorkflow

    from sam3d.data.io import atomic_write
    from sam3d.models.checkpoint import read_trained
    from sam3d.presets import BUNDLE_DIR

    torch.set_num_threads(args.threads)
    family = args.family or _family_default()
    work = Path(args.work)
    data_dir = work / f"data_{family}_{args.cases}_{args.seed}"
    run_dir = work / f"run_{args.network}_{family}_{args.click_training}_{args.seed}_e{args.epochs}"
    settings = {
        **RECIPE,
        "learning_rate": args.lr,
        "click_training": args.click_training,
        "max_epochs": args.epochs,
        "val_interval": args.val_interval,
        "val_clicks": args.val_clicks,
        "seed": args.seed,
        "phantom_cases": args.cases,
        "phantom_kwargs": {"family": family},
    }
    if args.network == "click_unet":
        settings["network_def"] = {
            "_target_": "sam3d.models.volumetric.click_unet.build_click_unet",
            "preset": "tiny",
        }
    command = "python scripts/train_default_model.py " + shlex.join(argv or sys.argv[1:])
    print(f"[train_default_model] {family} phantoms x {args.cases} in {data_dir}; {settings}")
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_DIR / "kits" / "train.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(run_dir),
        dataset_dir=str(data_dir),
        num_workers=0,
        resume=False,
        mlflow_enabled=False,
        **settings,
    )
    t0 = time.perf_counter()
    workflow.initialize()
    t_data = time.perf_counter() - t0
    workflow.run()
    workflow.finalize()
    wall = time.perf_counter() - t0
    trainer = workflow.parser.get_parsed_content("train#trainer")
    best = torch.load(run_dir / "models" / "last.pt", map_location="cpu", weights_only=False)
    obj = read_trained(run_dir / "models" / "model.pt")
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        commit = ""
    training = {
        "note": "trained on synthetic volumes only (sam3d phantoms); not for clinical use",
        "family": family,
        "cases": args.cases,
        "seed": args.seed,
        "recipe": settings,
        "iterations": int(trainer.state.iteration),
        "epochs": int(trainer.state.epoch),
        "wall_minutes": round(wall / 60, 1),
        "data_minutes": round(t_data / 60, 1),
        "best_val_dice_1click": float(best.get("best_metric", float("nan"))),
        "best_epoch": int(best.get("best_epoch", -1)),
        "device": f"CPU ({platform.processor() or platform.machine()}), "
        f"{args.threads} torch thread(s), {os.cpu_count()} cores",
        "command": command,
        "script": "scripts/train_default_model.py",
        "commit": commit,
    }
    obj["meta"] = {**obj.get("meta", {}), "training": training}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: torch.save(obj, tmp))
    size = out.stat().st_size / 2**20
    print(f"[train_default_model] wrote {out} ({size:.1f} MiB): {json.dumps(training, indent=1)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

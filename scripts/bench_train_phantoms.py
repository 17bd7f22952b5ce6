"""Sam3D vs a MONAI UNet: same phantoms, same pipeline, same wall-clock training budget.

Both models train on the kits bundle's training chain (``sam3d.data.pipelines``: 1 mm,
window + z-score, pos/neg crops, flips, rot90, zoom, intensity shift, clicks) with
DiceCE, AdamW and gradient clipping (bf16 autocast on CUDA) until the budget is spent;
data loading and caching happen once, before either clock starts. Then both are scored
on held-out phantoms with Dice and NSD (``sam3d.metrics``, spacing from the metadata):

- Sam3D: one seeded positive click per case, one crop centred on it (the reference's
  protocol, ``sam3d.engine.ClickCropInferer``);
- UNet: automatic, sliding window over the whole volume; and the same prediction kept
  only inside Sam3D's click-centred window ("UNet in click crop"), which gives it the
  same localisation hint.

GPU: ``python scripts/bench_train_phantoms.py --preset vit_b --budget-s 1800``
CPU proof run: ``python scripts/bench_train_phantoms.py --preset tiny --budget-s 60 \
--n-cases 8 --shape 48 48 32 --spacing 1.5 1.5 2.0``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.utils import set_determinism

from sam3d.apps.kits import ensure_dataset, load_datalist
from sam3d.data import pipelines
from sam3d.engine import ClickCropInferer, window_start
from sam3d.metrics.surface import compute_surface_dice
from sam3d.models import build_sam3d, count_parameters


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="vit_b", help="Sam3D preset (vit_b, tiny, ...)")
    p.add_argument("--sam-checkpoint", default=None, help="SAM weights (random init without)")
    p.add_argument("--budget-s", type=float, default=1800.0, help="training seconds per model")
    p.add_argument("--n-cases", type=int, default=40, help="phantoms (60/20/20 split)")
    p.add_argument("--shape", type=int, nargs=3, default=[128, 128, 64])
    p.add_argument("--spacing", type=float, nargs=3, default=[1.25, 1.25, 2.5])
    p.add_argument("--data", type=Path, default=Path("outputs/bench_train_phantoms/data"))
    p.add_argument("--out", type=Path, default=Path("outputs/bench_train_phantoms"))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["sam3d", "unet"], choices=["sam3d", "unet"])
    return p.parse_args()


def train_for(
    name: str, net: torch.nn.Module, loader: DataLoader, budget_s: float, lr: float,
    device: torch.device, prompted: bool,
) -> dict:  # fmt: skip
    """Train until ``budget_s`` wall-clock seconds are spent; returns steps and losses."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    amp = device.type == "cuda"
    net.train()
    steps, losses, start = 0, [], time.perf_counter()
    while time.perf_counter() - start < budget_s:
        for batch in loader:
            img = batch["image"].to(device)
            lab = batch["label"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if prompted:
                    out = net(
                        img, points=batch["points"].to(device),
                        point_labels=batch["point_labels"].to(device),
                    )  # fmt: skip
                else:
                    out = net(img)
                loss = loss_fn(out.float(), lab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            steps += 1
            losses.append(float(loss.detach()))
            if time.perf_counter() - start >= budget_s:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    first = float(np.mean(losses[: max(1, len(losses) // 10)]))
    last = float(np.mean(losses[-max(1, len(losses) // 10) :]))
    print(f"  {name}: {steps} steps in {elapsed:.0f} s, loss {first:.3f} -> {last:.3f}")
    return {"steps": steps, "train_s": elapsed, "loss_first": first, "loss_last": last}


def _click_window(points: torch.Tensor, labels: torch.Tensor, roi: int, shape) -> tuple:
    pos = points[labels == 1]
    centre = pos.mean(0).tolist() if pos.numel() else [s / 2 for s in shape]
    starts = [window_start(c, roi, s) for c, s in zip(centre, shape)]
    return tuple(slice(st, st + roi) for st in starts)


@torch.no_grad()
def evaluate(
    nets: dict[str, torch.nn.Module], data: CacheDataset, roi: int, tol_mm: float,
    device: torch.device,
) -> dict:  # fmt: skip
    """Dice and NSD per model on every held-out case."""
    amp = device.type == "cuda"
    scores: dict[str, dict[str, list[float]]] = {}
    for item in data:
        img = item["image"][None].to(device)
        gt = item["label"][0].to(device) > 0
        spacing = [float(v) for v in np.linalg.norm(item["image"].affine[:3, :3].numpy(), axis=0)]
        pts, labs = item["points"][None].to(device), item["point_labels"][None].to(device)
        preds = {}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if "sam3d" in nets:
                logits = ClickCropInferer(roi)(img, nets["sam3d"], points=pts, point_labels=labs)
                preds["sam3d (1 click)"] = logits[0].argmax(0) == 1
            if "unet" in nets:
                logits = sliding_window_inference(img, roi, 4, nets["unet"], overlap=0.25)
                full = logits[0].argmax(0) == 1
                preds["unet (sliding window)"] = full
                window = _click_window(pts[0], labs[0], roi, gt.shape)
                cropped = torch.zeros_like(full)
                cropped[window] = full[window]
                preds["unet (in click crop)"] = cropped
        for name, pred in preds.items():
            inter = float((pred & gt).sum())
            denom = float(pred.sum() + gt.sum())
            dice = 2 * inter / denom if denom else float("nan")
            nsd = float(compute_surface_dice(pred, gt, spacing, tol_mm))
            scores.setdefault(name, {"dice": [], "nsd": []})
            scores[name]["dice"].append(dice)
            scores[name]["nsd"].append(nsd)
    return {
        name: {k: float(np.nanmean(v)) for k, v in s.items()} | {"n_cases": len(s["dice"])}
        for name, s in scores.items()
    }


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    set_determinism(seed=args.seed)
    preset = pipelines.load_dataset_preset("kits")
    ensure_dataset(
        args.data, n_cases=args.n_cases, seed=args.seed,
        phantom_kwargs={"shape_vox": args.shape, "spacing_mm": args.spacing, "n_lesions": 1},
    )  # fmt: skip
    train_list = load_datalist(args.data, "training", seed=args.seed)
    test_list = load_datalist(args.data, "test", seed=args.seed)
    sam = build_sam3d(args.preset, sam_checkpoint=args.sam_checkpoint)
    crop = int(sam.crop_size)
    t0 = time.perf_counter()
    train_ds = CacheDataset(
        train_list, pipelines.train_transforms(preset, crop), num_workers=args.num_workers
    )
    test_ds = CacheDataset(test_list, pipelines.val_transforms(preset, seed=args.seed))
    cache_s = time.perf_counter() - t0
    loader = DataLoader(
        train_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
        drop_last=len(train_ds) >= args.batch_size,
    )  # fmt: skip
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        load = os.getloadavg()[0]
        name = f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, load {load:.1f}"
    print(f"device: {device} ({name}), torch {torch.__version__}")
    print(
        f"data: {len(train_list)} train / {len(test_list)} held-out phantoms "
        f"{tuple(args.shape)} at {tuple(args.spacing)} mm, crop {crop}^3, cached in {cache_s:.0f} s"
    )
    print(f"budget: {args.budget_s:.0f} s of training per model, batch {args.batch_size}")
    nets: dict[str, torch.nn.Module] = {}
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(name)}
    for model in args.models:
        torch.manual_seed(args.seed)
        if model == "sam3d":
            net = sam.to(device)
        else:
            net = UNet(
                spatial_dims=3, in_channels=1, out_channels=2,
                channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2,
            ).to(device)  # fmt: skip
        n_params = count_parameters(net)
        print(f"{model}: {n_params['trainable'] / 1e6:.2f}M trainable parameters")
        results[model] = train_for(
            model, net, loader, args.budget_s, args.lr, device, prompted=model == "sam3d"
        )
        results[model]["trainable_params"] = n_params["trainable"]
        nets[model] = net.eval()
    scores = evaluate(nets, test_ds, crop, float(preset["nsd_tolerance_mm"]), device)
    results["scores"] = scores
    print(f"held-out single-click scores after {args.budget_s:.0f} s of training each:")
    for key, s in scores.items():
        print(f"  {key:24s} Dice {s['dice']:.3f}  NSD@5mm {s['nsd']:.3f}  ({s['n_cases']} cases)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"results_{args.preset}_{device.type}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    if any(math.isnan(s["dice"]) for s in scores.values()):
        print("note: NaN means no held-out case had a tumour")


if __name__ == "__main__":
    main()

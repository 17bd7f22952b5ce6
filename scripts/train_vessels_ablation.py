"""Short TopoLoRA-SAM trainings on 2D vessel phantoms with and without the clDice term.

Every run starts from the same weights (same seed), sees the same images in the same
order for the same number of steps, and differs only in ``lambda_cldice`` of the loss
BCE + Dice + lambda * soft clDice. Test phantoms are scored at their native size:
Dice and clDice (hard skeleton), mean over images.

    python scripts/train_vessels_ablation.py --sam-checkpoint sam_vit_b_01ec64.pth   # GPU
    python scripts/train_vessels_ablation.py --preset tiny --image-size 256 --size 96 \\
        --steps 20 --n-train 4 --n-test 2 --device cpu                               # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from sam3d.data.phantoms import make_vessel_phantom
from sam3d.losses import BCEDiceClDiceLoss
from sam3d.metrics.cldice import compute_cldice
from sam3d.models.planar.topolora import build_topolora_sam


def phantoms(n: int, first_seed: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (image ``1 x 3 x H x W`` in 0..255, label ``1 x 1 x H x W`` in {0,1}) pairs."""
    out = []
    for i in range(n):
        ph = make_vessel_phantom(first_seed + i, size=(size, size))
        img = torch.from_numpy(np.ascontiguousarray(ph.image.transpose(2, 0, 1))) * 255.0
        out.append((img[None].float(), torch.from_numpy(ph.label)[None, None].float()))
    return out


def train_and_score(lam: float, args, train_set, test_set) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_topolora_sam(
        args.preset,
        sam_checkpoint=args.sam_checkpoint,
        image_size=args.image_size,
        fused_attention=True,
        checkpoint_encoder=args.checkpoint_encoder,
    ).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    loss_fn = BCEDiceClDiceLoss(lambda_cldice=lam)
    amp = args.amp and device.type == "cuda"
    order = torch.randint(len(train_set), (args.steps,), generator=torch.Generator().manual_seed(1))
    model.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        img, lab = (t.to(device) for t in train_set[int(order[step])])
        if torch.rand((), generator=torch.Generator().manual_seed(step)) < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(img)
        loss = loss_fn(logits.float(), lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    model.eval()
    dice, cldice = [], []
    with torch.no_grad():
        for img, lab in test_set:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                pred = model(img.to(device)) > 0  # logits at the label's native size
            gt = lab.to(device) > 0.5
            assert pred.shape == gt.shape
            inter = (pred & gt).sum().item()
            denom = pred.sum().item() + gt.sum().item()
            dice.append(2 * inter / denom if denom else 1.0)
            cldice.append(float(compute_cldice(pred[0, 0], gt[0, 0])))
    return {
        "lambda_cldice": lam,
        "dice": float(np.nanmean(dice)),
        "cldice": float(np.nanmean(cldice)),
        "final_loss": float(np.mean(losses[-max(1, args.steps // 10) :])),
        "train_s": train_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="vit_b")
    ap.add_argument("--sam-checkpoint", default=None, help="official SAM weights (else random)")
    ap.add_argument("--image-size", type=int, default=1024, help="SAM input side")
    ap.add_argument("--size", type=int, default=256, help="phantom side in pixels")
    ap.add_argument("--n-train", type=int, default=16)
    ap.add_argument("--n-test", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--checkpoint-encoder", action="store_true")
    ap.add_argument("--no-amp", dest="amp", action="store_false")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"device: {name} | preset {args.preset} (weights: {args.sam_checkpoint or 'random'}) | "
        f"input {args.image_size} | phantoms {args.size}^2 train {args.n_train} test "
        f"{args.n_test} | {args.steps} steps, lr {args.lr:g}, seed {args.seed}"
    )
    train_set = phantoms(args.n_train, 1000, args.size)
    test_set = phantoms(args.n_test, 9000, args.size)
    rows = [train_and_score(lam, args, train_set, test_set) for lam in args.lambdas]
    print(f"{'loss':28s} {'Dice':>7s} {'clDice':>7s} {'last loss':>10s} {'train s':>8s}")
    for r in rows:
        lam = r["lambda_cldice"]
        label = "BCE + Dice" if lam == 0 else f"BCE + Dice + {lam:g} clDice"
        print(
            f"{label:28s} {r['dice']:7.4f} {r['cldice']:7.4f} {r['final_loss']:10.4f} "
            f"{r['train_s']:8.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": name, "args": vars(args) | {"json": None},
                                         "rows": rows}, indent=2, default=str))  # fmt: skip
    assert all(math.isfinite(r["dice"]) for r in rows)


if __name__ == "__main__":
    main()

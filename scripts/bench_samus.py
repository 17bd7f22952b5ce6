"""SAMUS benchmarks: one training step against full fine-tuning of the same SAM, and a short
training on echo phantoms against SAM with a frozen encoder and a trainable decoder.

1. ``step``: one optimiser step of SAMUS at ``S x S`` (256, batch 8 in the seed) and of
   the same SAM fully fine-tuned at its 1024 input, same batch, one click per image,
   the bundle's loss; median time of ``--steps`` steps after a warm-up and peak memory
   (CUDA: ``max_memory_allocated``; CPU: peak RSS of a subprocess per variant).
2. ``train``: SAMUS and the MedSAM-style baseline (SAM, frozen encoder, trainable mask
   decoder) trained for the same steps on the same echo phantoms, seed and batch order,
   through the echo bundle's own transforms and loss; Dice per structure at each image's
   native size on the validation split, interior-point clicks (one per structure).

Random SAM weights unless ``--sam-checkpoint`` is given (none can be downloaded here):
the training comparison then measures what the adapted parts learn from scratch.

    python scripts/bench_samus.py step --device cpu --preset tiny --batch 2
    python scripts/bench_samus.py train --device cpu --preset tiny --steps 60
    python scripts/bench_samus.py step --device cuda --preset vit_b --batch 8   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sam3d.losses import BCEDiceLoss  # noqa: E402
from sam3d.models.planar.samus import Samus, build_samus  # noqa: E402
from sam3d.models.sam.build import build_sam  # noqa: E402


class FrozenEncoderSam(torch.nn.Module):
    """The MedSAM-style baseline: SAM at ``image_size`` (its own preprocessing), frozen image
    encoder and prompt encoder, trainable mask decoder; the same call as :class:`Samus`."""

    def __init__(self, sam, train_encoder: bool = False):
        super().__init__()
        self.sam = sam
        for p in sam.parameters():
            p.requires_grad_(train_encoder)
        for p in sam.mask_decoder.parameters():
            p.requires_grad_(True)

    @property
    def img_size(self) -> int:
        return self.sam.image_encoder.img_size

    to_input_frame = Samus.to_input_frame
    decode = Samus.decode

    def forward(self, images, points, point_labels):
        if points.ndim == 3:
            points, point_labels = points[:, None], point_labels[:, None]
        hw = tuple(images.shape[-2:])
        x = images.float().expand(-1, 3, -1, -1) * 255.0
        x = F.interpolate(x, size=(self.img_size,) * 2, mode="bilinear", align_corners=False)
        emb = self.sam.image_encoder(self.sam.preprocess(x))
        low = self.decode(emb, self.to_input_frame(points, hw).to(emb.dtype), point_labels.long())
        return F.interpolate(low.float(), size=hw, mode="bilinear", align_corners=False)


def _models(args, which: str):
    if which == "samus":
        return build_samus(args.preset, args.sam_checkpoint, args.samus_size)
    sam = build_sam(args.preset, args.sam_checkpoint, args.sam_size)
    return FrozenEncoderSam(sam, train_encoder=(which == "full"))


# --------------------------------------------------------------------------- 1. step


def _one_variant(args, which: str) -> dict:
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = _models(args, which).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    loss_fn = BCEDiceLoss()
    s = args.samus_size if which == "samus" else args.sam_size
    x = torch.rand(args.batch, 1, s, s, device=dev)
    y = torch.zeros(args.batch, 1, s, s, device=dev)
    y[..., s // 4 : s // 2, s // 4 : s // 2] = 1
    pts = torch.full((args.batch, 1, 1, 2), 3 * s / 8, device=dev)
    lab = torch.ones(args.batch, 1, 1, dtype=torch.long, device=dev)
    amp = dev.type == "cuda"
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(args.steps + args.warmup):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x, pts, lab), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated(dev)
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "variant": which,
        "input": s,
        "batch": args.batch,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in model.parameters()),
        "step_s": float(np.median(times)),
        "peak_gib": peak / 2**30,
        "memory": "cuda max_memory_allocated" if dev.type == "cuda" else "peak RSS of the process",
    }


def bench_step(args) -> list[dict]:
    rows = []
    for which in ("samus", "full"):
        if args.device == "cpu":  # peak RSS needs a process per variant
            cmd = [sys.executable, __file__, "_variant", which, "--json", json.dumps(vars(args))]
            done = subprocess.run(cmd, capture_output=True, text=True)
            found = [ln for ln in done.stdout.splitlines() if ln.startswith('{"variant"')]
            if done.returncode or not found:
                raise SystemExit(f"bench_samus: the {which} variant failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(found[-1]))
        else:
            rows.append(_one_variant(args, which))
            torch.cuda.empty_cache()
    samus, full = rows
    print(
        f"device {args.device}, SAM preset {args.preset}, batch {args.batch}, "
        f"{args.steps} timed steps after {args.warmup} warm-up"
    )
    for r in rows:
        name = "SAMUS" if r["variant"] == "samus" else "SAM full fine-tuning"
        print(
            f"  {name:22s} input {r['input']:5d}  trainable {r['trainable']:>11,} / "
            f"{r['total']:>11,}  step {r['step_s']:.3f} s  peak {r['peak_gib']:.2f} GiB"
        )
    print(
        f"  ratio SAMUS / full: time {samus['step_s'] / full['step_s']:.3f}, "
        f"memory {samus['peak_gib'] / full['peak_gib']:.3f} ({samus['memory']})"
    )
    return rows


# --------------------------------------------------------------------------- 2. train


def _bundle_data(args, root: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "echo" / "train.json"))
    parser.update(
        {
            "bundle_root": str(root),
            "model_preset": args.preset,
            "phantom_cases": args.cases,
            "phantom_size": [args.phantom_size, args.phantom_size],
            "num_workers": 0,
            "seed": args.seed,
        }
    )
    parser["model_config"] = {"sam": args.preset, "image_size": args.samus_size}
    train = parser.get_parsed_content("train#dataset")
    val = parser.get_parsed_content("validate#dataset")
    return train, val, parser.get_parsed_content("class_names")


def _train_eval(args, which, train_ds, val_ds, classes) -> dict:
    from monai.data import DataLoader
    from monai.utils import set_determinism

    dev = torch.device(args.device)
    set_determinism(args.seed)
    torch.manual_seed(args.seed)
    model = _models(args, which if which == "samus" else "decoder").to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    loss_fn = BCEDiceLoss()
    loader = DataLoader(
        train_ds, batch_size=args.batch, shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    step, t0 = 0, time.perf_counter()
    model.train()
    amp = dev.type == "cuda"
    while step < args.steps:
        for batch in loader:
            x, y = batch["image"].to(dev), batch["label"].to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x, batch["points"].to(dev), batch["point_labels"].to(dev))
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= args.steps:
                break
    train_s = time.perf_counter() - t0
    model.eval()
    dices = {c: [] for c in classes}
    with torch.no_grad():
        for item in val_ds:
            x = item["image"][None].to(dev)
            logits = model(x, item["points"][None].to(dev), item["point_labels"][None].to(dev))
            pred = torch.sigmoid(logits[0].float()) > 0.5
            gt = item["label"].to(dev) > 0
            for k, c in enumerate(classes):
                inter = (pred[k] & gt[k]).sum().item()
                denom = pred[k].sum().item() + gt[k].sum().item()
                if gt[k].any():
                    dices[c].append(2 * inter / denom)
    return {
        "variant": which,
        "trainable": sum(p.numel() for p in params),
        "train_s": train_s,
        "dice": {c: float(np.mean(v)) if v else float("nan") for c, v in dices.items()},
    }


def bench_train(args) -> list[dict]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        train_ds, val_ds, classes = _bundle_data(args, Path(tmp))
        rows = [_train_eval(args, w, train_ds, val_ds, classes) for w in ("samus", "baseline")]
    weights = args.sam_checkpoint or "random weights"
    print(
        f"device {args.device}, SAM preset {args.preset} ({weights}), SAMUS at "
        f"{args.samus_size}, baseline SAM at {args.sam_size}; "
        f"{args.steps} steps of batch {args.batch}, lr {args.lr}, seed {args.seed}; "
        f"{len(train_ds)} training / {len(val_ds)} validation phantoms of {args.phantom_size}^2 px"
    )
    for r in rows:
        name = "SAMUS" if r["variant"] == "samus" else "SAM frozen encoder + decoder"
        d = ", ".join(f"{c} {v:.3f}" for c, v in r["dice"].items())
        print(f"  {name:30s} trainable {r['trainable']:>11,}  {r['train_s']:.0f} s  Dice {d}")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["step", "train", "_variant"])
    p.add_argument("variant", nargs="?")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="vit_b", help="SAM preset of configs/sam/")
    p.add_argument("--sam-checkpoint", default=None)
    p.add_argument("--samus-size", type=int, default=256)
    p.add_argument("--sam-size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (step)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--phantom-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.json:
        variant = args.variant
        args = argparse.Namespace(**json.loads(args.json))
        args.what, args.variant, args.json = "_variant", variant, None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_samus: --device cuda asked for but no CUDA GPU is available")
    torch.set_num_threads(args.threads)
    if args.what == "_variant":
        print(json.dumps(_one_variant(args, args.variant)))
    elif args.what == "step":
        bench_step(args)
    else:
        bench_train(args)


if __name__ == "__main__":
    main()

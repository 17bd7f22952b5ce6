"""Sam3D vs a click-channel UNet vs an automatic UNet: learning curves on CT phantoms.

All three train through the kits bundle's own trainer (``bundles/kits/train.json``, built
with :class:`monai.bundle.ConfigWorkflow` and overrides: the same cached training data,
augmentation, simulated clicks, DiceCE, AdamW, gradient clipping, bf16 on CUDA); only
``network_def`` differs:

- ``sam3d``: the Sam3D preset (``--preset``), clicks through its prompt encoder;
- ``unet_clicks``: a MONAI UNet whose input carries two extra channels, Gaussian heatmaps
  of the positive and of the negative clicks (the DeepEdit way);
- ``unet_auto``: the same UNet without clicks (image only; the click crop still tells it
  where to look).

Each model gets the same training budget (``--clock cpu``: CPU seconds of this process,
fair on a shared machine; ``wall``: wall-clock seconds, the default on CUDA), with the
learning rate cosine-decayed over the budget. At each ``--checkpoints-s`` the clock
pauses and the model is scored on the held-out (test) phantoms: one seeded positive
click per case and the bundle's validation inferer (``sam3d.engine.ClickCropInferer``:
the same click-centred crop, grown as in ``sam3d segment``, for every model), Dice and
NSD against the clicked lesion. The curves go to one JSON file and one plot.

GPU: ``python scripts/bench_train_phantoms.py --device cuda --preset vit_b --budget-s 600
--checkpoints-s 120 300 600``
CPU: ``python scripts/bench_train_phantoms.py --device cpu --preset tiny --budget-s 300
--checkpoints-s 60 120 300``
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

from sam3d.data import pipelines
from sam3d.engine import ClickCropInferer
from sam3d.metrics.surface import compute_surface_dice
from sam3d.models import build_sam3d, count_parameters
from sam3d.presets import BUNDLE_DIR

MODELS = ("sam3d", "unet_clicks", "unet_auto")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="Sam3D preset (tiny, vit_b, ...)")
    p.add_argument("--sam-checkpoint", default=None, help="SAM weights (random init without)")
    p.add_argument("--budget-s", type=float, default=300.0, help="training seconds per model")
    p.add_argument("--checkpoints-s", type=float, nargs="+", default=[60.0, 120.0, 300.0])
    p.add_argument("--clock", choices=["cpu", "wall"], default=None, help="default: cpu on CPU")
    p.add_argument("--n-cases", type=int, default=30, help="phantoms (60/20/20 split)")
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 48])
    p.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 2.5])
    p.add_argument("--out", type=Path, default=Path("outputs/bench_train_phantoms"))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--samples-per-volume", type=int, default=2)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--n-pos-clicks", type=int, default=None, help="training positives (max)")
    p.add_argument("--n-neg-clicks", type=int, default=None, help="training negatives (max)")
    return p.parse_args(argv)


class ClickHeatmapUNet(torch.nn.Module):
    """A MONAI UNet with the clicks as input channels (DeepEdit-style), or without them.

    ``forward(image B x 1 x H x W x D, points B x N x 3, point_labels B x N)``: with
    ``clicks`` the input is ``[image, G+, G-]`` where ``G+`` / ``G-`` are the maxima of
    Gaussians (``sigma`` voxels) at the positive / negative clicks (-1 padding ignored).
    ``encode`` / ``decode`` give the promptable interface of the validation inferer.
    """

    def __init__(self, crop_size: int, clicks: bool = True, sigma: float = 3.0) -> None:
        from monai.networks.nets import UNet

        super().__init__()
        self.crop_size, self.clicks, self.sigma = int(crop_size), clicks, float(sigma)
        self.net = UNet(
            spatial_dims=3, in_channels=3 if clicks else 1, out_channels=2,
            channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2,
        )  # fmt: skip

    def heatmaps(self, shape, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``B x 2 x H x W x D``: positive and negative click heatmaps in [0, 1]."""
        grids = torch.meshgrid(
            *[torch.arange(s, device=points.device, dtype=torch.float32) for s in shape],
            indexing="ij",
        )
        grid = torch.stack(grids, -1)  # H x W x D x 3
        d2 = ((grid[None, None] - points[:, :, None, None, None].float()) ** 2).sum(-1)
        g = torch.exp(-d2 / (2 * self.sigma**2))  # B x N x H x W x D
        out = []
        for value in (1, 0):
            keep = (labels == value).float()[:, :, None, None, None]
            out.append((g * keep).amax(1))
        return torch.stack(out, 1)

    def forward(self, image, points=None, point_labels=None) -> torch.Tensor:
        if self.clicks:
            heat = self.heatmaps(image.shape[2:], points, point_labels).to(image.dtype)
            image = torch.cat([image, heat], 1)
        return self.net(image)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, features, points, point_labels) -> torch.Tensor:
        return self.forward(features, points, point_labels)


class Clock:
    """Seconds of training: CPU time of this process or wall time, pausable."""

    def __init__(self, kind: str, device: torch.device) -> None:
        self.kind, self.device = kind, device
        self.spent, self.t0 = 0.0, None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.process_time() if self.kind == "cpu" else time.perf_counter()

    def start(self) -> None:
        self.t0 = self._now()

    def pause(self) -> None:
        self.spent += self._now() - self.t0
        self.t0 = None

    def elapsed(self) -> float:
        return self.spent + (self._now() - self.t0 if self.t0 is not None else 0.0)


@torch.no_grad()
def evaluate(net, data, roi: int, tol_mm: float, device: torch.device) -> dict[str, float]:
    """Held-out Dice / NSD: one seeded click per case, the bundle's validation inferer."""
    net.eval()
    inferer = ClickCropInferer(roi, amp=device.type == "cuda")
    dice, nsd = [], []
    for item in data:
        img = item["image"][None].to(device)
        gt = item["label"][0].to(device) > 0
        pts, labs = item["points"][None].to(device), item["point_labels"][None].to(device)
        pred = inferer(img, net, points=pts, point_labels=labs)[0].argmax(0) == 1
        spacing = [float(v) for v in np.linalg.norm(item["image"].affine[:3, :3].numpy(), axis=0)]
        denom = float(pred.sum() + gt.sum())
        dice.append(2 * float((pred & gt).sum()) / denom if denom else float("nan"))
        nsd.append(float(compute_surface_dice(pred, gt, spacing, tol_mm)))
    net.train()
    return {"dice": float(np.nanmean(dice)), "nsd": float(np.nanmean(nsd)), "n_cases": len(dice)}


def make_network(name: str, args: argparse.Namespace, crop: int) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    if name == "sam3d":
        return build_sam3d(args.preset, sam_checkpoint=args.sam_checkpoint)
    return ClickHeatmapUNet(crop, clicks=name == "unet_clicks")


def train_curve(name: str, net, args, data_dir: Path, test_ds, shared: dict, device) -> dict:
    """Train ``net`` with the kits bundle's trainer for the budget; the held-out curve."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    overrides = {
        "bundle_root": str(args.out / f"bundle_{name}"),
        "dataset_dir": str(data_dir),
        "preset": args.preset,
        "network_def": net,
        "device": device,
        "amp": device.type == "cuda",
        "max_epochs": 100000,  # the budget ends the run
        "batch_size": args.batch_size,
        "samples_per_volume": args.samples_per_volume,
        "learning_rate": args.lr,
        "num_workers": args.num_workers,
        "seed": args.seed,
        "resume": False,
        "mlflow_enabled": False,
        # no validation, checkpointing or logging inside the run: the curve is scored here
        "train#handlers": [
            {"_target_": "sam3d.engine.GradientClipping", "max_norm": "@grad_clip_norm"}
        ],
        "initialize": ["$monai.utils.set_determinism(seed=@seed)"],
    }
    if args.n_pos_clicks is not None:
        overrides["n_pos_clicks"] = args.n_pos_clicks
    if args.n_neg_clicks is not None:
        overrides["n_neg_clicks"] = args.n_neg_clicks
    if "train_dataset" in shared:  # cached once, shared by every model
        overrides["train#dataset"] = shared["train_dataset"]
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_DIR / "kits" / "train.json"),
        logging_file=False,
        workflow_type="train",
        **overrides,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    shared.setdefault("train_dataset", workflow.parser.get_parsed_content("train#dataset"))
    optimizer = workflow.parser.get_parsed_content("optimizer")
    roi = int(workflow.parser.get_parsed_content("crop_size"))
    tol = float(workflow.parser.get_parsed_content("dataset_info")["nsd_tolerance_mm"])
    clock = Clock(args.clock, device)
    pending = sorted(t for t in args.checkpoints_s if t <= args.budget_s)
    curve: list[dict] = []
    losses: list[float] = []

    def on_start(engine) -> None:
        clock.start()

    def set_lr(engine) -> None:  # cosine over the budget, to 1 % of the base rate
        frac = min(1.0, clock.elapsed() / args.budget_s)
        lr = args.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in optimizer.param_groups:
            group["lr"] = lr

    def on_iteration(engine) -> None:
        out = engine.state.output
        losses.append(float((out[0] if isinstance(out, list) else out)["loss"]))
        elapsed = clock.elapsed()
        while pending and elapsed >= pending[0]:
            mark = pending.pop(0)
            clock.pause()
            scores = evaluate(net, test_ds, roi, tol, device)
            recent = losses[-max(1, min(len(losses), 20)) :]
            point = {
                "budget_s": mark,
                "trained_s": round(elapsed, 1),
                "steps": engine.state.iteration,
                "loss": float(np.mean(recent)),
                **scores,
            }
            curve.append(point)
            print(
                f"  {name:12s} {mark:6.0f} s ({point['steps']:5d} steps): held-out Dice "
                f"{scores['dice']:.3f}  NSD {scores['nsd']:.3f}  loss {point['loss']:.3f}",
                flush=True,
            )
            clock.start()
        if elapsed >= args.budget_s:
            engine.terminate()

    trainer.add_event_handler(Events.STARTED, on_start)
    trainer.add_event_handler(Events.ITERATION_STARTED, set_lr)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, on_iteration)
    trainer.run()
    return {"curve": curve, "steps": trainer.state.iteration, "trainable_params":
            count_parameters(net)["trainable"], "crop": roi}  # fmt: skip


def save_plot(results: dict, path: Path, clock: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    labels = {
        "sam3d": "Sam3D",
        "unet_clicks": "UNet + click heatmaps",
        "unet_auto": "UNet (no clicks)",
    }
    for name in MODELS:
        if name in results["models"]:
            curve = results["models"][name]["curve"]
            ax.plot([p["budget_s"] / 60 for p in curve], [p["dice"] for p in curve], "o-",
                    label=labels[name])  # fmt: skip
    ax.set_xlabel(f"training time per model ({clock} minutes)")
    ax.set_ylabel("held-out Dice, one click")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"CT phantoms, {results['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.clock is None:
        args.clock = "wall" if device.type == "cuda" else "cpu"
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    from sam3d.data.phantoms import write_phantom_dataset

    data_dir = args.out / "data"
    if not (data_dir / "dataset.json").is_file():
        write_phantom_dataset(
            "ct", data_dir, n=args.n_cases, seed=args.seed, shape_vox=tuple(args.shape),
            spacing_mm=tuple(args.spacing), n_lesions=1, balance_contrast=True,
        )  # fmt: skip
    from monai.data import CacheDataset

    from sam3d.apps.kits import load_datalist

    preset = pipelines.load_dataset_preset("kits")
    test_list = load_datalist(data_dir, "test", seed=args.seed)
    test_ds = CacheDataset(
        test_list, pipelines.val_transforms(preset, seed=args.seed), progress=False
    )
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        load = os.getloadavg()[0]
        name = f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, load {load:.1f}"
    print(f"device: {device} ({name}), torch {torch.__version__}, clock: {args.clock} seconds")
    print(f"data: {args.n_cases} phantoms {tuple(args.shape)} at {tuple(args.spacing)} mm, "
          f"{len(test_list)} held-out; budget {args.budget_s:.0f} s per model")  # fmt: skip
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "device": name,
                     "clock": args.clock, "models": {}}  # fmt: skip
    shared: dict = {}
    crop = int(build_sam3d(args.preset).crop_size)
    for model in args.models:
        net = make_network(model, args, crop)
        print(f"{model}: {count_parameters(net)['trainable'] / 1e6:.2f}M trainable parameters")
        results["models"][model] = train_curve(model, net, args, data_dir, test_ds, shared, device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"results_{args.preset}_{device.type}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot = args.out / f"learning_curves_{args.preset}_{device.type}.png"
    save_plot(results, plot, args.clock)
    print("held-out single-click Dice at each budget:")
    marks = sorted({p["budget_s"] for m in results["models"].values() for p in m["curve"]})
    print("| model | " + " | ".join(f"{t / 60:g} min" for t in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for model, r in results["models"].items():
        by = {p["budget_s"]: p for p in r["curve"]}
        cells = [f"{by[t]['dice']:.3f} ({by[t]['steps']} steps)" if t in by else "-" for t in marks]
        print(f"| {model} | " + " | ".join(cells) + " |")
    print(f"wrote {path} and {plot}")
    return results


if __name__ == "__main__":
    main()

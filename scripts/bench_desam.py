"""DeSAM benchmarks: training from the embedding cache vs live encoder passes, cache size per
slice, and a short cross-site training (DeSAM vs SAM's coupled decoder vs a MONAI UNet).

Part ``memory`` -- one training step, same batch and prompts, each variant in its own
process (peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak
RSS on the CPU):

- ``cache``: DeSAM's decoder trained from maps read from an :class:`EmbeddingCache`;
- ``live_desam``: the same decoder on live (no-grad) encoder passes;
- ``live_sam_decoder``: SAM's own mask decoder fine-tuned on live encoder passes (what a
  user without the cache does).

Also printed: the cache's bytes per slice (float16, four maps) for ViT-B and ViT-H at SAM's
1024 input against the reference's float32 npz (67.1 MB a slice at ViT-H).

Part ``sites`` -- train on site A phantoms for the same steps, test on sites B-F, Dice
per patient in 3D over the ground-truth slices (the reference's evaluation):

- DeSAM, grid mode (an ``n x n`` point grid, IoU ranking); with ``--box`` also a DeSAM
  trained and evaluated on the whole-image box (the reference's second mode);
- SAM's own decoder fine-tuned with the same prompts and steps (the coupled baseline),
  grid mode with its own IoU head and the same selection;
- a MONAI 2D UNet trained for the same wall-clock time as DeSAM on the same slices.

No SAM weights can be downloaded here: the frozen encoder is a *random* SAM unless
``--sam-checkpoint`` is given, so the cross-site rows test the machinery, not the seed's
claim (which rests on pretrained SAM features).

Examples::

    python scripts/bench_desam.py memory --device cpu --preset vit_b --size 512 --batch 2
    python scripts/bench_desam.py sites --device cpu --preset tiny --size 128 --steps 150
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchmem import peak_gib, reset_peak, sync  # scripts/benchmem.py

from sam3d.apps.prostate import (
    cached_slices,
    case_slices,
    dice_3d,
    evaluate_cases,
    prostate_datalist,
)
from sam3d.data.embedding_cache import EmbeddingCache, encoder_fingerprint
from sam3d.losses import DeSAMLoss
from sam3d.models.planar.desam import DeSAM, build_desam, desam_preset, select_grid_mask

REFERENCE_BYTES_PER_SLICE = (3 * 1280 + 256) * 64 * 64 * 4  # float32 ViT-H, four maps


def _model(args: argparse.Namespace, device: torch.device) -> DeSAM:
    torch.manual_seed(0)
    cfg = {**desam_preset(args.preset), "image_size": args.size}
    if args.pdmm_width:
        cfg["pdmm_width"] = args.pdmm_width
    return build_desam(sam_checkpoint=args.sam_checkpoint, **cfg).to(device)


def _batch(model: DeSAM, b: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(b, 3, model.img_size, model.img_size, generator=g) * 255).to(device)
    s = model.mask_size
    target = torch.zeros(b, 1, s, s, device=device)
    target[..., s // 4 : s // 2, s // 4 : s // 2] = 1
    points = torch.full((b, 1, 2), model.img_size * 3 / 8, device=device)
    return images, target, points, torch.ones(b, 1, device=device), torch.ones(b, 1, device=device)


class CoupledSam(torch.nn.Module):
    """SAM's own decoder on DeSAM's frozen encoders: the coupled baseline, same interface."""

    def __init__(self, desam: DeSAM, sam_decoder: torch.nn.Module):
        super().__init__()
        self.desam, self.mask_decoder = desam, sam_decoder
        for p in desam.parameters():
            p.requires_grad_(False)
        self.img_size, self.mask_size = desam.img_size, desam.mask_size

    def decode(self, neck, points, labels):
        sparse, dense = self.desam.embed_prompts(points, labels)
        per = len(points) // len(neck)
        outs = [  # SAM's decoder takes one image and all its prompts at once
            self.mask_decoder(
                image_embeddings=neck[b : b + 1],
                image_pe=self.desam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse[b * per : (b + 1) * per],
                dense_prompt_embeddings=dense[b * per : (b + 1) * per],
                multimask_output=False,
            )
            for b in range(len(neck))
        ]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def preprocess(self, images):
        return self.desam.preprocess(images)

    def encode(self, x):
        return self.desam.encode(x)

    def grid_points(self, n_per_side, device=None):
        return self.desam.grid_points(n_per_side, device)

    @torch.no_grad()
    def grid_candidates(self, features, n_per_side=9, points_per_batch=None):
        """As :meth:`DeSAM.grid_candidates`, through SAM's own decoder (one image)."""
        grid = self.grid_points(n_per_side, features[3].device)
        ones = torch.ones(len(grid), 1, device=grid.device)
        lg, iou = self.decode(features[3], grid[:, None], ones)
        return lg[:, 0].float().cpu(), iou[:, 0].float().cpu()

    @torch.no_grad()
    def segment(self, images, mode="grid", n_per_side=9, iou_threshold=0.5, min_region_px=1000):
        feats = self.encode(self.preprocess(images))
        masks = []
        for i in range(len(images)):
            lg, iou = self.grid_candidates([f[i : i + 1] for f in feats], n_per_side)
            masks.append(select_grid_mask(lg, iou, iou_threshold, min_region_px)[0])
        return torch.stack(masks).to(images.device)


class UNetSegmenter(torch.nn.Module):
    """A MONAI 2D UNet on the slice at the mask size (channel 0 of the SAM input / 255)."""

    def __init__(self, img_size: int, mask_size: int):
        super().__init__()
        from monai.networks.nets import UNet

        self.net = UNet(2, 1, 1, (16, 32, 64, 128), (2, 2, 2), num_res_units=2)
        self.img_size, self.mask_size = img_size, mask_size

    def forward(self, x):
        return self.net(x)

    def prepare(self, images):
        x = images[:, :1].float() / 255.0
        return torch.nn.functional.interpolate(x, (self.mask_size,) * 2, mode="area")

    @torch.no_grad()
    def segment(self, images, mode="grid", **_):
        return self.net(self.prepare(images))[:, 0] > 0


# --------------------------------------------------------------------------- memory


def run_variant(name: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = _model(args, device)
    images, target, points, labels, iou_t = _batch(model, args.batch, device)
    loss_fn = DeSAMLoss()
    tmp = tempfile.TemporaryDirectory()
    if name == "cache":
        cache = EmbeddingCache(
            tmp.name, [f"s{i}" for i in range(args.batch)], model.feature_shapes(),
            (model.mask_size,) * 2, encoder_fingerprint(model),
        )  # fmt: skip
        u8 = images.to(torch.uint8).cpu().numpy()
        lab = target[:, 0].to(torch.uint8).cpu().numpy()

        def encode(b):
            return model.encode(model.preprocess(torch.as_tensor(b, device=device).float()))

        cache.build(lambda i: (u8[i], lab[i]), encode, progress=False)
        # the encoder is not needed any more: free it, as a cached training does
        model.image_encoder.to("meta")
        gc.collect()
    if name == "live_sam_decoder":
        from sam3d.models.sam.build import build_sam

        sam = build_sam(desam_preset(args.preset)["sam"], args.sam_checkpoint, args.size)
        net: torch.nn.Module = CoupledSam(model, sam.mask_decoder.to(device))
        params = list(net.mask_decoder.parameters())
    else:
        net = model
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)

    def step() -> None:
        if name == "cache":
            feats = [
                torch.stack([cache.features(i)[k] for i in range(args.batch)]).to(device)
                for k in range(4)
            ]
        else:
            with torch.no_grad():
                feats = model.encode(model.preprocess(images))
        if name == "live_sam_decoder":
            out = net.decode(feats[3], points, labels)
        else:
            out = model(feats, points, labels, return_iou=True)
        opt.zero_grad(set_to_none=True)
        loss_fn(out, (target, iou_t)).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    sync(device)
    reset_peak(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    row = {"variant": name, "step_s": float(np.median(times)), "peak_gib": peak_gib(device)}
    if name == "cache":
        row["cache_bytes_per_slice"] = cache.bytes_per_entry
    tmp.cleanup()
    return row


def part_memory(args: argparse.Namespace) -> dict:
    rows = []
    for name in ("cache", "live_desam", "live_sam_decoder"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            argv = [sys.executable, __file__, "memory", "--device", args.device,
                    "--preset", args.preset, "--size", str(args.size), "--batch",
                    str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                    "--variant", name, "--json", str(out)]  # fmt: skip
            if args.sam_checkpoint:
                argv += ["--sam-checkpoint", args.sam_checkpoint]
            subprocess.run(argv, check=True)
            rows.append(json.loads(out.read_text()))
    ref = next(r for r in rows if r["variant"] == "live_sam_decoder")
    print(f"\nDeSAM training step, preset {args.preset} at {args.size}^2, batch {args.batch}, "
          f"device {args.device} (median of {args.steps} steps; shared machine)")  # fmt: skip
    print(f"{'variant':18s} {'step s':>8s} {'peak GiB':>9s} {'time x':>7s} {'mem x':>6s}")
    for r in rows:
        t, m = r["step_s"] / ref["step_s"], r["peak_gib"] / ref["peak_gib"]
        print(f"{r['variant']:18s} {r['step_s']:8.3f} {r['peak_gib']:9.3f} {t:7.3f} {m:6.3f}")
    sizes = {}
    for preset, width in (("vit_b", 768), ("vit_h", 1280)):
        sizes[preset] = (3 * width + 256) * 64 * 64 * 2
    print("\ncache bytes per slice at SAM's 1024 input (four maps, float16) vs the reference's "
          f"float32 npz ({REFERENCE_BYTES_PER_SLICE / 1e6:.1f} MB at ViT-H):")  # fmt: skip
    for preset, b in sizes.items():
        print(f"  {preset}: {b / 1e6:.1f} MB ({b / REFERENCE_BYTES_PER_SLICE:.3f} x)")
    measured = rows[0].get("cache_bytes_per_slice")
    print(f"  measured row of this run ({args.preset} at {args.size}): {measured / 1e6:.2f} MB")
    return {"rows": rows, "bytes_per_slice_1024": sizes}


# --------------------------------------------------------------------------- sites


def _train_steps(step, steps: int, opt: torch.optim.Optimizer) -> float:
    """Run ``steps`` steps under the reference's poly schedule (``(1 - i / steps) ** 0.9``)."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / steps) ** 0.9)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
        sched.step()
    return time.perf_counter() - t0


@torch.no_grad()
def prompt_robustness(net, cases, n_per_side: int, iou_threshold: float = 0.5) -> dict:
    """Every grid candidate of every ground-truth slice against the truth (2D Dice): mean
    over the prompts inside the prostate and over those outside it (the poor prompts);
    how often a candidate from an outside point passes the IoU threshold; how often the
    top-IoU prompt is inside."""
    inside, outside, passed_out, top_in, n_slices = [], [], [], 0, 0
    grid = None
    for case in cases:
        for _, x, y in case_slices(case, net.img_size, net.mask_size):
            img = torch.as_tensor(x)[None].float().to(next(net.parameters()).device)
            logits, iou = net.grid_candidates(net.encode(net.preprocess(img)), n_per_side)
            gt = torch.as_tensor(y) > 0
            if grid is None:
                grid = net.grid_points(n_per_side)
            r = (grid[:, 1] * net.mask_size / net.img_size).long().clamp(0, net.mask_size - 1)
            c = (grid[:, 0] * net.mask_size / net.img_size).long().clamp(0, net.mask_size - 1)
            pin = gt[r, c]
            for k in range(len(grid)):
                d = dice_3d((logits[k] > 0).numpy(), gt.numpy())  # any shape
                (inside if pin[k] else outside).append(d)
                if not pin[k]:
                    passed_out.append(float(iou[k]) > iou_threshold)
            top_in += bool(pin[int(torch.argmax(iou))])
            n_slices += 1
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"dice_inside": mean(inside), "dice_outside": mean(outside),
            "outside_passing": mean(passed_out), "top_iou_inside": top_in / max(1, n_slices),
            "n_prompts_inside": len(inside), "n_prompts_outside": len(outside)}  # fmt: skip


def _figure(path: Path, nets: dict, cases: list, results: dict) -> None:
    """One case per site (the first), its middle ground-truth slice, every model's mask
    (``nets``: name -> (network, automatic mode, its kwargs))."""
    from sam3d.apps.prostate import segment_volume
    from sam3d.data.io import load_image_label
    from sam3d.visualize import save_comparison_grid

    rows, truths, preds, names, scores = [], [], {n: [] for n in nets}, [], {n: [] for n in nets}
    seen = set()
    for case in cases:
        if case["site"] in seen:
            continue
        seen.add(case["site"])
        image, label = load_image_label(case["image"], case["label"])
        vol, lab = image[0].numpy(), label[0].numpy() > 0
        ks = np.flatnonzero(lab.any(axis=(0, 1)))
        k = int(ks[len(ks) // 2])
        rows.append(vol[:, :, k].T)
        truths.append(lab[:, :, k].T)
        names.append(f"site {case['site']}")
        for n, (net, mode, kw) in nets.items():
            preds[n].append(segment_volume(net, vol, mode, **kw)[:, :, k].T)
            scores[n].append(results[n]["per_case"].get(case["image"], float("nan")))
    save_comparison_grid(rows, truths, preds, path, names, scores,
                         "trained on site A; numbers: the case's 3D Dice")  # fmt: skip
    print(f"figure: {path}")


def part_sites(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    root = Path(tempfile.mkdtemp(prefix="bench_desam_"))
    phantom = {"n_per_site": args.cases, "in_plane_vox": args.in_plane, "n_slices": args.slices,
               "seed": 0}  # fmt: skip
    data = root / "data"
    split = (["A"], None, args.val_fraction, 0, phantom)
    train = prostate_datalist(data, "training", *split)
    held = prostate_datalist(data, "validation", *split)  # site A cases never trained on
    test = prostate_datalist(data, "test", *split)
    model = _model(args, device)
    ds = cached_slices(model, train, root / "cache", progress=False)
    print(f"cache: {len(ds)} slices, {ds.cache.size_bytes / 2**20:.1f} MiB")
    loss_fn = DeSAMLoss()
    rng = np.random.default_rng(0)
    order = [rng.integers(len(ds), size=args.batch) for _ in range(args.steps)]
    items = {}

    def batch(i):
        rows = order[i]
        its = [ds[int(r)] for r in rows]
        feats = [torch.stack([it["features"][k] for it in its]).to(device) for k in range(4)]
        pts = torch.stack([it["points"] for it in its]).to(device)
        lab = torch.stack([it["label"] for it in its]).to(device)
        iou = torch.stack([it["iou_target"] for it in its]).to(device)
        return feats, pts, lab, iou

    batches = [batch(i) for i in range(args.steps)]  # the same prompts for both SAM models
    # DeSAM: Adam, poly schedule, DiceCE + L1 IoU (the reference's recipe)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()

    def desam_step(i):
        feats, pts, lab, iou = batches[i]
        out = model(feats, pts, torch.ones(len(pts), 1, device=device), return_iou=True)
        opt.zero_grad()
        loss_fn(out, (lab, iou)).backward()
        opt.step()

    items["desam"] = _train_steps(desam_step, args.steps, opt)
    print(f"DeSAM: {args.steps} steps in {items['desam']:.1f} s", flush=True)
    # SAM's coupled decoder, same prompts, targets, loss, optimiser and steps
    from sam3d.models.sam.build import build_sam

    sam = build_sam(desam_preset(args.preset)["sam"], args.sam_checkpoint, args.size)
    coupled = CoupledSam(model, sam.mask_decoder.to(device))
    opt_c = torch.optim.Adam(coupled.mask_decoder.parameters(), lr=args.lr)
    coupled.train()

    def coupled_step(i):
        feats, pts, lab, iou = batches[i]
        out = coupled.decode(feats[3], pts, torch.ones(len(pts), 1, device=device))
        opt_c.zero_grad()
        loss_fn(out, (lab, iou)).backward()
        opt_c.step()

    items["coupled_sam_decoder"] = _train_steps(coupled_step, args.steps, opt_c)
    print(f"coupled: {args.steps} steps in {items['coupled_sam_decoder']:.1f} s", flush=True)
    if args.box:  # the reference's second mode: whole-image box prompts, no IoU term
        box_model = _model(args, device)  # same seed: the same frozen encoder as the cache's
        opt_b = torch.optim.Adam([p for p in box_model.parameters() if p.requires_grad],
                                 lr=args.lr)  # fmt: skip
        box_model.train()

        def box_step(i):
            feats, _, lab, _ = batches[i]
            opt_b.zero_grad()
            loss_fn(box_model(feats), lab).backward()  # no prompt: the whole-image box
            opt_b.step()

        items["desam_whole_box"] = _train_steps(box_step, args.steps, opt_b)
        print(f"DeSAM whole box: {args.steps} steps in {items['desam_whole_box']:.1f} s")
    # MONAI UNet for DeSAM's wall-clock time
    unet = UNetSegmenter(model.img_size, model.mask_size).to(device)
    opt_u = torch.optim.Adam(unet.parameters(), lr=1e-3)
    slices = [sl for c in train for sl in case_slices(c, model.img_size, model.mask_size)]
    x_all = torch.stack([torch.as_tensor(s[1]) for s in slices]).float().to(device)
    y_all = torch.stack([torch.as_tensor(s[2]) for s in slices]).float()[:, None].to(device)
    x_all = unet.prepare(x_all)
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(sigmoid=True)
    unet.train()
    t0, n_unet = time.perf_counter(), 0
    while time.perf_counter() - t0 < items["desam"]:
        idx = torch.as_tensor(rng.integers(len(x_all), size=args.batch))
        opt_u.zero_grad()
        dice_ce(unet(x_all[idx]), y_all[idx]).backward()
        opt_u.step()
        n_unet += 1
    items["unet"] = time.perf_counter() - t0
    grid = {"n_per_side": args.grid, "iou_threshold": 0.5, "min_region_px": 1000}
    nets = {"desam": (model, "grid", grid), "coupled_sam_decoder": (coupled, "grid", grid)}
    if args.box:
        nets["desam_whole_box"] = (box_model, "box", {})
    nets["unet"] = (unet, "grid", {})
    results, robust = {}, {}
    for name, (net, mode, kw) in nets.items():
        net.eval()
        res = evaluate_cases(net, test, root / "eval" / name, mode, **kw)
        res["held_out_A"] = evaluate_cases(net, held, root / "eval_A" / name, mode, **kw)
        res["per_case"] = {
            **_per_case(root / "eval" / name / "metrics_per_case.csv", test),
            **_per_case(root / "eval_A" / name / "metrics_per_case.csv", held),
        }
        results[name] = res
        if mode == "grid" and name != "unet":
            robust[name] = prompt_robustness(net, test, args.grid)
    print(f"\ncross-site phantoms: train site A ({len(train)} cases, {len(ds)} slices), "
          f"held-out A ({len(held)} cases), test B-F ({len(test)} cases); {args.steps} steps "
          f"of batch {args.batch}, lr {args.lr:g} poly; preset {args.preset} at {args.size}^2, "
          f"PDMM width {args.pdmm_width or desam_preset(args.preset)['pdmm_width']} "
          f"({'random' if not args.sam_checkpoint else 'given'} SAM weights), grid "
          f"{args.grid}x{args.grid}; device {args.device}")  # fmt: skip
    sites = sorted(results["desam"]["sites"])
    print(f"{'model':22s} {'train s':>8s} {'A*':>6s} " + " ".join(f"{s:>6s}" for s in sites)
          + "  B-F  empty")  # fmt: skip
    for name, res in results.items():
        print(f"{name:22s} {items[name]:8.1f} {res['held_out_A']['test_dice']:6.3f} "
              + " ".join(f"{res['sites'][s]:6.3f}" for s in sites)
              + f" {res['test_dice']:6.3f} {res.get('empty_slices', '-')!s:>5s}")  # fmt: skip
    print(
        "(A*: held-out site A cases, in-domain; Dice per patient in 3D over the GT slices; "
        f"empty: GT slices given an empty mask; UNet: {n_unet} steps in DeSAM's time)"
    )
    print("\nprompt robustness on B-F (2D Dice of each grid point's own mask):")
    print(f"{'model':22s} {'inside':>7s} {'outside':>8s} {'out>thr':>8s} {'top in':>7s}")
    for name, r in robust.items():
        print(f"{name:22s} {r['dice_inside']:7.3f} {r['dice_outside']:8.3f} "
              f"{r['outside_passing']:8.3f} {r['top_iou_inside']:7.3f}")  # fmt: skip
    print(
        "(inside / outside: mean Dice of the masks from grid points inside / outside the "
        "prostate; out>thr: share of outside points whose mask passes the IoU threshold; "
        "top in: share of slices whose best-IoU point is inside)"
    )
    if args.figure:
        _figure(Path(args.figure), nets, test + held, results)
    return {"train_s": items, "results": results, "robustness": robust, "unet_steps": n_unet}


def _per_case(csv_path: Path, cases: list) -> dict:
    """``image path -> Dice`` from an evaluation's ``metrics_per_case.csv``."""
    import csv

    from sam3d.data.io import nifti_stem

    by_stem = {nifti_stem(c["image"]): c["image"] for c in cases}
    with open(csv_path, newline="") as f:
        return {by_stem[r["case"]]: float(r["dice"]) for r in csv.DictReader(f)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["memory", "sites"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--size", type=int, default=None, help="SAM input side (preset's default)")
    ap.add_argument("--sam-checkpoint", default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--cases", type=int, default=4, help="phantom cases per site")
    ap.add_argument("--in-plane", type=int, default=64, help="phantom pixels per side")
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--grid", type=int, default=9, help="grid points per side")
    ap.add_argument(
        "--val-fraction",
        type=float,
        default=0.25,
        help="site A cases held out of training (the in-domain column)",
    )
    ap.add_argument("--figure", default=None, help="sites part: save a comparison PNG here")
    ap.add_argument(
        "--box",
        action="store_true",
        help="sites part: also train DeSAM on whole-image boxes (evaluated in box mode)",
    )
    ap.add_argument(
        "--pdmm-width",
        type=int,
        default=None,
        help="PDMM's width (the preset's by default; the reference's is 256)",
    )
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_desam: --device cuda asked for but no CUDA device is available")
    args.size = args.size or desam_preset(args.preset)["image_size"]
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)) if args.device == "cpu" else 8)
    if args.part == "memory" and args.variant:
        out = run_variant(args.variant, args)
    elif args.part == "memory":
        out = part_memory(args)
    else:
        out = part_sites(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

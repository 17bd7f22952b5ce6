"""Benchmark click segmentation of a whole CT volume, end to end, against SwinUNETR.

Writes a synthetic CT (``make_ct_phantom``, 512x512x200 at 0.8x0.8x2.5 mm by default) as
``.nii.gz`` to a temporary folder and times, on one device and in one process:

- first click: open the file, RAS, 1 mm, window, encode, prompt, decode, invert to the
  original grid, save the mask (a new :class:`ClickSession`; the model is loaded once
  before and one warm-up run is not counted);
- further clicks: each later click on the open session (prompt encoder + decoder on the
  cached features, stitching, inversion to the original grid), median and max;
- automatic mode: open, sliding windows over the whole grid without clicks (windows on
  the device, stitching on the CPU), invert, save;
- reference: MONAI SwinUNETR sliding-window inference over the same volume (roi 96,
  overlap 0.5, bf16 autocast on CUDA), inference only.

Goals on an H100 with vit_b: first click <= 1 s, further click <= 20 ms, automatic mode
<= 3 s (SwinUNETR measured about 6.6 s in the reference table).

    python scripts/bench_inference.py                      # vit_b, 512x512x200, cuda if any
    python scripts/bench_inference.py --device cpu --preset tiny --shape 96 96 40 \\
        --spacing 1.5 1.5 3 --swin-feature-size 12
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
from sam3d.inference import ClickSession, WindowGrowth, load_model_for_inference
from sam3d.models import build_sam3d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _tumour_click(label: np.ndarray) -> tuple[int, int, int]:
    pts = np.argwhere(label == 2)
    if len(pts) == 0:
        pts = np.argwhere(label > 0)
    if len(pts) == 0:
        return tuple(s // 2 for s in label.shape)  # type: ignore[return-value]
    c = pts.mean(0)
    return tuple(int(v) for v in pts[np.argmin(((pts - c) ** 2).sum(1))])  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="vit_b", help="model preset (random weights)")
    ap.add_argument("--checkpoint", help="a trained Sam3D checkpoint instead of random weights")
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5])
    ap.add_argument("--further-clicks", type=int, default=10)
    ap.add_argument("--overlap", type=float, default=0.25, help="automatic mode overlap")
    ap.add_argument("--sw-batch-size", type=int, default=4)
    ap.add_argument(
        "--max-windows",
        type=int,
        help="window growth limit (default 27 with --checkpoint; 1 with random weights, "
        "whose meaningless lesion would touch every border)",
    )
    ap.add_argument("--swin-feature-size", type=int, default=48)
    ap.add_argument("--no-reference", action="store_true", help="skip SwinUNETR")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} ({device}), torch {torch.__version__}")

    if args.checkpoint:
        model, meta = load_model_for_inference(args.checkpoint, device)
        dataset = meta["dataset"]
    else:
        torch.manual_seed(0)
        model = build_sam3d(args.preset).to(device).eval()
        dataset = load_dataset_preset("kits")
    print(f"model: {args.checkpoint or args.preset + ' (random weights)'}, crop {model.crop_size}")

    ph = make_ct_phantom(
        0, shape_vox=tuple(args.shape), spacing_mm=tuple(args.spacing), orientation="RAS"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    image = tmp / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ph.image_hu.astype(np.int16), ph.affine), image)
    click = _tumour_click(ph.label)
    print(
        f"volume: {tuple(args.shape)} at {tuple(args.spacing)} mm, "
        f"{image.stat().st_size / 2**20:.1f} MiB .nii.gz; click at voxel {click}"
    )
    max_windows = args.max_windows or (27 if args.checkpoint else 1)
    growth = WindowGrowth(max_windows=max_windows)
    print(f"window growth: up to {max_windows} window(s)")

    def first_click(out: Path) -> ClickSession:
        s = ClickSession(model, image, dataset, device=device, growth=growth)
        s.click(click)
        s.save(out)
        return s

    first_click(tmp / "warmup.nii.gz")  # kernels, allocator, file cache
    t_first, session = _timed(lambda: first_click(tmp / "mask.nii.gz"), device)
    n_windows = len(session.windows)
    print(f"first click end to end: {t_first * 1e3:.0f} ms ({n_windows} window(s) decoded)")

    rng = np.random.default_rng(0)
    times = []
    for n in range(args.further_clicks):
        offset = rng.integers(-3, 4, size=3)
        p = np.clip(np.array(click) + offset, 0, np.array(args.shape) - 1)
        t, _ = _timed(lambda p=p, n=n: session.click(tuple(p), positive=n % 3 != 2), device)
        times.append(t)
    if times:
        print(
            f"further click: median {statistics.median(times) * 1e3:.1f} ms, "
            f"max {max(times) * 1e3:.1f} ms over {len(times)} clicks; "
            f"encoder calls in the session: {session.encode_calls}"
        )

    def automatic() -> ClickSession:
        s = ClickSession(model, image, dataset, device=device)
        s.segment_all(overlap=args.overlap, sw_batch_size=args.sw_batch_size)
        s.save(tmp / "auto.nii.gz")
        return s

    t_auto, _ = _timed(automatic, device)
    print(f"automatic mode end to end (overlap {args.overlap}): {t_auto:.2f} s")

    t_swin = None
    if not args.no_reference:
        from monai.inferers import sliding_window_inference
        from monai.networks.nets import SwinUNETR

        swin = SwinUNETR(in_channels=1, out_channels=2, feature_size=args.swin_feature_size)
        swin = swin.to(device).eval()
        volume = torch.as_tensor(ph.image_hu)[None, None].to(device)
        amp = device.type == "cuda"

        def reference() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                return sliding_window_inference(volume, (96, 96, 96), 4, swin, overlap=0.5)

        if device.type == "cuda":
            reference()  # warm-up
        t_swin, _ = _timed(reference, device)
        print(f"reference SwinUNETR sliding window (roi 96, overlap 0.5): {t_swin:.2f} s")

    print("ratios:")
    print(f"  first click / 1 s goal: {t_first / 1.0:.2f}")
    if times:
        print(f"  further click (median) / 20 ms goal: {statistics.median(times) / 0.020:.2f}")
    print(f"  automatic / 3 s goal: {t_auto / 3.0:.2f}")
    if t_swin:
        print(f"  automatic / SwinUNETR: {t_auto / t_swin:.2f}")


if __name__ == "__main__":
    main()

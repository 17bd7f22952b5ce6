"""Benchmark Sam3D: inference of one crop and one training step, against the anchor's formulation.

Times, on one device and in one process:

- ours: encode + decode without grad (bf16 autocast on CUDA), the decode alone (a further
  click on cached features), and a training step (forward, DiceCE, backward, AdamW; bf16
  autocast), with and without activation checkpointing, for each ``--batch``;
- reference: the same weights run in the anchor's formulation (x4 upsampled crop, SAM's 2D
  patch conv on every slice, explicit attention with a materialised bias), float32, batch 1.

Prints one line per measurement (median milliseconds, peak memory) and the ratios; the
time ratios are then measured again with ours and the reference alternating (A B A B ...,
``max(3, repeats // 3)`` rounds at b=1), printed as the median and spread of the
round-by-round ratios (the figure to quote: the first ones follow the machine's load).

    python scripts/bench_model.py                       # vit_b, 128^3, cuda if available
    python scripts/bench_model.py --device cpu --preset tiny --crop 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.losses import DiceCELoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchtime import alternate, ratio_line, ratio_summary  # noqa: E402

from sam3d.models import Sam3D, build_sam3d, count_parameters  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int
) -> tuple[float, float | None]:
    """Median wall time in ms over ``repeats`` calls, and the peak memory in GiB (CUDA only)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def make_batch(batch: int, crop: int, device: torch.device, n_clicks: int = 1):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 1, crop, crop, crop, generator=g)
    labels = (torch.rand(batch, 1, crop, crop, crop, generator=g) > 0.9).long()
    points = torch.rand(batch, n_clicks, 3, generator=g) * (crop - 1)
    point_labels = torch.ones(batch, n_clicks, dtype=torch.long)
    return images.to(device), labels.to(device), points.to(device), point_labels.to(device)


def inference_call(model: Sam3D, batch, device, amp: bool) -> Callable[[], torch.Tensor]:
    """Encode + decode one batch without grad."""
    images, _, points, point_labels = batch

    def full():
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return model.decode(model.encode(images), points, point_labels)

    return full


def bench_inference(model: Sam3D, batch, device, amp: bool, repeats: int, warmup: int):
    images, _, points, point_labels = batch
    model.eval()
    full = inference_call(model, batch, device, amp)

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        feats = model.encode(images)

    def decode_only():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return model.decode(feats, points, point_labels)

    t_full, m_full = measure(full, device, repeats, warmup)
    t_dec, _ = measure(decode_only, device, repeats, warmup)
    return t_full, m_full, t_dec


def train_step_call(model: Sam3D, batch, device, amp: bool) -> Callable[[], None]:
    """One training step (forward, DiceCE, backward, AdamW)."""
    images, labels, points, point_labels = batch
    model.train()
    loss_fn = DiceCELoss(
        include_background=False, softmax=True, to_onehot_y=True, lambda_dice=0.5, lambda_ce=0.5
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images, points, point_labels)
        loss = loss_fn(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_train_step(model: Sam3D, batch, device, amp: bool, repeats: int, warmup: int):
    return measure(train_step_call(model, batch, device, amp), device, repeats, warmup)


def alternating_ratios(model: Sam3D, batch, device, amp: bool, rounds: int) -> dict:
    """Ours and the anchor's formulation alternately (A B A B ...), b=1: reference / ours."""

    def as_reference(fn: Callable[[], object], on: bool) -> Callable[[], object]:
        def run():
            model.set_reference(on)
            try:
                return fn()
            finally:
                model.set_reference(False)

        return run

    out = {}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    for name, make in (("inference", inference_call), ("train step", train_step_call)):
        ours = as_reference(make(model, batch, device, amp), False)
        ref = as_reference(make(model, batch, device, False), True)
        a, b = alternate(ours, ref, rounds=rounds, warmup=1, sync=sync)
        out[name] = ratio_summary(b, a)
        print(ratio_line(f"ratio reference / ours, b=1, {name} (time)", b, a, "ms"))
    return out


def profile_train_step(model: Sam3D, batch, device, amp: bool, rows: int = 20) -> None:
    """Print the most expensive ops of one training step (where to look next)."""
    from torch.profiler import ProfilerActivity, profile

    bench_train_step(model, batch, device, amp, repeats=1, warmup=1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        bench_train_step(model, batch, device, amp, repeats=1, warmup=0)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def _fmt(ms: float, gib: float | None) -> str:
    mem = f"{gib:6.2f} GiB" if gib is not None else "   n/a    "
    return f"{ms:9.1f} ms  {mem}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="vit_b")
    ap.add_argument("--crop", type=int, default=None, help="crop side (default: the preset's)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--amp",
        choices=["auto", "bf16", "none"],
        default="auto",
        help="autocast for our runs (auto: bf16 on CUDA, none on CPU)",
    )
    ap.add_argument("--no-reference", action="store_true", help="skip the anchor-formulation run")
    ap.add_argument(
        "--profile", action="store_true", help="print the top ops of one b=1 training step"
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    torch.manual_seed(0)
    model = build_sam3d(args.preset).to(device)
    crop = args.crop or model.crop_size
    counts = count_parameters(model)
    print(f"device: {name}; torch {torch.__version__}; preset {args.preset}; crop {crop}^3")
    total, trainable = counts["total"] / 1e6, counts["trainable"] / 1e6
    print(f"parameters: {total:.2f}M total, {trainable:.2f}M trainable")
    print(f"ours: autocast {'bf16' if amp else 'off'}, fused attention, folded patch embedding")
    results: dict = {
        "device": name,
        "preset": args.preset,
        "crop": crop,
        "ours": {},
        "reference": {},
    }

    for b in args.batch:
        batch = make_batch(b, crop, device)
        t_inf, m_inf, t_dec = bench_inference(model, batch, device, amp, args.repeats, args.warmup)
        print(f"ours  b={b} {'inference (encode + decode)':34s} {_fmt(t_inf, m_inf)}")
        print(f"ours  b={b} {'decode only (a further click)':34s} {_fmt(t_dec, None)}")
        res = {"inference_ms": t_inf, "inference_gib": m_inf, "decode_ms": t_dec}
        depth = len(model.encoder.blocks)
        for ckpt in (False, depth // 2, True):
            model.encoder.use_checkpoint = ckpt
            t, m = bench_train_step(model, batch, device, amp, args.repeats, args.warmup)
            n = model.encoder.checkpointed_blocks
            tag = f"train step, {n:2d}/{depth} blocks ckpt"
            print(f"ours  b={b} {tag:34s} {_fmt(t, m)}")
            res[f"train_ckpt{n}_ms"] = t
            res[f"train_ckpt{n}_gib"] = m
        res["train_ms"], res["train_gib"] = res["train_ckpt0_ms"], res["train_ckpt0_gib"]
        model.encoder.use_checkpoint = False
        results["ours"][b] = res
        del batch

    if args.profile:
        profile_train_step(model, make_batch(1, crop, device), device, amp)

    if not args.no_reference:
        model.set_reference(True)
        batch = make_batch(1, crop, device)
        reps, warm = max(1, args.repeats // 3), 1
        try:
            t_inf, m_inf, _ = bench_inference(model, batch, device, False, reps, warm)
            t_tr, m_tr = bench_train_step(model, batch, device, False, reps, warm)
        except torch.OutOfMemoryError:
            print("ref   b=1 anchor formulation: out of memory on this device")
            return results
        finally:
            model.set_reference(False)
        print(f"ref   b=1 {'inference (anchor formulation, fp32)':34s} {_fmt(t_inf, m_inf)}")
        print(f"ref   b=1 {'train step (anchor formulation)':34s} {_fmt(t_tr, m_tr)}")
        results["reference"] = {
            "inference_ms": t_inf,
            "inference_gib": m_inf,
            "train_ms": t_tr,
            "train_gib": m_tr,
        }
        rounds = max(3, args.repeats // 3)
        results["alternating"] = alternating_ratios(model, batch, device, amp, rounds)
        ours = results["ours"].get(1)
        if ours:
            print(
                f"ratio reference/ours, b=1: inference {t_inf / ours['inference_ms']:.1f}x time"
                + (f", {m_inf / ours['inference_gib']:.1f}x memory" if m_inf else "")
                + f"; train step {t_tr / ours['train_ms']:.1f}x time"
                + (f", {m_tr / ours['train_gib']:.1f}x memory" if m_tr else "")
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

"""One TopoLoRA-SAM training step against full fine-tuning of the same SAM, in one run.

Every variant trains the same prompt-free SAM (same preset, input, loss and AdamW
step); the reference is full fine-tuning (every SAM parameter trainable, SAM's own
explicit attention). Printed per variant: median step time, peak memory, trainable
parameters, and the ratios to the reference.

    python scripts/bench_topolora.py                      # H100: vit_b, 1024^2, batch 4, bf16
    python scripts/bench_topolora.py --device cpu --preset tiny --batch 1 --steps 2

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (all variants in this
process) and, on the CPU, the peak resident set (VmHWM) of a fresh process per variant
(freed CPU memory is not returned to the OS, so one process could not compare them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchmem import peak_gib, reset_peak, sync  # scripts/benchmem.py

from sam3d.models.planar.topolora import TopoLoRASam
from sam3d.models.sam.build import build_sam

VARIANTS = {
    # name: (LoRA on, fused attention, block checkpointing)
    "full fine-tuning": (False, False, False),
    "TopoLoRA (SAM attention)": (True, False, False),
    "TopoLoRA + fused attention": (True, True, False),
    "TopoLoRA + fused + checkpointing": (True, True, True),
}


def _run_isolated(name: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        argv = [sys.executable, __file__, "--device", args.device, "--preset", args.preset,
                "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--variant", name, "--json", str(out)]  # fmt: skip
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["rows"][0]


def build_variant(preset: str, size: int, lora: bool, fused: bool, ckpt: bool) -> TopoLoRASam:
    torch.manual_seed(0)
    model = TopoLoRASam(
        build_sam(preset, image_size=size),
        lora_targets=("*.mlp.lin1", "*.mlp.lin2") if lora else (),
        fused_attention=fused,
        checkpoint_encoder=ckpt,
    )
    if not lora:  # full fine-tuning: every parameter trains
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def bench(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    amp = args.amp and device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g).mul(255).to(device)
    target = (torch.rand(args.batch, 1, args.size, args.size, generator=g) > 0.9).float()
    target = target.to(device)
    rows = []
    for name, (lora, fused, ckpt) in VARIANTS.items():
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        if args.variant is not None and name != args.variant:
            continue
        if device.type == "cpu" and args.variant is None:
            rows.append(_run_isolated(name, args))  # a fresh process: an honest peak RSS
            continue
        model = build_variant(args.preset, args.size, lora, fused, ckpt).to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
        reset_peak(device)
        times = []
        for step in range(args.warmup + args.steps):
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(images)
            loss = F.binary_cross_entropy_with_logits(logits.float(), target)
            loss.backward()
            opt.step()
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        rows.append(
            {
                "variant": name,
                "step_ms": 1000 * statistics.median(times),
                "peak_gib": peak_gib(device),
                "trainable": sum(p.numel() for p in params),
            }
        )
        del model, opt, params, logits, loss
    ref = rows[0] if rows and rows[0]["variant"] == "full fine-tuning" else None
    for r in rows:
        r["time_ratio"] = r["step_ms"] / ref["step_ms"] if ref else float("nan")
        r["memory_ratio"] = r["peak_gib"] / ref["peak_gib"] if ref else float("nan")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="vit_b", help="SAM preset: vit_b, vit_l, vit_h, tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024, help="SAM input side (1024 as SAM)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on CUDA")
    ap.add_argument("--only", nargs="*", help="run only variants whose name contains these")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: one variant (CPU isolation)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(
        f"device: {name} | preset {args.preset} | batch {args.batch} | {args.size}^2 | "
        f"bf16 autocast: {args.amp and dev.type == 'cuda'} | torch {torch.__version__}"
    )
    rows = bench(args)
    print(f"{'variant':34s} {'step ms':>9s} {'peak GiB':>9s} {'trainable':>11s} {'time x':>7s} "
          f"{'mem x':>6s}")  # fmt: skip
    for r in rows:
        print(
            f"{r['variant']:34s} {r['step_ms']:9.1f} {r['peak_gib']:9.2f} {r['trainable']:11,d} "
            f"{r['time_ratio']:7.2f} {r['memory_ratio']:6.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": name, "args": vars(args) | {"json": None},
                                         "rows": rows}, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()

"""Click evaluation of trained checkpoints on two held-out sets, as the field reports it.

For each ``--checkpoint`` (any volumetric kind: Sam3D, the click-channel UNet) and each of
two sets of volumes no model was trained on:

- **training-family held-out**: ``--n`` volumes of the training family (``--family``:
  ``synth`` by default, ``ct`` for a checkpoint trained on CT phantoms) from a seed that
  training does not use (``--heldout-seed``);
- **second-generator held-out**: ``--n`` volumes of :mod:`sam3d.data.phantoms.heldout`,
  written apart from the training generators and never used for training;

every lesion is segmented by a simulated user (:mod:`sam3d.inference.interactive`: first
click at the lesion's deepest voxel, then at the deepest voxel of the largest error,
through ``ClickSession``). Prints per set the Dice curve after 1..``--clicks`` clicks,
NoC@80/85/90 (capped at ``--clicks``; unreached counts ``--clicks``) and the share of
positive clicks inside the mask; writes ``results.csv`` (per lesion), ``summary.json``
and ``curves.png`` (one panel per set, labelled with the set) into ``--out``.

Example: ``python scripts/bench_interactive.py --checkpoint demo_out/kits_bundle/models/
model.pt --family ct --family-kwargs '{"shape_vox": [96, 96, 48], "spacing_mm": [1.5, 1.5,
2.5], "n_lesions": 1}' --n 6 --out outputs/bench_interactive``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from sam3d.data.phantoms import get_family, write_phantom_dataset
from sam3d.inference import load_model_for_inference
from sam3d.inference.interactive import evaluate_clicks, lesion_cases, write_results_csv

SECOND = "heldout"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", required=True, type=Path,
                   help="trained model.pt (repeatable)")  # fmt: skip
    p.add_argument("--family", default="synth", help="the checkpoints' training family")
    p.add_argument("--family-kwargs", default="{}", help="JSON: generator options of --family")
    p.add_argument("--heldout-kwargs", default="{}", help="JSON: options of the second set")
    p.add_argument("--n", type=int, default=6, help="volumes per set")
    p.add_argument("--max-lesions", type=int, default=None, help="at most this many per set")
    p.add_argument("--clicks", type=int, default=10)
    p.add_argument("--heldout-seed", type=int, default=90210, help="seed of both sets")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_interactive"))
    return p.parse_args(argv)


def make_sets(args: argparse.Namespace) -> dict[str, Path]:
    """The two held-out datasets (written once per folder, reused afterwards)."""
    fam = get_family(args.family)
    if not fam.training or fam.dims != 3:
        sys.exit(f"--family must be a volumetric training family, not {args.family!r}")
    sets = {
        f"training-family held-out ({args.family}, seed {args.heldout_seed})": (
            args.family, json.loads(args.family_kwargs)),
        f"second-generator held-out ({SECOND}, seed {args.heldout_seed})": (
            SECOND, json.loads(args.heldout_kwargs)),
    }  # fmt: skip
    out = {}
    for label, (family, kwargs) in sets.items():
        folder = args.out / "data" / f"{family}_{args.heldout_seed}_{args.n}"
        if not (folder / "dataset.json").is_file():
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
            write_phantom_dataset(family, folder, args.n, seed=args.heldout_seed, progress=True,
                                  **kwargs)  # fmt: skip
        out[label] = folder / "dataset.json"
    return out


def save_plot(summary: dict, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(summary["sets"])
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 3.9), dpi=100,
                             squeeze=False)  # fmt: skip
    for ax, label in zip(axes[0], sets):
        for ck, res in summary["sets"][label].items():
            curve = res["curve"]
            ax.plot(range(1, len(curve) + 1), curve, "o-", ms=3,
                    label=f"{ck} (NoC@85 {res['noc']['0.85']:.1f})")  # fmt: skip
        ax.set_title(label + f"\n{res['n_lesions']} lesions", fontsize=9)
        ax.set_xlabel("clicks")
        ax.set_ylabel("mean Dice of the clicked lesion")
        ax.set_ylim(0, 1)
        ax.set_xticks(range(1, summary["clicks"] + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"simulated clicks through ClickSession, {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    where = f"{device.type} ({name or platform.machine()}, {torch.get_num_threads()} threads)"
    args.out.mkdir(parents=True, exist_ok=True)
    sets = make_sets(args)
    summary: dict = {"device": where, "clicks": args.clicks, "command": " ".join(sys.argv),
                     "sets": {label: {} for label in sets}}  # fmt: skip
    evaluations = []
    for ck in args.checkpoint:
        model, meta = load_model_for_inference(ck, device)
        dataset = meta.get("dataset", "kits")
        ck_name = f"{ck.parent.parent.name}/{ck.name}" if ck.parent.name == "models" else ck.name
        for label, spec in sets.items():
            cases = lesion_cases(spec, ("training", "validation", "test"), limit=args.max_lesions)
            t0 = time.perf_counter()
            ev = evaluate_clicks(model, cases, n_clicks=args.clicks, dataset=dataset,
                                 device=device, label=label, progress=True)  # fmt: skip
            ev.meta["checkpoint"] = str(ck)
            evaluations.append(ev)
            seconds = time.perf_counter() - t0
            print(f"[{ck_name}] {ev.summary()} ({seconds:.0f} s, {where})", flush=True)
            summary["sets"][label][ck_name] = {
                "checkpoint": str(ck),
                "n_lesions": len(ev.cases),
                "curve": [round(float(v), 4) for v in ev.curve],
                "noc": {str(t): round(v, 3) for t, v in ev.noc.items()},
                "positive_inside": round(ev.positive_inside, 4),
                "seconds": round(seconds, 1),
            }
    write_results_csv(args.out / "results.csv", evaluations)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    save_plot(summary, args.out / "curves.png", where)
    print(f"wrote {args.out / 'results.csv'}, {args.out / 'summary.json'}, "
          f"{args.out / 'curves.png'}")  # fmt: skip
    return summary


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

"""The ``sam3d`` command.

Every subcommand is a small function over the library; a :class:`Sam3DError`
(anything the user can cause) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sam3d.errors import Sam3DError


def _cmd_phantoms(args: argparse.Namespace) -> None:
    from sam3d.data.phantoms import write_phantom_dataset

    kwargs: dict = {}
    if args.shape is not None:
        want = 3 if args.kind == "ct" else 2
        if len(args.shape) != want:
            raise Sam3DError(f"--shape takes {want} numbers for {args.kind} phantoms")
        kwargs["shape_vox" if args.kind == "ct" else "size"] = tuple(args.shape)
    if args.spacing is not None:
        if args.kind != "ct":
            raise Sam3DError("--spacing applies to ct phantoms only")
        kwargs["spacing_mm"] = tuple(args.spacing)
    out = write_phantom_dataset(
        args.kind, args.out, n=args.n, seed=args.seed, progress=True, **kwargs
    )
    print(f"wrote {args.n} {args.kind} phantoms and {out}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from sam3d.demo import run_demo

    run_demo(Path(args.out), seed=args.seed)


def _cmd_info(args: argparse.Namespace) -> None:
    import numpy as np

    from sam3d.data.io import load_image, load_image_label, orientation_codes, spacing_from_affine

    if args.label is None:
        image, label = load_image(args.image), None
    else:
        image, label = load_image_label(args.image, args.label)
    spacing = ", ".join(f"{s:.4g}" for s in spacing_from_affine(image.affine))
    print(f"image:       {args.image}")
    print(f"shape:       {tuple(image.shape[1:])} (i, j, k)")
    print(f"spacing:     ({spacing}) mm")
    print(f"orientation: {orientation_codes(image.affine)}")
    print(f"intensity:   {float(image.min()):.1f} .. {float(image.max()):.1f} (HU for CT)")
    if label is not None:
        values, counts = np.unique(label.numpy().astype(np.int64), return_counts=True)
        print(f"label:       {args.label}")
        print("label counts: " + ", ".join(f"{v}: {c}" for v, c in zip(values, counts)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam3d", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantoms", help="generate a synthetic dataset with an MSD dataset.json")
    p.add_argument("--kind", choices=["ct", "vessels"], default="ct")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=8, help="number of cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shape",
        type=int,
        nargs="+",
        metavar="N",
        help="ct: I J K voxels; vessels: H W pixels (default: drawn / 256 256)",
    )
    p.add_argument(
        "--spacing", type=float, nargs=3, metavar="MM", help="ct: voxel size (default: drawn)"
    )
    p.set_defaults(func=_cmd_phantoms)

    p = sub.add_parser("demo", help="the embedded end-to-end demo on phantoms")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="check and describe a volume (and its label)")
    p.add_argument("image", type=Path, help="NIfTI volume (.nii.gz / .nii)")
    p.add_argument("--label", type=Path, help="label volume on the same voxel grid")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Sam3DError as e:
        print(f"sam3d {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"sam3d {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``sam3d`` command.

Every subcommand is a small function over the library; a :class:`Sam3DError`
(anything the user can cause) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from sam3d.errors import Sam3DError, find_user_error

# Options whose value is a comma-separated point: "-42.5,17,-310.2" is a value, not an
# option, although argparse would take it for one (it knows only "-5", "-.5" as numbers).
_POINT_OPTIONS = ("--click", "--negative")
_NUMBER_LIST = re.compile(r"^-\s*[0-9.]")

DESCRIPTION = """\
Segment Anything adapted to medical images, on MONAI. Segment a tumour in a CT
volume (NIfTI) from one click or more, or automatically; segment a structure in a 2D
ultrasound image from clicks; generate synthetic phantoms to try it all on; open a
local web viewer; export a trained bundle to the MONAI model zoo. Training,
evaluation and batch inference of the models run as MONAI bundles (bundles/*/):
python -m monai.bundle run --config_file bundles/kits/train.json. A user's error
(a missing file, a click outside the image, a bad checkpoint) ends with one line
and exit code 2."""

EPILOG = """\
examples:
  sam3d phantoms --out ct_data --n 2
  sam3d segment case.nii.gz --click 32,36,22 --checkpoint bundles/kits/models/model.pt \\
      --out case_tumour.nii.gz --preview case_tumour.png
  sam3d segment-batch ct_data/imagesTr --checkpoint bundles/kits/models/model.pt --out-dir masks/
  sam3d segment-2d echo.png --click 127,114 --checkpoint bundles/echo/models/model.pt --out lv.png
  sam3d serve case.nii.gz --checkpoint bundles/kits/models/model.pt
  sam3d demo --out demo_out

Each command has its own --help (sam3d segment --help). README.md has the whole tour."""


def _cmd_phantoms(args: argparse.Namespace) -> None:
    from sam3d.data.phantoms import get_family, write_phantom_dataset

    family = get_family(args.kind)
    kwargs: dict = {}
    if args.shape is not None:
        if family.shape_option is None:
            raise Sam3DError(f"--shape does not apply to {args.kind} phantoms")
        if len(args.shape) != family.dims:
            raise Sam3DError(f"--shape takes {family.dims} numbers for {args.kind} phantoms")
        kwargs[family.shape_option] = tuple(args.shape)
    if args.spacing is not None:
        if family.spacing_option is None:
            raise Sam3DError(f"--spacing does not apply to {args.kind} phantoms")
        kwargs[family.spacing_option] = tuple(args.spacing)
    out = write_phantom_dataset(
        args.kind, args.out, n=args.n, seed=args.seed, progress=True, **kwargs
    )
    print(f"wrote {args.n} {args.kind} phantoms and {out}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from sam3d.demo import run_demo

    run_demo(Path(args.out), seed=args.seed)


def _cmd_info(args: argparse.Namespace) -> None:
    import numpy as np

    from sam3d.data.io import (
        load_image,
        load_image_label,
        obliquity_deg,
        orientation_codes,
        spacing_from_affine,
    )

    if args.label is None:
        image, label = load_image(args.image), None
    else:
        image, label = load_image_label(args.image, args.label)
    spacing = ", ".join(f"{s:.4g}" for s in spacing_from_affine(image.affine))
    print(f"image:       {args.image}")
    print(f"shape:       {tuple(image.shape[1:])} (i, j, k)")
    print(f"spacing:     ({spacing}) mm")
    tilt = obliquity_deg(image.affine)
    oblique = f" (oblique: {tilt:.1f} degrees off the axes)" if tilt > 0.01 else ""
    print(f"orientation: {orientation_codes(image.affine)}{oblique}")
    print(f"intensity:   {float(image.min()):.1f} .. {float(image.max()):.1f} (HU for CT)")
    if label is not None:
        values, counts = np.unique(label.numpy().astype(np.int64), return_counts=True)
        print(f"label:       {args.label}")
        print("label counts: " + ", ".join(f"{v}: {c}" for v, c in zip(values, counts)))


def _point(text: str) -> tuple[float, float, float]:
    parts = text.replace(" ", "").split(",")
    try:
        point = tuple(float(v) for v in parts)
    except ValueError:
        point = ()
    if len(point) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers I,J,K, got {text!r}")
    return point  # type: ignore[return-value]


def _join_negative_points(argv: Sequence[str]) -> list[str]:
    """``--click -1,2,3`` -> ``--click=-1,2,3`` so that negative coordinates work as written."""
    out: list[str] = []
    it = iter(argv)
    for tok in it:
        if tok in _POINT_OPTIONS:
            nxt = next(it, None)
            if nxt is not None and _NUMBER_LIST.match(nxt):
                out.append(f"{tok}={nxt}")
                continue
            out.append(tok)
            if nxt is not None:
                out.append(nxt)
            continue
        out.append(tok)
    return out


def _growth(args: argparse.Namespace):
    from sam3d.inference import WindowGrowth

    return WindowGrowth(enabled=not args.no_grow, max_extent_mm=args.max_extent_mm)


def _checkpoint_or_shipped(checkpoint: Path | None) -> Path:
    """``--checkpoint``, or the shipped model (said on one line, with what it was trained on)."""
    if checkpoint is not None:
        return checkpoint
    from sam3d.models.checkpoint import read_trained
    from sam3d.weights import shipped_checkpoint, shipped_model_note

    path = shipped_checkpoint()
    print(shipped_model_note(read_trained(path).get("meta")), flush=True)
    return path


def _cmd_segment(args: argparse.Namespace) -> None:
    from sam3d.lightimport import import_monai_for_inference

    import_monai_for_inference()  # no ignite / mlflow / matplotlib behind MONAI
    from sam3d.inference.segment import intensity_note, segment_file

    session = segment_file(
        args.image,
        _checkpoint_or_shipped(args.checkpoint),
        args.out,
        clicks=args.click,
        negatives=args.negative,
        world=args.world,
        preview=args.preview,
        device=args.device,
        growth=_growth(args),
        dataset=args.dataset,
    )
    note, warning = intensity_note(session)
    source = "--dataset" if args.dataset else "the checkpoint"
    print(f"{note} (from {source})")
    if warning:
        print(f"sam3d segment: warning: {warning}", file=sys.stderr)
    n = int(session.mask_numpy().sum())
    print(
        f"wrote {args.out} ({n} tumour voxels)" + (f" and {args.preview}" if args.preview else "")
    )


def _cmd_segment_batch(args: argparse.Namespace) -> None:
    from sam3d.lightimport import import_monai_for_inference

    import_monai_for_inference()
    from sam3d.inference import load_model_for_inference
    from sam3d.inference.batch import list_cases, rank_device, segment_batch
    from sam3d.inference.session import resolve_dataset

    cases = list_cases(args.input, key=args.key)
    preset = resolve_dataset(args.dataset) if args.dataset else None  # refused before the model
    device = rank_device(args.device)  # under torchrun: cuda:LOCAL_RANK
    model, meta = load_model_for_inference(args.checkpoint, device)
    if preset is None:
        preset = resolve_dataset(meta["dataset"])
    print(
        f"intensity preset {preset.get('name', '?')!r} "
        f"(from {'--dataset' if args.dataset else 'the checkpoint'})"
    )
    report = segment_batch(
        model,
        preset,
        cases,
        args.out_dir,
        device=device,
        growth=_growth(args),
        world=args.world,
        previews=args.previews,
    )
    print(
        f"{len(report.written)} written, {len(report.skipped)} already done, "
        f"{len(report.failed)} failed (of {len(cases)} cases, all ranks)"
    )
    if report.failed:
        for image, msg in report.failed:
            print(f"  {image}: {msg}", file=sys.stderr)
        raise Sam3DError(f"{len(report.failed)} case(s) failed")


def _cmd_serve(args: argparse.Namespace) -> None:
    from sam3d.serve.server import run_server

    run_server(
        args.image,
        args.checkpoint,
        host=args.host,
        port=args.port,
        device=args.device,
        growth=_growth(args),
        max_upload_mb=args.max_upload_mb,
        max_memory_gb=args.max_memory_gb,
        allow_hosts=args.allow_host,
        max_image_mb=args.max_image_mb,
    )


def _override(text: str) -> tuple[str, object]:
    """``ID=VALUE`` -> (id, value); the value as a Python literal when it is one."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected ID=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _cmd_bundle(args: argparse.Namespace) -> None:
    if args.action == "export":
        from sam3d.apps.export import export_bundle

        if args.out is None:
            raise Sam3DError("bundle export needs --out DIR")
        out = export_bundle(
            args.run_dir, args.out, version=args.version, torchscript=not args.no_torchscript,
            overwrite=args.overwrite,
        )  # fmt: skip
        print(f"wrote the model-zoo bundle {out}")
        return
    from sam3d.apps.zoo import check_bundle, failures

    checks = check_bundle(args.run_dir, overrides=dict(args.set), export=not args.no_torchscript)
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}" + (f": {c.detail}" if c.detail else ""))
    if failures(checks):
        raise Sam3DError(f"{len(failures(checks))} zoo check(s) failed")


def _xy(text: str) -> tuple[float, float]:
    try:
        point = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        point = ()
    if len(point) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers X,Y (column, row), got {text!r}")
    return point  # type: ignore[return-value]


def _cmd_segment_2d(args: argparse.Namespace) -> None:
    from sam3d.inference.planar import segment_image_file

    mask = segment_image_file(
        args.image, args.checkpoint, args.out, args.click, args.negative, args.preview, args.device
    )
    extra = f" and {args.preview}" if args.preview else ""
    print(f"wrote {args.out} ({int(mask.sum())} pixels){extra}")


def _add_growth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument(
        "--no-grow", action="store_true", help="one window only (lesions beyond it are cut)"
    )
    p.add_argument(
        "--max-extent-mm",
        type=float,
        default=384.0,
        help="largest extent (mm) the windows may grow to along any axis",
    )


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line refusal (no usage block): ``sam3d segment: error: ...``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sam3d",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from sam3d.data.phantoms import family_names, get_family

    kinds = "; ".join(
        f"{n}: {get_family(n).description}{'' if get_family(n).training else ' [held out]'}"
        for n in family_names()
    )
    p = sub.add_parser(
        "phantoms",
        help="generate a synthetic dataset with an MSD dataset.json",
        description=f"Phantom families: {kinds}.",
    )
    p.add_argument(
        "--kind",
        choices=family_names(),
        default="ct",
        help=f"the phantom family (default: ct): {kinds}",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=8, help="number of cases (default: 8)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed: the same seed writes the same cases (0)"
    )
    p.add_argument(
        "--shape",
        type=int,
        nargs="+",
        metavar="N",
        help="volumes: I J K voxels; images: H W pixels (default: the family's)",
    )
    p.add_argument(
        "--spacing", type=float, nargs=3, metavar="MM", help="volumes: voxel size (default: drawn)"
    )
    p.set_defaults(func=_cmd_phantoms)

    p = sub.add_parser("demo", help="the embedded end-to-end demo on phantoms")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("demo_out"),
        help="folder for the phantoms, the training run and the masks (default: demo_out)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms (default: 0)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="check and describe a volume (and its label)")
    p.add_argument("image", type=Path, help="NIfTI volume (.nii.gz / .nii)")
    p.add_argument("--label", type=Path, help="label volume on the same voxel grid")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "segment",
        help="segment a tumour in a NIfTI volume from clicks (automatic without clicks)",
    )
    p.add_argument("image", type=Path, help="NIfTI volume (.nii.gz / .nii)")
    p.add_argument(
        "--click",
        action="append",
        type=_point,
        default=[],
        metavar="I,J,K",
        help="positive click: voxel indices of the image (RAS mm with --world); repeatable",
    )
    p.add_argument(
        "--negative",
        action="append",
        type=_point,
        default=[],
        metavar="I,J,K",
        help="negative click (not tumour); repeatable",
    )
    p.add_argument("--world", action="store_true", help="clicks are world millimetres (RAS)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="trained model.pt (Sam3D, SAM-Med3D) or an official SAM-Med3D .pth (default: the "
        "shipped tiny Sam3D, trained on synthetic volumes only)",
    )
    p.add_argument("--out", required=True, type=Path, help="output mask .nii.gz")
    p.add_argument("--preview", type=Path, help="also write a PNG preview (three slices)")
    p.add_argument(
        "--dataset",
        help="intensity preset (kits, lits, pancreas, colon or a JSON file; default: the "
        "checkpoint's)",
    )
    _add_growth_args(p)
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser(
        "segment-batch",
        help="segment a folder or datalist of volumes (resumable; sharded under torchrun)",
    )
    p.add_argument("input", type=Path, help="folder of .nii.gz files or a datalist JSON")
    p.add_argument("--key", help="datalist key (default: test/testing/validation/training)")
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="trained model.pt (Sam3D, SAM-Med3D) or an official SAM-Med3D .pth",
    )
    p.add_argument(
        "--out-dir", required=True, type=Path, help="folder for <case>_seg.nii.gz (and previews)"
    )
    p.add_argument("--world", action="store_true", help="datalist points are RAS mm")
    p.add_argument(
        "--dataset",
        help="intensity preset (kits, lits, pancreas, colon or a JSON file; default: the "
        "checkpoint's)",
    )
    p.add_argument("--previews", action="store_true", help="a PNG beside every mask")
    _add_growth_args(p)
    p.set_defaults(func=_cmd_segment_batch)

    p = sub.add_parser("serve", help="a local web viewer: click on the tumour, see the 3D mask")
    p.add_argument("image", type=Path, nargs="*", help="NIfTI volumes the page may open")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="trained model.pt or an official SAM-Med3D .pth (default: the demo's model with "
        "its phantoms when demo_out/ has them, else the shipped tiny model, trained on "
        "synthetic volumes only)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: local only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument(
        "--max-upload-mb", type=float, default=512.0, help="largest upload accepted (512)"
    )
    p.add_argument(
        "--max-memory-gb", type=float, default=8.0, help="memory for open images and features"
    )
    p.add_argument(
        "--max-image-mb",
        type=float,
        default=1024.0,
        help="largest image accepted, decompressed (its header's shape x data type)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the browser may use besides the listening address (repeatable)",
    )
    _add_growth_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("bundle", help="export a training run as a model-zoo bundle; check one")
    p.add_argument(
        "action",
        choices=["export", "check"],
        help="export: a training run -> a model-zoo bundle; check: the zoo's offline checks",
    )
    p.add_argument("run_dir", type=Path, help="export: the training's bundle root; check: a bundle")
    p.add_argument("--out", type=Path, help="export: the new bundle's folder")
    p.add_argument("--version", help="export: the bundle version (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="export: replace a non-empty --out")
    p.add_argument("--no-torchscript", action="store_true", help="no models/model.ts / TS check")
    p.add_argument(
        "--set",
        action="append",
        type=_override,
        default=[],
        metavar="ID=VALUE",
        help="check: a config override for the network checks (e.g. preset=tiny); repeatable",
    )
    p.set_defaults(func=_cmd_bundle)

    p = sub.add_parser("segment-2d", help="segment a structure in a 2D image (PNG) from clicks")
    p.add_argument("image", type=Path, help="8-bit grey or RGB image (.png)")
    for flag, what in (("--click", "positive click"), ("--negative", "negative click")):
        p.add_argument(flag, action="append", type=_xy, default=[], metavar="X,Y",
                       help=f"{what}: pixel column, row; repeatable")  # fmt: skip
    p.add_argument("--checkpoint", required=True, type=Path, help="trained model.pt (samus)")
    p.add_argument("--out", required=True, type=Path, help="output mask .png (0 / 255)")
    p.add_argument("--preview", type=Path, help="also write an overlay .png")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.set_defaults(func=_cmd_segment_2d)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_join_negative_points(argv))
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"sam3d {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        user = find_user_error(e)  # also when MONAI or ignite wrapped it
        if user is None and isinstance(e, OSError) and e.filename is not None:
            user = Sam3DError(f"cannot access {str(e.filename)[:120]}: {e.strerror or e}")
        if user is None:
            raise
        print(f"sam3d {args.command}: error: {_one_line(user)}", file=sys.stderr)
        return user.exit_code
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())

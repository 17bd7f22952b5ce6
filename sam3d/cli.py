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

    out = write_phantom_dataset(args.kind, args.out, n=args.n, seed=args.seed, progress=True)
    print(f"wrote {args.n} {args.kind} phantoms and {out}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from sam3d.demo import run_demo

    run_demo(Path(args.out), seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam3d", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantoms", help="generate a synthetic dataset with an MSD dataset.json")
    p.add_argument("--kind", choices=["ct", "vessels"], default="ct")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--n", type=int, default=8, help="number of cases")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_phantoms)

    p = sub.add_parser("demo", help="the embedded end-to-end demo on phantoms")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
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

"""Mutation checks before a release: break the code a test guards and see the suite fail.

Each mutant is one textual change of a source file (the mistakes issue 27 found going
unnoticed). The script copies ``sam3d/``, ``tests/`` and ``configs/`` to a temporary
folder, applies one mutant there (the checkout is never touched), runs the tests that
must catch it and reports whether they failed. Exit status 1 when a mutant survives.

    OMP_NUM_THREADS=1 python scripts/check_mutants.py            # every mutant
    OMP_NUM_THREADS=1 python scripts/check_mutants.py pos_embed_zeroed
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "pos_embed_zeroed",
        "sam3d/models/sam/build.py",
        "out[key] = x.permute(0, 2, 3, 1).to(value.dtype)",
        "out[key] = torch.zeros(want.shape, dtype=value.dtype)",
        ("tests/test_weight_adaptation.py",),
    ),
    Mutant(
        "rel_pos_not_resized_by_segment_anythings_rule",
        "sam3d/models/sam/build.py",
        'x = F.interpolate(x, size=want.shape[0], mode="linear", align_corners=False)',
        'x = F.interpolate(x, size=want.shape[0], mode="linear", align_corners=True)',
        ("tests/test_weight_adaptation.py",),
    ),
    Mutant(
        "lora_dropout_module_removed",
        "sam3d/models/sam/lora.py",
        "self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()",
        "self.dropout = nn.Identity()",
        ("tests/test_weight_adaptation.py",),
    ),
    Mutant(
        "lora_dropout_not_applied",
        "sam3d/models/sam/lora.py",
        "F.linear(self.dropout(x), self.lora_a)",
        "F.linear(x, self.lora_a)",
        ("tests/test_weight_adaptation.py",),
    ),
    Mutant(
        "samus_mlp_adapter_weight_1",
        "sam3d/models/planar/samus.py",
        "self.adapter_scale = 0.5",
        "self.adapter_scale = 1.0",
        ("tests/test_weight_adaptation.py",),
    ),
    Mutant(
        "samus_cnn_branch_weight_1",
        "sam3d/models/planar/samus.py",
        "(x + 0.5 * cnn)",
        "(x + 1.0 * cnn)",
        ("tests/test_weight_adaptation.py",),
    ),
)


def run(mutant: Mutant, python: str) -> tuple[bool, str, float]:
    """Apply ``mutant`` in a copy; returns (caught, last pytest line, seconds)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        root = Path(tmp)
        for folder in ("sam3d", "tests", "configs"):
            shutil.copytree(
                REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__")
            )
        target = root / mutant.path
        text = target.read_text()
        if text.count(mutant.old) != 1:
            raise SystemExit(f"{mutant.name}: {mutant.path} no longer holds {mutant.old!r} once")
        target.write_text(text.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        proc = subprocess.run(
            [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=root, env=env, capture_output=True, text=True,
        )  # fmt: skip
        lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
        return proc.returncode != 0, lines[-1] if lines else "", time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    survived = []
    for m in chosen:
        caught, summary, seconds = run(m, sys.executable)
        print(f"{'CAUGHT ' if caught else 'SURVIVED'} {m.name:48s} {seconds:6.0f} s  {summary}")
        if not caught:
            survived.append(m.name)
    if survived:
        print(f"{len(survived)} mutant(s) survived: {', '.join(survived)}")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())

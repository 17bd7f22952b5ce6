"""Start-up: the command line and the click path import only what they need (fresh
processes: ``sys.modules`` after the import)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["mlflow", "matplotlib", "ignite", "pandas", "sklearn", "torchvision"]


def _run(code: str) -> dict:
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_importing_the_cli_imports_neither_mlflow_nor_matplotlib():
    got = _run(
        f"""
        import json, sys
        import sam3d.cli
        print(json.dumps([m for m in {HEAVY + ["monai", "torch"]!r} if m in sys.modules]))
        """
    )
    assert got == []


def test_the_click_path_runs_without_monais_training_side():
    """``sam3d segment``'s import (MONAI with ignite, mlflow, matplotlib... hidden) opens a
    volume and clicks; matplotlib still loads when the preview asks for it."""
    got = _run(
        f"""
        import json, sys
        from sam3d.lightimport import import_monai_for_inference
        assert import_monai_for_inference()
        import torch
        from monai.data import MetaTensor
        from sam3d.inference.segment import segment_file  # noqa: F401
        from sam3d.inference import ClickSession, WindowGrowth
        from sam3d.models import build_sam3d
        model = build_sam3d("tiny").eval()
        aff = torch.diag(torch.tensor([0.8, 0.8, 2.0, 1.0]))
        img = MetaTensor(torch.zeros(1, 40, 40, 40), affine=aff)
        s = ClickSession(model, img, "kits", device="cpu", growth=WindowGrowth(enabled=False))
        s.click((20, 20, 20))
        s.click((22, 20, 20), positive=False)
        after = [m for m in {HEAVY!r} if m in sys.modules]
        import matplotlib.pyplot  # a preview: imported for real
        print(json.dumps({{"heavy": after, "mask": list(s.mask.shape)}}))
        """
    )
    assert got == {"heavy": [], "mask": [40, 40, 40]}

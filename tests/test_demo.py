"""The demo's own steps (phantoms, preview) on a reduced case size."""

from __future__ import annotations

import json

from matplotlib.image import imread

from sam3d import demo


def test_phantom_and_preview_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_SHAPE_VOX", (48, 48, 16))
    steps = [s for s in demo.STEPS if s[0] in ("phantoms", "preview")]
    state = demo.run_demo(tmp_path, seed=0, steps=steps)
    meta = json.loads((tmp_path / "phantoms_ct" / "dataset.json").read_text())
    n = sum(len(meta[k]) for k in ("training", "validation", "test"))
    assert n == demo.DEMO_N_CASES
    preview = tmp_path / "preview_phantom.png"
    assert state.outputs["preview_phantom"] == preview
    assert imread(preview).shape[0] > 100
    log = capsys.readouterr().out
    assert "[demo] step 1/2: phantoms" in log and f"wrote {preview}" in log


def test_learning_curve_plot_has_loss_and_validation(tmp_path):
    curve = [
        {"epoch": 1.0, "minutes": 0.5, "train_loss": 0.7},
        {"epoch": 2.0, "minutes": 1.0, "train_loss": 0.5, "val_dice": 0.4},
        {"epoch": 3.0, "minutes": 1.5, "train_loss": 0.4},
        {"epoch": 4.0, "minutes": 2.0, "train_loss": 0.3, "val_dice": 0.7},
    ]
    path = demo.save_learning_curve(curve, tmp_path / "learning_curve.png")
    image = imread(path)
    assert image.shape[0] > 200
    # the orange validation line is drawn (tab:orange is (1.0, 0.5, 0.05))
    rgb = image[..., :3]
    assert ((rgb[..., 0] > 0.9) & (abs(rgb[..., 1] - 0.5) < 0.08) & (rgb[..., 2] < 0.2)).sum() > 20

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

"""The model shipped with the package (sam3d/weights/tiny_synth.pt): it loads, says what it
was trained on, and still segments lesions of volumes it never saw, from the training
family's held-out seeds and from the second (held-out) generator, through ClickSession."""

from __future__ import annotations

import numpy as np
import pytest

from sam3d.weights import SHIPPED_MODEL

pytestmark = pytest.mark.skipif(not SHIPPED_MODEL.is_file(), reason="no shipped model file")

# Floors well under what docs/BENCHMARKS.md measured (a regression check, not the goals).
FLOORS = {"synth": (0.45, 0.55), "heldout": (0.30, 0.40)}  # (1 click, 3 clicks) mean Dice


def test_shipped_model_loads_with_its_training_metadata():
    from sam3d.inference import load_model_for_inference

    model, meta = load_model_for_inference(SHIPPED_MODEL, "cpu")
    training = meta["training"]
    assert training["family"] == "synth" and "synthetic volumes only" in training["note"]
    assert training["command"].startswith("python scripts/train_default_model.py")
    assert training["iterations"] > 0 and training["wall_minutes"] > 0
    assert model.crop_size == 32 and model.mask_prompt is not None
    assert SHIPPED_MODEL.stat().st_size < 8 * 2**20  # a few MB
    assert meta["dataset"]["spacing_mm"] == [1.5, 1.5, 1.5]


@pytest.mark.parametrize("family", ["synth", "heldout"])
def test_shipped_model_scores_on_held_out_volumes(family, tmp_path):
    from sam3d.data.phantoms import write_phantom_dataset
    from sam3d.inference import load_model_for_inference
    from sam3d.inference.interactive import evaluate_clicks, lesion_cases

    model, meta = load_model_for_inference(SHIPPED_MODEL, "cpu")
    # seeds training never used (the shipped model's data: seed 0)
    listing = write_phantom_dataset(family, tmp_path / family, 2, seed=4242)
    cases = lesion_cases(listing, ("training", "validation", "test"), limit=4)
    assert cases
    ev = evaluate_clicks(model, cases, n_clicks=3, dataset=meta["dataset"], device="cpu")
    one, three = FLOORS[family]
    assert np.isfinite(ev.curve).all()
    assert ev.curve[0] >= one, ev.summary()
    assert ev.curve[2] >= three, ev.summary()


def test_segment_without_checkpoint_uses_and_names_the_shipped_model(tmp_path, capsys):
    from sam3d.cli import main
    from sam3d.data.phantoms import write_phantom_dataset
    from sam3d.inference.interactive import lesion_cases

    listing = write_phantom_dataset("synth", tmp_path / "s", 1, seed=777)
    case = lesion_cases(listing, ("training", "validation", "test"), limit=1)[0]
    i, j, k = (int(v) for v in np.argwhere(case.target).mean(0).round())
    out = tmp_path / "mask.nii.gz"
    assert main(["segment", case.image, "--click", f"{i},{j},{k}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no --checkpoint: using the shipped model tiny_synth.pt" in printed
    assert "synthetic volumes only" in printed and out.is_file()

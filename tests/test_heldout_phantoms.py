"""The held-out second generator: its draws, its lesions, and that training never uses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sam3d.data.phantoms import family_names, get_family, make_heldout_phantom
from sam3d.data.phantoms.heldout import GRIDS_MM, LESION_KINDS
from sam3d.errors import Sam3DError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"fov_mm": (60.0, 60.0, 40.0)}


def test_deterministic_and_drawn_from_its_grids_and_orientations():
    a, b = make_heldout_phantom(3, **SMALL), make_heldout_phantom(3, **SMALL)
    np.testing.assert_array_equal(a.image_hu, b.image_hu)
    phs = [make_heldout_phantom(s, **SMALL) for s in range(16)]
    assert {p.spacing_mm for p in phs} == set(GRIDS_MM)
    assert {p.orientation for p in phs} == {"RAS", "LPS"}
    assert {p.phase for p in phs} == {"portal", "non-contrast"}
    kinds = {les.kind for p in phs for les in p.lesions}
    assert kinds == set(LESION_KINDS)
    enh = {les.enhancing for p in phs for les in p.lesions}
    assert enh == {True, False}  # bright and dark lesions
    for p in phs:
        np.testing.assert_allclose(np.linalg.norm(p.affine[:3, :3], axis=0), p.spacing_mm)
        assert p.lesions, "every volume has a lesion"
        np.testing.assert_array_equal(p.label == 2, p.instances > 0)
        assert sorted(np.unique(p.instances[p.instances > 0]).tolist()) == [
            les.instance for les in p.lesions
        ]


def test_lesion_intensities_follow_their_kind():
    """Mean HU inside a non-cystic lesion is off its organ by its contrast's sign; a cyst's
    core is water-dense (below 40 HU) whatever the phase."""
    checked = {"bright": 0, "dark": 0, "cyst": 0}
    for s in range(12):
        p = make_heldout_phantom(s, fov_mm=(80.0, 80.0, 50.0))
        organ = float(np.median(p.image_hu[p.label == 1]))
        for les in p.lesions:
            vals = p.image_hu[p.instances == les.instance]
            if les.kind == "cystic":
                if les.diameter_mm > 16 and p.spacing_mm[2] < 3:
                    assert np.percentile(vals, 10) < 40.0
                    checked["cyst"] += 1
            elif len(vals) > 50:
                diff = float(np.median(vals)) - organ
                assert np.sign(diff) == np.sign(les.contrast_hu)
                assert abs(diff) > 0.15 * abs(les.contrast_hu)
                checked["bright" if diff > 0 else "dark"] += 1
    assert min(checked.values()) >= 1, checked


def test_training_never_uses_the_heldout_family(tmp_path):
    from sam3d.apps import kits

    assert not get_family("heldout").training
    assert "heldout" in family_names(training=False)
    assert "heldout" not in family_names(training=True)
    with pytest.raises(Sam3DError, match="held-out"):
        kits.ensure_dataset(tmp_path / "d", 3, 0, {"family": "heldout"})
    # no bundle config and no training code names it
    for path in [*ROOT.glob("bundles/*/*.json"), *ROOT.glob("sam3d/apps/**/*.py"),
                 *ROOT.glob("sam3d/engine/*.py"), ROOT / "sam3d/demo.py"]:  # fmt: skip
        assert "heldout" not in path.read_text(), path
    train = json.loads((ROOT / "bundles/kits/train.json").read_text())
    family = (train.get("phantom_kwargs") or {}).get("family", "ct")
    assert get_family(family).training

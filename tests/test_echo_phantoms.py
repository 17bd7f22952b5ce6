"""Echo phantoms: geometry of the structures, ultrasound-like texture, the written dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from sam3d.data.phantoms import ECHO_LABELS, make_echo_phantom, write_phantom_dataset
from sam3d.errors import Sam3DError


def test_structures_sit_in_the_sector_in_anatomical_order():
    for seed in range(6):
        ph = make_echo_phantom(seed, (160, 144), depth_mm=150.0)
        assert ph.image.shape == ph.label.shape == ph.sector.shape == (160, 144)
        assert set(np.unique(ph.label)) == {0, 1, 2, 3}
        assert not ph.label[~ph.sector].any() and not ph.image[~ph.sector].any()
        lv, myo, la = (ph.label == c for c in (1, 2, 3))
        # myocardium wraps the cavity (they touch); the atrium lies deeper than the base
        assert (ndimage.binary_dilation(lv) & myo).any()
        rows = [np.argwhere(m)[:, 0].mean() for m in (lv, la)]
        assert rows[0] < rows[1]
        assert not (ndimage.binary_dilation(lv) & la).any()  # the mitral gap keeps them apart
        for m in (lv, myo, la):
            assert ndimage.label(m)[1] == 1  # one piece each
        assert ph.spacing_mm == pytest.approx((150.0 / (0.97 * 160),) * 2)


def test_image_looks_like_ultrasound():
    ph = make_echo_phantom(3)
    img, lab, sector = ph.image, ph.label, ph.sector
    blood = img[(lab == 1) | (lab == 3)].mean()
    muscle = img[lab == 2].mean()
    tissue = img[(lab == 0) & sector].mean()
    assert blood < tissue < muscle  # dark blood, bright myocardium
    # speckle: strong pixel-to-pixel variation inside a homogeneous region
    inner = ndimage.binary_erosion(lab == 2, iterations=1) if (lab == 2).sum() > 400 else lab == 2
    assert img[inner].std() / img[inner].mean() > 0.15
    # depth attenuation: tissue in the near field is brighter than in the far field
    rows = np.arange(img.shape[0])[:, None] * np.ones_like(img)
    near = (lab == 0) & sector & (rows < 0.4 * img.shape[0])
    far = (lab == 0) & sector & (rows > 0.8 * img.shape[0])
    assert img[near].mean() > img[far].mean()
    again = make_echo_phantom(3)
    assert np.array_equal(again.image, img) and np.array_equal(again.label, lab)  # seeded
    assert not np.array_equal(make_echo_phantom(4).label, lab)
    with pytest.raises(Sam3DError, match="at least 48"):
        make_echo_phantom(0, (32, 64))


def test_dataset_writes_png_folders_spacing_and_a_preview(tmp_path):
    index = write_phantom_dataset("echo", tmp_path, 5, seed=1, size=(96, 80))
    meta = json.loads(index.read_text())
    assert meta["labels"] == {str(k): v for k, v in ECHO_LABELS.items()}
    assert [len(meta[s]) for s in ("training", "validation", "test")] == [3, 1, 1]
    for entry in meta["training"] + meta["validation"] + meta["test"]:
        image = np.asarray(Image.open(tmp_path / entry["image"]))
        label = np.asarray(Image.open(tmp_path / entry["label"]))
        assert image.shape == label.shape == (96, 80) and image.dtype == np.uint8
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        assert len(entry["spacing_mm"]) == 2 and 0.5 < entry["spacing_mm"][0] < 3
    ph = make_echo_phantom(meta["phantom"]["cases"][0]["seed"], (96, 80))
    first = np.asarray(Image.open(tmp_path / meta["training"][0]["label"]))
    assert np.array_equal(first, ph.label)
    assert Image.open(tmp_path / "preview.png").size[0] > 300

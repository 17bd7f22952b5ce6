"""The domain-randomised training family (`synth`): determinism, instances, touching
lesions scored apart, ranges, speed, and its dataset usable by the kits glue."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sam3d.data.clicks import clicked_instance, clicked_lesion
from sam3d.data.phantoms import make_synth_phantom

SMALL = {"shape_vox": (48, 48, 24), "spacing_mm": (2.0, 2.0, 3.0)}


def test_same_seed_same_volume_and_other_seed_another():
    a, b = make_synth_phantom(7, **SMALL), make_synth_phantom(7, **SMALL)
    np.testing.assert_array_equal(a.image_hu, b.image_hu)
    np.testing.assert_array_equal(a.instances, b.instances)
    c = make_synth_phantom(8, **SMALL)
    assert not np.array_equal(a.image_hu, c.image_hu)


def test_labels_and_instances_agree_and_each_lesion_has_its_id():
    for seed in range(6):
        ph = make_synth_phantom(seed)
        assert ph.label.dtype == np.uint8 and ph.instances.dtype == np.uint16
        np.testing.assert_array_equal(ph.label == 2, ph.instances > 0)
        ids = sorted(int(v) for v in np.unique(ph.instances) if v)
        assert ids == [les.instance for les in ph.lesions] == list(range(1, len(ids) + 1))
        assert 1 <= len(ids) <= 5
        for les in ph.lesions:
            # the lesion differs from its host by at least the least contrast, before noise
            assert abs(les.intensity_hu - les.host_hu) >= 25.0 - 1e-6
            assert -40.0 <= les.intensity_hu <= 240.0


def test_draws_cover_spacing_orientation_and_sizes():
    phs = [make_synth_phantom(s) for s in range(24)]
    spacings = np.array([p.spacing_mm for p in phs])
    assert spacings.min() >= 0.5 and spacings.max() <= 5.0
    assert spacings[:, 2].max() > 2.5 and spacings[:, 0].min() < 0.8  # thick and fine
    assert {p.orientation for p in phs} == {"RAS", "LPS", "oblique"}
    diam = [les.diameter_mm for p in phs for les in p.lesions]
    assert min(diam) >= 5.0 and max(diam) <= 60.0 and max(diam) > 30.0 and min(diam) < 12.0
    # air outside a body, tissue inside within the kits window
    for p in phs[:4]:
        assert p.image_hu.min() < -900 and np.median(p.image_hu[p.label > 0]) > -60


def test_touching_lesions_are_two_objects_for_the_click():
    """Some seeds place a lesion against the previous one. Connected components merge
    them (what ``clicked_lesion`` would score); instances keep the clicked one alone."""
    found = 0
    for seed in range(40):
        ph = make_synth_phantom(seed, **SMALL)
        for les in ph.lesions:
            if not les.touching:
                continue
            mine = ph.instances == les.instance
            grown = ndimage.binary_dilation(mine, structure=np.ones((3, 3, 3), bool))
            if not (grown & (ph.instances == les.touching)).any():
                continue  # placed against it but clipped apart
            click = np.argwhere(mine)[0][None].astype(float)
            alone = clicked_instance(ph.instances, click, np.array([1]))
            merged = clicked_lesion(ph.label == 2, click, np.array([1]))
            np.testing.assert_array_equal(alone, mine)
            assert merged.sum() > alone.sum()
            found += 1
    assert found >= 3


def test_clicked_instance_by_hand():
    inst = np.zeros((6, 6, 6), np.uint16)
    inst[1:3, 1:3, 1:3] = 1
    inst[3:5, 1:3, 1:3] = 2  # touching 1
    pts = np.array([[3.6, 1.0, 1.0], [1.0, 1.0, 1.0]])  # rounds to (4,1,1) in 2; then in 1
    np.testing.assert_array_equal(clicked_instance(inst, pts[:1], np.array([1])), inst == 2)
    np.testing.assert_array_equal(clicked_instance(inst, pts, np.array([1, 0])), inst == 2)
    np.testing.assert_array_equal(clicked_instance(inst, pts, np.array([1, 1])), inst > 0)
    assert not clicked_instance(inst, np.array([[0.0, 0, 0]]), np.array([1])).any()


def test_a_volume_of_128_voxels_is_fast():
    make_synth_phantom(0, shape_vox=(128, 128, 128), spacing_mm=(1.0, 1.0, 1.0))
    t = time.perf_counter()
    make_synth_phantom(1, shape_vox=(128, 128, 128), spacing_mm=(1.0, 1.0, 1.0))
    assert time.perf_counter() - t < 2.0


def test_dataset_with_instances_and_the_kits_glue(tmp_path):
    from sam3d.apps import kits
    from sam3d.errors import Sam3DError

    root = tmp_path / "synth"
    assert kits.ensure_dataset(root, 3, 1, {"family": "synth", **SMALL}) == "msd"
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["phantom"]["kind"] == "synth" and meta["labels"]["2"] == "lesion"
    e = meta["test"][0]
    seed = next(c["seed"] for c in meta["phantom"]["cases"] if e["image"].endswith(c["case"]))
    ph = make_synth_phantom(seed, **SMALL)
    inst = nib.load(root / e["instance"])
    np.testing.assert_array_equal(np.asarray(inst.dataobj), ph.instances)
    np.testing.assert_allclose(inst.affine, ph.affine, atol=1e-5)
    assert len(kits.load_datalist(root, "training")) == 1
    with pytest.raises(Sam3DError, match="unknown phantom kind"):
        kits.ensure_dataset(tmp_path / "x", 3, 1, {"family": "nope"})


def test_validation_scores_the_clicked_instance(tmp_path):
    """val_transforms with instance_key keeps the clicked lesion alone, touching or not."""
    from sam3d.data.phantoms.common import make_affine, save_nifti
    from sam3d.data.pipelines import load_dataset_preset, val_transforms

    shape = (24, 24, 24)
    aff = make_affine((1.0, 1.0, 1.0), shape, "RAS")
    inst = np.zeros(shape, np.uint16)
    inst[4:10, 4:10, 4:10] = 1
    inst[10:16, 4:10, 4:10] = 2  # touches lesion 1
    image = np.where(inst > 0, 150.0, 40.0)
    label = np.where(inst > 0, 2, 1).astype(np.uint8)
    for name, arr, dt in (("i", image, np.int16), ("l", label, np.uint8), ("n", inst, np.uint16)):
        save_nifti(arr, aff, tmp_path / f"{name}.nii.gz", dt)
    case = {k: str(tmp_path / f"{n}.nii.gz") for k, n in (("image", "i"), ("label", "l"),
                                                           ("instance", "n"))}  # fmt: skip
    preset = load_dataset_preset("kits")
    out = val_transforms(preset, seed=0, instance_key="instance")(dict(case))
    click = np.floor(out["points"][0].numpy() + 0.5).astype(int)
    kept = out["label"][0].numpy() > 0
    assert "instance" not in out
    clicked_id = 1 if click[0] < 10 else 2
    assert kept.sum() == 216 and out["label_all"][0].numpy().sum() == 432
    assert kept[tuple(click)] and kept.sum() == (inst == clicked_id).sum()
    merged = val_transforms(preset, seed=0)(dict(case))
    assert merged["label"][0].numpy().sum() == 432  # components merge touching lesions

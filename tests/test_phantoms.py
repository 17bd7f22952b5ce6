"""Synthetic CT volumes and vessel images: determinism, anatomy, labels, geometry, datasets."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from sam3d.data.phantoms import (
    T,
    make_ct_phantom,
    make_vessel_phantom,
    save_nifti,
    split_cases,
    write_phantom_dataset,
)
from sam3d.errors import Sam3DError

SMALL = {"shape_vox": (48, 48, 24), "spacing_mm": (4.0, 4.0, 4.0)}
ANISO = {"shape_vox": (128, 128, 32), "spacing_mm": (0.9, 0.9, 2.5)}
FACES = [np.eye(3, dtype=int)[a] * s for a in range(3) for s in (-1, 1)]


def _tumour_components(label: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(label == 2, structure=np.ones((3, 3, 3)))


def test_ct_phantom_is_deterministic_per_seed():
    a, b = make_ct_phantom(3, **SMALL), make_ct_phantom(3, **SMALL)
    np.testing.assert_array_equal(a.image_hu, b.image_hu)
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.affine, b.affine)
    c = make_ct_phantom(4, **SMALL)
    assert not np.array_equal(a.image_hu, c.image_hu)


def test_ct_phantom_types_and_label_values():
    ph = make_ct_phantom(1, orientation="RAS", n_lesions=2, **SMALL)
    assert ph.image_hu.dtype == np.float32 and ph.image_hu.shape == SMALL["shape_vox"]
    assert ph.label.dtype == np.uint8 and ph.label.shape == SMALL["shape_vox"]
    assert set(np.unique(ph.label)) <= {0, 1, 2}
    assert (ph.label == 1).any() and (ph.label == 2).any()
    np.testing.assert_allclose(np.linalg.norm(ph.affine[:3, :3], axis=0), SMALL["spacing_mm"])
    # label and tissue map agree: organ = kidney without tumour
    assert np.array_equal(ph.label == 1, ph.tissue == T["organ"])
    assert np.array_equal(ph.label == 2, ph.tissue == T["tumour"])


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
@pytest.mark.parametrize("geometry", [SMALL, ANISO], ids=["4mm", "aniso"])
def test_lesions_lie_inside_the_organ(seed, geometry):
    ph = make_ct_phantom(seed, n_lesions=3, **geometry)
    comps, n = _tumour_components(ph.label)
    assert n == len(ph.lesions) >= 1
    organ_parts, _ = ndimage.label(ph.label > 0, structure=np.ones((3, 3, 3)))
    padded = np.pad(ph.label, 1)  # outside the volume counts as background
    for c in range(1, n + 1):
        vox = np.argwhere(comps == c)
        # the tumour sits in a kidney (a label>0 part that has organ voxels) ...
        part = organ_parts[tuple(vox[0])]
        assert (ph.label[organ_parts == part] == 1).any()
        # ... and most of its surface borders organ, not background
        to_organ = to_background = 0
        for f in FACES:
            nb = padded[tuple((vox + 1 + f).T)]
            to_organ += int((nb == 1).sum())
            to_background += int((nb == 0).sum())
        assert to_organ > to_background, (c, to_organ, to_background)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("geometry", [SMALL, ANISO], ids=["4mm", "aniso"])
def test_lesion_sizes_in_mm(seed, geometry):
    ph = make_ct_phantom(seed, n_lesions=3, **geometry)
    spacing = np.asarray(ph.spacing_mm)
    comps, n = _tumour_components(ph.label)
    for sl in ndimage.find_objects(comps):
        n_vox = np.array([s.stop - s.start for s in sl])
        assert (n_vox * spacing).max() >= 5.0  # covered extent
        assert ((n_vox - 1) * spacing).max() <= 60.0  # centre-to-centre extent


def _interior(mask: np.ndarray) -> np.ndarray:
    """Voxels whose in-plane neighbours share the mask (away from partial-volume edges)."""
    return ndimage.binary_erosion(mask, structure=np.ones((3, 3, 1)))


@pytest.mark.parametrize("geometry", [SMALL, ANISO], ids=["4mm", "aniso"])
def test_hu_ranges_per_tissue_and_lesion_contrast(geometry):
    measured = 0
    for seed in range(5):
        ph = make_ct_phantom(seed, n_lesions=3, **geometry)
        img, tis = ph.image_hu, ph.tissue
        assert abs(img[_interior(tis == T["air"])].mean() + 1000) < 15
        assert -130 < img[_interior(tis == T["fat"])].mean() < -70
        assert img[(tis == T["bone"]) | (tis == T["marrow"])].mean() > 300  # edges included
        organ_mean = img[_interior(ph.label == 1)].mean()
        assert 25 < organ_mean < 55
        comps, n = _tumour_components(ph.label)
        for c in range(1, n + 1):
            core = _interior(comps == c)
            if core.sum() < 4:
                continue  # too small to measure without partial volume
            contrast = abs(img[core].mean() - organ_mean)
            assert 20 <= contrast <= 80, (seed, c, contrast)
            measured += 1
    assert measured >= 3


def test_same_body_size_at_different_spacings():
    areas = []
    for s in (0.8, 1.6):
        ph = make_ct_phantom(7, spacing_mm=(s, s, 5.0), orientation="RAS", n_lesions=0)
        mid = ph.image_hu.shape[2] // 2
        areas.append((ph.image_hu[:, :, mid] > -500).sum() * s * s)
        assert ph.image_hu.shape[0] == round(300 / s)
    assert abs(areas[0] - areas[1]) / areas[0] < 0.03


def test_anatomy_shrinks_to_a_small_field_of_view():
    ph = make_ct_phantom(0, orientation="RAS", n_lesions=0, **SMALL)
    body = ph.image_hu > -500
    # the body fits inside the field of view with air all around
    assert not body[[0, -1]].any() and not body[:, [0, -1]].any()


def test_random_geometry_is_within_the_stated_ranges():
    for seed in range(3):
        ph = make_ct_phantom(seed, shape_vox=(64, 64, 16))  # spacing and orientation drawn
        si, sj, sk = ph.spacing_mm
        assert si == sj and 1.25 <= sk <= 5.0
        assert ph.orientation in ("RAS", "LPS", "oblique")


def _sitk_affine_ras(path: Path) -> np.ndarray:
    im = sitk.ReadImage(str(path))
    direction = np.array(im.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(im.GetSpacing())[None, :]
    affine[:3, 3] = im.GetOrigin()
    affine[:2] *= -1  # LPS -> RAS
    return affine


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique"])
def test_written_affine_reads_back_in_nibabel_and_simpleitk(tmp_path, orientation):
    ph = make_ct_phantom(
        2, shape_vox=(40, 36, 12), spacing_mm=(3.1, 3.3, 4.5), orientation=orientation
    )
    path = tmp_path / "ct.nii.gz"
    save_nifti(ph.image_hu, ph.affine, path, np.int16)
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, ph.affine, atol=1e-4)
    np.testing.assert_allclose(_sitk_affine_ras(path), ph.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.rint(ph.image_hu).astype(np.int16))
    codes = "".join(nib.aff2axcodes(img.affine))
    if orientation != "oblique":
        assert codes == orientation
    else:
        rot = ph.affine[:3, :3] / np.array(ph.spacing_mm)
        assert not np.allclose(np.abs(rot), np.eye(3), atol=1e-3)  # truly oblique
        assert np.allclose(rot.T @ rot, np.eye(3), atol=1e-9)  # still a rotation


def test_unknown_orientation_is_refused():
    with pytest.raises(Sam3DError, match="orientation"):
        make_ct_phantom(0, orientation="XYZ", **SMALL)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("size", [(256, 256), (96, 128)])
def test_vessel_phantom_is_thin_connected_and_dark(seed, size):
    vp = make_vessel_phantom(seed, size=size)
    assert vp.image.dtype == np.float32 and vp.image.shape == (*size, 3)
    assert vp.image.min() >= 0 and vp.image.max() <= 1
    assert set(np.unique(vp.label)) == {0, 1}
    assert not vp.label[~vp.fov].any()
    assert ndimage.distance_transform_edt(vp.label).max() <= 3.5
    _, n = ndimage.label(vp.label, structure=np.ones((3, 3)))
    assert n == vp.n_trees >= 2  # each tree is one 8-connected piece; trees never touch
    # vessels are darker than the background right next to them
    ring = ndimage.binary_dilation(vp.label, iterations=3) & ~vp.label.astype(bool) & vp.fov
    green = vp.image[..., 1]
    assert green[vp.label > 0].mean() < green[ring].mean() - 0.05
    assert (vp.image[~vp.fov] == 0).all()


def test_vessel_phantom_is_deterministic_per_seed():
    a, b, c = make_vessel_phantom(1), make_vessel_phantom(1), make_vessel_phantom(2)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(a.label, c.label)


@pytest.mark.parametrize(
    ("n", "sizes"),
    [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (5, (3, 1, 1)), (10, (6, 2, 2))],
)
def test_split_sizes(n, sizes):
    parts = split_cases(n)
    assert tuple(len(p) for p in parts) == sizes
    assert sorted(sum(parts, [])) == list(range(n))


def _check_dataset(path: Path, n: int) -> dict:
    meta = json.loads(path.read_text())
    entries = meta["training"] + meta["validation"] + meta["test"]
    assert len(entries) == n and all(len(meta[k]) >= 1 for k in ("training", "validation", "test"))
    for e in entries:
        for key in ("image", "label"):
            assert (path.parent / e[key]).is_file()
    # atomic writes leave no temporary files behind
    assert not [p for p in path.parent.rglob(".*") if p.is_file()]
    return meta


def test_write_ct_dataset(tmp_path):
    path = write_phantom_dataset("ct", tmp_path / "ct", n=3, seed=0, **SMALL)
    meta = _check_dataset(path, 3)
    assert meta["labels"] == {"0": "background", "1": "kidney", "2": "tumour"}
    first = tmp_path / "ct" / meta["training"][0]["label"]
    lab = nib.load(first)
    assert lab.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(lab.dataobj))) <= {0, 1, 2}
    img = nib.load(tmp_path / "ct" / meta["training"][0]["image"])
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, lab.affine)


def test_write_vessel_dataset(tmp_path):
    path = write_phantom_dataset("vessels", tmp_path / "v", n=3, seed=0, size=(96, 96))
    meta = _check_dataset(path, 3)
    e = meta["training"][0]
    image = np.asarray(Image.open(path.parent / e["image"]))
    label = np.asarray(Image.open(path.parent / e["label"]))
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    assert label.shape == (96, 96) and set(np.unique(label)) == {0, 1}
    expected = make_vessel_phantom(
        json.loads(path.read_text())["phantom"]["cases"][0]["seed"], (96, 96)
    )
    np.testing.assert_array_equal(label, expected.label)


def test_write_dataset_refuses_bad_arguments(tmp_path):
    with pytest.raises(Sam3DError, match="kind"):
        write_phantom_dataset("mri", tmp_path, n=2)
    with pytest.raises(Sam3DError, match="at least 1"):
        write_phantom_dataset("ct", tmp_path, n=0)


def test_families_are_a_registry_the_cli_lists(tmp_path, capsys):
    from sam3d.cli import build_parser, main
    from sam3d.data.phantoms import family_names, get_family

    assert {"ct", "vessels", "echo", "prostate"} <= set(family_names())
    kind = next(a for a in build_parser()._subparsers._group_actions[0].choices["phantoms"]
                ._actions if a.dest == "kind")  # fmt: skip
    assert list(kind.choices) == family_names()
    with pytest.raises(Sam3DError, match="use one of " + ", ".join(family_names())):
        get_family("mri")
    # prostate through the registry: the same files as its own writer, n cases per site
    out = tmp_path / "p"
    assert main(["phantoms", "--kind", "prostate", "--out", str(out), "--n", "1"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert len(meta["training"]) == 6 and meta["phantom"]["kind"] == "prostate"
    from sam3d.data.phantoms import write_prostate_dataset

    ref = write_prostate_dataset(tmp_path / "ref", 1, sites=("A",), seed=0)
    a = nib.load(out / meta["training"][0]["label"]).get_fdata()
    b = nib.load(ref.parent / json.loads(ref.read_text())["training"][0]["label"]).get_fdata()
    np.testing.assert_array_equal(a, b)
    assert main(["phantoms", "--kind", "prostate", "--out", str(out), "--shape", "4", "4"]) == 2
    assert "--shape does not apply to prostate" in capsys.readouterr().err

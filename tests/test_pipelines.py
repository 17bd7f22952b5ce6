"""Dataset presets and the MONAI transform chains (Python builders and the bundle's config)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam3d.data import pipelines
from sam3d.errors import Sam3DError

REPO = Path(__file__).resolve().parents[1]

# docs/REFERENCES.md section 1 (the anchor's data recipe), typed in by hand.
EXPECTED = {
    "kits": ((-54, 247), 59.54, 55.46, 2),
    "lits": ((-48, 163), 60.06, 40.20, 2),
    "pancreas": ((-39, 204), 68.45, 63.42, 2),
    "colon": ((-57, 175), 65.18, 32.65, 1),
}


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, str]:
    from sam3d.data.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("pipeline_phantoms")
    spec_path = write_phantom_dataset(
        "ct", root, n=1, seed=3, shape_vox=(48, 48, 32), spacing_mm=(1.5, 1.5, 2.0),
        n_lesions=1, orientation="LPS",
    )  # fmt: skip
    entry = json.loads(Path(spec_path).read_text())["training"][0]
    return {k: str(root / v) for k, v in entry.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dataset_presets_follow_the_reference_recipe(name):
    p = pipelines.load_dataset_preset(name)
    window, mean, std, tumour = EXPECTED[name]
    assert tuple(p["window_hu"]) == window and p["mean"] == mean and p["std"] == std
    assert p["tumour_label"] == tumour
    assert p["nsd_tolerance_mm"] == 5.0 and p["spacing_mm"] == [1.0, 1.0, 1.0]


def test_preset_names_paths_and_errors(tmp_path):
    assert pipelines.dataset_preset_names() == ["colon", "kits", "lits", "pancreas"]
    custom = dict(pipelines.load_dataset_preset("kits"), tumour_label=5)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(custom))
    assert pipelines.load_dataset_preset(path)["tumour_label"] == 5
    with pytest.raises(Sam3DError, match="unknown dataset preset"):
        pipelines.load_dataset_preset("spleen")
    with pytest.raises(Sam3DError, match="lacks mean"):
        pipelines.load_dataset_preset({k: v for k, v in custom.items() if k != "mean"})


def test_window_then_zscore_by_hand():
    p = pipelines.load_dataset_preset("kits")
    chain = pipelines.intensity_transforms(p)
    hu = torch.tensor([-1000.0, -54.0, 100.0, 247.0, 900.0]).reshape(1, 5, 1, 1)
    out = {"image": hu}
    for t in chain:
        out = t(out)
    expected = (np.clip([-1000, -54, 100, 247, 900], -54, 247) - 59.54) / 55.46
    assert np.allclose(out["image"].flatten().numpy(), expected, atol=1e-5)
    assert pipelines.air_value(p) == pytest.approx((-54 - 59.54) / 55.46)


def test_val_chain_gives_ras_1mm_binary_tumour_and_a_click_inside_it(case):
    p = pipelines.load_dataset_preset("kits")
    out = pipelines.val_transforms(p, seed=0)(case)
    img, lab = out["image"], out["label"]
    assert img.shape[0] == 1 and img.shape == lab.shape
    assert nib.aff2axcodes(img.affine.numpy()) == ("R", "A", "S")
    assert np.allclose(np.linalg.norm(img.affine.numpy()[:3, :3], axis=0), 1.0)
    assert set(torch.unique(lab).tolist()) == {0.0, 1.0}
    # the tumour keeps its volume through resampling to 1 mm (nearest neighbour)
    raw = nib.load(case["label"])
    raw_mm3 = float((np.asarray(raw.dataobj) == 2).sum()) * 1.5 * 1.5 * 2.0
    assert float(lab.sum()) == pytest.approx(raw_mm3, rel=0.25)
    assert out["point_labels"].tolist() == [1]
    i, j, k = out["points"][0].long().tolist()
    assert lab[0, i, j, k] == 1
    assert float(img.min()) >= pipelines.air_value(p) - 1e-5
    again = pipelines.val_transforms(p, seed=0)(case)
    assert torch.equal(again["points"], out["points"])


def test_train_chain_gives_fixed_crops_with_clicks_on_the_right_side(case):
    p = pipelines.load_dataset_preset("kits")
    chain = pipelines.train_transforms(p, crop_size=32, n_pos=5, n_neg=7)
    chain.set_random_state(seed=0)
    n_with_tumour = 0
    for _ in range(4):
        (out,) = chain(case)
        img, lab = out["image"], out["label"]
        assert img.shape == (1, 32, 32, 32) and lab.shape == (1, 32, 32, 32)
        pts, labels = out["points"], out["point_labels"]
        assert pts.shape == (12, 3) and labels.shape == (12,)
        assert float(pts.min()) >= 0 and float(pts.max()) <= 31
        idx = pts.long()
        at = lab[0, idx[:, 0], idx[:, 1], idx[:, 2]]
        assert torch.all(at[labels == 1] == 1) and torch.all(at[labels == 0] == 0)
        n_with_tumour += int(lab.sum() > 0)
    assert n_with_tumour >= 1  # pos:neg 2:1 crops find the lesion


def _config_chain(key: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "kits" / "train.json"))
    parser.update({"preset": "tiny", "seed": 0, "n_pos_clicks": 5, "n_neg_clicks": 7, **overrides})
    return parser.get_parsed_content(key)


def test_bundle_config_chains_equal_the_python_builders(case):
    # the bundle calls the builders with its own settings (here a 2 mm grid)
    p = pipelines.load_dataset_preset("kits", spacing_mm=2.0)
    assert _config_chain("dataset_info", spacing_mm=2.0) == p
    ours, theirs = (
        pipelines.val_transforms(p, seed=0)(case),
        _config_chain("validate#preprocessing", spacing_mm=2.0)(case),
    )
    assert np.allclose(np.linalg.norm(ours["image"].affine.numpy()[:3, :3], axis=0), 2.0)
    for key in ("image", "label", "label_all", "points", "point_labels"):
        assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key])), key
    for mode in ("interactive", "reference"):  # the bundle's click_training option
        py_chain = pipelines.train_transforms(
            p, crop_size=32, n_pos=5, n_neg=7, click_training=mode
        )
        cfg_chain = _config_chain(
            "train#preprocessing", spacing_mm=2.0, click_training=mode, samples_per_volume=1
        )
        py_chain.set_random_state(seed=11)
        cfg_chain.set_random_state(seed=11)
        for _ in range(2):
            (a,), (b,) = py_chain(case), cfg_chain(case)
            for key in ("image", "label", "points", "point_labels"):
                assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    # by default the dataset preset's 1 mm grid
    assert _config_chain("dataset_info") == pipelines.load_dataset_preset("kits")
    one_mm = _config_chain("validate#preprocessing")(case)
    assert np.allclose(np.linalg.norm(one_mm["image"].affine.numpy()[:3, :3], axis=0), 1.0)


def test_cached_training_data_does_not_reread_the_nifti_files(case, tmp_path):
    import shutil

    from monai.bundle import ConfigParser
    from monai.data import CacheDataset

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "kits" / "train.json"))
    assert parser.get("train#dataset#_target_") == "CacheDataset"
    assert parser.get("validate#dataset#_target_") == "CacheDataset"
    copy = {k: str(shutil.copy(v, tmp_path / f"{k}.nii.gz")) for k, v in case.items()}
    chain = _config_chain("train#preprocessing", click_training="reference", samples_per_volume=1)
    ds = CacheDataset([copy], transform=chain, progress=False)
    for path in copy.values():
        Path(path).unlink()  # a later epoch must not need the files
    (a,), (b,) = ds[0], ds[0]
    assert a["image"].shape == (1, 32, 32, 32) and b["points"].shape == (12, 3)


def test_inference_chain_equals_the_bundles_and_training_intensities(case):
    """inference.json, ``sam3d segment`` (grid.preprocessing) and training's validation
    chain put a volume on the same grid with the same intensities."""
    from monai.bundle import ConfigParser
    from monai.transforms import NormalizeIntensityd, ScaleIntensityRanged

    from sam3d.inference.grid import preprocessing

    p = pipelines.load_dataset_preset("kits", spacing_mm=2.0)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "kits" / "inference.json"))
    parser.update({"dataset_info": p, "loaded": None})
    bundle = parser.get_parsed_content("preprocessing")
    data = {"image": case["image"], "points": [[10, 12, 8]], "point_labels": [1]}
    a = bundle(dict(data))
    b = preprocessing(p)({"image": case["image"]})
    torch.testing.assert_close(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
    assert a["points"].shape == (1, 3)  # clicks mapped onto the grid
    assert np.allclose(a["image"].affine.numpy(), b["image"].affine.numpy())
    # the grid of training's validation (before its body crop) is the same 2 mm RAS grid
    val = pipelines.val_transforms(p)(dict(case))
    assert np.allclose(
        np.abs(val["image"].affine.numpy()[:3, :3]), np.abs(a["image"].affine.numpy()[:3, :3])
    )
    ours = [
        t for t in bundle.transforms if isinstance(t, ScaleIntensityRanged | NormalizeIntensityd)
    ]
    assert [type(t) for t in ours] == [ScaleIntensityRanged, NormalizeIntensityd]
    x = torch.linspace(-1200, 1500, 5 * 6 * 7).reshape(1, 5, 6, 7)
    b = {"image": x.clone()}
    for t in ours:
        b = t(b)
    # by hand: clip to KiTS [-54, 247] HU, z-score with 59.54 / 55.46
    torch.testing.assert_close(
        torch.as_tensor(b["image"]), (x.clamp(-54, 247) - 59.54) / 55.46, rtol=1e-5, atol=1e-5
    )


def test_validation_keeps_the_clicked_lesion_only():
    from sam3d.data.clicks import ClickedLesiond, clicked_lesion

    mask = np.zeros((12, 10, 8), bool)
    mask[1:4, 1:4, 1:4] = True  # lesion A
    mask[7:11, 5:9, 3:7] = True  # lesion B
    mask[4, 4, 4] = True  # touches A at a corner: 26-connected to it
    got = clicked_lesion(mask, np.array([[8.4, 6.5, 4.0], [0, 0, 0]]), np.array([1, -1]))
    expected = np.zeros_like(mask)
    expected[7:11, 5:9, 3:7] = True
    assert np.array_equal(got, expected)
    both = clicked_lesion(mask, np.array([[2.0, 2.0, 2.0], [9, 6, 4]]), np.array([1, 1]))
    assert np.array_equal(both, mask)
    label = torch.as_tensor(mask[None].astype(np.float32))
    data = {"label": label, "points": torch.tensor([[2.0, 2.0, 2.0]])}
    out = ClickedLesiond(all_key="label_all")({**data, "point_labels": torch.tensor([1])})
    assert int(out["label"].sum()) == 3 * 3 * 3 + 1 and torch.equal(out["label_all"], label)

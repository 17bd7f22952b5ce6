"""The prostate (DeSAM) bundle end to end on the CPU, its glue and the prostate phantoms."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam3d.apps.prostate import (
    cache_dir_for,
    cached_slices,
    dice_3d,
    evaluate_cases,
    load_cases,
    prostate_datalist,
    segment_files,
    volume_to_uint8,
)
from sam3d.data.phantoms import SITES, make_prostate_phantom, save_site_preview
from sam3d.errors import Sam3DError
from sam3d.models.checkpoint import load_trained
from sam3d.models.planar.desam import desam_preset
from tests.conftest import run_bundle_workflow

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "prostate"
PHANTOM = {"n_per_site": 3, "in_plane_vox": 40, "n_slices": 6, "seed": 0, "sites": ["A", "B", "C"]}
MODEL = {**desam_preset("tiny"), "image_size": 128}  # logits 32 x 32


def _workflow(configs, workflow_type, check=True, **overrides):
    return run_bundle_workflow(BUNDLE, configs, workflow_type, check, **overrides)


def _tiny(root: Path, ckpt: str) -> dict:
    return {
        "bundle_root": str(root),
        "sam_checkpoint": ckpt,
        "model_config": MODEL,
        "phantom": PHANTOM,
        "batch_size": 4,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sam_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("prostate")
    _workflow(["train.json"], "train", max_epochs=1, **_tiny(root, tiny_sam_checkpoint))
    return root


def test_training_from_the_cache_writes_a_desam_checkpoint_and_mlflow_metrics(
    trained, tiny_sam_checkpoint
):
    model, meta = load_trained(trained / "models" / "model.pt", kind="desam")
    assert meta["epoch"] == 1 and "val_dice" in meta and meta["train_sites"] == ["A"]
    assert model.mask_size == 32 and (trained / "models" / "last.pt").is_file()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained / 'eval' / 'mlruns.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "sam3d_prostate"]
    (run,) = client.search_runs([exp.experiment_id])
    # train_dice: train#postprocessing (the logits thresholded) feeds a training metric
    assert {"train_loss", "train_dice", "val_dice"} <= set(run.data.metrics)
    assert 0.0 <= run.data.metrics["train_dice"] <= 1.0
    assert run.data.params["train_sites"] == "A" and float(run.data.params["cache_mib"]) > 0
    # the caches are reused as they are: a second build computes nothing
    cases = prostate_datalist(trained / "data" / "prostate", "validation", ["A"], phantom=PHANTOM)
    from sam3d.models.planar.desam import build_desam

    net = build_desam(sam_checkpoint=tiny_sam_checkpoint, **MODEL)
    again = cached_slices(net, cases, cache_dir_for(trained / "cache", "validation", MODEL),
                          progress=False)  # fmt: skip
    assert again.report.computed == 0 and again.report.reused == len(again) > 0


def test_leave_sites_out_evaluation_writes_per_case_and_per_site_dice(trained, tiny_sam_checkpoint):
    _workflow(
        ["train.json", "evaluate.json"], "eval", check=False,
        grid={"n_per_side": 3, "iou_threshold": 0.0, "min_region_px": 1000},
        **_tiny(trained, tiny_sam_checkpoint),
    )  # fmt: skip
    rows = list(csv.DictReader((trained / "eval" / "metrics_per_case.csv").open()))
    assert len(rows) == 6 and {r["site"] for r in rows} == {"B", "C"}  # never site A
    sites = {
        r["site"]: r for r in csv.DictReader((trained / "eval" / "metrics_per_site.csv").open())
    }
    assert set(sites) == {"B", "C", "all"} and sites["all"]["n"] == "6"
    for s in ("B", "C"):
        mean = np.mean([float(r["dice"]) for r in rows if r["site"] == s])
        assert float(sites[s]["dice_mean"]) == pytest.approx(mean, abs=1e-6)

    # inference on one test volume writes a mask whose 3D Dice (over the ground-truth
    # slices) is the evaluation's: the two paths agree
    case = next(c for c in load_cases(trained / "data" / "prostate") if c["site"] == "B")
    out = trained / "eval" / "inference"
    _workflow(
        ["inference.json"], "infer", bundle_root=str(trained),
        input_files=[case["image"]], output_dir=str(out),
        grid={"n_per_side": 3, "iou_threshold": 0.0, "min_region_px": 1000},
    )  # fmt: skip
    stem = Path(case["image"]).name.removesuffix(".nii.gz")
    mask_img = nib.load(out / f"{stem}_mask.nii.gz")
    src = nib.load(case["image"])
    assert mask_img.shape == src.shape and np.allclose(mask_img.affine, src.affine)
    mask = np.asarray(mask_img.dataobj)
    gt = np.asarray(nib.load(case["label"]).dataobj) > 0
    ks = np.flatnonzero(gt.any(axis=(0, 1)))
    (row,) = [r for r in rows if r["case"] == stem]
    assert float(row["dice"]) == pytest.approx(dice_3d(mask[:, :, ks], gt[:, :, ks]), abs=1e-6)
    # and its count of ground-truth slices left empty is the written mask's
    assert int(row["gt_slices"]) == len(ks)
    assert int(row["empty_slices"]) == int((~mask[:, :, ks].any(axis=(0, 1))).sum())


def test_evaluation_counts_and_warns_about_ground_truth_slices_left_empty(
    trained, tmp_path, caplog
):
    class Nothing(torch.nn.Module):  # a network that never finds anything
        img_size, mask_size = 64, 16

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def segment(self, images, mode="grid", **_):
            return torch.zeros(len(images), self.mask_size, self.mask_size, dtype=torch.bool)

    cases = prostate_datalist(trained / "data" / "prostate", "test", ["A"], phantom=PHANTOM)[:2]
    n_gt = 0
    for c in cases:
        gt = np.asarray(nib.load(c["label"]).dataobj) > 0
        n_gt += int(gt.any(axis=(0, 1)).sum())
    with caplog.at_level("WARNING"):
        out = evaluate_cases(Nothing(), cases, tmp_path, "grid", iou_threshold=0.5)
    assert out["gt_slices"] == out["empty_slices"] == n_gt > 0 and out["test_dice"] == 0.0
    assert "no candidate passed iou_threshold 0.5" in caplog.text


def test_a_2d_or_4d_nifti_gets_one_clear_message_and_nothing_is_written(
    tmp_path, tiny_sam_checkpoint
):
    from sam3d.models.planar.desam import build_desam

    net = build_desam(sam_checkpoint=tiny_sam_checkpoint, **MODEL)
    for name, shape, words in (("four.nii.gz", (8, 8, 4, 3), "3 channels or time points"),
                               ("flat.nii.gz", (8, 8), "2D image")):  # fmt: skip
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), tmp_path / name)
        with pytest.raises(Sam3DError, match=words):
            segment_files(net, [tmp_path / name], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- glue


def test_splits_leave_sites_out_and_validation_comes_from_training_sites(tmp_path):
    d = tmp_path / "data"
    parts = {
        s: prostate_datalist(d, s, ["A", "B"], phantom=PHANTOM)
        for s in ("training", "validation", "test")
    }
    assert {c["site"] for c in parts["training"] + parts["validation"]} == {"A", "B"}
    assert {c["site"] for c in parts["test"]} == {"C"} and len(parts["test"]) == 3
    names = [c["image"] for p in parts.values() for c in p]
    assert len(names) == len(set(names)) == 9  # disjoint, every case used once
    assert len(parts["validation"]) == 2  # 25 % of the six training-site cases
    with pytest.raises(Sam3DError, match="both trained and tested"):
        prostate_datalist(d, "test", ["A"], ["A", "B"], phantom=PHANTOM)
    with pytest.raises(Sam3DError, match="not in"):
        prostate_datalist(d, "test", ["Z"], phantom=PHANTOM)


def test_volume_to_uint8_clips_at_the_percentiles():
    v = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    u = volume_to_uint8(v)
    lo, hi = np.percentile(v, (0.5, 99.5))
    assert u.dtype == np.uint8 and u.min() == 0 and u.max() == 255
    k = 500
    assert int(u.flat[k]) == int(np.rint((k - lo) / (hi - lo) * 255))


def test_dice_3d_is_the_plain_binary_dice_and_one_when_both_are_empty():
    pred = np.zeros((4, 5, 3), np.uint8)
    gt = np.zeros((4, 5, 3), bool)
    assert dice_3d(pred, gt) == 1.0  # the bundle's convention (compute_dice: NaN)
    pred[0, 0, 0] = pred[1, 1, 1] = pred[2, 2, 2] = 1  # |P| = 3
    assert dice_3d(pred, gt) == 0.0
    gt[1, 1, 1] = gt[2, 2, 2] = gt[3, 3, 2] = gt[3, 4, 2] = True  # |G| = 4, |P & G| = 2
    assert dice_3d(pred, gt) == pytest.approx(2 * 2 / (3 + 4), abs=1e-15)
    assert dice_3d(pred * 2, gt.astype(np.int16) * 7) == dice_3d(pred, gt)  # nonzero = foreground
    assert dice_3d(pred[:, :, 2], gt[:, :, 2]) == pytest.approx(2 * 1 / (1 + 3))  # any shape


# --------------------------------------------------------------------------- phantoms


def test_prostate_phantoms_are_seeded_and_sites_shift_the_domain(tmp_path):
    a1, a2 = make_prostate_phantom(3, "A", 48, 6), make_prostate_phantom(3, "A", 48, 6)
    assert np.array_equal(a1.image, a2.image) and np.array_equal(a1.label, a2.label)
    assert a1.label.any() and a1.spacing_mm[0] == pytest.approx(SITES["A"]["fov_mm"] / 48)
    f = make_prostate_phantom(3, "F", 48, 6)
    c = make_prostate_phantom(3, "C", 48, 6)
    # background noise (outside the body, corner of the slice) relative to the scale
    noise = lambda p, s: p.image[:4, :4].std() / SITES[s]["scale"]  # noqa: E731
    assert noise(f, "F") > 2 * noise(a1, "A")

    # site C: fat darker than the gland (another contrast), site A: the reverse
    def fat_vs_gland(p):
        fat = (volume_to_uint8(p.image) > 0) & ~p.label.astype(bool)
        return np.median(p.image[p.label > 0]) / np.percentile(p.image[fat], 90)

    assert fat_vs_gland(c) > fat_vs_gland(a1)
    assert make_prostate_phantom(4, "A", 48, 6).gland_mm != a1.gland_mm  # seeds differ
    png = save_site_preview(tmp_path / "sites.png", seed=1, in_plane_vox=48, n_slices=4)
    assert png.stat().st_size > 10_000
    with pytest.raises(Sam3DError, match="unknown prostate site"):
        make_prostate_phantom(0, "Q")


class _Bright(torch.nn.Module):
    """A stand-in network: each slice's mask is where its pixels are brighter than its
    mean (so masks depend on the slice); records how many slices it segmented."""

    img_size, mask_size = 32, 16

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = 0

    def segment(self, images, mode="grid", **_):
        self.seen += len(images)
        x = torch.as_tensor(images).float().mean(1)
        x = torch.nn.functional.interpolate(x[:, None], (self.mask_size,) * 2)[:, 0]
        return x > x.mean(dim=(1, 2), keepdim=True)


def test_evaluation_segments_only_the_slices_it_scores_with_the_same_masks():
    from sam3d.apps.prostate import segment_volume

    vol = np.random.default_rng(0).gamma(2.0, 50.0, (24, 20, 9)).astype(np.float32)
    ks = np.array([2, 3, 7])
    net = _Bright()
    whole = segment_volume(net, vol)
    assert net.seen == 9
    net.seen = 0
    part = segment_volume(net, vol, slices=ks)
    assert net.seen == 3  # six slices fewer to segment
    np.testing.assert_array_equal(part, whole[:, :, ks])  # same intensities (whole-volume clip)
    assert whole[:, :, ks].any()
    assert segment_volume(net, vol, slices=[]).shape == (24, 20, 0)


def test_inference_warns_when_a_mask_is_empty(tmp_path, caplog):
    class Nothing(_Bright):
        def segment(self, images, mode="grid", **_):
            return torch.zeros(len(images), self.mask_size, self.mask_size, dtype=torch.bool)

    vol = np.random.default_rng(1).gamma(2.0, 50.0, (24, 20, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "case.nii.gz")
    with caplog.at_level("WARNING"):
        (path,) = segment_files(Nothing(), [tmp_path / "case.nii.gz"], tmp_path / "out")
    assert np.asarray(nib.load(path).dataobj).sum() == 0
    assert "the mask of" in caplog.text and "is empty" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        segment_files(_Bright(), [tmp_path / "case.nii.gz"], tmp_path / "out2")
    assert "is empty" not in caplog.text

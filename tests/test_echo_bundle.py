"""The echo (SAMUS) bundle end to end on the CPU (tiny SAM, a few small phantoms), its glue,
and ``sam3d segment-2d``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from sam3d.apps.echo import (
    BoundedHD95Metric,
    StructuresToLabeld,
    echo_datalist,
    inference_datalist,
)
from sam3d.cli import main
from sam3d.data.clicks import StructureClicksd
from sam3d.data.planar import ClassMaskd, ToUnitGreyd
from sam3d.errors import Sam3DError
from sam3d.metrics import compute_hd95
from sam3d.models.checkpoint import load_trained
from tests.conftest import run_bundle_workflow

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "echo"
PHANTOM_HW = (96, 80)  # non-square: catches any H/W swap between image, logits and metrics
CLASSES = ("lv", "myo", "la")


def _workflow(configs, workflow_type, check=True, **overrides):
    return run_bundle_workflow(BUNDLE, configs, workflow_type, check, **overrides)


def _tiny(root: Path, ckpt: str) -> dict:
    return {
        "bundle_root": str(root),
        "sam_checkpoint": ckpt,
        "model_preset": "tiny",
        "phantom_cases": 5,  # 3 training, 1 validation, 1 test
        "phantom_size": list(PHANTOM_HW),
        "num_workers": 0,
        "batch_size": 2,  # batch > 1: the seed trains with 8
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sam_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("echo")
    _workflow(["train.json"], "train", max_epochs=1, **_tiny(root, tiny_sam_checkpoint))
    return root


def test_training_writes_checkpoints_phantoms_and_mlflow_metrics(trained):
    assert (trained / "data" / "echo" / "dataset.json").is_file()  # generated phantoms
    assert (trained / "data" / "echo" / "preview.png").is_file()
    model, meta = load_trained(trained / "models" / "model.pt", kind="samus")
    assert meta["epoch"] == 1 and "val_dice" in meta and meta["class_names"] == list(CLASSES)
    assert model.img_size == 128  # the tiny preset
    assert (trained / "models" / "last.pt").is_file()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained / 'eval' / 'mlruns.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "sam3d_echo"]
    (run,) = client.search_runs([exp.experiment_id])
    for key in ("train_loss", "val_dice", "val_iou", "val_hd95", "val_dice_lv", "val_hd95_la"):
        assert key in run.data.metrics, key
    assert run.data.params["hd95_unit"] == "mm"  # the phantoms' index gives the pixel size
    assert run.data.params["bce_pos_weight"] == "2.0"


def _test_case(root: Path) -> dict:
    (case,) = echo_datalist(root / "data" / "echo", "test")
    return case


def test_evaluation_per_structure_at_native_size_in_mm(trained, tiny_sam_checkpoint):
    _workflow(
        ["train.json", "evaluate.json"],
        "eval",
        run_name="eval",
        **_tiny(trained, tiny_sam_checkpoint),
    )
    case = _test_case(trained)
    label = np.asarray(Image.open(case["label"]))
    assert label.shape == PHANTOM_HW
    rows = list(csv.DictReader((trained / "eval" / "metrics_per_case.csv").open()))
    assert [r["case"] for r in rows] == [Path(case["image"]).name]
    # recompute every structure's Dice and HD95 from the model itself, independently of
    # the bundle's transforms: native-size image, interior clicks, spacing from the index
    model, _ = load_trained(trained / "models" / "model.pt", kind="samus")
    image = torch.from_numpy(np.asarray(Image.open(case["image"])) / 255.0).float()
    onehot = np.stack([label == c for c in (1, 2, 3)]).astype(np.float32)
    clicks = StructureClicksd("label")({"label": onehot})
    with torch.no_grad():
        logits = model(image[None, None], clicks["points"][None], clicks["point_labels"][None])
    pred = (torch.sigmoid(logits[0]) > 0.5).numpy()
    assert pred.shape == (3, *PHANTOM_HW)
    spacing = case["spacing_mm"]
    diagonal = float(np.hypot(PHANTOM_HW[0] * spacing[0], PHANTOM_HW[1] * spacing[1]))
    dices = []
    for c, name in enumerate(CLASSES):
        p, g = pred[c], onehot[c] > 0
        dice = 2 * (p & g).sum() / (p.sum() + g.sum())
        dices.append(dice)
        assert float(rows[0][f"test_dice_{name}"]) == pytest.approx(dice, abs=1e-5)
        hd = float(compute_hd95(torch.from_numpy(p), torch.from_numpy(g), spacing))
        hd = diagonal if np.isinf(hd) else hd
        assert float(rows[0][f"test_hd95_{name}"]) == pytest.approx(hd, rel=1e-4)
    assert float(rows[0]["test_dice"]) == pytest.approx(np.mean(dices), abs=1e-5)
    assert not any(k.startswith("val_") for k in rows[0])  # named after the test split
    # the saved prediction is a native-size class-id map
    png = Image.open(trained / "eval" / "pred" / (Path(case["image"]).stem + "_pred.png"))
    saved = np.asarray(png)
    assert saved.shape == PHANTOM_HW and set(np.unique(saved)) <= {0, 1, 2, 3}
    # viewable: a palette PNG, each structure a bright colour, the values still class ids
    assert png.mode == "P"
    rgb = np.asarray(png.convert("RGB"))
    from sam3d.data.planar import LABEL_COLOURS

    assert set(np.unique(saved)) - {0}, "no structure predicted: nothing to check"
    for c in set(np.unique(saved)) - {0}:
        assert (rgb[saved == c] == LABEL_COLOURS[c]).all() and max(LABEL_COLOURS[c]) >= 128

    # the two-click protocol runs the same evaluation with a refinement click
    out2 = trained / "eval2"
    _workflow(
        ["train.json", "evaluate.json"], "eval", two_clicks=True, mlflow_enabled=False,
        output_dir=str(out2), **_tiny(trained, tiny_sam_checkpoint),
    )  # fmt: skip
    rows2 = list(csv.DictReader((out2 / "metrics_per_case.csv").open()))
    assert rows2[0]["case"] == rows[0]["case"] and "test_dice_la" in rows2[0]


def test_inference_from_a_users_click(trained):
    case = _test_case(trained)
    out = trained / "eval" / "inference"
    label = np.asarray(Image.open(case["label"]))
    r, c = np.argwhere(label == 1).mean(0).round().astype(int)
    _workflow(
        ["inference.json"], "infer", bundle_root=str(trained), output_dir=str(out),
        input_dict={"image": case["image"], "points": [[int(c), int(r)]], "point_labels": [1]},
    )  # fmt: skip
    mask = np.asarray(Image.open(out / (Path(case["image"]).stem + "_mask.png")))
    assert mask.shape == PHANTOM_HW and set(np.unique(mask)) <= {0, 1}  # one prompt: one id
    with pytest.raises(Sam3DError, match="needs 'points'"):
        inference_datalist({"image": case["image"]}, trained)


# --------------------------------------------------------------------------- segment-2d


def test_segment_2d_writes_mask_and_preview(trained, tmp_path, capsys):
    case = _test_case(trained)
    out, preview = tmp_path / "o" / "mask.png", tmp_path / "o" / "overlay.png"
    ckpt = str(trained / "models" / "model.pt")
    argv = [case["image"], "--click", "40,50", "--negative", "5,90", "--checkpoint", ckpt]
    rc = main(["segment-2d", *argv, "--out", str(out), "--preview", str(preview)])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    mask = np.asarray(Image.open(out))
    assert mask.shape == PHANTOM_HW and set(np.unique(mask)) <= {0, 255}
    assert preview.is_file()
    # the same as the model called by hand with the click (x=40, y=50) -> (row 50, col 40)
    model, _ = load_trained(ckpt, kind="samus")
    image = torch.from_numpy(np.asarray(Image.open(case["image"])) / 255.0).float()
    pts = torch.tensor([[[[50.0, 40.0], [90.0, 5.0]]]])
    with torch.no_grad():
        logits = model(image[None, None], pts, torch.tensor([[[1, 0]]]))
    assert np.array_equal(mask > 0, (torch.sigmoid(logits[0, 0]) > 0.5).numpy())


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize(
    "what, make, args, message",
    [
        ("rgba", lambda p: _png(p, np.zeros((20, 20, 4), np.uint8)), ["--click", "3,3"], "alpha"),
        ("16-bit", lambda p: _png(p, np.zeros((20, 20), np.uint16)), ["--click", "3,3"], "8-bit"),
        (
            "outside",
            lambda p: _png(p, np.zeros((20, 30), np.uint8)),
            ["--click", "30,5"],
            "outside",
        ),
        ("no click", lambda p: _png(p, np.zeros((20, 20), np.uint8)), [], "at least one"),
    ],
)
def test_segment_2d_refuses_bad_inputs_with_one_line(
    trained, tmp_path, capsys, what, make, args, message
):
    image = make(tmp_path / f"{what}.png")
    out = tmp_path / "mask.png"
    ckpt = str(trained / "models" / "model.pt")
    rc = main(["segment-2d", str(image), *args, "--checkpoint", ckpt, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_segment_2d_refuses_a_checkpoint_of_another_kind(
    tmp_path, capsys, trained_tiny_sam3d_checkpoint
):
    image = _png(tmp_path / "g.png", np.zeros((20, 20), np.uint8))
    out = tmp_path / "mask.png"
    argv = ["segment-2d", str(image), "--click", "3,3", "--checkpoint"]
    rc = main([*argv, trained_tiny_sam3d_checkpoint, "--out", str(out)])
    assert rc == 2 and "sam3d model" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------- the glue


def test_image_and_mask_transforms_refuse_what_they_cannot_read():
    grey = MetaTensor(torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8))
    out = ToUnitGreyd("image")({"image": grey})["image"]
    assert out.shape == (1, 2, 2) and torch.allclose(out[0], torch.tensor([[0, 1], [0.2, 0.4]]))
    rgb = torch.stack([torch.full((2, 2), 30), torch.full((2, 2), 60), torch.full((2, 2), 90)])
    assert torch.allclose(
        ToUnitGreyd("image")({"image": rgb.to(torch.uint8)})["image"], torch.tensor(60 / 255)
    )
    with pytest.raises(Sam3DError, match="alpha"):
        ToUnitGreyd("image")({"image": torch.zeros(4, 2, 2, dtype=torch.uint8)})
    with pytest.raises(Sam3DError, match="8-bit"):
        ToUnitGreyd("image")({"image": torch.zeros(1, 2, 2, dtype=torch.int32)})

    ids = torch.tensor([[[0, 1], [2, 3]]], dtype=torch.uint8)
    onehot = ClassMaskd("label", 3)({"label": ids})["label"]
    assert onehot.shape == (3, 2, 2) and onehot[:, 1, 1].tolist() == [0, 0, 1]
    assert onehot.sum(0).tolist() == [[0, 1], [1, 1]]
    binary = torch.tensor([[[0, 255], [255, 0]]], dtype=torch.uint8)  # BUSI / TN3K masks
    assert ClassMaskd("label", 1)({"label": binary})["label"].tolist() == [[[0, 1], [1, 0]]]
    grey_ids = torch.tensor([[[0, 85], [170, 255]]], dtype=torch.uint8)
    mapped = ClassMaskd("label", 3, values=[0, 85, 170, 255])({"label": grey_ids})["label"]
    assert torch.equal(mapped, onehot)
    with pytest.raises(Sam3DError, match=r"class ids \[7\] outside"):
        ClassMaskd("label", 3)({"label": torch.tensor([[[0, 7]]])})
    with pytest.raises(Sam3DError, match=r"class ids \[85, 170, 255\]"):
        ClassMaskd("label", 3)({"label": grey_ids})


def test_label_map_and_bounded_hd95():
    probs = torch.tensor([[[0.9, 0.2]], [[0.95, 0.1]], [[0.1, 0.3]]])  # K=3 x 1 x 2
    assert StructuresToLabeld("pred")({"pred": probs})["pred"].tolist() == [[[2, 0]]]
    gt = torch.zeros(1, 2, 10, 20)
    gt[:, :, 2:5, 2:5] = 1
    pred = gt.clone()
    pred[0, 1] = 0  # structure 2 missed: scores the diagonal, in mm
    m = BoundedHD95Metric(include_background=True, spacing_mm=[0.5, 2.0])
    values = m(pred, gt)
    assert values[0, 0] == 0 and values[0, 1] == pytest.approx(np.hypot(5.0, 40.0))


def test_datalist_spacing_all_or_none(tmp_path):
    for n in "abcd":
        _png(tmp_path / "images" / f"{n}.png", np.zeros((8, 8), np.uint8))
        _png(tmp_path / "masks" / f"{n}.png", np.zeros((8, 8), np.uint8))
    cases = echo_datalist(tmp_path, "training")
    assert cases and all("spacing_mm" not in c for c in cases)
    given = echo_datalist(tmp_path, "training", spacing_mm=[0.3, 0.3])
    assert all(c["spacing_mm"] == [0.3, 0.3] for c in given)

    def entry(n: str, spacing: bool) -> dict:
        e = {"image": f"images/{n}.png", "label": f"masks/{n}.png"}
        return {**e, "spacing_mm": [1.0, 1.0]} if spacing else e

    index = {
        "training": [entry("a", True), entry("b", False)],
        "validation": [entry("c", True)],
        "test": [entry("d", True)],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(index))
    assert echo_datalist(tmp_path, "test")[0]["spacing_mm"] == [1.0, 1.0]  # kept from the index
    with pytest.raises(Sam3DError, match="1 of 2 training cases"):
        echo_datalist(tmp_path, "training")

"""The retina bundle end to end on the CPU (tiny SAM, a few small phantoms), and its glue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam3d.apps.retina import retina_datalist
from sam3d.data.planar import BinarizeMaskd, ToSamRGBd
from sam3d.data.planar import find_image_mask_dataset as find_retina_dataset
from sam3d.engine import GradientClipping as GradientClipHandler
from sam3d.errors import Sam3DError
from sam3d.models.checkpoint import load_trained
from tests.conftest import run_bundle_workflow

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "retina"
PHANTOM_HW = (96, 80)  # non-square: catches any H/W swap between image, logits and metrics


def _workflow(configs, workflow_type, check=True, **overrides):
    return run_bundle_workflow(BUNDLE, configs, workflow_type, check, **overrides)


def _tiny(root: Path, ckpt: str) -> dict:
    return {
        "bundle_root": str(root),
        "sam_checkpoint": ckpt,
        "model_config#sam": "tiny",
        "model_config#image_size": 256,  # SAM's 1024 works too; 256 keeps the CPU run short
        "phantom_cases": 5,  # 3 training, 1 validation, 1 test
        "phantom_size": list(PHANTOM_HW),
        "num_workers": 0,
        "accumulation_steps": 2,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sam_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("retina")
    _workflow(["train.json"], "train", max_epochs=1, **_tiny(root, tiny_sam_checkpoint))
    return root


def test_training_writes_checkpoints_phantoms_and_mlflow_metrics(trained):
    assert (trained / "data" / "vessels" / "dataset.json").is_file()  # generated phantoms
    assert (trained / "models" / "model.pt").is_file() and (
        trained / "models" / "last.pt"
    ).is_file()
    model, meta = load_trained(trained / "models" / "model.pt", kind="topolora")
    assert meta["epoch"] == 1 and "val_dice" in meta
    assert model.img_size == 256 and model.parameter_counts()["lora"] > 0
    # the adapter and decoder have moved away from their initial values: training happened
    assert model.adapter.up.weight.abs().sum() > 0

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained / 'eval' / 'mlruns.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "sam3d_retina"]
    (run,) = client.search_runs([exp.experiment_id])
    for key in ("val_dice", "val_iou", "val_cldice", "val_bfscore", "val_ece", "train_loss"):
        assert key in run.data.metrics, key
    assert run.data.params["lambda_cldice"] == "0.5"


def test_evaluation_metrics_are_computed_at_native_size(trained, tiny_sam_checkpoint):
    _workflow(
        ["train.json", "evaluate.json"],
        "eval",
        run_name="eval",
        # evaluate builds the network the checkpoint says it was trained as (tiny SAM, 256)
        **{k: v for k, v in _tiny(trained, tiny_sam_checkpoint).items() if "model_config" not in k},
    )
    (case,) = retina_datalist(trained / "data" / "vessels", "test")
    pred_png = trained / "eval" / "pred" / (Path(case["image"]).stem + "_pred.png")
    pred = np.asarray(Image.open(pred_png)) > 127
    label = np.asarray(Image.open(case["label"])) > 0
    assert pred.shape == label.shape == PHANTOM_HW  # the saved prediction has the image's size
    # the bundle's Dice equals Dice recomputed from the saved native-size mask
    dice = 2 * (pred & label).sum() / (pred.sum() + label.sum())
    rows = dict(
        line.split(",") for line in (trained / "eval" / "metrics.csv").read_text().splitlines()
    )
    assert float(rows["val_dice"]) == pytest.approx(dice, abs=1e-6)  # pooled over the test set
    assert float(rows["val_mean_dice"]) == pytest.approx(dice, abs=1e-6)  # mean over images
    for key in ("val_iou", "val_cldice", "val_bfscore", "val_ece"):
        assert key in rows


def test_inference_writes_native_size_masks(trained):
    out = trained / "eval" / "inference"
    _workflow(["inference.json"], "infer", bundle_root=str(trained), output_dir=str(out))
    (case,) = retina_datalist(trained / "data" / "vessels", "test")
    mask = np.asarray(Image.open(out / (Path(case["image"]).stem + "_mask.png")))
    assert mask.shape == PHANTOM_HW and set(np.unique(mask)) <= {0, 255}


# --------------------------------------------------------------------------- the glue


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_mask_folders_pair_by_stem_with_dataset_suffixes(tmp_path):
    rgb = np.zeros((8, 6, 3), np.uint8)
    mask = np.zeros((8, 6), np.uint8)
    # DRIVE, CHASE_DB1 and Kvasir-SEG naming in one folder pair
    for img, msk in [
        ("21_training.png", "21_manual1.png"),
        ("Image_01L.png", "Image_01L_1stHO.png"),
        ("cju0qkwl35piu.png", "cju0qkwl35piu.png"),
        ("im0001.png", "im0001.ah.png"),
        ("33_training.png", "33_manual1.png"),
    ]:
        _png(tmp_path / "images" / img, rgb)
        _png(tmp_path / "masks" / msk, mask)
    splits = find_retina_dataset(tmp_path)
    pairs = [p for s in ("training", "validation", "test") for p in splits[s]]
    assert len(pairs) == 5 and len(splits["validation"]) == len(splits["test"]) == 1
    names = {(Path(p["image"]).name, Path(p["label"]).name) for p in pairs}
    assert ("21_training.png", "21_manual1.png") in names
    assert ("Image_01L.png", "Image_01L_1stHO.png") in names
    assert ("im0001.png", "im0001.ah.png") in names
    assert find_retina_dataset(tmp_path, seed=0) == splits  # deterministic split

    (tmp_path / "masks" / "33_manual1.png").unlink()
    with pytest.raises(Sam3DError, match="no mask"):
        find_retina_dataset(tmp_path)


def test_split_folders_and_unknown_layouts(tmp_path):
    # DRIVE's layout: train/ and test/ only. Validation is carved from train/, never test/.
    for split, names in (("train", "abc"), ("test", "d")):
        for n in names:
            _png(tmp_path / split / "images" / f"{n}.png", np.zeros((4, 4, 3), np.uint8))
            _png(tmp_path / split / "labels" / f"{n}.png", np.zeros((4, 4), np.uint8))
    splits = find_retina_dataset(tmp_path)
    assert [c["image"].rsplit("/", 1)[-1] for c in splits["test"]] == ["d.png"]
    assert all("/train/" in c["image"] for c in splits["training"] + splits["validation"])
    assert len(splits["validation"]) == 1 and len(splits["training"]) == 2
    assert not {c["image"] for c in splits["validation"]} & {c["image"] for c in splits["test"]}
    for n in "bc":
        (tmp_path / "train" / "images" / f"{n}.png").unlink()
        (tmp_path / "train" / "labels" / f"{n}.png").unlink()
    assert find_retina_dataset(tmp_path)["validation"] == []  # one training case: none to carve
    with pytest.raises(Sam3DError, match="validation split .* is empty"):
        retina_datalist(tmp_path, "validation")
    other = tmp_path / "other"
    _png(other / "random.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(Sam3DError, match="no dataset found"):
        retina_datalist(other)
    with pytest.raises(Sam3DError, match="split must be"):
        retina_datalist(other, "val")


def test_rgb_and_mask_transforms():
    grey = torch.tensor([[[0, 128], [255, 7]]], dtype=torch.uint8)
    out = ToSamRGBd("image")({"image": grey})["image"]
    assert out.shape == (3, 2, 2) and out.dtype == torch.float32
    assert torch.equal(out[2], grey[0].float())
    rgba = torch.ones(4, 2, 2)  # float in [0, 1] with an alpha channel
    out = ToSamRGBd("image")({"image": rgba})["image"]
    assert out.shape == (3, 2, 2) and out.max() == 255.0
    jpeg_mask = torch.tensor([[[0, 250, 3], [130, 90, 255]]]).repeat(3, 1, 1)
    m = BinarizeMaskd("label")({"label": jpeg_mask})["label"]
    assert m.shape == (1, 2, 3) and m.tolist() == [[[0, 1, 0], [1, 0, 1]]]
    assert BinarizeMaskd("label")({"label": torch.zeros(1, 2, 2)})["label"].sum() == 0
    with pytest.raises(Sam3DError, match="channels"):
        ToSamRGBd("image")({"image": torch.zeros(2, 2, 2)})


def test_gradient_clipping_respects_accumulation():
    class Engine:  # the attributes of a SupervisedTrainer the handler reads
        amp, scaler, accumulation_steps = False, None, 3

        class state:  # noqa: N801
            epoch_length, iteration = 7, 1

    p = torch.nn.Parameter(torch.zeros(4))
    engine = Engine()
    engine.optimizer = torch.optim.SGD([p], lr=1.0)
    steps = []
    for it in range(1, 8):  # MONAI steps after iterations 3, 6 and the epoch's last, 7
        engine.state.iteration = it
        p.grad = torch.full((4,), 10.0)
        GradientClipHandler(max_norm=1.0)(engine)
        steps.append(bool(torch.isclose(p.grad.norm(), torch.tensor(1.0))))
    assert steps == [False, False, True, False, False, True, True]

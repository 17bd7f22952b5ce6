"""Engine glue: datasets and splits, click-centred inference, clipping, checkpoints, MLflow."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam3d import engine
from sam3d.apps import kits
from sam3d.errors import Sam3DError

SMALL = {"shape_vox": [48, 48, 32], "spacing_mm": [1.5, 1.5, 2.0], "n_lesions": 1}


def _nifti(path: Path, shape=(4, 4, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.int16), np.eye(4)), str(path))


# ------------------------------------------------------------------------ datasets


def test_ensure_dataset_generates_phantoms_once_and_refuses_foreign_folders(tmp_path, caplog):
    root = tmp_path / "data"
    with caplog.at_level("WARNING", logger="sam3d.engine"):
        assert kits.ensure_dataset(root, n_cases=3, seed=1, phantom_kwargs=SMALL) == "msd"
    assert "generating 3 synthetic CT phantoms" in caplog.text
    spec = root / "dataset.json"
    stamp = spec.stat().st_mtime_ns
    assert kits.ensure_dataset(root, n_cases=3, seed=1, phantom_kwargs=SMALL) == "msd"
    assert spec.stat().st_mtime_ns == stamp  # not regenerated
    # deterministic: the same seed writes the same volumes
    other = tmp_path / "again"
    kits.ensure_dataset(other, n_cases=3, seed=1, phantom_kwargs=SMALL)
    first = json.loads(spec.read_text())["training"][0]["image"]
    a, b = nib.load(root / first).get_fdata(), nib.load(other / first).get_fdata()
    assert np.array_equal(a, b)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(Sam3DError, match="neither an MSD-style dataset.json"):
        kits.ensure_dataset(foreign)


def test_datalist_uses_the_msd_splits_it_is_given(tmp_path):
    for name in ("a", "b", "c", "d"):
        _nifti(tmp_path / "imagesTr" / f"{name}.nii.gz")
        _nifti(tmp_path / "labelsTr" / f"{name}.nii.gz")
    entry = {
        n: {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in "abcd"
    }
    spec = {"training": [entry["a"], entry["b"]], "validation": [entry["c"]], "test": [entry["d"]]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    val = kits.load_datalist(tmp_path, "validation")
    assert val == [
        {
            "image": str(tmp_path / "imagesTr" / "c.nii.gz"),
            "label": str(tmp_path / "labelsTr" / "c.nii.gz"),
        }
    ]
    assert [Path(d["image"]).name for d in kits.load_datalist(tmp_path, "test")] == ["d.nii.gz"]
    with pytest.raises(Sam3DError, match="unknown split"):
        kits.load_datalist(tmp_path, "train")
    (tmp_path / "imagesTr" / "a.nii.gz").unlink()
    with pytest.raises(Sam3DError, match="missing"):
        kits.load_datalist(tmp_path, "training")


def test_datalist_carves_unlabelled_msd_and_kits21_deterministically(tmp_path):
    # MSD without validation/test labels (the real decathlon layout): carved from training
    msd = tmp_path / "msd"
    entries = []
    for i in range(10):
        _nifti(msd / "imagesTr" / f"c{i}.nii.gz")
        _nifti(msd / "labelsTr" / f"c{i}.nii.gz")
        entries.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (msd / "dataset.json").write_text(
        json.dumps({"training": entries, "test": ["./imagesTs/x.nii.gz"]})
    )
    splits = {
        s: kits.load_datalist(msd, s, 0.2, 0.2, seed=3) for s in ("training", "validation", "test")
    }
    names = {s: {Path(d["image"]).name for d in v} for s, v in splits.items()}
    assert [len(names[s]) for s in ("training", "validation", "test")] == [6, 2, 2]
    assert set.union(*names.values()) == {f"c{i}.nii.gz" for i in range(10)}
    assert not (names["training"] & names["test"]) and not (names["validation"] & names["test"])
    assert splits["test"] == kits.load_datalist(msd, "test", 0.2, 0.2, seed=3)
    assert splits["test"] != kits.load_datalist(msd, "test", 0.2, 0.2, seed=4)
    # KiTS21 case folders
    k21 = tmp_path / "kits21"
    for i in range(5):
        _nifti(k21 / f"case_{i:05d}" / "imaging.nii.gz")
        _nifti(k21 / f"case_{i:05d}" / "aggregated_MAJ_seg.nii.gz")
    assert kits.find_dataset(k21) == "kits21"
    all_cases = [d for s in ("training", "validation", "test") for d in kits.load_datalist(k21, s)]
    assert sorted(Path(d["label"]).parent.name for d in all_cases) == [
        f"case_{i:05d}" for i in range(5)
    ]
    assert all(d["label"].endswith("aggregated_MAJ_seg.nii.gz") for d in all_cases)


# ------------------------------------------------------------------- clicks in engines


class _Echo(torch.nn.Module):
    """Logits [0, image] for the crop it sees; records the clicks it was given."""

    def forward(self, image, points, point_labels):
        self.points, self.point_labels = points.clone(), point_labels.clone()
        return torch.cat([torch.zeros_like(image), image], dim=1)

    def encode(self, image):
        return image.clone()

    def decode(self, features, points, point_labels):
        return self.forward(features, points, point_labels)


def test_click_crop_inferer_pastes_the_click_centred_window_into_the_volume():
    vol = (torch.arange(20 * 24 * 12, dtype=torch.float32).reshape(1, 1, 20, 24, 12) % 7) - 3.0
    net = _Echo()
    inferer = engine.ClickCropInferer(roi_size=8, growth={"enabled": False})
    points = torch.tensor([[[10.0, 5.0, 10.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, -1]])
    out = inferer(vol, net, points=points, point_labels=labels)
    assert out.shape == (1, 2, 20, 24, 12)
    # window: i 6..14 (click at index 4), j 1..9, k 4..12 (shifted inside the volume)
    win = (slice(6, 14), slice(1, 9), slice(4, 12))
    prob = torch.softmax(out[0], dim=0)[1]
    expected = torch.zeros(20, 24, 12)
    expected[win] = torch.sigmoid(vol[0, 0][win])
    torch.testing.assert_close(prob, expected, atol=2e-6, rtol=0)
    assert net.points[0, 0].tolist() == [4.0, 4.0, 6.0]  # click in crop coordinates
    assert net.point_labels.tolist() == [[1]]  # the padding click is not handed on


def test_click_crop_inferer_centres_volumes_smaller_than_the_window():
    vol = torch.rand(2, 1, 5, 9, 6) + 1.0
    out = engine.ClickCropInferer(roi_size=8, growth={"enabled": False})(
        vol, _Echo(), points=torch.tensor([[[2.0, 4.0, 3.0]], [[1.0, 1.0, 1.0]]]),
        point_labels=torch.tensor([[1], [1]]),
    )  # fmt: skip
    assert out.shape == (2, 2, 5, 9, 6)
    prob = torch.softmax(out[0], dim=0)[1]
    # i and k: the volume sits in the middle of the window (all of it seen); j: window 0..8
    torch.testing.assert_close(prob[:, 0:8], torch.sigmoid(vol[0, 0, :, 0:8]))
    assert float(prob[:, 8].max()) < 1e-5


def test_centre_click_network_gives_one_positive_click_at_the_centre():
    net = _Echo()
    out = engine.CentreClickNetwork(net)(torch.rand(2, 1, 8, 8, 6))
    assert out.shape == (2, 2, 8, 8, 6)
    assert net.points.tolist() == [[[3.5, 3.5, 2.5]]] * 2 and net.point_labels.tolist() == [[1]] * 2


def test_gradient_clipping_bounds_the_norm():
    class FakeEngine:
        amp = False
        scaler = None

    lin = torch.nn.Linear(4, 4)
    (lin(torch.ones(1, 4)) * 1000).sum().backward()
    before = torch.nn.utils.get_total_norm([p.grad for p in lin.parameters()])
    eng = FakeEngine()
    eng.optimizer = torch.optim.SGD(lin.parameters(), lr=0.1)
    engine.GradientClipping(max_norm=1.0)(eng)
    after = torch.nn.utils.get_total_norm([p.grad for p in lin.parameters()])
    assert before > 10 and after == pytest.approx(1.0, rel=1e-4)


# --------------------------------------------------------------------- checkpoints


def test_atomic_save_and_resume_state(tmp_path):
    path = tmp_path / "m" / "last.pt"
    engine.atomic_torch_save({"epoch": 2, "max_epochs": 5, "w": torch.ones(2)}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left
    assert engine.read_resume_state(path)["epoch"] == 2
    assert engine.read_resume_state(path, max_epochs=2) is None  # that training is finished
    assert engine.read_resume_state(tmp_path / "none.pt") is None
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(Sam3DError, match="cannot read the resume checkpoint"):
        engine.read_resume_state(path)


def test_supervised_trainer_with_clicks_lowers_the_loss_on_a_fixed_phantom(tmp_path):
    """MONAI's SupervisedTrainer + click_prepare_batch + clipping, the bundle's loss/optimizer."""
    from ignite.engine import Events
    from ignite.metrics import Average
    from monai.data import DataLoader
    from monai.engines import SupervisedTrainer
    from monai.handlers import from_engine
    from monai.losses import DiceCELoss

    from sam3d.data import pipelines
    from sam3d.models import build_sam3d

    kits.ensure_dataset(tmp_path / "d", n_cases=1, seed=2, phantom_kwargs=SMALL)
    case = kits.load_datalist(tmp_path / "d", "training", 0.0, 0.0)[0]
    chain = pipelines.train_transforms(pipelines.load_dataset_preset("kits"), crop_size=32)
    chain.set_random_state(seed=0)
    samples = []
    while len(samples) < 2:  # two fixed crops that hold tumour
        (s,) = chain(case)
        if s["label"].sum() > 20:
            samples.append(s)
    torch.manual_seed(0)
    net = build_sam3d("tiny")
    losses: list[float] = []
    mean_loss = Average(output_transform=from_engine(["loss"], first=True))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=8,
        train_data_loader=DataLoader(samples, batch_size=2, shuffle=False),
        network=net,
        optimizer=torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-3),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True, include_background=False),
        prepare_batch=engine.click_prepare_batch(),
        key_train_metric={"train_loss": mean_loss},
        train_handlers=[engine.GradientClipping(1.0)],
    )  # fmt: skip
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: losses.append(e.state.metrics["train_loss"])
    )
    trainer.run()
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses


# ---------------------------------------------------------------------------- MLflow


def test_mlflow_run_refuses_folders_and_unreachable_servers_quickly(tmp_path):
    with pytest.raises(Sam3DError, match="not usable"):
        engine.MLflowRun(tracking_uri=str(tmp_path / "mlruns"))
    run = engine.MLflowRun(tracking_uri="http://127.0.0.1:9", timeout_s=2)
    start = time.time()
    with pytest.raises(Sam3DError, match="cannot be reached"):
        run.check()
    assert time.time() - start < 10
    with pytest.raises(SystemExit) as exc:
        engine.checked(run.check)
    assert exc.value.code == 2


def test_mlflow_run_reopens_the_run_of_a_resumable_checkpoint(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    first = engine.MLflowRun(
        tracking_uri=uri, experiment_name="e", resume_file=tmp_path / "last.pt"
    )
    run_id = first.check().run_id
    assert first.client.get_experiment_by_name("e").artifact_location.endswith("mlruns")
    engine.atomic_torch_save(
        {"epoch": 1, "max_epochs": 3, "mlflow_run_id": run_id}, tmp_path / "last.pt"
    )
    again = engine.MLflowRun(
        tracking_uri=uri, experiment_name="e", resume_file=tmp_path / "last.pt"
    )
    assert again.run_id == run_id
    finished = engine.MLflowRun(
        tracking_uri=uri, experiment_name="e", resume_file=tmp_path / "last.pt", max_epochs=1
    )
    assert finished.run_id != run_id  # a finished training starts a new run


def test_save_executed_config_writes_the_parsed_config_with_overrides(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "imports": ["$import sam3d", "$import sam3d.engine"],
            "lr": 0.1,
            "out": str(tmp_path / "cfg.json"),
            "save": "$sam3d.engine.save_executed_config(@out)",
        }
    )
    parser["lr"] = 0.5  # a command-line override
    assert parser.get_parsed_content("save") == str(tmp_path / "cfg.json")
    saved = json.loads((tmp_path / "cfg.json").read_text())
    assert saved["lr"] == 0.5 and saved["save"].startswith("$sam3d.engine.save_executed_config")
    with pytest.raises(RuntimeError, match="bundle config expression"):
        engine.save_executed_config(tmp_path / "x.json")


def test_write_csv_writes_the_rows_atomically_and_quotes_what_needs_it(tmp_path):
    import csv

    rows = [["case", "note"], ["a,b", 'say "hi"'], ["c", 0.5]]
    path = tmp_path / "out.csv"
    engine.write_csv(path, rows)
    with path.open(newline="") as f:
        assert list(csv.reader(f)) == [[str(v) for v in r] for r in rows]
    engine.write_csv(path, rows[:1])  # replaces, no temporary left behind
    assert path.read_bytes() == b"case,note\r\n" and sorted(tmp_path.iterdir()) == [path]


def test_datalist_carves_only_the_missing_split(tmp_path):
    entries = []
    for i in range(6):
        _nifti(tmp_path / "imagesTr" / f"c{i}.nii.gz")
        _nifti(tmp_path / "labelsTr" / f"c{i}.nii.gz")
        entries.append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
    spec = {"training": entries[:5], "validation": entries[5:]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    names = {
        s: sorted(Path(d["image"]).name for d in kits.load_datalist(tmp_path, s, 0.2, 0.2))
        for s in ("training", "validation", "test")
    }
    assert names["validation"] == ["c5.nii.gz"]
    assert len(names["test"]) == 1 and len(names["training"]) == 4  # only the test is carved
    assert sorted(names["training"] + names["test"]) == [f"c{i}.nii.gz" for i in range(5)]

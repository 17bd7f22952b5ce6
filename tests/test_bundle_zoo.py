"""The MONAI model zoo's offline checks on every in-repo bundle and on exported bundles.

Every folder of ``bundles/`` with a ``metadata.json`` is checked (new bundles too: give
them a tiny network in ``TINY`` so the network check stays fast). The exported kits
bundle runs with ``python -m monai.bundle run --config_file configs/inference.json`` in a
fresh folder and must give ``sam3d segment``'s mask for the same input and click.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam3d.apps.export import export_bundle, load_weights
from sam3d.apps.zoo import check_bundle, failures, readme_sections
from sam3d.errors import Sam3DError
from sam3d.models.planar.desam import desam_preset

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parent.name for p in (REPO / "bundles").glob("*/metadata.json"))
SHAPE = "_meta_#network_data_format#inputs#image#spatial_shape"
# config overrides that make each bundle's network tiny for verify_net_in_out
TINY = {
    "kits": {"preset": "tiny", SHAPE: [32, 32, 32]},
    "retina": {"model_config#sam": "tiny", "model_config#image_size": 64, SHAPE: [48, 40]},
    "echo": {"model_preset": "tiny", SHAPE: [48, 40]},
    # DeSAM takes S x S slices (S = the preset's image_size), logits S/4 x S/4
    "prostate": {"model_config": {**desam_preset("tiny"), "image_size": 64}, SHAPE: [64, 64]},
}


def _assert_pass(checks) -> None:
    bad = failures(checks)
    assert not bad, "\n".join(f"{c.name}: {c.detail}" for c in bad)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_in_repo_bundle_passes_the_offline_zoo_checks(bundle):
    checks = check_bundle(REPO / "bundles" / bundle, overrides=TINY.get(bundle))
    assert {c.name for c in checks} >= {
        "files", "readme", "changelog", "metadata", "pins", "properties", "net_in_out"
    }  # fmt: skip
    _assert_pass(checks)


def test_the_checks_catch_what_the_issue_found(tmp_path):
    """Before this work: no LICENSE, ignite pinned below the declared range, an undeclared
    pin, sam3d-med pinned, no train#key_metric, a README without the template, a
    promptable network_def."""
    bad = tmp_path / "kits"
    shutil.copytree(REPO / "bundles" / "kits", bad)
    (bad / "LICENSE").unlink()
    meta = json.loads((bad / "metadata.json").read_text())
    meta["required_packages_version"].update(
        {"pytorch-ignite": "0.4.13", "sam3d-med": "0.1.0", "requests": "2.32.3"}
    )
    meta["version"] = "9.9.9"
    (bad / "metadata.json").write_text(json.dumps(meta))
    train = json.loads((bad / "train.json").read_text())
    del train["train"]["key_metric"], train["network_io"]
    train["train"]["trainer"]["key_train_metric"] = None
    (bad / "train.json").write_text(json.dumps(train))
    (bad / "docs" / "README.md").write_text("# kits\n\n## Data\n\nphantoms\n")
    got = {c.name: c for c in check_bundle(bad, overrides=TINY["kits"])}
    assert "missing LICENSE" in got["files"].detail
    assert "9.9.9 not in changelog" in got["changelog"].detail
    assert "pytorch-ignite==0.4.13 is outside sam3d-med's declared range" in got["pins"].detail
    assert "requests is pinned but sam3d-med does not declare it" in got["pins"].detail
    assert "sam3d-med is not on the package index" in got["pins"].detail
    assert "train: no train::key_metric" in got["properties"].detail
    assert "'Model Description'" in got["readme"].detail
    assert "points" in got["net_in_out"].detail  # forward() missing 'points'
    assert got["metadata"].ok  # the metadata itself is still valid


def test_readme_sections_accept_the_template_headings():
    text = "# T\n### **Authors**\n## **Model Description**\n#### **Preprocessing**\n"
    missing = readme_sections(text)
    assert "Authors" not in missing and "Preprocessing" not in missing
    assert "Model Description" not in missing and "Performance" in missing


# ---- exported bundles --------------------------------------------------------------


def _kits_run(tmp: Path, checkpoint: str) -> Path:
    """A kits training run: the trained checkpoint with a best-epoch metric, the
    executed config a training saves."""
    obj = torch.load(checkpoint, weights_only=True)
    obj["meta"].update({"epoch": 3, "val_mean_dice": 0.625})
    run = tmp / "run"
    (run / "models").mkdir(parents=True)
    torch.save(obj, run / "models" / "model.pt")
    executed = json.loads((REPO / "bundles" / "kits" / "train.json").read_text())
    executed.update({"bundle_root": str(run), "preset": "tiny", "max_epochs": 3})
    (run / "eval").mkdir()
    (run / "eval" / "config_executed.json").write_text(json.dumps(executed))
    return run


@pytest.fixture(scope="module")
def kits_export(tmp_path_factory, trained_tiny_sam3d_checkpoint):
    tmp = tmp_path_factory.mktemp("kits_export")
    run = _kits_run(tmp, trained_tiny_sam3d_checkpoint)
    return export_bundle(run, tmp / "kits_zoo", version="0.2.0"), run


@pytest.mark.slow
def test_exported_kits_bundle_passes_the_zoo_checks(kits_export, trained_tiny_sam3d_checkpoint):
    out, _ = kits_export
    configs = ["metadata.json", "inference.json", "train.json", "evaluate.json", "logging.conf"]
    for name in [f"configs/{c}" for c in configs] + [
        "models/model.pt", "models/model.ts", "LICENSE", "docs/README.md", "docs/data_license.txt"
    ]:  # fmt: skip
        assert (out / name).is_file(), name
    checks = check_bundle(out)
    names = {c.name for c in checks}
    assert {"net_in_out", "torchscript", "model.ts", "torchscript_script"} <= names
    _assert_pass(checks)

    # models/model.pt: the plain state dict of the trained network, nothing else
    plain = torch.load(out / "models" / "model.pt", weights_only=True)
    trained = torch.load(trained_tiny_sam3d_checkpoint, weights_only=True)
    assert plain.keys() == trained["state_dict"].keys()
    assert all(torch.equal(plain[k], trained["state_dict"][k]) for k in plain)

    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.2.0" and "0.2.0" in meta["changelog"]
    assert meta["sam3d"]["model"] == "sam3d" and meta["sam3d"]["preset"] == trained["preset"]
    assert meta["sam3d"]["meta"]["dataset"] == trained["dataset"]
    assert meta["eval_metrics"]["val_mean_dice"] == 0.625
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, 32]
    train = json.loads((out / "configs" / "train.json").read_text())
    assert train["bundle_root"] == "." and train["preset"] == "tiny" and "_meta_" not in train

    readme = (out / "docs" / "README.md").read_text()
    assert readme_sections(readme) == []
    assert "| val_mean_dice | 0.6250 |" in readme and "at epoch 3" in readme
    assert "| `max_epochs` | `3` |" in readme and "pip install -e" in readme


@pytest.mark.slow
def test_exported_kits_inference_in_a_fresh_folder_equals_sam3d_segment(
    kits_export, tmp_path, trained_tiny_sam3d_checkpoint
):
    from sam3d.cli import main
    from sam3d.data.phantoms import make_ct_phantom

    out, _ = kits_export
    ph = make_ct_phantom(7, shape_vox=(40, 36, 16), spacing_mm=(1.25, 1.25, 2.5), n_lesions=1)
    image = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ph.image_hu.astype(np.int16), ph.affine), image)
    click = [int(round(c)) for c in np.argwhere(ph.label == 2).mean(0)]

    ref = tmp_path / "segment.nii.gz"
    code = main(["segment", str(image), "--checkpoint", trained_tiny_sam3d_checkpoint, "--click",
                 ",".join(map(str, click)), "--out", str(ref), "--device", "cpu"])  # fmt: skip
    assert code == 0

    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh)
    case = {"image": str(image), "points": [click], "point_labels": [1]}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(REPO)
    # the same CPU threads as this process: the barely trained model's probabilities sit
    # near 0.5, where another summation order flips voxels
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--input_dict", repr(case)],
        cwd=fresh, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = nib.load(fresh / "eval" / "inference" / "ct_seg.nii.gz")
    want = nib.load(ref)
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-5)
    mask = np.asarray(want.dataobj)
    assert mask.shape == ph.label.shape and 0 < mask.sum() < mask.size  # not a trivial mask
    np.testing.assert_array_equal(np.asarray(got.dataobj), mask)


def test_exported_kits_evaluate_config_loads_the_plain_weights(kits_export):
    from monai.bundle import ConfigParser

    out, _ = kits_export
    parser = ConfigParser()
    parser.read_config(
        [str(out / "configs" / "train.json"), str(out / "configs" / "evaluate.json")]
    )
    parser.read_meta(str(out / "configs" / "metadata.json"))
    parser["bundle_root"] = str(out)
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network")
    plain = torch.load(out / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], plain[k]) for k in plain)
    assert parser.get_parsed_content("dataset_info")["name"] == "kits"
    assert parser.get_parsed_content("crop_size") == 32


@pytest.fixture(scope="module")
def retina_export(tmp_path_factory):
    from sam3d.models.checkpoint import save_trained
    from sam3d.models.registry import build_model

    torch.manual_seed(1)
    model = build_model("topolora", {"sam": "tiny", "image_size": 64})
    with torch.no_grad():  # non-zero adapter and LoRA: a model that is not plain SAM
        for name, p in model.named_parameters():
            if "adapter" in name or "lora" in name:
                p.normal_(0, 0.05)
    tmp = tmp_path_factory.mktemp("retina_export")
    save_trained(tmp / "run" / "models" / "model.pt", model, meta={"epoch": 2, "val_dice": 0.4})
    return export_bundle(tmp / "run", tmp / "retina_zoo"), model.eval()


def test_exported_retina_bundle_passes_the_zoo_checks(retina_export):
    out, model = retina_export
    checks = check_bundle(out)  # the zoo's fake input: 1 x 3 x 1 x 1
    _assert_pass(checks)
    assert "torchscript" in {c.name for c in checks}

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.json"))
    parser.read_meta(str(out / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(out), "device": "$torch.device('cpu')"})
    net = parser.get_parsed_content("network").eval()
    x = torch.rand(1, 3, 50, 44) * 255
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=0, atol=0)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"]["val_dice"] == 0.4 and meta["sam3d"]["model"] == "topolora"


@pytest.mark.slow
def test_exported_retina_inference_in_a_fresh_folder_equals_the_model(retina_export, tmp_path):
    from PIL import Image

    from sam3d.data.phantoms import write_phantom_dataset

    out, model = retina_export
    write_phantom_dataset("vessels", tmp_path / "ph", 1, seed=0, size=(60, 52))
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(tmp_path / "ph" / "imagesTr" / "vessel_000.png", images / "a.png")
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--input_dir", str(images)],
        cwd=fresh, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = np.asarray(Image.open(fresh / "eval" / "inference" / "a_mask.png"))
    rgb = np.asarray(Image.open(images / "a.png").convert("RGB"))
    x = torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = (torch.sigmoid(model(x))[0, 0] > 0.5).numpy().astype(np.uint8) * 255
    assert got.shape == (60, 52) and 0 < (want > 0).mean() < 1  # not a trivial mask
    np.testing.assert_array_equal(got, want)


def test_export_refuses_what_is_not_a_run(tmp_path, kits_export):
    with pytest.raises(Sam3DError, match="no models/model.pt"):
        export_bundle(tmp_path, tmp_path / "out")
    out, run = kits_export
    with pytest.raises(Sam3DError, match="not empty"):
        export_bundle(run, out)


def test_bundle_commands(retina_export, tmp_path, capsys):
    from sam3d.cli import main

    out, _ = retina_export
    run = out.parent / "run"
    assert main(["bundle", "export", str(run)]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["bundle", "export", str(run), "--out", str(tmp_path / "b"), "--version",
                 "1.0.0", "--no-torchscript"]) == 0  # fmt: skip
    assert not (tmp_path / "b" / "models" / "model.ts").exists()
    capsys.readouterr()
    shape = f"{SHAPE}=[48, 40]"  # a literal, parsed
    assert (
        main(
            [
                "bundle",
                "check",
                str(tmp_path / "b"),
                "--set",
                shape,
                "--set",
                "device=cpu",
                "--no-torchscript",
            ]
        )
        == 0  # fmt: skip
    )
    printed = capsys.readouterr().out
    assert "ok   metadata" in printed and "ok   net_in_out" in printed
    (tmp_path / "b" / "LICENSE").unlink()
    assert main(["bundle", "check", str(tmp_path / "b"), "--no-torchscript"]) == 2
    assert "FAIL files: missing LICENSE" in capsys.readouterr().out


def test_load_weights_refuses_weights_of_another_shape(kits_export):
    from sam3d.models.registry import build_model

    out, _ = kits_export
    other = build_model("topolora", {"sam": "tiny", "image_size": 64})
    with pytest.raises(Sam3DError, match="does not fit this network"):
        load_weights(other, out / "models" / "model.pt")

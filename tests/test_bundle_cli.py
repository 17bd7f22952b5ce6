"""Bundles through the real ``python -m monai.bundle run`` command line: booleans given as
``false`` are False, and a user's error is one message with exit code 2."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam3d.engine import as_bool
from sam3d.errors import Sam3DError

REPO = Path(__file__).resolve().parents[1]
KITS = REPO / "bundles" / "kits"
SMALL = "{'shape_vox': [32, 32, 24], 'spacing_mm': [1.5, 1.5, 2.0], 'n_lesions': 1}"


class _Pickled:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sam3d_bundle_pwned",))


def _bundle(config: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _user_error(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a refused run (no traceback anywhere)."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [ln for ln in text.splitlines() if "error:" in ln.lower() or " ERROR " in ln]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), ("false", False), ("False", False), ("true", True),
     ("no", False), ("1", True), ("0", False), (0, False), (1, True), (None, False)],
)  # fmt: skip
def test_as_bool_reads_what_a_command_line_gives(value, expected):
    assert as_bool(value, "resume") is expected


@pytest.mark.parametrize("value", ["maybe", 2, [True], "yes please"])
def test_as_bool_refuses_anything_else(value):
    with pytest.raises(Sam3DError, match="resume must be true or false"):
        as_bool(value, "resume")


def _pickled_last_pt(root: Path) -> Path:
    last = root / "models" / "last.pt"
    last.parent.mkdir(parents=True)
    with open(last, "wb") as f:
        pickle.dump({"epoch": 0, "network": _Pickled()}, f)
    return last


def test_a_pickled_code_last_pt_is_refused_in_one_line_and_never_run(tmp_path):
    root = tmp_path / "run"
    _pickled_last_pt(root)
    proc = _bundle(
        str(KITS / "train.json"), "--bundle_root", str(root), "--preset", "tiny",
        "--mlflow_enabled", "false", "--dataset_dir", str(tmp_path / "nothing"),
    )  # fmt: skip
    line = _user_error(proc)
    assert "last.pt" in line and "pickled code" in line
    assert not Path("/tmp/sam3d_bundle_pwned").exists()
    assert not (tmp_path / "nothing").exists()  # refused before any data work


@pytest.mark.slow
def test_resume_false_and_mlflow_enabled_false_are_false_on_the_command_line(tmp_path):
    """``--resume false``: the (pickled) last.pt is neither read nor trusted, a new
    training overwrites it; ``--mlflow_enabled false``: no tracking store is created."""
    root = tmp_path / "run"
    _pickled_last_pt(root)
    proc = _bundle(
        str(KITS / "train.json"), "--bundle_root", str(root), "--preset", "tiny",
        "--max_epochs", "1", "--num_workers", "0", "--phantom_cases", "4",
        "--phantom_kwargs", SMALL, "--resume", "false", "--mlflow_enabled", "false",
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    state = torch.load(root / "models" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["mlflow_run_id"] is None
    assert not (root / "eval" / "mlruns.db").exists()
    assert not Path("/tmp/sam3d_bundle_pwned").exists()


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    from sam3d.data.pipelines import load_dataset_preset
    from sam3d.models import build_sam3d, save_sam3d_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bundle_ckpt") / "model.pt"
    model = build_sam3d("tiny", crop_size=16).eval()
    save_sam3d_checkpoint(model, path, meta={}, dataset=load_dataset_preset("kits"))
    return path


@pytest.mark.parametrize(
    "case",
    [
        "image_4d",
        pytest.param("checkpoint_pickled", marks=pytest.mark.slow),
        pytest.param("checkpoint_malformed", marks=pytest.mark.slow),
    ],
)
def test_inference_bundle_errors_are_one_message_exit_2(tmp_path, small_checkpoint, case):
    image, ckpt = tmp_path / "case.nii.gz", small_checkpoint
    shape = (16, 16, 8, 3) if case == "image_4d" else (16, 16, 8)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), image)
    if case == "checkpoint_pickled":
        ckpt = tmp_path / "model.pt"
        with open(ckpt, "wb") as f:
            pickle.dump({"state_dict": _Pickled()}, f)
    elif case == "checkpoint_malformed":
        ckpt = tmp_path / "model.pt"
        torch.save({**torch.load(small_checkpoint, weights_only=True), "state_dict": [1]}, ckpt)
    proc = _bundle(
        str(KITS / "inference.json"), "--bundle_root", str(tmp_path),
        "--checkpoint", str(ckpt), "--input_dict", f"{{'image': '{image}'}}",
        "--grow_windows", "false", "--output_dir", str(tmp_path / "out"),
    )  # fmt: skip
    line = _user_error(proc)
    assert {"image_4d": "3 channels or time points", "checkpoint_pickled": "pickled code",
            "checkpoint_malformed": "'state_dict' a dict"}[case] in line  # fmt: skip
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not Path("/tmp/sam3d_bundle_pwned").exists()


PLANAR_INPUTS = {
    "echo": lambda d: ["--input_dict", f"{{'image': '{d / 'a.png'}', 'points': [[3, 3]]}}"],
    "retina": lambda d: ["--input_dir", str(d)],
    "prostate": lambda d: ["--input_files", f"['{d / 'a.nii.gz'}']"],
}


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(PLANAR_INPUTS))
@pytest.mark.parametrize("step", ["evaluate", "inference"])
def test_a_missing_checkpoint_is_one_line_in_every_planar_bundle(bundle, step, tmp_path):
    """No trained model yet: evaluate and inference of echo, retina and prostate say so in
    one line with exit code 2 (retina's evaluate gave a 54-line traceback)."""
    from PIL import Image

    root = REPO / "bundles" / bundle
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(inputs / "a.png")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), inputs / "a.nii.gz")
    if step == "inference":
        config, extra = str(root / "inference.json"), PLANAR_INPUTS[bundle](inputs)
    else:
        config, extra = f"['{root / 'train.json'}','{root / 'evaluate.json'}']", []
    proc = _bundle(
        config, "--bundle_root", str(tmp_path / "run"), "--mlflow_enabled", "false",
        "--dataset_dir", str(tmp_path / "data"), *extra,
    )  # fmt: skip
    line = _user_error(proc)
    assert "no trained model at" in line and "model.pt" in line, line
    assert not (tmp_path / "run" / "models").exists()


def test_a_checkpoint_of_another_kind_is_refused_in_one_line(tmp_path):
    from sam3d.models.checkpoint import save_trained
    from sam3d.models.registry import build_model

    ckpt = tmp_path / "run" / "models" / "model.pt"
    ckpt.parent.mkdir(parents=True)
    save_trained(ckpt, build_model("topolora", "tiny"))
    proc = _bundle(
        str(REPO / "bundles" / "echo" / "inference.json"), "--bundle_root",
        str(tmp_path / "run"), "--input_dict",
        f"{{'image': '{tmp_path / 'x.png'}', 'points': [[1, 1]]}}",
    )  # fmt: skip
    line = _user_error(proc)
    assert "holds a topolora model; this bundle needs samus" in line, line
    # and a bad input (no clicks) is one line too, not MONAI's traceback
    proc = _bundle(
        str(REPO / "bundles" / "echo" / "inference.json"), "--bundle_root",
        str(tmp_path / "run"), "--input_dict", "{'image': 'x.png'}",
    )  # fmt: skip
    assert "input_dict needs 'points'" in _user_error(proc)

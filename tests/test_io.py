"""Reading images and labels: good files load with their geometry, bad ones end in one message.

Every bad input is checked twice: the library raises Sam3DError with a clear
sentence, and the command line (`sam3d info`) exits with code 2 and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sam3d.cli import main
from sam3d.data.io import (
    atomic_write,
    load_image,
    load_image_label,
    orientation_codes,
    spacing_from_affine,
)
from sam3d.data.phantoms import make_affine, save_nifti
from sam3d.errors import Sam3DError

AFFINE = make_affine((1.5, 1.5, 3.0), (12, 10, 6), "LPS", center_world=(10.0, -5.0, 40.0))


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def volume(tmp_path) -> Path:
    data = np.arange(12 * 10 * 6, dtype=np.int16).reshape(12, 10, 6)
    path = tmp_path / "ct.nii.gz"
    save_nifti(data, AFFINE, path, np.int16)
    return path


def test_load_image_keeps_values_shape_and_affine(volume):
    img = load_image(volume)
    assert tuple(img.shape) == (1, 12, 10, 6)
    np.testing.assert_allclose(np.asarray(img.affine), AFFINE, atol=1e-4)
    np.testing.assert_array_equal(img[0].numpy(), np.asarray(nib.load(volume).dataobj))
    assert spacing_from_affine(img.affine) == pytest.approx((1.5, 1.5, 3.0), abs=1e-5)
    assert orientation_codes(img.affine) == "LPS"


def test_load_image_label_pair(tmp_path, volume):
    label = tmp_path / "label.nii.gz"
    save_nifti(np.ones((12, 10, 6)), AFFINE, label, np.uint8)
    image, lab = load_image_label(volume, label)
    assert image.shape == lab.shape
    # a shift far below the tolerance (1e-3 mm) is accepted
    shifted = AFFINE.copy()
    shifted[0, 3] += 1e-5
    save_nifti(np.ones((12, 10, 6)), shifted, label, np.uint8)
    load_image_label(volume, label)


def test_a_single_volume_stored_as_4d_is_accepted(tmp_path):
    path = _nifti(tmp_path / "one.nii.gz", np.zeros((12, 10, 6, 1), np.float32))
    assert tuple(load_image(path).shape) == (1, 12, 10, 6)


def test_2d_images_load_when_allowed(tmp_path):
    path = _nifti(tmp_path / "flat.nii.gz", np.zeros((12, 10), np.float32))
    assert tuple(load_image(path, require_3d=False).shape) == (1, 12, 10)


def _bad_inputs(tmp: Path, volume: Path) -> dict[str, tuple[list[Path], str]]:
    """name -> (paths for `sam3d info IMAGE [--label LABEL]`, expected message fragment)."""
    gz = volume.read_bytes()
    truncated = tmp / "truncated.nii.gz"
    truncated.write_bytes(gz[: len(gz) // 2])
    random_bytes = tmp / "random.nii.gz"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(3000))
    nan = np.zeros((12, 10, 6), np.float32)
    nan[3, 4, 5] = np.nan
    inf = np.zeros((12, 10, 6), np.float32)
    inf[0, 0, 0] = np.inf
    bad_shape = tmp / "label_shape.nii.gz"
    save_nifti(np.zeros((12, 10, 5)), AFFINE, bad_shape, np.uint8)
    moved = AFFINE.copy()
    moved[2, 3] += 0.01  # 10 micrometres off
    bad_affine = tmp / "label_affine.nii.gz"
    save_nifti(np.zeros((12, 10, 6)), moved, bad_affine, np.uint8)
    flat = AFFINE.copy()
    flat[:3, 1] = 0  # voxel size 0 along j
    no_geometry = nib.Nifti1Image(np.zeros((12, 10, 6), np.float32), None)
    no_geometry.set_sform(flat, code=1)
    nib.save(no_geometry, str(tmp / "flat.nii.gz"))
    return {
        "missing": ([tmp / "nope.nii.gz"], "no such file"),
        "no-geometry": (
            [tmp / "flat.nii.gz"],
            "no valid voxel geometry",
        ),
        "folder": ([tmp], "is a folder"),
        "truncated": ([truncated], "truncated"),
        "random-bytes": ([random_bytes], "cannot read"),
        "2d": ([_nifti(tmp / "2d.nii.gz", np.zeros((12, 10), np.float32))], "2D image"),
        "4d": (
            [_nifti(tmp / "4d.nii.gz", np.zeros((12, 10, 6, 3), np.float32))],
            "3 channels or time points",
        ),
        "nan": ([_nifti(tmp / "nan.nii.gz", nan)], "NaN or infinite"),
        "inf": ([_nifti(tmp / "inf.nii.gz", inf)], "NaN or infinite"),
        "label-shape": ([volume, bad_shape], "different shapes"),
        "label-affine": ([volume, bad_affine], "different voxel grids"),
    }


CASES = [
    "missing",
    "no-geometry",
    "folder",
    "truncated",
    "random-bytes",
    "2d",
    "4d",
    "nan",
    "inf",
    "label-shape",
    "label-affine",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_one_clear_error(tmp_path, volume, case):
    paths, fragment = _bad_inputs(tmp_path, volume)[case]
    with pytest.raises(Sam3DError, match=fragment) as info:
        if len(paths) == 1:
            load_image(paths[0])
        else:
            load_image_label(*paths)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_on_the_command_line_exits_2_without_traceback(tmp_path, volume, case, capsys):
    paths, fragment = _bad_inputs(tmp_path, volume)[case]
    argv = ["info", str(paths[0])] + (["--label", str(paths[1])] if len(paths) > 1 else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sam3d info: error: ") and fragment in err
    assert "Traceback" not in err


def test_console_script_exit_code(tmp_path):
    # A missing file answers before MONAI is imported, so the process is quick.
    exe = Path(sys.executable).with_name("sam3d")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sam3d"]
    missing = tmp_path / "absent.nii.gz"
    proc = subprocess.run([*cmd, "info", str(missing)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == f"sam3d info: error: {missing}: no such file\n"


def test_info_describes_a_good_pair(tmp_path, volume, capsys):
    label = tmp_path / "label.nii.gz"
    lab = np.zeros((12, 10, 6))
    lab[2:4, 2:4, 2:4] = 2
    save_nifti(lab, AFFINE, label, np.uint8)
    assert main(["info", str(volume), "--label", str(label)]) == 0
    out = capsys.readouterr().out
    assert "(12, 10, 6)" in out and "LPS" in out and "(1.5, 1.5, 3) mm" in out
    assert "0: 712, 2: 8" in out
    assert f"0.0 .. {12 * 10 * 6 - 1}.0" in out


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert os.listdir(tmp_path) == []
    atomic_write(target, lambda tmp: tmp.write_bytes(b"whole"))
    assert target.read_bytes() == b"whole" and os.listdir(tmp_path) == ["out.nii.gz"]
    # same permissions as a plainly created file (mkstemp alone would give 0600)
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_obliquity_of_axis_aligned_and_rotated_grids():
    from sam3d.data.io import obliquity_deg
    from sam3d.data.phantoms import _rotation

    assert obliquity_deg(AFFINE) == pytest.approx(0.0, abs=1e-6)
    tilted = np.eye(4)
    tilted[:3, :3] = _rotation(np.array([0.0, 0.0, 1.0]), np.deg2rad(10.0)) @ np.diag([1, 2, 3])
    assert obliquity_deg(tilted) == pytest.approx(10.0, abs=1e-6)
    flipped = tilted.copy()
    flipped[:, 0] *= -1  # a flip is still 10 degrees off its nearest axis codes
    assert obliquity_deg(flipped) == pytest.approx(10.0, abs=1e-6)


def test_info_reports_an_oblique_grid(tmp_path, capsys):
    tilted = make_affine((2.0, 2.0, 3.0), (12, 10, 6), "oblique", rng=np.random.default_rng(1))
    path = tmp_path / "oblique.nii.gz"
    save_nifti(np.zeros((12, 10, 6)), tilted, path, np.int16)
    assert main(["info", str(path)]) == 0
    assert "(oblique: " in capsys.readouterr().out

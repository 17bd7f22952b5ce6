"""The `sam3d phantoms` command: datasets on disk, options, and clear refusals."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from PIL import Image

from sam3d.cli import main


def test_phantoms_ct_command(tmp_path, capsys):
    out = tmp_path / "ct"
    argv = ["phantoms", "--kind", "ct", "--out", str(out), "--n", "3", "--seed", "1"]
    assert main([*argv, "--shape", "40", "40", "12", "--spacing", "4", "4", "5"]) == 0
    assert str(out / "dataset.json") in capsys.readouterr().out
    meta = json.loads((out / "dataset.json").read_text())
    assert [len(meta[k]) for k in ("training", "validation", "test")] == [1, 1, 1]
    img = nib.load(out / meta["test"][0]["image"])
    assert img.shape == (40, 40, 12)
    np.testing.assert_allclose(nib.affines.voxel_sizes(img.affine), (4, 4, 5), atol=1e-5)


def test_phantoms_vessels_command(tmp_path):
    out = tmp_path / "v"
    assert main(["phantoms", "--kind", "vessels", "--out", str(out), "--n", "2"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    label = np.asarray(Image.open(out / meta["training"][0]["label"]))
    assert label.shape == (256, 256) and label.max() == 1


def test_phantoms_command_refuses_bad_options(tmp_path, capsys):
    base = ["phantoms", "--out", str(tmp_path / "x")]
    assert main([*base, "--n", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert main([*base, "--kind", "vessels", "--shape", "64", "64", "64"]) == 2
    assert "--shape takes 2 numbers" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["phantoms", "--out", str(tmp_path / "file" / "sub"), "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sam3d phantoms: error: cannot create") and "Traceback" not in err

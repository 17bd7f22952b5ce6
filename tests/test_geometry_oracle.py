"""Where the mask lands: an oracle model through every inference path.

The oracle (``tests/serve_oracle.py``, shared with the viewer's tests) has the Sam3D
``encode`` / ``decode`` interface and no weights: it returns the connected region of
the clicked intensity (here: the 200 HU lesion on 0 HU) under a positive click. So a saved mask
covers the known lesion exactly when the click reached the model at the right grid
voxel and the probability map went back to the right original voxels. Phantoms:
LPS, LAS, oblique and anisotropic volumes (a 200 HU ellipsoid lesion off the centre
on 0 HU) with different extents along i, j and k, so that a swap or flip of axes
anywhere misses the lesion. Checked: Dice with the known lesion and the distance
of the mask's centre (world mm) from the lesion's, for voxel and ``--world``
clicks, through ``ClickSession``, ``sam3d segment``, ``sam3d segment-batch`` and
the kits inference bundle; and the 2D retina bundle's PNG (x is the column).

How the oracle gets in: every 3D path loads its model through
``sam3d.inference.load_model_for_inference``, which calls
``sam3d.models.load_sam3d_checkpoint``; the tests patch that one function to return
the oracle, so the loader's own checks (file exists, device, eval mode) and every
caller, the bundle's config included, run unchanged. The retina bundle builds its
network in the config: the test overrides ``network`` in MONAI's ``ConfigParser``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image
from serve_oracle import BrightComponentOracle

import sam3d.models
from sam3d.cli import main
from sam3d.data.phantoms.common import make_affine
from sam3d.data.pipelines import load_dataset_preset
from sam3d.inference import ClickSession

ROOT = Path(__file__).resolve().parents[1]
KITS = load_dataset_preset("kits")
LESION_HU = 200.0


def oracle() -> BrightComponentOracle:
    """The shared oracle (tests/serve_oracle.py): the region within 100 HU of the click's."""
    return BrightComponentOracle(tol=100.0 / KITS["std"], crop_size=32)


# name -> (orientation, shape (I, J, K), spacing mm, lesion offset from the centre in RAS mm)
PHANTOMS = {
    "LPS": ("LPS", (40, 34, 26), (1.0, 1.0, 1.5), (9.0, -7.0, 5.0)),
    "LAS": ("LAS", (36, 40, 24), (1.2, 0.9, 1.6), (-8.0, 6.0, -4.0)),
    "oblique": ("oblique", (38, 34, 28), (1.1, 1.0, 1.4), (8.0, 7.0, -5.0)),
    "anisotropic": ("RAS", (48, 30, 14), (0.7, 1.3, 3.0), (7.0, -6.0, 6.0)),
}
LESION_RADII_MM = (6.0, 4.5, 5.5)  # along R, A, S


class Phantom:
    """A NIfTI file with a known lesion: its voxel mask, world centre and a click."""

    def __init__(self, tmp_path, name: str) -> None:
        orientation, shape, spacing, offset = PHANTOMS[name]
        # (rng 2: the oblique affine is a tilted LPS one)
        rng = np.random.default_rng(2)
        self.affine = make_affine(spacing, shape, orientation, (10.0, -20.0, 30.0), rng)
        self.spacing = np.asarray(spacing)
        vox = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
        self.world_of_voxels = vox @ self.affine[:3, :3].T + self.affine[:3, 3]
        self.centre_world = np.array([10.0, -20.0, 30.0]) + np.asarray(offset)
        rel = (self.world_of_voxels - self.centre_world) / np.asarray(LESION_RADII_MM)
        self.lesion = (rel**2).sum(-1) <= 1.0
        image = np.where(self.lesion, LESION_HU, 0.0).astype(np.int16)
        self.path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(image, self.affine), self.path)
        # the click: the lesion voxel nearest to its centre
        inside = np.argwhere(self.lesion)
        d = np.linalg.norm(self.world_of_voxels[self.lesion] - self.centre_world, axis=1)
        self.click_vox = inside[int(np.argmin(d))].astype(float)
        self.click_world = self.affine[:3, :3] @ self.click_vox + self.affine[:3, 3]
        assert len(set(shape)) == 3 and self.lesion.sum() > 100

    def check(self, mask: np.ndarray) -> None:
        """The mask covers the lesion (Dice > 0.9) and is centred on it within a voxel."""
        mask = np.asarray(mask) > 0
        assert mask.shape == self.lesion.shape
        dice = 2 * (mask & self.lesion).sum() / (mask.sum() + self.lesion.sum())
        assert mask.any(), "empty mask: the click missed the lesion"
        centre = self.world_of_voxels[mask].mean(0)
        miss = float(np.linalg.norm(centre - self.world_of_voxels[self.lesion].mean(0)))
        assert dice > 0.9, f"Dice {dice:.3f} with the known lesion"
        assert miss <= self.spacing.min(), f"mask centre {miss:.2f} mm from the lesion's"

    def check_file(self, path) -> None:
        img = nib.load(str(path))
        np.testing.assert_allclose(img.affine, self.affine, atol=1e-5)
        self.check(np.asarray(img.dataobj))


@pytest.fixture
def oracle_checkpoint(tmp_path, monkeypatch):
    """A checkpoint path whose loading yields the oracle (see the module docstring)."""
    path = tmp_path / "oracle.pt"
    path.write_bytes(b"oracle")  # the loader checks the file exists

    def load(p, map_location="cpu", kind=None, what=""):
        assert str(p) == str(path)
        return oracle(), {"dataset": dict(KITS), "model": "sam3d"}

    monkeypatch.setattr(sam3d.models, "load_trained", load)
    return path


def _csv(p) -> str:
    return ",".join(f"{v:.4f}" for v in p)


@pytest.mark.parametrize("name", list(PHANTOMS))
@pytest.mark.parametrize("world", [False, True], ids=["voxel", "world"])
def test_click_session(tmp_path, name, world):
    ph = Phantom(tmp_path, name)
    session = ClickSession(oracle(), ph.path, KITS, device="cpu")
    session.click(ph.click_world if world else ph.click_vox, world=world)
    ph.check(session.mask_numpy())
    ph.check_file(session.save(tmp_path / "out.nii.gz"))


@pytest.mark.parametrize("name", ["LPS", "oblique", "anisotropic"])
@pytest.mark.parametrize("world", [False, True], ids=["voxel", "world"])
def test_sam3d_segment(tmp_path, oracle_checkpoint, name, world, capsys):
    ph = Phantom(tmp_path, name)
    out = tmp_path / "seg.nii.gz"
    click = ph.click_world if world else ph.click_vox
    argv = ["segment", str(ph.path), "--checkpoint", str(oracle_checkpoint), "--out", str(out)]
    argv += ["--click", _csv(click), "--device", "cpu"] + (["--world"] if world else [])
    assert main(argv) == 0, capsys.readouterr()
    ph.check_file(out)


@pytest.mark.parametrize("world", [False, True], ids=["voxel", "world"])
def test_sam3d_segment_batch(tmp_path, oracle_checkpoint, world, capsys):
    phantoms = [Phantom(tmp_path, name) for name in PHANTOMS]
    cases = [
        {
            "image": ph.path.name,
            "points": [(ph.click_world if world else ph.click_vox).tolist()],
            "point_labels": [1],
        }
        for ph in phantoms
    ]
    datalist = tmp_path / "cases.json"
    datalist.write_text(json.dumps({"test": cases}))
    out_dir = tmp_path / "out"
    argv = ["segment-batch", str(datalist), "--checkpoint", str(oracle_checkpoint)]
    argv += ["--out-dir", str(out_dir), "--device", "cpu"] + (["--world"] if world else [])
    assert main(argv) == 0, capsys.readouterr()
    for ph in phantoms:
        ph.check_file(out_dir / ph.path.name.replace(".nii.gz", "_seg.nii.gz"))


@pytest.mark.parametrize("name", ["LAS", "oblique"])
@pytest.mark.parametrize("world", [False, True], ids=["voxel", "world"])
def test_kits_inference_bundle(tmp_path, oracle_checkpoint, name, world):
    ph = Phantom(tmp_path, name)
    click = ph.click_world if world else ph.click_vox
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles/kits/inference.json"))
    parser.update(
        {
            "bundle_root": str(ROOT / "bundles/kits"),
            "output_dir": str(tmp_path / "out"),
            "checkpoint": str(oracle_checkpoint),
            "device": "$torch.device('cpu')",
            "input_dict": {"image": str(ph.path), "points": [click.tolist()], "point_labels": [1]},
            "points_world": world,
        }
    )
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("run")
    ph.check_file(tmp_path / "out" / f"{name}_seg.nii.gz")


class BrightPixelOracle(torch.nn.Module):
    """2D stand-in for TopoLoRA-SAM: logits ``B x 1 x H x W``, positive where the red
    channel of the ``B x 3 x H x W`` (0-255) input is bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] > 127).float() * 20 - 10


def test_retina_bundle_png_keeps_rows_and_columns(tmp_path):
    # 40 rows x 64 columns; the object: rows 5-14, columns 40-59 (far right, near the top)
    h, w = 40, 64
    truth = np.zeros((h, w), bool)
    truth[5:15, 40:60] = True
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[truth] = (230, 30, 30)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(rgb).save(images / "eye.png")
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles/retina/inference.json"))
    parser.update(
        {
            "bundle_root": str(ROOT / "bundles/retina"),
            "input_dir": str(images),
            "output_dir": str(tmp_path / "out"),
            "device": "$torch.device('cpu')",
            "amp": False,
            "network": BrightPixelOracle(),
        }
    )
    parser.get_parsed_content("initialize")
    parser.get_parsed_content("run")
    (out,) = (tmp_path / "out").glob("*.png")
    with Image.open(out) as im:
        assert im.size == (w, h)  # PIL: (width = columns, height = rows)
        mask = np.asarray(im) > 127
    np.testing.assert_array_equal(mask, truth)

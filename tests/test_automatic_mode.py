"""Automatic mode (issue 23 item 7): nothing outside the body, and `sam3d segment` without
clicks refuses a checkpoint that was not trained for automatic mode."""

from __future__ import annotations

import numpy as np
import torch

from sam3d.data.phantoms.common import make_affine, save_nifti
from sam3d.inference.auto import body_mask
from sam3d.inference.session import ClickSession

KITS = "kits"


def _body_volume(shape=(40, 36, 16)):
    """Air, an elliptic body (40 HU) with an air pocket inside (a lung), and a bright
    'table' strip outside the body."""
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    inside = ((i - 20) / 14.0) ** 2 + ((j - 16) / 11.0) ** 2 <= 1.0
    img = np.full(shape, -1000.0)
    img[inside] = 40.0
    img[16:22, 14:18, 5:11] = -850.0  # lung: inside the body
    img[:, 32:34, :] = 300.0  # the table, apart from the body
    body = np.repeat(inside[..., None], shape[2], axis=2)
    return img, body


def test_body_mask_by_hand():
    img, body = _body_volume()
    np.testing.assert_array_equal(body_mask(img > -500), body)
    assert body_mask(np.full((4, 4, 4), True)).all()  # no air: all body


class EverythingModel(torch.nn.Module):
    """Marks every voxel of every window as tumour (what an untrained automatic mode
    can do: blobs in the air)."""

    crop_size = 16

    def encode(self, images):
        return images

    def decode(self, features, points, point_labels=None, mask_prompt=None):
        ones = torch.ones_like(features) * 10
        return torch.cat([-ones, ones], dim=1)


def test_automatic_mode_predicts_nothing_outside_the_body(tmp_path):
    img, body = _body_volume()
    path = tmp_path / "v.nii.gz"
    save_nifti(img, make_affine((1.0, 1.0, 2.0), img.shape, "LPS"), path, np.int16)
    session = ClickSession(EverythingModel(), path, KITS, device="cpu")
    mask = session.segment_all(overlap=0.25).numpy()
    # the body (40 HU and the lung) on the 1 mm grid, resampled back: exact but at its rim
    from scipy import ndimage

    ball = np.ones((3, 3, 3), bool)
    assert not (mask & ~ndimage.binary_dilation(body, ball)).any()
    assert mask[ndimage.binary_erosion(body, ball)].all()
    assert mask[16:22, 14:18, 5:11].all()  # the lung pocket is inside the body
    assert not mask[:, 32:34, :].any()  # the table stays out


def _checkpoint(tmp_path, meta):
    from sam3d.data.pipelines import load_dataset_preset
    from sam3d.models.checkpoint import save_trained
    from sam3d.models.registry import build_model

    torch.manual_seed(0)
    return save_trained(tmp_path / f"m{len(meta)}.pt", build_model("sam3d", "tiny"), meta=meta,
                        dataset=load_dataset_preset(KITS))  # fmt: skip


def test_segment_without_clicks_refuses_a_click_only_checkpoint(tmp_path, capsys):
    from sam3d.cli import main

    img, _ = _body_volume((24, 24, 12))
    path = tmp_path / "v.nii.gz"
    save_nifti(img, make_affine((1.0, 1.0, 2.0), img.shape, "RAS"), path, np.int16)
    out = tmp_path / "seg.nii.gz"
    ck = _checkpoint(tmp_path, {})
    assert main(["segment", str(path), "--checkpoint", str(ck), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with clicks only" in err[0] and not out.exists()
    # a click works with the same checkpoint; a checkpoint trained for it runs automatic mode
    argv = ["segment", str(path), "--checkpoint", str(ck), "--out", str(out)]
    assert main([*argv, "--click", "12,12,6"]) == 0
    ck_auto = _checkpoint(tmp_path, {"automatic_mode": True})
    out.unlink()
    assert main(["segment", str(path), "--checkpoint", str(ck_auto), "--out", str(out)]) == 0
    assert out.exists()

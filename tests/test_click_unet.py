"""The click-channel UNet baseline: its click maps by hand, Sam3D's interface, the previous
mask channel, that it learns to follow the click, and that ClickSession / the click
evaluation / the checkpoint loader drive it unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sam3d.models.checkpoint import save_trained
from sam3d.models.registry import build_model, kind_of
from sam3d.models.volumetric.click_unet import ClickUNet, click_maps


def test_click_maps_by_hand():
    pts = torch.tensor([[[2.0, 3.0, 4.0], [6.0, 6.0, 6.0], [0.0, 0.0, 0.0]]])
    labs = torch.tensor([[1, 0, -1]])
    g = click_maps((8, 8, 8), pts, labs, sigma=2.0)
    assert g.shape == (1, 2, 8, 8, 8)
    assert g[0, 0, 2, 3, 4] == 1.0 and g[0, 1, 6, 6, 6] == 1.0
    # one voxel off on two axes: exp(-2 / (2 * 4))
    assert g[0, 0, 3, 4, 4].item() == pytest.approx(math.exp(-2 / 8), rel=1e-6)
    # the padding click at the origin adds nothing (the positive map there is the first
    # click's tail, the negative map the second's)
    assert g[0, 0, 0, 0, 0].item() == pytest.approx(math.exp(-(4 + 9 + 16) / 8), rel=1e-5)
    assert g[0, 1, 0, 0, 0].item() == pytest.approx(math.exp(-108 / 8), rel=1e-4, abs=1e-12)
    d = click_maps((8, 8, 8), pts, labs, sigma=1.5, kind="disk")
    assert d[0, 0].sum() == 19  # the 6-neighbourhood + 12 edge neighbours (sqrt 2 <= 1.5)


def test_sam3d_interface_and_the_previous_mask_channel():
    model = build_model("click_unet", "tiny").eval()
    assert kind_of(model) == "click_unet" and model.mask_prompt == "channel"
    x = torch.randn(2, 1, 32, 32, 32)
    pts = torch.tensor([[[16.0, 16, 16], [0, 0, 0]], [[8.0, 8, 8], [20, 20, 20]]])
    labs = torch.tensor([[1, -1], [1, 0]])
    with torch.no_grad():
        feats = model.encode(x)
        a = model.decode(feats, pts, labs)
        b = model(x, pts, labs)
        c = model.decode(feats, pts, labs, mask_prompt=torch.ones(2, 1, 32, 32, 32))
        z = model.decode(feats, pts, labs, mask_prompt=torch.zeros(2, 1, 32, 32, 32))
    assert a.shape == (2, 2, 32, 32, 32)
    assert torch.equal(a, b) and torch.equal(a, z)  # no mask prompt = an empty mask
    assert not torch.allclose(a, c)  # the previous mask is an input
    with pytest.raises(ValueError, match="mask_prompt must be"):
        model.decode(feats, pts, labs, mask_prompt=torch.zeros(2, 1, 16, 16, 16))
    plain = ClickUNet(previous_mask=False)
    assert plain.mask_prompt is None and plain.net.model[0].conv.unit0.conv.in_channels == 3


def test_it_learns_to_segment_the_clicked_cube_only():
    """Two identical cubes, the target is the one under the positive click: only the
    click maps tell them apart (an image-only net can do no better than Dice ~0.67)."""
    torch.manual_seed(0)
    model = ClickUNet(crop_size=16, channels=(8, 16), strides=(2,), num_res_units=1)
    x = torch.zeros(2, 1, 16, 16, 16)
    x[:, :, 2:7, 4:9, 4:9] = 1.0
    x[:, :, 9:14, 4:9, 4:9] = 1.0
    y = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    y[0, 2:7, 4:9, 4:9] = 1
    y[1, 9:14, 4:9, 4:9] = 1
    pts = torch.tensor([[[4.0, 6, 6]], [[11.0, 6, 6]]])
    labs = torch.ones(2, 1, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x, pts, labs), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model(x, pts, labs).argmax(1)
    for i in range(2):
        inter = ((pred[i] == 1) & (y[i] == 1)).sum().item()
        dice = 2 * inter / ((pred[i] == 1).sum().item() + (y[i] == 1).sum().item())
        assert dice > 0.9


def test_clicksession_and_the_loader_drive_it(tmp_path):
    from sam3d.data.phantoms.common import make_affine, save_nifti
    from sam3d.inference import load_model_for_inference
    from sam3d.inference.interactive import ClickCase, evaluate_clicks

    model = build_model("click_unet", "tiny")
    path = save_trained(tmp_path / "m.pt", model, dataset={"name": "kits"})
    loaded, meta = load_model_for_inference(path, "cpu")
    assert isinstance(loaded, ClickUNet) and meta["dataset"] == {"name": "kits"}
    shape = (40, 40, 30)
    target = np.zeros(shape, bool)
    target[15:22, 15:22, 10:16] = True
    save_nifti(np.where(target, 150.0, 40.0), make_affine((1.0, 1.0, 1.5), shape, "RAS"),
               tmp_path / "i.nii.gz", np.int16)  # fmt: skip
    case = ClickCase("c", str(tmp_path / "i.nii.gz"), target, (1.0, 1.0, 1.5))
    ev = evaluate_clicks(loaded, [case], n_clicks=2, dataset="kits", device="cpu")
    assert len(ev.curve) == 2 and np.isfinite(ev.curve).all()
    # the deepest voxel: i, j = 18 lie 4 mm deep; k = 12 and 13 both 4.5 mm (1.5 mm
    # slices), so i, j bound the depth and the tie goes to the first in C order
    assert ev.cases[0].clicks[0] == ((18, 18, 12), 1)

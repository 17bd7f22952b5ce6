"""The one window rule: validation, ``sam3d segment`` (the session) and the inference bundle
place and pad the window of a click alike, including half-voxel clicks and volumes
thinner than the window."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from sam3d.data import pipelines
from sam3d.engine import ClickCropInferer
from sam3d.inference import ClickSession, WindowGrowth
from sam3d.inference.bundle import ClickInferer
from sam3d.inference.windows import centred_origin, extract_window

KITS_1MM = pipelines.load_dataset_preset("kits")


class RecordingModel(torch.nn.Module):
    """Promptable stand-in: records every crop it encodes and every (local) click it gets.

    Tumour logit = the crop's intensity at each voxel, so the output is a copy of the crop.
    """

    def __init__(self, crop_size: int) -> None:
        super().__init__()
        self.crop_size = crop_size
        self.crops: list[torch.Tensor] = []
        self.clicks: list[torch.Tensor] = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.crops.append(images.detach().clone())
        return images.clone()

    def decode(self, features, points, point_labels) -> torch.Tensor:
        self.clicks.append(points.detach().clone())
        return torch.cat([torch.zeros_like(features), features], dim=1)


def test_centred_origin_by_hand():
    # the click's voxel floor(c + 0.5) sits at index r // 2 of the window
    assert centred_origin([20.0, 21.0, 10.5], [32, 32, 8], [100, 100, 100]) == (4, 5, 7)
    assert centred_origin([10.49, 10.5, 10.51], [8, 8, 8], [100, 100, 100]) == (6, 7, 7)
    # consecutive integer clicks move the window by one voxel each (no round-half-even)
    starts = [centred_origin([c, 50, 50], [32, 32, 32], [100] * 3)[0] for c in range(40, 46)]
    assert starts == [24, 25, 26, 27, 28, 29]
    # shifted inside at the borders; centred on a volume thinner than (or as thin as) it
    assert centred_origin([1.0, 98.0, 2.0], [8, 8, 8], [100, 100, 5]) == (0, 92, -1)
    assert centred_origin([1.0, 1.0, 1.0], [8, 8, 8], [8, 7, 2]) == (0, 0, -3)


def test_extract_window_pads_with_the_volume_minimum_on_both_sides():
    vol = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4) + 5.0
    win = extract_window(vol, (-1, -2, 0), (4, 6, 4))
    assert win.shape == (1, 4, 6, 4)
    assert torch.equal(win[:, 1:3, 2:5, :], vol)
    assert float(win[:, 0].max()) == 5.0 and float(win[:, 3].max()) == 5.0


@pytest.mark.parametrize(
    "click", [(10.5, 7.5, 2.0), (10.0, 7.0, 2.5), (2.5, 14.5, 0.0), (19.0, 0.5, 4.0)]
)
def test_validation_cli_and_bundle_crop_the_same_window(tmp_path, click):
    """The same click on the same volume: the two code paths that place windows, the
    session that ``sam3d segment`` runs (:class:`ClickSession`) and the bundle's
    :class:`ClickInferer`, encode the same crop and hand the model the same click, after
    training's validation chain and ``sam3d segment``'s preprocessing put the volume on
    the same grid. Validation's :class:`ClickCropInferer` is ``ClickInferer(output=
    "logits")``, not a third path: checked as such (its softmax is the bundle's
    probability). The volume (20 x 16 x 5 voxels at 1 mm, RAS) is thinner than the
    8-voxel window along k; no air, so validation's body crop keeps every voxel."""
    rng = np.random.default_rng(0)
    hu = rng.uniform(-50, 240, size=(20, 16, 5)).astype(np.float32)
    path = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(path))
    label = np.zeros((20, 16, 5), np.uint8)
    label[tuple(int(np.floor(c + 0.5)) for c in click)] = 2
    label_path = tmp_path / "thin_label.nii.gz"
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(label_path))
    growth = WindowGrowth(enabled=False)

    cli = RecordingModel(crop_size=8)
    session = ClickSession(cli, path, dataset=KITS_1MM, device="cpu", growth=growth)
    session.click(click)

    # validation: the bundle's evaluation chain, then its inferer, with the same click
    val = pipelines.val_transforms(KITS_1MM, seed=0)({"image": str(path), "label": str(label_path)})
    assert val["image"].shape == (1, 20, 16, 5)  # nothing cropped away
    torch.testing.assert_close(val["image"].as_tensor(), session.grid_image.as_tensor())
    validation = RecordingModel(crop_size=8)
    points = torch.tensor([[click]], dtype=torch.float32)
    labels = torch.ones(1, 1, dtype=torch.long)
    logits = ClickCropInferer(8, growth={"enabled": False})(
        val["image"][None], validation, points=points, point_labels=labels
    )
    bundle = RecordingModel(crop_size=8)
    bundle_prob = ClickInferer(growth=growth)(
        val["image"][None], bundle, points=points, point_labels=labels
    )

    assert len(cli.crops) == len(bundle.crops) == 1
    assert torch.equal(cli.crops[0], bundle.crops[0])
    torch.testing.assert_close(cli.clicks[0], bundle.clicks[0])
    # ClickCropInferer: the bundle's inferer, only as logits log(1 - p), log(p)
    assert torch.equal(validation.crops[0], bundle.crops[0])
    torch.testing.assert_close(
        torch.softmax(logits.float(), dim=1)[:, 1:], bundle_prob.float(), rtol=0, atol=1e-5
    )
    # and the crop is the one the rule places, by hand
    origin = centred_origin(click, (8, 8, 8), (20, 16, 5))
    expected = extract_window(session.grid_image.as_tensor(), origin, (8, 8, 8))[None]
    assert torch.equal(cli.crops[0], expected)
    assert origin[2] == -1  # thin axis: volume centred, padded on both sides
    assert session.windows == [origin]
    # validation's logits give back the window's probability inside it, background outside
    prob = torch.softmax(logits[0], dim=0)[1]
    inside = tuple(slice(max(o, 0), o + 8) for o in origin)
    window_prob = torch.sigmoid(expected[0, 0])
    lo = [max(0, -o) for o in origin]
    sub = window_prob[lo[0] :, lo[1] :, lo[2] :][: prob[inside].shape[0], : prob[inside].shape[1]]
    torch.testing.assert_close(prob[inside], sub[:, :, : prob[inside].shape[2]], atol=1e-5, rtol=0)
    outside = torch.ones_like(prob, dtype=torch.bool)
    outside[inside] = False
    assert float(prob[outside].max()) < 1e-5


def test_validation_grows_windows_like_the_cli():
    """A lesion longer than the window: validation decodes the same grown windows."""
    vol = torch.full((1, 1, 40, 12, 12), -2.0)
    vol[0, 0, 4:36, 4:8, 4:8] = 2.0  # a bar along i, 32 voxels long
    points = torch.tensor([[[20.0, 6.0, 6.0]]])
    labels = torch.ones(1, 1, dtype=torch.long)
    grown = RecordingModel(crop_size=12)
    logits = ClickCropInferer(12)(vol, grown, points=points, point_labels=labels)
    mask = logits[0].argmax(0) == 1
    assert len(grown.crops) > 1
    assert bool(mask[4:36, 4:8, 4:8].all()) and int(mask.sum()) == 32 * 4 * 4
    single = RecordingModel(crop_size=12)
    one = ClickCropInferer(12, growth={"enabled": False})(
        vol, single, points=points, point_labels=labels
    )
    assert len(single.crops) == 1 and int((one[0].argmax(0) == 1).sum()) == 12 * 4 * 4


def test_a_previous_prediction_kept_by_its_box_gives_the_whole_grids_windows():
    """A click state keeps only its windows' box of the stitched map: every window cut from
    it equals the window cut from the whole grid (zero outside the box), in half precision."""
    from sam3d.inference.windows import PreviousPrediction, extract_window, previous_window

    g = torch.Generator().manual_seed(0)
    grid = torch.zeros(20, 18, 16)
    lo, hi = (3, 5, 2), (15, 14, 11)
    grid[3:15, 5:14, 2:11] = torch.rand(12, 9, 9, generator=g)
    kept = PreviousPrediction.of(grid, lo, hi)
    assert kept.values.dtype == torch.float16 and tuple(kept.values.shape) == (12, 9, 9)
    roi = (8, 8, 8)
    for origin in [(0, 0, 0), (10, 8, 6), (12, 10, 8), (-2, 4, 1), (14, 12, 9)]:
        want = extract_window(grid[None], origin, roi).half().float()
        got = previous_window(kept, origin, roi)
        assert got.shape == (1, *roi)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert previous_window(kept, (16, 15, 12), roi).abs().sum() == 0  # no overlap

"""RandCropAffined: one resample that equals the crop, flip, rot90 and zoom it composes."""

from __future__ import annotations

import numpy as np
import torch

from sam3d.data.augment import RandCropAffined


def _ramp(shape=(10, 10, 10)) -> torch.Tensor:
    g = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")).float()
    return (g[0] * 100 + g[1] * 10 + g[2])[None]  # unique value per voxel


def test_no_augmentation_is_the_centre_crop():
    x = _ramp()
    t = RandCropAffined(["image", "label"], crop_size=6, max_shift=0)
    out = t({"image": x, "label": (x > 500).float()})
    torch.testing.assert_close(out["image"], x[:, 2:8, 2:8, 2:8])
    torch.testing.assert_close(out["label"], (x[:, 2:8, 2:8, 2:8] > 500).float())


def test_flip_and_rot90_and_shift_are_exact_voxel_moves():
    x = _ramp()
    t = RandCropAffined("image", crop_size=6, flip_prob=1.0, max_shift=0)
    torch.testing.assert_close(t({"image": x})["image"], x[:, 2:8, 2:8, 2:8].flip(1, 2, 3))
    t = RandCropAffined("image", crop_size=6, rot90_prob=1.0, max_shift=0)
    t.set_random_state(0)
    out = t({"image": x})["image"][0]
    centre = x[0, 2:8, 2:8, 2:8]
    assert any(torch.allclose(out, torch.rot90(centre, k, dims=(0, 1))) for k in (1, 2, 3))
    # a shift moves the window by whole voxels within the margin
    t = RandCropAffined("image", crop_size=6, max_shift=2)
    t.set_random_state(1)
    out = t({"image": x})["image"]
    hits = [
        (i, j, k) for i in range(5) for j in range(5) for k in range(5)
        if torch.allclose(out, x[:, i : i + 6, j : j + 6, k : k + 6], atol=1e-3)
    ]  # fmt: skip
    assert len(hits) == 1


def test_zoom_magnifies_about_the_centre_and_labels_stay_labels():
    x = _ramp((21, 21, 21))
    t = RandCropAffined(["image", "label"], crop_size=21, zoom_prob=1.0, zoom_range=(2, 2))
    out = t({"image": x, "label": (x > 1000).float()})
    # zoom 2: output voxel i reads input 10 + (i - 10) / 2, a linear ramp stays linear
    img = out["image"][0]
    assert torch.isclose(img[10, 10, 10], x[0, 10, 10, 10])
    assert torch.isclose(img[14, 10, 10] - img[10, 10, 10], torch.tensor(200.0))
    assert set(np.unique(out["label"].numpy())) <= {0.0, 1.0}


def test_rotation_turns_the_axial_plane():
    x = torch.zeros(1, 21, 21, 5)
    x[0, 15, 10, :] = 1.0  # a point 5 voxels along axis 0 from the centre
    t = RandCropAffined("image", crop_size=(21, 21, 5), rotate_prob=1.0, rotate_deg=90)
    t.set_random_state(3)
    out = t({"image": x})["image"][0, :, :, 2]
    i, j = np.unravel_index(int(out.argmax()), out.shape)
    assert abs(np.hypot(i - 10, j - 10) - 5) < 1.0 and (i, j) != (15, 10)

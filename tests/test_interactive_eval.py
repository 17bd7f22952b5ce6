"""Evaluation by simulated clicks: click placement, the curve, NoC and positive-inside,
by hand; and the same protocol through a real ClickSession."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam3d.inference.interactive import (
    ClickCase,
    evaluate_clicks,
    lesion_cases,
    next_click,
    run_case,
)

SHAPE = (10, 10, 10)


def _gt() -> np.ndarray:
    gt = np.zeros(SHAPE, bool)
    gt[2:6, 2:6, 2:6] = True  # 64 voxels
    return gt


class ScriptedSession:
    """An oracle 'model': returns a fixed sequence of masks and records the clicks."""

    def __init__(self, masks):
        self.masks, self.calls = list(masks), []

    def reset(self):
        self.calls.clear()

    def click(self, point, positive=True):
        self.calls.append((tuple(point), positive))
        return torch.from_numpy(self.masks[min(len(self.calls), len(self.masks)) - 1])


def _scripted_masks():
    gt = _gt()
    leak = np.zeros(SHAPE, bool)
    leak[7:10, 0:3, 0:3] = True  # 27 voxels, on the image border
    m1 = np.zeros(SHAPE, bool)
    m1[2:6, 2:6, 2:3] = True  # 16 of the 64
    m1 |= leak
    return [m1, gt | leak, gt.copy()]


def test_clicks_curve_noc_and_inside_by_hand():
    case = ClickCase("a", "img-a", _gt(), (1.0, 1.0, 1.0))
    session = ScriptedSession(_scripted_masks())
    res = run_case(session, case, n_clicks=5)
    # click 1: the cube's deepest voxel; {3,4}^3 all lie 2 voxels deep, C order -> (3,3,3)
    # click 2: the miss (4x4x3 slab k=3..5, 48 voxels) beats the leak (27): its deepest
    #          voxel (3,3,4), positive; click 3: the leak's centre (8,1,1), negative;
    # then the mask is exact and clicking stops.
    assert session.calls == [((3.0, 3.0, 3.0), True), ((3.0, 3.0, 4.0), True),
                             ((8.0, 1.0, 1.0), False)]  # fmt: skip
    assert res.clicks == [((3, 3, 3), 1), ((3, 3, 4), 1), ((8, 1, 1), 0)]
    np.testing.assert_allclose(res.dice, [32 / 107, 128 / 155, 1.0, 1.0, 1.0])
    assert res.positive_inside == [False, True]  # (3,3,3) is outside mask 1
    assert [res.noc(t, 5) for t in (0.8, 0.85, 0.9)] == [2, 3, 3]

    empty = ScriptedSession([np.zeros(SHAPE, bool)])
    ev = evaluate_clicks(
        lambda image: session if image == "img-a" else empty,
        [case, ClickCase("b", "img-b", _gt(), (1.0, 1.0, 1.0))],
        n_clicks=5,
    )
    np.testing.assert_allclose(ev.curve, [16 / 107, 64 / 155, 0.5, 0.5, 0.5])
    assert ev.noc == pytest.approx({0.8: 3.5, 0.85: 4.0, 0.9: 4.0})  # unreached counts 5
    assert ev.positive_inside == pytest.approx(1 / 7)  # 1 of 2 + 0 of 5 positive clicks
    assert ev.cases[1].clicks == [((3, 3, 3), 1)] * 5  # the whole cube stays missed


def test_next_click_deepest_in_mm_and_the_largest_component():
    target = np.zeros((12, 12, 6), bool)
    target[1:11, 1:4, 1:5] = True  # a 10 x 3 x 4 slab
    # in voxels the deepest row is j=2 at k=2 (depth 2); with 3 mm along j every voxel
    # is limited by k or i, and the first voxel of depth 2 mm in C order wins
    p_vox, lab = next_click(target, np.zeros_like(target))
    assert lab == 1 and tuple(p_vox) == (2, 2, 2)
    p_mm, _ = next_click(target, np.zeros_like(target), (1.0, 3.0, 1.0))
    assert tuple(p_mm) == (2, 1, 2)  # j=1 is already 3 mm from the edge
    # two leaks: the bigger one is clicked, negative
    pred = target.copy()
    pred[0, 0, 0] = True
    pred[6:10, 6:10, 1:5] = True
    q, lab = next_click(target, pred)
    assert lab == 0 and 6 <= q[0] < 10 and 6 <= q[1] < 10
    assert next_click(target, target) is None


class ThresholdModel(torch.nn.Module):
    """Segments every bright voxel of the window, whatever the clicks (a Sam3D-shaped
    stand-in: ``encode`` keeps the crop, ``decode`` -> B x 2 x H x W x D logits)."""

    crop_size = 32

    def encode(self, images):
        return images

    def decode(self, features, points, point_labels=None, mask_prompt=None):
        fg = (features > 1.0).float() * 20 - 10
        return torch.cat([-fg, fg], dim=1)


def test_through_clicksession_only_the_clicked_lesion_counts(tmp_path):
    """Two bright cubes; the model segments both. Scored against the clicked one, the
    other is a leak: Dice 2*64/(128+64) at every click, the negative click changes
    nothing, NoC is the cap."""
    import json

    from sam3d.data.phantoms.common import make_affine, save_nifti

    shape = (40, 40, 40)
    aff = make_affine((1.0, 1.0, 1.0), shape, "LPS")
    inst = np.zeros(shape, np.uint16)
    inst[10:14, 10:14, 10:14] = 1
    inst[22:26, 10:14, 10:14] = 2
    image = np.where(inst > 0, 200.0, 40.0)
    save_nifti(image, aff, tmp_path / "i.nii.gz", np.int16)
    save_nifti((inst > 0) * 2, aff, tmp_path / "l.nii.gz", np.uint8)
    save_nifti(inst, aff, tmp_path / "n.nii.gz", np.uint16)
    entry = {"image": "./i.nii.gz", "label": "./l.nii.gz", "instance": "./n.nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps({"test": [entry]}))
    cases = lesion_cases(tmp_path / "dataset.json", "test")
    assert [c.name for c in cases] == ["i#1", "i#2"]
    ev = evaluate_clicks(ThresholdModel(), cases, n_clicks=3, dataset="kits", device="cpu")
    np.testing.assert_allclose(ev.curve, [128 / 192] * 3, atol=1e-6)
    assert ev.noc == {0.8: 3.0, 0.85: 3.0, 0.9: 3.0}
    assert ev.positive_inside == 1.0
    assert [lab for _, lab in ev.cases[0].clicks] == [1, 0, 0]
    # the negative click lands in the other cube
    p = ev.cases[0].clicks[1][0]
    assert inst[p] == 2

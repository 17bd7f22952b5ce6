"""Click simulation: where clicks land, padding, and seeding per case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from sam3d.data.clicks import (
    RandSimulateClicksd,
    RandStructureClicksd,
    SimulateClicksd,
    StructureClicksd,
    case_seed,
    error_region_click,
    interior_point,
    sample_clicks,
)
from sam3d.errors import Sam3DError


def _label(shape=(20, 18, 16)) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    lab[2:18, 2:16, 2:14] = 1  # organ
    lab[8:12, 6:10, 5:9] = 2  # tumour: 4 x 4 x 4 = 64 voxels
    return lab


def _case(name: str, lab: np.ndarray | None = None) -> dict:
    lab = _label() if lab is None else lab
    t = MetaTensor(torch.from_numpy(lab)[None], meta={"filename_or_obj": f"/data/labelsTr/{name}"})
    return {"label": t}


def _at(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    idx = points.astype(int)
    return mask[idx[:, 0], idx[:, 1], idx[:, 2]]


def test_positive_clicks_inside_tumour_negative_outside():
    lab = _label()
    tumour = lab == 2
    points, labels = sample_clicks(tumour, 10, 20, np.random.default_rng(0))
    assert points.shape == (30, 3) and points.dtype == np.float32
    assert labels.tolist() == [1] * 10 + [0] * 20
    assert np.all(points == np.round(points))  # voxel centres
    assert _at(tumour, points[labels == 1]).all()
    assert not _at(tumour, points[labels == 0]).any()


def test_negatives_near_the_tumour_with_a_margin():
    tumour = _label() == 2
    points, labels = sample_clicks(tumour, 1, 200, np.random.default_rng(1), neg_margin_vox=2)
    neg = points[labels == 0]
    lo, hi = np.array([8, 6, 5]) - 2, np.array([11, 9, 8]) + 2  # tumour box +- margin
    assert np.all(neg >= lo) and np.all(neg <= hi)
    assert not _at(tumour, neg).any()


def test_no_tumour_pads_positives_with_minus_one():
    empty = np.zeros((8, 8, 8), dtype=bool)
    points, labels = sample_clicks(empty, 3, 2, np.random.default_rng(0))
    assert labels.tolist() == [0, 0, -1, -1, -1]
    assert np.all(points[2:] == 0)


def test_fewer_tumour_voxels_than_clicks_draws_with_replacement():
    one = np.zeros((6, 6, 6), dtype=bool)
    one[3, 2, 1] = True
    points, labels = sample_clicks(one, 4, 0, np.random.default_rng(0))
    assert labels.tolist() == [1] * 4 and np.all(points == [3, 2, 1])


def test_seeded_clicks_depend_on_seed_and_case_name_only():
    t = SimulateClicksd(keys="label", n_pos=3, n_neg=2, seed=7, tumour_label=2)
    a1, b, a2 = t(_case("case_a.nii.gz")), t(_case("case_b.nii.gz")), t(_case("case_a.nii.gz"))
    assert torch.equal(a1["points"], a2["points"])  # same case, any order, same clicks
    assert not torch.equal(a1["points"], b["points"])
    other = SimulateClicksd(keys="label", n_pos=3, n_neg=2, seed=8, tumour_label=2)
    assert not torch.equal(a1["points"], other(_case("case_a.nii.gz"))["points"])
    # the seed is the documented function of (seed, file name), independent of the folder
    rng = np.random.default_rng(case_seed(7, "case_a.nii.gz"))
    expected, _ = sample_clicks(_label() == 2, 3, 2, rng)
    assert np.array_equal(a1["points"].numpy(), expected)
    assert a1["point_labels"].dtype == torch.int64 and a1["points"].dtype == torch.float32
    assert _at(_label() == 2, a1["points"].numpy()[:3]).all()


def test_seeded_clicks_need_a_case_name():
    t = SimulateClicksd(keys="label")
    with pytest.raises(Sam3DError, match="case name"):
        t({"label": torch.zeros(1, 4, 4, 4)})
    named = SimulateClicksd(keys="label", case_key="name")
    out = named({"label": torch.ones(1, 4, 4, 4), "name": "x"})
    assert out["point_labels"].tolist() == [1]


def test_seeded_clicks_are_not_randomizable_so_cachedataset_caches_them():
    from monai.transforms import Randomizable

    assert not isinstance(SimulateClicksd(), Randomizable)
    assert isinstance(RandSimulateClicksd(), Randomizable)


def test_random_training_clicks_are_reproducible_from_their_seed():
    data = _case("c.nii.gz")
    t = RandSimulateClicksd(keys="label", n_pos=10, n_neg=20, tumour_label=2)
    t.set_random_state(seed=3)
    first = [t(data)["points"] for _ in range(2)]
    assert not torch.equal(first[0], first[1])  # fresh clicks every call
    t.set_random_state(seed=3)
    again = [t(data)["points"] for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    out = t(data)
    tumour = _label() == 2
    labels = out["point_labels"].numpy()
    assert _at(tumour, out["points"].numpy()[labels == 1]).all()
    assert not _at(tumour, out["points"].numpy()[labels == 0]).any()


def test_clicks_collate_to_fixed_size_batches():
    from monai.data import list_data_collate

    t = SimulateClicksd(keys="label", n_pos=2, n_neg=3, tumour_label=2)
    empty = np.zeros_like(_label())
    batch = list_data_collate([t(_case("a.nii.gz")), t(_case("b.nii.gz", empty))])
    assert batch["points"].shape == (2, 5, 3) and batch["point_labels"].shape == (2, 5)
    assert batch["point_labels"][1].tolist() == [0, 0, 0, -1, -1]


def test_varying_click_counts_stay_in_bounds_and_cover_single_clicks():
    from monai.data import MetaTensor

    tumour = np.zeros((12, 12, 12), dtype=np.uint8)
    tumour[3:8, 3:8, 3:8] = 1
    t = RandSimulateClicksd(keys="label", n_pos=4, n_neg=3, vary_count=True)
    t.set_random_state(0)
    seen_pos = set()
    for _ in range(60):
        out = t({"label": MetaTensor(torch.from_numpy(tumour)[None])})
        labels, points = out["point_labels"], out["points"]
        assert labels.shape == (7,) and points.shape == (7, 3)
        n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
        assert 1 <= n_pos <= 4 and 0 <= n_neg <= 3
        # positives first, then negatives, then padding
        assert labels.tolist() == [1] * n_pos + [0] * n_neg + [-1] * (7 - n_pos - n_neg)
        idx = points.long()
        inside = tumour[idx[:, 0], idx[:, 1], idx[:, 2]]
        assert (inside[:n_pos] == 1).all() and (inside[n_pos : n_pos + n_neg] == 0).all()
        seen_pos.add(n_pos)
    assert seen_pos == {1, 2, 3, 4}


# --------------------------------------------------------------------------- structures


def _u_mask() -> np.ndarray:
    u = np.zeros((30, 40), dtype=bool)
    u[4:26, 4:12] = True  # left arm
    u[4:26, 28:36] = True  # right arm
    u[18:26, 4:36] = True  # bottom bar
    return u


def test_interior_point_lies_deep_inside_a_u_shape():
    u = _u_mask()
    centroid = np.argwhere(u).mean(0).round().astype(int)
    assert not u[tuple(centroid)]  # the centroid of a U is outside it
    idx = np.argwhere(u)
    middle = idx[len(idx) // 2]  # the reference's click: a mask pixel, but on its edge
    p = interior_point(u)
    assert u[tuple(p)]
    r, c = middle
    assert not u[r - 1 : r + 2, c - 1 : c + 2].all()  # it touches the background
    assert p[1] - 1 >= 0 and u[p[0] - 1 : p[0] + 2, p[1] - 1 : p[1] + 2].all()
    # independent check: brute-force distance to the nearest background pixel (border = bg)
    padded = np.pad(u, 1)
    bg = np.argwhere(~padded)
    fg = np.argwhere(padded)
    dist = np.sqrt(((fg[:, None, :] - bg[None, :, :]) ** 2).sum(-1)).min(1)
    assert np.isclose(dist.max(), np.sqrt(((p + 1 - bg) ** 2).sum(-1)).min())
    assert interior_point(np.zeros((5, 5), bool)) is None
    full = np.ones((7, 9), bool)  # the image border counts as boundary: row 3 is deepest
    assert interior_point(full).tolist() == [3, 3]  # cols 3..5 tie at 4 px: first in C order
    assert interior_point(u).tolist() == p.tolist()  # deterministic


def test_error_region_click_is_farthest_from_the_first_inside_the_errors():
    gt = np.zeros((10, 10), bool)
    gt[2:8, 2:8] = True
    pred = gt.copy()
    pred[2:8, 6:8] = False  # missed strip on the right
    pred[0, 0] = True  # a leak far away
    point, label = error_region_click(gt, pred, first=(4, 4))
    assert point.tolist() == [0, 0] and label == 0  # the leak is farther than the strip
    pred[0, 0] = False
    point, label = error_region_click(gt, pred, first=(4, 4))
    assert label == 1 and gt[tuple(point)] and not pred[tuple(point)]
    assert point.tolist() in ([7, 7],)  # farthest missed pixel from (4, 4)
    assert error_region_click(gt, gt, (4, 4)) is None


def test_structure_clicks_one_prompt_per_channel_with_padding():
    lab = np.zeros((3, 30, 40), np.float32)
    lab[0] = _u_mask()
    lab[1, 2:5, 30:38] = 1  # channel 2 empty: structure absent
    out = StructureClicksd("label")({"label": torch.from_numpy(lab)})
    assert out["points"].shape == (3, 1, 2) and out["point_labels"].tolist() == [[1], [1], [-1]]
    for c in range(2):
        r, col = out["points"][c, 0].long().tolist()
        assert lab[c, r, col] == 1
    pred = lab.copy()
    pred[0, 20:26, 4:36] = 0  # the model missed the U's bar
    two = StructureClicksd("label", pred_key="pred")({"label": lab, "pred": pred})
    assert two["points"].shape == (3, 2, 2)
    assert two["point_labels"].tolist() == [[1, 1], [1, -1], [-1, -1]]
    r, col = two["points"][0, 1].long().tolist()
    assert lab[0, r, col] == 1 and pred[0, r, col] == 0
    rand = RandStructureClicksd("label")
    rand.set_random_state(0)
    a = rand({"label": lab})
    assert a["point_labels"].tolist() == [[1], [1], [-1]]
    for c in range(2):
        r, col = a["points"][c, 0].long().tolist()
        assert lab[c, r, col] == 1
    rand.set_random_state(0)
    assert torch.equal(rand({"label": lab})["points"], a["points"])  # seeded by MONAI

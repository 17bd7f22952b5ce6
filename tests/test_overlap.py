"""Dice, IoU, precision, recall against DeepMind's Dice and hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

np.NaN = np.nan  # noqa: NPY201  (surface-distance 0.1 still uses it)
import surface_distance as sd  # noqa: E402

from sam3d.metrics.overlap import (  # noqa: E402
    OverlapMetric,
    compute_dice,
    compute_iou,
    compute_precision_recall,
)


@pytest.mark.parametrize("seed", range(4))
def test_dice_matches_reference_and_counts(seed):
    rng = np.random.default_rng(seed)
    shape = (12, 10, 8) if seed % 2 else (30, 20)
    p, g = rng.random(shape) < 0.4, rng.random(shape) < 0.5
    pt, gt = torch.from_numpy(p), torch.from_numpy(g)
    assert abs(float(compute_dice(pt, gt)) - sd.compute_dice_coefficient(g, p)) < 1e-12
    tp, fp, fn = (p & g).sum(), (p & ~g).sum(), (~p & g).sum()
    assert abs(float(compute_iou(pt, gt)) - tp / (tp + fp + fn)) < 1e-12
    prec, rec = compute_precision_recall(pt, gt)
    assert abs(float(prec) - tp / (tp + fp)) < 1e-12
    assert abs(float(rec) - tp / (tp + fn)) < 1e-12


def test_empty_conventions():
    e = torch.zeros(5, 5, dtype=torch.bool)
    m = e.clone()
    m[1:3, 1:3] = True
    assert math.isnan(float(compute_dice(e, e)))
    assert math.isnan(sd.compute_dice_coefficient(e.numpy(), e.numpy()))
    assert float(compute_dice(e, m)) == 0.0
    prec, rec = compute_precision_recall(e, m)
    assert math.isnan(float(prec)) and float(rec) == 0.0


def test_probabilities_are_refused():
    with pytest.raises(ValueError, match="binary"):
        compute_dice(torch.rand(4, 4), torch.ones(4, 4))


def test_batched_shapes_and_float_masks():
    rng = np.random.default_rng(1)
    p = torch.from_numpy(rng.random((2, 3, 9, 9, 9)) < 0.5).float()
    g = torch.from_numpy(rng.random((2, 3, 9, 9, 9)) < 0.5).float()
    dice = compute_dice(p, g, spatial_dims=3)
    assert dice.shape == (2, 3)
    assert abs(float(dice[1, 2]) - float(compute_dice(p[1, 2], g[1, 2]))) < 1e-12


def test_metric_per_case_and_pooled():
    a = torch.zeros(1, 2, 4, 4)
    b = torch.zeros(1, 2, 4, 4)
    a[0, 1, :2] = 1  # 8 pixels predicted
    b[0, 1, :1] = 1  # 4 true: dice 2*4/12
    c = torch.zeros(1, 2, 4, 4)
    d = torch.zeros(1, 2, 4, 4)
    c[0, 1, 0, 0] = 1
    d[0, 1, 0, 0] = 1  # perfect single pixel: dice 1
    per_case = OverlapMetric("dice")
    pooled = OverlapMetric("dice", pooled=True)
    for m in (per_case, pooled):
        m(a, b)
        m(c, d)
    assert abs(float(per_case.aggregate()) - (8 / 12 + 1) / 2) < 1e-6
    assert abs(float(pooled.aggregate()) - 2 * 5 / (9 + 5)) < 1e-6
    iou = OverlapMetric("iou", pooled=True)
    iou(torch.cat([a, c]), torch.cat([b, d]))
    assert abs(float(iou.aggregate()) - 5 / 9) < 1e-6


def test_case_overlap_metric_keeps_per_case_values_in_its_buffer():
    from sam3d.metrics import CaseOverlapMetric

    a = torch.zeros(2, 1, 4, 4)
    b = torch.zeros(2, 1, 4, 4)
    a[0, 0, :2] = 1  # case 0: 8 predicted, 4 true inside them -> dice 8/12, iou 4/8
    b[0, 0, :1] = 1
    a[1, 0, 0, 0] = b[1, 0, 0, 0] = 1  # case 1: perfect
    dice, iou = CaseOverlapMetric("dice", include_background=True), CaseOverlapMetric("iou")
    dice(a, b)
    iou(a, b)  # one channel: nothing to drop as background
    torch.testing.assert_close(dice.get_buffer(), torch.tensor([[8 / 12], [1.0]]))
    torch.testing.assert_close(iou.get_buffer(), torch.tensor([[0.5], [1.0]]))
    assert float(dice.aggregate()) == pytest.approx((8 / 12 + 1) / 2)


def test_echo_metric_keys_name_their_structure_and_metric():
    from sam3d.apps.echo import metric_names, structure_metrics

    names = metric_names(["lv", "myo_wall"])  # an underscore in a structure name
    assert names[:3] == ["val_dice", "val_iou", "val_hd95"]
    assert "val_hd95_myo_wall" in names and len(names) == 9
    handlers = structure_metrics(["lv", "myo_wall"])
    assert "val_dice" not in handlers and set(handlers) == set(names) - {"val_dice"}
    h = handlers["val_iou_myo_wall"]
    assert h.metric_fn.metric == "iou" and h._output_transform.c == 1
    assert type(handlers["val_hd95_lv"].metric_fn).__name__ == "BoundedHD95Metric"

"""Boundary F1 against an independent scipy implementation and hand cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from sam3d.metrics.boundary import BoundaryF1Metric, compute_bf_score


def bf_scipy(pred: np.ndarray, gt: np.ndarray, tol: float, spacing=None) -> float:
    d = pred.ndim
    st = ndimage.generate_binary_structure(d, d)
    bp = pred & ~ndimage.binary_erosion(pred, st, border_value=0)
    bg = gt & ~ndimage.binary_erosion(gt, st, border_value=0)
    sampling = spacing if spacing is not None else [1.0] * d
    dist_to_g = ndimage.distance_transform_edt(~bg, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~bp, sampling=sampling)
    precision = (dist_to_g[bp] <= tol).mean()
    recall = (dist_to_p[bg] <= tol).mean()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def blob(rng, shape):
    n = ndimage.gaussian_filter(rng.random(shape), 2.0)
    return n > np.quantile(n, 0.6)


@pytest.mark.parametrize("seed", range(4))
def test_matches_scipy_in_pixels_and_mm(seed):
    rng = np.random.default_rng(seed)
    shape = (40, 36) if seed % 2 == 0 else (20, 18, 14)
    p, g = blob(rng, shape), blob(rng, shape)
    pt, gt = torch.from_numpy(p), torch.from_numpy(g)
    for tol in (1.0, 2.0):
        assert abs(float(compute_bf_score(pt, gt, tol)) - bf_scipy(p, g, tol)) < 1e-9
        assert float(compute_bf_score(pt, gt, tolerance_px=tol)) == float(
            compute_bf_score(pt, gt, tolerance_mm=tol, spacing_mm=[1.0] * len(shape))
        )
    spacing = [0.5, 1.5, 2.0][: len(shape)]
    got = float(compute_bf_score(pt, gt, tolerance_mm=1.5, spacing_mm=spacing))
    assert abs(got - bf_scipy(p, g, 1.5, spacing)) < 1e-9


def test_hand_cases():
    g = np.zeros((10, 10), bool)
    g[2:8, 2:8] = True
    gt = torch.from_numpy(g)
    assert float(compute_bf_score(gt, gt, 1.0)) == 1.0
    shifted = torch.from_numpy(np.roll(g, 1, axis=0))
    assert float(compute_bf_score(shifted, gt, 1.0)) == 1.0  # within one pixel
    assert float(compute_bf_score(shifted, gt, 0.5)) < 1.0
    e = torch.zeros_like(gt)
    assert float(compute_bf_score(e, gt)) == 0.0
    assert math.isnan(float(compute_bf_score(e, e)))


def test_metric_class():
    rng = np.random.default_rng(7)
    p = np.stack([blob(rng, (32, 32)) for _ in range(2)])
    g = np.stack([blob(rng, (32, 32)) for _ in range(2)])
    metric = BoundaryF1Metric(tolerance_px=1.0)
    vals = metric(torch.from_numpy(p[:, None]).float(), torch.from_numpy(g[:, None]).float())
    assert vals.shape == (2, 1)
    for i in range(2):
        assert abs(float(vals[i, 0]) - bf_scipy(p[i], g[i], 1.0)) < 1e-6


def test_units_say_what_they_are():
    # a 2 px shift on a 0.5 mm grid: 1 mm away, so within 1 mm but not within 1 px
    g = np.zeros((16, 16), bool)
    g[4:12, 4:12] = True
    gt, shifted = torch.from_numpy(g), torch.from_numpy(np.roll(g, 2, axis=1))
    assert float(compute_bf_score(shifted, gt, tolerance_mm=1.0, spacing_mm=0.5)) == 1.0
    assert float(compute_bf_score(shifted, gt, tolerance_px=1.0)) < 1.0
    assert float(compute_bf_score(shifted, gt, tolerance_px=2.0)) == 1.0


def test_misuse_raises_value_error():
    a = torch.zeros(8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="not both"):
        compute_bf_score(a, a, 1.0, tolerance_mm=1.0, spacing_mm=[1, 1])
    with pytest.raises(ValueError, match="needs spacing_mm"):
        compute_bf_score(a, a, tolerance_mm=1.0)
    with pytest.raises(ValueError, match="only used with tolerance_mm"):
        compute_bf_score(a, a, 1.0, spacing_mm=[1, 1])
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite and >= 0"):
            compute_bf_score(a, a, bad)
    with pytest.raises(ValueError, match="shapes differ"):
        compute_bf_score(a, a[:4])
    with pytest.raises(ValueError, match="needs spacing_mm"):
        BoundaryF1Metric(tolerance_mm=1.0)

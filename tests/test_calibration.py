"""ECE against a direct numpy implementation of Guo et al.'s binning and hand cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam3d.metrics.calibration import CalibrationErrorMetric, compute_ece


def ece_numpy(p: np.ndarray, y: np.ndarray, n_bins=15, mode="confidence") -> float:
    if mode == "confidence":
        conf, acc = np.maximum(p, 1 - p), ((p > 0.5) == y).astype(float)
    else:
        conf, acc = p, y.astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(conf[inside].mean() - acc[inside].mean())
    return ece


@pytest.mark.parametrize("mode", ["confidence", "probability"])
def test_matches_numpy(mode):
    rng = np.random.default_rng(0)
    p = rng.random((3, 40, 40))
    y = rng.random((3, 40, 40)) < p**1.5  # miscalibrated on purpose
    got = float(compute_ece(torch.from_numpy(p), torch.from_numpy(y), mode=mode))
    assert abs(got - ece_numpy(p.ravel(), y.ravel(), mode=mode)) < 1e-12


def test_hand_cases():
    # perfectly confident and right: 0; confident and always wrong: 1
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert float(compute_ece(y, y)) == 0.0
    assert abs(float(compute_ece(1 - y, y)) - 1.0) < 1e-12
    # all at 0.8, right 80% of the time: calibrated
    p = torch.full((10,), 0.8, dtype=torch.float64)
    t = torch.tensor([1.0] * 8 + [0.0] * 2)
    assert abs(float(compute_ece(p, t))) < 1e-12


def test_metric_is_dataset_level():
    rng = np.random.default_rng(1)
    p = rng.random((4, 1, 16, 16))
    y = rng.random((4, 1, 16, 16)) < p
    metric = CalibrationErrorMetric()
    metric(torch.from_numpy(p[:2]), torch.from_numpy(y[:2]).float())
    metric(torch.from_numpy(p[2:]), torch.from_numpy(y[2:]).float())
    assert abs(float(metric.aggregate()) - ece_numpy(p.ravel(), y.ravel())) < 1e-6

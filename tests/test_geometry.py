"""The one spacing helper and the one click-to-grid mapping, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from sam3d.data.geometry import (
    grid_spacing_mm,
    original_to_grid,
    spacing_from_affine,
    world_to_original,
)


def test_spacing_is_the_column_norm_and_keeps_zero():
    # an oblique 3 x 4 mm in-plane grid rotated by 30 degrees, 2.5 mm slices
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    a = np.eye(4)
    a[:3, :3] = np.array([[3 * c, -4 * s, 0], [3 * s, 4 * c, 0], [0, 0, 2.5]])
    assert spacing_from_affine(a) == pytest.approx((3.0, 4.0, 2.5))
    assert spacing_from_affine(torch.as_tensor(a)) == pytest.approx((3.0, 4.0, 2.5))
    flat = np.diag([1.0, 0.0, 2.0, 1.0])
    assert spacing_from_affine(flat) == (1.0, 0.0, 2.0)  # a broken header is not hidden
    assert spacing_from_affine(np.diag([0.5, 0.7, 1.0])) == pytest.approx((0.5, 0.7))  # 2D
    img = MetaTensor(torch.zeros(1, 2, 2, 2), affine=torch.as_tensor(a))
    assert grid_spacing_mm(img) == pytest.approx((3.0, 4.0, 2.5))
    assert grid_spacing_mm(torch.zeros(1, 2, 2, 2)) == (1.0, 1.0, 1.0)


def test_clicks_map_through_both_affines_by_hand():
    # original: 2 mm voxels, LPS-flipped i and j, origin (100, 50, -20)
    a0 = np.array([[-2.0, 0, 0, 100], [0, -2.0, 0, 50], [0, 0, 2.0, -20], [0, 0, 0, 1]])
    # grid: 1 mm RAS, origin (10, -30, -20)
    a1 = np.array([[1.0, 0, 0, 10], [0, 1.0, 0, -30], [0, 0, 1.0, -20], [0, 0, 0, 1]])
    click = [[5.0, 10.0, 3.0]]
    # world = (100 - 10, 50 - 20, -20 + 6) = (90, 30, -14); grid = world - origin
    np.testing.assert_allclose(original_to_grid(click, a0, a1), [[80.0, 60.0, 6.0]])
    np.testing.assert_allclose(original_to_grid([[90.0, 30.0, -14.0]], a0, a1, world=True), [
        [80.0, 60.0, 6.0]
    ])  # fmt: skip
    np.testing.assert_allclose(world_to_original([[90.0, 30.0, -14.0]], a0), click)

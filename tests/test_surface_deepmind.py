"""DeepMind's own surface-distance test cases, run through our functions.

The cases and expected values are those of ``surface_distance_test.py`` in
google-deepmind/surface-distance (masks, spacings, expected numbers and the error
messages it expects), unchanged; only the functions called are ours. The
reference's argument order is (gt, pred), ours (pred, gt). Its test compares
numbers to 3 places; so does this file. Empty masks included: the expected values
there are exactly our conventions (docs/METRICS.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import surface_distance as sd
import torch

from sam3d.metrics import (
    compute_assd,
    compute_dice,
    compute_hd95,
    compute_surface_dice,
    compute_surface_distances,
)

NAN, INF = math.nan, math.inf


def close(expected: float, actual: float, places: int = 3) -> bool:
    """The reference's ``_assert_almost_equal``: NaN equals NaN, inf equals inf."""
    if math.isnan(expected) or math.isnan(actual):
        return math.isnan(expected) and math.isnan(actual)
    if math.isinf(expected) or math.isinf(actual):
        return expected == actual
    return round(abs(expected - actual), places) == 0


def surface_overlap(dist: torch.Tensor, area: torch.Tensor, tolerance_mm: float) -> float:
    """Directed surface overlap at a tolerance from our distances (NaN without surfels)."""
    return float((area * (dist <= tolerance_mm)).sum() / area.sum())


def assert_metrics(
    mask_gt,
    mask_pred,
    spacing,
    expected_average_surface_distance,
    expected_hausdorff_100,
    expected_hausdorff_95,
    expected_surface_overlap_at_1mm,
    expected_surface_dice_at_1mm,
    expected_volumetric_dice,
):
    """The reference's ``_assert_metrics``, with every value computed by sam3d."""
    p, g = torch.from_numpy(mask_pred), torch.from_numpy(mask_gt)
    assd = compute_assd(p, g, spacing, directed=True).tolist()
    for i in range(2):
        assert close(expected_average_surface_distance[i], assd[i]), ("assd", i, assd)
    hd100 = float(compute_hd95(p, g, spacing, percent=100))
    assert close(expected_hausdorff_100, hd100), hd100
    hd95 = float(compute_hd95(p, g, spacing, percent=95))
    assert close(expected_hausdorff_95, hd95), hd95
    (item,) = compute_surface_distances(p, g, spacing)
    overlap = (
        surface_overlap(item["distances_gt_to_pred"], item["surfel_areas_gt"], 1.0),
        surface_overlap(item["distances_pred_to_gt"], item["surfel_areas_pred"], 1.0),
    )
    for i in range(2):
        assert close(expected_surface_overlap_at_1mm[i], overlap[i]), ("overlap", i, overlap)
    nsd = float(compute_surface_dice(p, g, spacing, 1.0))
    assert close(expected_surface_dice_at_1mm, nsd), nsd
    dice = float(compute_dice(p, g))
    assert close(expected_volumetric_dice, dice), dice


def assert_distances_equal(ours: dict, expected: dict) -> None:
    """Same (distance, area) pairs per direction; ours are in grid order, so sort both."""
    for direction, areas in (
        ("gt_to_pred", "surfel_areas_gt"),
        ("pred_to_gt", "surfel_areas_pred"),
    ):
        key = f"distances_{direction}"
        got = np.stack([ours[key].numpy(), ours[areas].numpy()])
        want = np.stack([np.asarray(expected[key], float), np.asarray(expected[areas], float)])
        got, want = got[:, np.lexsort(got[::-1])], want[:, np.lexsort(want[::-1])]
        np.testing.assert_array_equal(got, want)


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask_gt, mask_pred, spacing_mm",
    [
        (np.zeros([2, 2, 2], dtype=bool), np.zeros([2, 2], dtype=bool), [1, 1]),
        (np.zeros([2, 2], dtype=bool), np.zeros([2, 2, 2], dtype=bool), [1, 1]),
        (np.zeros([2, 2], dtype=bool), np.zeros([2, 2], dtype=bool), [1, 1, 1]),
    ],
)
def test_raises_on_incompatible_shapes(mask_gt, mask_pred, spacing_mm):
    with pytest.raises(ValueError, match="The arguments must be of compatible shape"):
        compute_surface_distances(
            torch.from_numpy(mask_pred), torch.from_numpy(mask_gt), spacing_mm
        )


@pytest.mark.parametrize(
    "mask_gt, mask_pred, spacing_mm",
    [
        (np.zeros([2], dtype=bool), np.zeros([2], dtype=bool), [1]),
        (np.zeros([2, 2, 2, 2], dtype=bool), np.zeros([2, 2, 2, 2], dtype=bool), [1, 1, 1, 1]),
    ],
)
def test_raises_on_invalid_shapes(mask_gt, mask_pred, spacing_mm):
    with pytest.raises(ValueError, match="Only 2D and 3D masks are supported"):
        compute_surface_distances(
            torch.from_numpy(mask_pred), torch.from_numpy(mask_gt), spacing_mm
        )


# -- 2D -----------------------------------------------------------------------------


def test_2d_on_2_pixels_2mm_away():
    mask_gt = np.zeros((128, 128), bool)
    mask_pred = np.zeros((128, 128), bool)
    mask_gt[50, 70] = 1
    mask_pred[50, 72] = 1
    spacing = (2, 1)
    (ours,) = compute_surface_distances(
        torch.from_numpy(mask_pred), torch.from_numpy(mask_gt), spacing
    )
    diag = 0.5 * math.sqrt(2**2 + 1**2)
    expected = {
        "surfel_areas_gt": [diag, diag, diag, diag],
        "surfel_areas_pred": [diag, diag, diag, diag],
        "distances_gt_to_pred": [1.0, 1.0, 2.0, 2.0],
        "distances_pred_to_gt": [1.0, 1.0, 2.0, 2.0],
    }
    assert set(ours) == set(expected)
    assert_distances_equal(ours, expected)
    assert_metrics(
        mask_gt,
        mask_pred,
        spacing,
        expected_average_surface_distance=(1.5, 1.5),
        expected_hausdorff_100=2.0,
        expected_hausdorff_95=2.0,
        expected_surface_overlap_at_1mm=(0.5, 0.5),
        expected_surface_dice_at_1mm=0.5,
        expected_volumetric_dice=0.0,
    )


def test_2d_two_squares_shifted_by_one_pixel():
    mask_gt = np.asarray(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    mask_pred = np.asarray(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    vertical, horizontal = 2, 1
    diag = 0.5 * math.sqrt(horizontal**2 + vertical**2)
    spacing = (vertical, horizontal)
    (ours,) = compute_surface_distances(
        torch.from_numpy(mask_pred), torch.from_numpy(mask_gt), spacing
    )
    # the reference's hand-listed surfels and distances (clockwise from the top left)
    expected = {
        "surfel_areas_gt": [diag, horizontal, diag, vertical, diag, horizontal, diag, vertical],
        "surfel_areas_pred": [
            diag,
            horizontal,
            diag,
            vertical,
            vertical,
            diag,
            horizontal,
            diag,
            vertical,
            vertical,
        ],
        "distances_gt_to_pred": [0] * 5 + [horizontal] + [0] * 2,
        "distances_pred_to_gt": [0] * 5 + [vertical] * 3 + [0] * 2,
    }
    assert_distances_equal(ours, expected)
    # expected numbers: the reference's own functions on its hand-listed distances
    ref = {k: np.asarray(v, float) for k, v in expected.items()}
    order_g = np.argsort(ref["distances_gt_to_pred"], kind="stable")
    order_p = np.argsort(ref["distances_pred_to_gt"], kind="stable")
    ref_sorted = {
        "distances_gt_to_pred": ref["distances_gt_to_pred"][order_g],
        "surfel_areas_gt": ref["surfel_areas_gt"][order_g],
        "distances_pred_to_gt": ref["distances_pred_to_gt"][order_p],
        "surfel_areas_pred": ref["surfel_areas_pred"][order_p],
    }
    assert_metrics(
        mask_gt,
        mask_pred,
        spacing,
        expected_average_surface_distance=sd.compute_average_surface_distance(ref_sorted),
        expected_hausdorff_100=sd.compute_robust_hausdorff(ref_sorted, 100),
        expected_hausdorff_95=sd.compute_robust_hausdorff(ref_sorted, 95),
        expected_surface_overlap_at_1mm=sd.compute_surface_overlap_at_tolerance(ref_sorted, 1),
        expected_surface_dice_at_1mm=sd.compute_surface_dice_at_tolerance(ref_sorted, 1),
        expected_volumetric_dice=sd.compute_dice_coefficient(mask_gt, mask_pred),
    )


# -- empty masks, 2D and 3D ---------------------------------------------------------

EMPTY_CASES = {
    "empty_prediction": dict(
        expected_average_surface_distance=(INF, NAN),
        expected_hausdorff_100=INF,
        expected_hausdorff_95=INF,
        expected_surface_overlap_at_1mm=(0.0, NAN),
        expected_surface_dice_at_1mm=0.0,
        expected_volumetric_dice=0.0,
    ),
    "empty_ground_truth": dict(
        expected_average_surface_distance=(NAN, INF),
        expected_hausdorff_100=INF,
        expected_hausdorff_95=INF,
        expected_surface_overlap_at_1mm=(NAN, 0.0),
        expected_surface_dice_at_1mm=0.0,
        expected_volumetric_dice=0.0,
    ),
    "both_empty": dict(
        expected_average_surface_distance=(NAN, NAN),
        expected_hausdorff_100=INF,
        expected_hausdorff_95=INF,
        expected_surface_overlap_at_1mm=(NAN, NAN),
        expected_surface_dice_at_1mm=NAN,
        expected_volumetric_dice=NAN,
    ),
}


@pytest.mark.parametrize("case", list(EMPTY_CASES))
@pytest.mark.parametrize("dims", [2, 3])
def test_empty_masks(case, dims):
    shape = (128,) * dims
    spacing = (3, 2) if dims == 2 else (3, 2, 1)
    mask_gt, mask_pred = np.zeros(shape, bool), np.zeros(shape, bool)
    # the reference's voxels: 2D gt / pred at (50, 60); 3D gt (50, 60, 70), pred (50, 60, 72)
    if case == "empty_prediction":
        mask_gt[(50, 60, 70)[:dims]] = 1
    elif case == "empty_ground_truth":
        mask_pred[(50, 60) if dims == 2 else (50, 60, 72)] = 1
    assert_metrics(mask_gt, mask_pred, spacing, **EMPTY_CASES[case])


# -- 3D -----------------------------------------------------------------------------


def test_3d_on_2_pixels_2mm_away():
    mask_gt = np.zeros((128, 128, 128), bool)
    mask_pred = np.zeros((128, 128, 128), bool)
    mask_gt[50, 60, 70] = 1
    mask_pred[50, 60, 72] = 1
    assert_metrics(
        mask_gt,
        mask_pred,
        (3, 2, 1),
        expected_average_surface_distance=(1.5, 1.5),
        expected_hausdorff_100=2.0,
        expected_hausdorff_95=2.0,
        expected_surface_overlap_at_1mm=(0.5, 0.5),
        expected_surface_dice_at_1mm=0.5,
        expected_volumetric_dice=0.0,
    )


def test_3d_two_cubes_shifted_by_one_pixel():
    mask_gt = np.zeros((100, 100, 100), bool)
    mask_pred = np.zeros((100, 100, 100), bool)
    mask_gt[0:50, :, :] = 1
    mask_pred[0:51, :, :] = 1
    assert_metrics(
        mask_gt,
        mask_pred,
        (2, 1, 1),
        expected_average_surface_distance=(0.322, 0.339),
        expected_hausdorff_100=2.0,
        expected_hausdorff_95=2.0,
        expected_surface_overlap_at_1mm=(0.842, 0.830),
        expected_surface_dice_at_1mm=0.836,
        expected_volumetric_dice=0.990,
    )

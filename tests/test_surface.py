"""NSD, HD95 and ASSD against DeepMind's surface-distance (the reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

# surface-distance 0.1 still uses names that NumPy 2 removed.
np.Inf = np.inf  # noqa: NPY201
np.NaN = np.nan  # noqa: NPY201
import surface_distance as sd  # noqa: E402
from surface_distance import lookup_tables  # noqa: E402

from sam3d.metrics.surface import (  # noqa: E402
    AverageSurfaceDistanceMetric,
    HausdorffDistance95Metric,
    SurfaceDiceMetric,
    compute_assd,
    compute_hd95,
    compute_surface_dice,
    surfel_area_table,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference(gt: np.ndarray, pred: np.ndarray, spacing, tol) -> tuple:
    """(NSD per tolerance, HD95, symmetric ASSD) from DeepMind's surface-distance."""
    dist = sd.compute_surface_distances(gt.astype(bool), pred.astype(bool), list(spacing))
    tols = tol if isinstance(tol, (list, tuple)) else [tol]
    nsd = [float(sd.compute_surface_dice_at_tolerance(dist, t)) for t in tols]
    hd = sd.compute_robust_hausdorff(dist, 95)
    assd = float(np.mean(sd.compute_average_surface_distance(dist)))
    return (nsd if isinstance(tol, (list, tuple)) else nsd[0]), float(hd), assd


def ours(gt: np.ndarray, pred: np.ndarray, spacing, tols: list) -> tuple:
    p, g = torch.from_numpy(pred), torch.from_numpy(gt)
    return (
        [float(compute_surface_dice(p, g, spacing, t)) for t in tols],
        float(compute_hd95(p, g, spacing)),
        float(compute_assd(p, g, spacing)),
    )


def blob(rng: np.random.Generator, shape, sigma: float = 1.5) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.random(shape), sigma)
    return noise > np.quantile(noise, rng.uniform(0.4, 0.8))


def assert_matches(gt, pred, spacing, tol):
    tols = list(tol) if isinstance(tol, (list, tuple)) else [tol]
    r, o = reference(gt, pred, spacing, tols), ours(gt, pred, spacing, tols)
    assert np.abs(np.array(r[0]) - np.array(o[0])).max() <= 1e-5, (r, o)
    assert abs(r[1] - o[1]) <= 1e-4, (r, o)
    assert abs(r[2] - o[2]) <= 1e-4, (r, o)


@pytest.mark.parametrize("seed", range(4))
def test_area_tables_equal_reference(seed):
    rng = np.random.default_rng(seed)
    s3 = rng.uniform(0.2, 4.0, 3)
    ref3 = lookup_tables.create_table_neighbour_code_to_surface_area(s3)
    np.testing.assert_allclose(
        surfel_area_table(torch.tensor(s3)[None])[0].numpy(), ref3, atol=1e-12
    )
    s2 = rng.uniform(0.2, 4.0, 2)
    ref2 = lookup_tables.create_table_neighbour_code_to_contour_length(s2)
    np.testing.assert_allclose(
        surfel_area_table(torch.tensor(s2)[None])[0].numpy(), ref2, atol=1e-12
    )


@pytest.mark.parametrize("seed", range(8))
def test_random_shapes_3d(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(x) for x in rng.integers(6, 28, 3))
    gt = blob(rng, shape)
    pred = (
        np.roll(gt, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 3)))
        if seed % 3 == 0
        else blob(rng, shape)
    )
    spacing = rng.uniform(0.3, 3.0, 3)
    assert_matches(gt, pred, spacing, float(rng.uniform(0.2, 4.0)))


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_2d(seed):
    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(x) for x in rng.integers(8, 60, 2))
    gt, pred = blob(rng, shape), blob(rng, shape)
    spacing = rng.uniform(0.2, 3.0, 2)
    assert_matches(gt, pred, spacing, float(rng.uniform(0.2, 5.0)))


def test_large_tolerance_uses_grid_passes_and_still_matches():
    # many ellipsoid offsets: the band-limited grid passes are cheaper and must agree
    rng = np.random.default_rng(7)
    gt, pred = blob(rng, (30, 26, 20)), blob(rng, (30, 26, 20))
    assert_matches(gt, pred, (0.4, 0.5, 1.2), [3.0, 7.5, 12.0])


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5), (2.0, 0.5, 1.0)])
def test_hand_made_shapes(spacing):
    shape = (16, 14, 12)
    line = np.zeros(shape, bool)
    line[3:13, 5, 6] = True  # one voxel thick
    dot = np.zeros(shape, bool)
    dot[8, 6, 6] = True  # one voxel
    cube = np.zeros(shape, bool)
    cube[0:6, 0:7, 0:12] = True  # touches three borders of the volume
    plate = np.zeros(shape, bool)
    plate[2:15, 1:13, 11] = True  # on the last slice
    shifted = np.roll(cube, 2, axis=0)
    for gt, pred in [
        (line, dot),
        (dot, line),
        (cube, shifted),
        (plate, cube),
        (line, line),
        (dot, plate),
    ]:
        assert_matches(gt, pred, spacing, [0.5, 1.0, 2.0, 2.5])


def test_ties_exactly_at_tolerance():
    # distances that equal the tolerance exactly count as within it, as in the reference
    gt = np.zeros((12, 12, 12), bool)
    gt[3:7, 3:7, 3:7] = True
    pred = np.roll(gt, 2, axis=0)
    assert_matches(gt, pred, (0.8, 0.8, 1.0), [1.0, 2.0, 1.6, math.sqrt(2.0 * 0.8**2)])


def test_empty_masks():
    # our conventions, and the reference's value wherever it defines one
    gt = np.zeros((10, 10, 10), bool)
    gt[2:5, 2:5, 2:5] = True
    empty = np.zeros_like(gt)
    spacing = (1.0, 1.0, 2.0)
    g, e = torch.from_numpy(gt), torch.from_numpy(empty)
    for pred, ref in ((e, g), (g, e), (e, e)):
        dist = sd.compute_surface_distances(ref.numpy(), pred.numpy(), spacing)
        nsd = float(compute_surface_dice(pred, ref, spacing, 1.0))
        ref_nsd = sd.compute_surface_dice_at_tolerance(dist, 1.0)
        assert nsd == ref_nsd or (math.isnan(nsd) and math.isnan(ref_nsd))
        assert float(compute_hd95(pred, ref, spacing)) == sd.compute_robust_hausdorff(dist, 95)
        np.testing.assert_array_equal(  # NaN == NaN for assert_array_equal
            compute_assd(pred, ref, spacing, directed=True).numpy(),
            np.array(sd.compute_average_surface_distance(dist)),
        )
    assert float(compute_surface_dice(e, g, spacing, 1.0)) == 0.0  # empty prediction
    assert math.isnan(float(compute_surface_dice(e, e, spacing, 1.0)))  # 0/0
    assert math.isinf(float(compute_hd95(e, e, spacing)))  # as the reference, not NaN
    assert compute_assd(e, g, spacing, directed=True).tolist()[0] == math.inf
    assert math.isnan(compute_assd(e, g, spacing, directed=True).tolist()[1])
    # the symmetric ASSD counts a miss as inf (MONAI's convention), both empty NaN
    assert math.isinf(float(compute_assd(e, g, spacing)))
    assert math.isinf(float(compute_assd(g, e, spacing)))
    assert math.isnan(float(compute_assd(e, e, spacing)))


def test_directed_assd_is_the_reference_pair():
    rng = np.random.default_rng(3)
    gt, pred = blob(rng, (20, 18, 16)), blob(rng, (20, 18, 16))
    spacing = (0.7, 1.1, 2.3)
    ref = sd.compute_average_surface_distance(sd.compute_surface_distances(gt, pred, spacing))
    got = compute_assd(torch.from_numpy(pred), torch.from_numpy(gt), spacing, directed=True)
    np.testing.assert_allclose(got.numpy(), np.array(ref), atol=1e-6)


def test_batched_multiclass_per_class_tolerance_and_spacing():
    rng = np.random.default_rng(11)
    b, c, shape = 2, 3, (18, 16, 14)
    pred = np.stack([[blob(rng, shape) for _ in range(c)] for _ in range(b)])
    gt = np.stack([[blob(rng, shape) for _ in range(c)] for _ in range(b)])
    gt[1, 2] = False  # one empty reference
    spacing = np.array([[0.8, 0.8, 2.5], [1.0, 0.6, 1.5]])
    tol = [1.0, 2.0, 3.0]
    got = compute_surface_dice(torch.from_numpy(pred), torch.from_numpy(gt), spacing, tol)
    assert got.shape == (b, c)
    hd = compute_hd95(torch.from_numpy(pred), torch.from_numpy(gt), spacing)
    for i in range(b):
        for j in range(c):
            r = reference(gt[i, j], pred[i, j], spacing[i], tol[j])
            assert abs(float(got[i, j]) - r[0]) <= 1e-5
            assert abs(float(hd[i, j]) - r[1]) <= 1e-4 or (
                math.isinf(r[1]) and math.isinf(hd[i, j])
            )


def test_api_misuse_raises_value_error():
    a = torch.zeros(6, 6, 6, dtype=torch.bool)
    a[2:4, 2:4, 2:4] = True
    with pytest.raises(ValueError, match="shapes differ"):
        compute_surface_dice(a, a[:5], (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="Only 2D and 3D"):
        compute_hd95(a[None, None], a[None, None], (1, 1, 1, 1, 1))
    labels = torch.zeros(6, 6, 6)
    labels[1:3, 1:3, 1:3] = 2  # a label map, not a mask
    with pytest.raises(ValueError, match="binary"):
        compute_surface_dice(labels, labels, (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="positive"):
        compute_surface_dice(a, a, (1, 0, 1), 1.0)
    with pytest.raises(ValueError, match="one per class"):
        compute_surface_dice(
            a[None, None].expand(1, 2, 6, 6, 6),
            a[None, None].expand(1, 2, 6, 6, 6),
            (1, 1, 1),
            [1.0, 2.0, 3.0],
        )
    for bad in (-1.0, math.inf, math.nan, [1.0, -0.5]):
        with pytest.raises(ValueError, match="finite and >= 0"):
            compute_surface_dice(a, a, (1, 1, 1), bad)
    with pytest.raises(TypeError, match="tolerance_mm"):
        compute_surface_dice(a, a, (1, 1, 1), "1mm")
    for bad in (-1.0, 100.5, math.nan):
        with pytest.raises(ValueError, match="percent"):
            compute_hd95(a, a, (1, 1, 1), percent=bad)
    with pytest.raises(TypeError, match="pred"):
        compute_assd([[0, 1]], [[0, 1]], (1, 1))
    assert float(compute_surface_dice(a, a, (1, 1, 1), 0.0)) == 1.0  # zero is a tolerance
    with pytest.raises(ValueError, match="finite and >= 0"):
        SurfaceDiceMetric(tolerance_mm=-2.0)
    with pytest.raises(ValueError, match="percent"):
        HausdorffDistance95Metric(percent=120)


def test_accepts_0_1_float_masks():
    rng = np.random.default_rng(5)
    gt, pred = blob(rng, (12, 12, 12)), blob(rng, (12, 12, 12))
    a = compute_surface_dice(
        torch.from_numpy(pred).float(), torch.from_numpy(gt).float(), (1, 1, 1), 1
    )
    assert abs(float(a) - reference(gt, pred, (1, 1, 1), 1.0)[0]) <= 1e-5


# ---------------------------------------------------------------------------------------
# Engine integration: spacing from the MetaTensor affine
# ---------------------------------------------------------------------------------------


def _meta_batch(masks: np.ndarray, spacing) -> torch.Tensor:
    """A collated batch of MetaTensors (B x C x spatial) whose affines carry ``spacing``."""
    from monai.data import MetaTensor, list_data_collate

    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    items = [MetaTensor(torch.from_numpy(m).float(), affine=affine) for m in masks]
    return list_data_collate(items)


def test_metric_class_reads_spacing_from_metatensor():
    rng = np.random.default_rng(21)
    shape = (20, 20, 12)
    spacing = (0.8, 0.8, 2.5)
    gt = np.stack([np.stack([~m, m]) for m in (blob(rng, shape), blob(rng, shape))])
    pred = np.stack([np.stack([~m, m]) for m in (blob(rng, shape), blob(rng, shape))])
    from monai.data import decollate_batch

    metric = SurfaceDiceMetric(tolerance_mm=2.0)
    # decollated MetaTensors, as an engine's output_transform hands them over
    metric(decollate_batch(_meta_batch(pred, spacing)), decollate_batch(_meta_batch(gt, spacing)))
    values = metric.get_buffer()
    assert values.shape == (2, 1)
    for i in range(2):
        ref = reference(gt[i, 1], pred[i, 1], spacing, 2.0)
        assert abs(float(values[i, 0]) - ref[0]) <= 1e-5
    assert abs(float(metric.aggregate()) - float(values.mean())) <= 1e-6

    hd = HausdorffDistance95Metric()
    hd(_meta_batch(pred, spacing), _meta_batch(gt, spacing))
    assd = AverageSurfaceDistanceMetric()
    assd(_meta_batch(pred, spacing), _meta_batch(gt, spacing))
    for i in range(2):
        ref = reference(gt[i, 1], pred[i, 1], spacing, 2.0)
        assert abs(float(hd.get_buffer()[i, 0]) - ref[1]) <= 1e-4
        assert abs(float(assd.get_buffer()[i, 0]) - ref[2]) <= 1e-4


def test_explicit_spacing_overrides_and_missing_spacing_warns():
    rng = np.random.default_rng(2)
    m1, m2 = blob(rng, (14, 14, 10)), blob(rng, (14, 14, 10))
    pred = torch.from_numpy(np.stack([np.stack([~m1, m1])]))
    gt = torch.from_numpy(np.stack([np.stack([~m2, m2])]))
    metric = SurfaceDiceMetric(tolerance_mm=1.0, spacing_mm=(0.5, 0.5, 3.0))
    got = float(metric(_meta_batch(pred.numpy(), (1, 1, 1)), gt)[0, 0])
    assert abs(got - reference(m2, m1, (0.5, 0.5, 3.0), 1.0)[0]) <= 1e-5
    with pytest.warns(UserWarning, match="no spacing_mm"):
        SurfaceDiceMetric(tolerance_mm=1.0)(pred, gt)


def test_engine_uses_image_spacing_where_monai_uses_unit_spacing():
    """Inside an ignite engine MONAI's SurfaceDiceMetric gets no spacing; ours reads it."""
    from ignite.engine import Engine
    from monai.data import decollate_batch
    from monai.handlers import IgniteMetricHandler, from_engine
    from monai.metrics import SurfaceDiceMetric as MonaiSurfaceDice

    spacing = (0.8, 0.8, 3.0)
    gt_m = np.zeros((24, 24, 12), bool)
    gt_m[6:18, 6:18, 3:9] = True
    pr_m = np.roll(gt_m, 2, axis=2)  # 2 slices = 6 mm off along the thick axis
    pred = _meta_batch(np.stack([np.stack([~pr_m, pr_m])]), spacing)
    gt = _meta_batch(np.stack([np.stack([~gt_m, gt_m])]), spacing)

    def step(engine, batch):
        return {"pred": decollate_batch(pred), "label": decollate_batch(gt)}

    engine = Engine(step)
    ours_h = IgniteMetricHandler(
        metric_fn=SurfaceDiceMetric(tolerance_mm=2.0),
        output_transform=from_engine(["pred", "label"]),
    )
    monai_h = IgniteMetricHandler(
        metric_fn=MonaiSurfaceDice(class_thresholds=[2.0], use_subvoxels=True),
        output_transform=from_engine(["pred", "label"]),
    )
    ours_h.attach(engine, "nsd_ours")
    monai_h.attach(engine, "nsd_monai")
    engine.run([0], max_epochs=1)
    truth = reference(gt_m, pr_m, spacing, 2.0)[0]
    unit = reference(gt_m, pr_m, (1.0, 1.0, 1.0), 2.0)[0]
    assert abs(engine.state.metrics["nsd_ours"] - truth) <= 1e-5
    assert abs(engine.state.metrics["nsd_monai"] - unit) <= 1e-5  # silently unit spacing
    assert abs(truth - unit) > 0.2


@requires_cuda
def test_cuda_matches_cpu():
    rng = np.random.default_rng(9)
    pred = torch.from_numpy(np.stack([blob(rng, (40, 36, 20)) for _ in range(3)]))
    gt = torch.from_numpy(np.stack([blob(rng, (40, 36, 20)) for _ in range(3)]))
    spacing = (0.8, 0.8, 2.5)
    for fn in (
        lambda p, g: compute_surface_dice(p, g, spacing, 2.0),
        lambda p, g: compute_hd95(p, g, spacing),
        lambda p, g: compute_assd(p, g, spacing),
    ):
        cpu = fn(pred, gt)
        gpu = fn(pred.cuda(), gt.cuda())
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-6, rtol=0)


def test_metric_classes_name_a_numpy_y_instead_of_calling_it_none():
    import pytest

    from sam3d.metrics.surface import HausdorffDistance95Metric, SurfaceDiceMetric

    p = torch.zeros(1, 2, 8, 8)
    p[:, 1, 2:5, 2:5] = 1
    p[:, 0] = 1 - p[:, 1]
    for metric in (SurfaceDiceMetric(tolerance_mm=1.0, spacing_mm=(1.0, 1.0)),
                   HausdorffDistance95Metric(spacing_mm=(1.0, 1.0))):  # fmt: skip
        with pytest.raises(TypeError, match=r"y must be a torch.Tensor .* got ndarray"):
            metric(p, p.numpy())
        with pytest.raises(TypeError, match=r"y_pred must be a torch.Tensor .* got ndarray"):
            metric(p.numpy(), p)
        assert float(metric(p, p).mean()) == 1.0 or float(metric(p, p).mean()) == 0.0

"""Topology-preserving skeleton: checked with scipy labels, Euler numbers and hand cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.measure import euler_number

from sam3d.metrics.skeleton import is_simple, skeletonize

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def one_thread():
    # thinning is many tiny ops: on a busy 2-core machine one thread is far faster
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def topology(mask: np.ndarray) -> tuple[int, int, int]:
    """(foreground components, background components, Euler number) with the image
    embedded in an infinite background (padded), 8/4 (2D) or 26/6 (3D) connectivity."""
    d = mask.ndim
    m = np.pad(mask, 1)
    fg = ndimage.label(m, ndimage.generate_binary_structure(d, d))[1]
    bg = ndimage.label(~m, ndimage.generate_binary_structure(d, 1))[1]
    return fg, bg, int(euler_number(m, connectivity=d))


def assert_thin(skel: np.ndarray):
    """No 2x2 (2D) or 2x2x2 (3D) block is entirely foreground."""
    d = skel.ndim
    block = np.ones((2,) * d, dtype=int)
    assert ndimage.correlate(skel.astype(int), block, mode="constant").max() < 2**d


def blob(rng, shape, sigma=2.0, q=0.6):
    noise = ndimage.gaussian_filter(rng.random(shape), sigma)
    return noise > np.quantile(noise, q)


def skel_np(mask: np.ndarray) -> np.ndarray:
    return skeletonize(torch.from_numpy(mask)).numpy()


@pytest.mark.parametrize("seed", range(4))
def test_random_2d_topology_and_thinness(seed):
    mask = blob(np.random.default_rng(seed), (64, 56))
    skel = skel_np(mask)
    assert skel.dtype == bool and not (skel & ~mask).any()
    assert topology(skel) == topology(mask)
    assert_thin(skel)
    np.testing.assert_array_equal(skel_np(skel), skel)  # already thin: nothing more to remove


@pytest.mark.parametrize("seed", range(2))
def test_random_3d_topology_and_thinness(seed):
    mask = blob(np.random.default_rng(10 + seed), (24, 22, 20), q=0.55)
    skel = skel_np(mask)
    assert not (skel & ~mask).any()
    assert topology(skel) == topology(mask)
    assert_thin(skel)


def test_holes_cavities_and_tunnels_survive():
    yy, xx = np.mgrid[:40, :40]
    ring = (np.hypot(yy - 20, xx - 20) < 15) & (np.hypot(yy - 20, xx - 20) > 7)
    skel = skel_np(ring)
    assert topology(skel) == topology(ring) == (1, 2, 0)  # one loop around one hole

    z, y, x = np.mgrid[:22, :22, :22]
    r = np.sqrt((z - 11) ** 2 + (y - 11) ** 2 + (x - 11) ** 2)
    shell = (r < 9) & (r > 5)  # one cavity
    skel = skel_np(shell)
    assert topology(skel) == topology(shell)
    assert topology(skel)[1] == 2

    rho = np.sqrt((y - 11) ** 2 + (x - 11) ** 2)
    torus = (rho - 7) ** 2 + (z - 11) ** 2 < 3.2**2  # one tunnel: Euler number 0
    skel = skel_np(torus)
    assert topology(skel) == topology(torus)
    assert topology(skel)[2] == 0
    assert_thin(skel)


def test_end_points_kept_and_thin_curves_unchanged():
    # a 26-connected curve with diagonal turns: every inner point is needed
    curve = np.zeros((20, 20, 20), bool)
    curve[3:15, 5, 5] = True
    for k in range(1, 5):
        curve[14 + k, 5 + k, 5] = True
        curve[18, 9 + k, 5 + k] = True
    np.testing.assert_array_equal(skel_np(curve), curve)
    # a 6-connected corner is simple in 26-connectivity: only that voxel goes
    corner = np.zeros((12, 12), bool)
    corner[2:8, 3] = True
    corner[7, 3:9] = True
    expected = corner.copy()
    expected[7, 3] = False
    np.testing.assert_array_equal(skel_np(corner), expected)

    z, y, x = np.mgrid[:30, :15, :15]
    tube = ((y - 7) ** 2 + (x - 7) ** 2 <= 2.5**2) & (z >= 4) & (z <= 25)
    skel = skel_np(tube)
    assert topology(skel)[0] == 1
    zs = np.nonzero(skel)[0]
    # the centre line runs nearly the whole length: its end points were not eaten
    assert zs.min() <= 7 and zs.max() >= 22
    assert skel.sum() <= 26


def test_simple_point_hand_cases():
    def bits(*offsets):
        order = [o for o in itertools.product((-1, 0, 1), repeat=3) if any(o)]
        b = torch.zeros(1, 26, dtype=torch.bool)
        for o in offsets:
            b[0, order.index(o)] = True
        return b

    assert bool(is_simple(bits((1, 0, 0))))  # a curve end: deleting it keeps topology
    assert not bool(is_simple(bits()))  # isolated point: deleting removes a component
    assert not bool(is_simple(bits((1, 0, 0), (-1, 0, 0))))  # middle of a curve: splits it
    full = [o for o in itertools.product((-1, 0, 1), repeat=3) if any(o)]
    assert not bool(is_simple(bits(*full)))  # interior: deleting makes a cavity
    assert bool(is_simple(bits(*[o for o in full if o[0] >= 0])))  # flat border point


def _simple_by_scipy_labels(cube: np.ndarray) -> bool:
    """Bertrand-Malandain's local test written with scipy labels on the 3x3x3 cube."""
    fg = cube.copy()
    fg[1, 1, 1] = False
    n_fg = ndimage.label(fg, ndimage.generate_binary_structure(3, 3))[1]
    offs = np.indices((3, 3, 3)).reshape(3, -1).T - 1
    n18 = (np.abs(offs).sum(1) <= 2).reshape(3, 3, 3)
    bg = ~cube & n18
    bg[1, 1, 1] = False
    labels, _ = ndimage.label(bg, ndimage.generate_binary_structure(3, 1))
    faces = [(0, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2)]
    touching = {labels[f] for f in faces if labels[f] > 0}
    return n_fg == 1 and len(touching) == 1


def test_simple_point_test_matches_scipy_labels():
    rng = np.random.default_rng(0)
    order = [o for o in itertools.product((-1, 0, 1), repeat=3) if any(o)]
    cubes = []
    for density in (0.2, 0.4, 0.6, 0.8):
        for _ in range(150):
            cube = rng.random((3, 3, 3)) < density
            cube[1, 1, 1] = True
            cubes.append(cube)
    bits = torch.tensor([[c[o[0] + 1, o[1] + 1, o[2] + 1] for o in order] for c in cubes])
    ours = is_simple(bits).numpy()
    expected = np.array([_simple_by_scipy_labels(c) for c in cubes])
    np.testing.assert_array_equal(ours, expected)
    assert 50 < expected.sum() < len(cubes) - 50  # both answers well represented


def test_full_table_path_gives_the_same_skeleton(monkeypatch):
    """The sync-free path used on CUDA (a table of all 2^26 neighbourhoods) deletes the
    same points as the memoised path; the table is stood in for by the exact test."""
    import sam3d.metrics.skeleton as skeleton_module

    class ExactTable:
        def __getitem__(self, codes: torch.Tensor) -> torch.Tensor:
            bits = ((codes[:, None] >> torch.arange(26)) & 1).bool()
            return is_simple(bits)

    monkeypatch.setattr(skeleton_module, "_lut_3d", lambda device: ExactTable())
    rng = np.random.default_rng(12)
    for mask in (blob(rng, (22, 20, 18), q=0.55), blob(rng, (16, 24, 20), sigma=1.5)):
        m = torch.from_numpy(mask)
        np.testing.assert_array_equal(
            skeletonize(m, full_table=True).numpy(), skeletonize(m, full_table=False).numpy()
        )


def test_batched_input_matches_single():
    rng = np.random.default_rng(3)
    masks = np.stack([blob(rng, (40, 40)) for _ in range(3)])
    batched = skeletonize(torch.from_numpy(masks), spatial_dims=2).numpy()
    for m, s in zip(masks, batched):
        np.testing.assert_array_equal(s, skel_np(m))


@requires_cuda
def test_cuda_matches_cpu():
    rng = np.random.default_rng(4)
    m3 = torch.from_numpy(blob(rng, (32, 30, 28)))
    m2 = torch.from_numpy(blob(rng, (96, 80)))
    for m in (m2, m3):
        gpu = skeletonize(m.cuda())
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), skeletonize(m))

"""Click segmentation: grid mapping, geometry of outputs, caching, window growth, bundle.

Two models drive these tests. The real tiny Sam3D (from a checkpoint saved by a short
training) checks shapes, affines and encoder calls. A deterministic stand-in with the
same ``encode``/``decode`` interface -- it returns the bright connected component that
holds a positive click -- checks the window mechanics (growth, stitching, negative
clicks, automatic mode) against masks known in advance.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from sam3d.data.phantoms import make_ct_phantom
from sam3d.data.pipelines import load_dataset_preset
from sam3d.errors import Sam3DError
from sam3d.inference import (
    ClickSession,
    WindowGrowth,
    load_model_for_inference,
    original_to_grid,
)

KITS = load_dataset_preset("kits")
BRIGHT_HU = 200.0
# The stand-in's tumour threshold in z-scored units: 100 HU, halfway between 0 and 200.
THRESHOLD_Z = (100.0 - KITS["mean"]) / KITS["std"]
NO_GROWTH = WindowGrowth(enabled=False)


class BrightComponentModel(torch.nn.Module):
    """Stand-in promptable model: tumour = bright components holding a positive click.

    A component holding a negative click is removed; with no valid click every bright
    component is tumour (automatic mode). ``encode_calls`` counts encoder runs.
    """

    def __init__(self, crop_size: int = 16) -> None:
        super().__init__()
        self.crop_size = crop_size
        self.encode_calls = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.encode_calls += 1
        return images.clone()

    def decode(self, features, points, point_labels) -> torch.Tensor:
        out = []
        for b in range(features.shape[0]):
            bright = (features[b, 0] > THRESHOLD_Z).cpu().numpy()
            comp, _ = ndimage.label(bright)
            valid = point_labels[b] >= 0
            if not bool(valid.any()):
                keep = bright
            else:
                keep = np.zeros_like(bright)
                hi = np.array(bright.shape) - 1
                for p, lab in zip(points[b][valid].round().long().tolist(), point_labels[b][valid]):
                    c = comp[tuple(np.clip(p, 0, hi))]
                    if c and int(lab) == 1:
                        keep |= comp == c
                for p, lab in zip(points[b][valid].round().long().tolist(), point_labels[b][valid]):
                    c = comp[tuple(np.clip(p, 0, hi))]
                    if c and int(lab) == 0:
                        keep &= comp != c
            t = torch.as_tensor(keep, dtype=torch.float32) * 20 - 10
            out.append(torch.stack([-t, t]))
        return torch.stack(out).to(features.device)


def _volume(shape, boxes, affine=None) -> tuple[MetaTensor, np.ndarray]:
    """A 0 HU volume with 200 HU boxes (slices); returns the MetaTensor and the box mask."""
    img = np.zeros(shape, np.float32)
    for box in boxes:
        img[box] = BRIGHT_HU
    aff = np.eye(4) if affine is None else affine
    return MetaTensor(torch.as_tensor(img)[None], affine=torch.as_tensor(aff)), img > 0


def _write_phantom(tmp_path, orientation: str, seed: int = 0, shape=(24, 24, 12)):
    ph = make_ct_phantom(
        seed, shape_vox=shape, spacing_mm=(1.25, 1.25, 2.5), orientation=orientation
    )
    path = tmp_path / f"{orientation}.nii.gz"
    nib.save(nib.Nifti1Image(ph.image_hu.astype(np.int16), ph.affine), path)
    return path, ph


@pytest.fixture(scope="module")
def tiny(trained_tiny_sam3d_checkpoint):
    model, meta = load_model_for_inference(trained_tiny_sam3d_checkpoint, "cpu")
    return model, meta["dataset"]


def test_original_to_grid_hand_computed():
    # original: 2 x 3 x 4 mm voxels at (10, 20, 30); grid: 1 mm voxels at (0, 0, 0)
    original = np.diag([2.0, 3.0, 4.0, 1.0])
    original[:3, 3] = [10, 20, 30]
    grid = np.eye(4)
    got = original_to_grid([[1, 2, 3]], original, grid)
    np.testing.assert_allclose(got, [[12, 26, 42]])
    # world input skips the original affine; an LPS grid flips the first two axes
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(
        original_to_grid([[12, 26, 42]], original, lps, world=True), [[-12, -26, 42]]
    )


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "oblique"])
def test_mask_keeps_input_geometry(tmp_path, tiny, orientation):
    model, dataset = tiny
    path, ph = _write_phantom(tmp_path, orientation)
    session = ClickSession(model, path, dataset, device="cpu", growth=NO_GROWTH)
    mask = session.click((12, 12, 6))
    assert tuple(mask.shape) == ph.image_hu.shape
    out = session.save(tmp_path / "mask.nii.gz")
    ref, got = nib.load(path), nib.load(out)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-6)
    assert nib.aff2axcodes(got.affine) == nib.aff2axcodes(ref.affine)
    assert got.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(got.dataobj), mask.numpy().astype(np.uint8))
    assert not list(tmp_path.glob(".mask*")), "a temporary file was left behind"


def test_voxel_and_world_clicks_give_the_same_mask(tmp_path, tiny):
    model, dataset = tiny
    path, ph = _write_phantom(tmp_path, "oblique", seed=1)
    vox = np.array([10.0, 13.0, 5.0])
    world = (ph.affine @ np.append(vox, 1.0))[:3]
    a = ClickSession(model, path, dataset, device="cpu", growth=NO_GROWTH).click(vox)
    b = ClickSession(model, path, dataset, device="cpu", growth=NO_GROWTH).click(world, world=True)
    assert torch.equal(a, b)


def test_further_clicks_never_call_the_encoder(tmp_path, tiny):
    model, dataset = tiny
    path, _ = _write_phantom(tmp_path, "RAS", seed=2)
    calls = []
    encode = model.encode
    model.encode = lambda images: calls.append(images.shape) or encode(images)
    try:
        session = ClickSession(model, path, dataset, device="cpu", growth=NO_GROWTH)
        first = session.click((12, 12, 6)).clone()
        assert len(calls) == 1 and tuple(calls[0][2:]) == (model.crop_size,) * 3
        second = session.click((14, 11, 6)).clone()  # the session rewrites its mask in place
        session.click((9, 13, 5), positive=False)
        assert len(calls) == 1 and session.encode_calls == 1
        torch.testing.assert_close(session.undo(), second)
        torch.testing.assert_close(session.undo(), first)
        assert len(calls) == 1
    finally:
        del model.encode


def test_window_growth_segments_a_lesion_longer_than_a_window():
    # a 48 mm bar along i in a 64 mm volume; windows are 16 mm
    bar = (slice(8, 56), slice(10, 14), slice(10, 14))
    image, truth = _volume((64, 24, 24), [bar])
    grown_model, cut_model = BrightComponentModel(16), BrightComponentModel(16)
    grown = ClickSession(grown_model, image, KITS, device="cpu").click((30, 12, 12))
    cut = ClickSession(cut_model, image, KITS, device="cpu", growth=NO_GROWTH).click((30, 12, 12))
    np.testing.assert_array_equal(grown.numpy(), truth)
    assert cut_model.encode_calls == 1 and grown_model.encode_calls > 1
    assert cut.sum() < truth.sum() and not (cut.numpy() & ~truth).any()
    extent = np.nonzero(cut.numpy().any((1, 2)))[0]
    assert extent.max() - extent.min() + 1 <= 16


def test_window_growth_stops_at_the_configured_extent():
    bar = (slice(2, 62), slice(10, 14), slice(10, 14))
    image, truth = _volume((64, 24, 24), [bar])
    growth = WindowGrowth(max_extent_mm=32)
    session = ClickSession(BrightComponentModel(16), image, KITS, device="cpu", growth=growth)
    mask = session.click((30, 12, 12)).numpy()
    extent = np.nonzero(mask.any((1, 2)))[0]
    assert 16 < extent.max() - extent.min() + 1 <= 32
    windows = np.array(session.windows)
    assert windows[:, 0].max() + 16 - windows[:, 0].min() <= 32


def test_window_growth_extent_is_in_mm_on_a_coarser_grid():
    # a 60 mm bar on a 2 mm grid: 8-voxel windows are 16 mm, the limit 32 mm = 16 voxels
    bar = (slice(2, 62), slice(10, 14), slice(10, 14))
    image, truth = _volume((64, 24, 24), [bar])
    growth = WindowGrowth(max_extent_mm=32)
    session = ClickSession(
        BrightComponentModel(8), image, KITS, device="cpu", growth=growth, spacing_mm=2.0
    )
    assert session.predictor.spacing_mm == (2.0, 2.0, 2.0)
    mask = session.click((30, 12, 12)).numpy()
    extent_mm = np.ptp(np.nonzero(mask.any((1, 2)))[0]) + 1  # original voxels are 1 mm
    assert 16 < extent_mm <= 32 + 2  # (+ one grid voxel of interpolation at the ends)
    windows = np.array(session.windows)
    assert (windows[:, 0].max() + 8 - windows[:, 0].min()) * 2.0 <= 32


def test_each_clicked_lesion_grows_within_its_own_extent():
    # two 36 mm bars 16 mm apart; the limit (48 mm) applies to each seed's windows
    a = (slice(4, 40), slice(10, 14), slice(10, 14))
    b = (slice(56, 92), slice(10, 14), slice(10, 14))
    image, truth = _volume((96, 24, 24), [a, b])
    growth = WindowGrowth(max_extent_mm=48)
    session = ClickSession(BrightComponentModel(16), image, KITS, device="cpu", growth=growth)
    mask = session.add_clicks([(20, 12, 12), (74, 12, 12)], [1, 1]).numpy()
    np.testing.assert_array_equal(mask, truth)


def test_negative_click_removes_a_region():
    a = (slice(4, 8), slice(4, 8), slice(4, 8))
    b = (slice(9, 13), slice(9, 13), slice(9, 13))
    image, _ = _volume((16, 16, 16), [a, b])
    model = BrightComponentModel(16)
    session = ClickSession(model, image, KITS, device="cpu")
    session.click((5, 5, 5))
    both = session.click((10, 10, 10)).numpy()
    assert both[a].all() and both[b].all()
    after = session.click((11, 11, 11), positive=False).numpy()
    assert after[a].all() and not after[b].any() and after.sum() == 64
    assert model.encode_calls == 1


def test_a_click_after_automatic_mode_keeps_only_its_lesion():
    a = (slice(4, 8), slice(4, 8), slice(4, 8))
    b = (slice(9, 13), slice(9, 13), slice(9, 13))
    image, _ = _volume((16, 16, 16), [a, b])
    session = ClickSession(BrightComponentModel(16), image, KITS, device="cpu")
    auto = session.segment_all().clone()
    assert auto[a].all() and auto[b].all()
    mask = session.click((5, 5, 5))
    assert mask[a].all() and int(mask.sum()) == 64


def test_automatic_mode_finds_every_lesion_with_sliding_windows():
    boxes = [(slice(3, 9), slice(3, 9), slice(3, 9)), (slice(30, 36), slice(20, 26), slice(8, 12))]
    image, truth = _volume((40, 32, 20), boxes)
    model = BrightComponentModel(16)
    session = ClickSession(model, image, KITS, device="cpu")
    mask = session.segment_all(overlap=0.25, output_device="cpu")
    np.testing.assert_array_equal(mask.numpy(), truth)
    assert model.encode_calls > 1  # one per window


def test_click_outside_the_volume_is_refused(tmp_path, tiny):
    model, dataset = tiny
    path, _ = _write_phantom(tmp_path, "LPS", seed=3)
    session = ClickSession(model, path, dataset, device="cpu", growth=NO_GROWTH)
    with pytest.raises(Sam3DError, match="outside the image"):
        session.click((24, 3, 3))
    with pytest.raises(Sam3DError, match="outside the image"):
        session.click((0, 0, 10_000), world=True)
    assert session.encode_calls == 0 and session.points_vox == []


def test_bundle_prompted_and_automatic(tmp_path, tiny, trained_tiny_sam3d_checkpoint):
    from monai.bundle import run

    model, dataset = tiny
    path, _ = _write_phantom(tmp_path, "oblique", seed=4, shape=(20, 20, 10))
    config = "bundles/kits/inference.json"
    common = dict(config_file=config, checkpoint=trained_tiny_sam3d_checkpoint, grow_windows=False)
    case = {"image": str(path), "points": [[10, 9, 5]], "point_labels": [1]}
    run(input_dict=case, output_dir=str(tmp_path / "prompted"), **common)
    got = nib.load(tmp_path / "prompted" / "oblique_seg.nii.gz")
    ref = nib.load(path)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-5)
    session = ClickSession(model, path, dataset, device="cpu", growth=NO_GROWTH)
    np.testing.assert_array_equal(np.asarray(got.dataobj), session.click((10, 9, 5)).numpy())

    run(input_dict={"image": str(path)}, output_dir=str(tmp_path / "auto"), **common)
    auto = nib.load(tmp_path / "auto" / "oblique_seg.nii.gz")
    assert auto.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(auto.dataobj), session.segment_all().numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_session_matches_the_cpu(tmp_path, tiny, trained_tiny_sam3d_checkpoint):
    model_cpu, dataset = tiny
    model_gpu, _ = load_model_for_inference(trained_tiny_sam3d_checkpoint, "cuda")
    path, _ = _write_phantom(tmp_path, "oblique", seed=5)
    cpu = ClickSession(model_cpu, path, dataset, device="cpu", growth=NO_GROWTH)
    gpu = ClickSession(model_gpu, path, dataset, device="cuda", growth=NO_GROWTH, amp=False)
    a, b = cpu.click((12, 12, 6)), gpu.click((12, 12, 6))
    assert b.device.type == "cuda"
    assert (a == b.cpu()).float().mean() > 0.999
    torch.testing.assert_close(cpu.prob_grid, gpu.prob_grid.cpu(), atol=1e-3, rtol=0)
    gpu.click((14, 12, 6), positive=False)
    assert gpu.encode_calls == 1


@pytest.mark.parametrize("orientation", ["LPS", "oblique"])
@pytest.mark.parametrize("where", ["inside", "at the edge"])
def test_region_inversion_equals_the_full_invertd(orientation, where):
    """Resampling only the decoded windows' box gives what Invertd gives for the whole map."""
    from sam3d.data.phantoms.common import make_affine
    from sam3d.inference.grid import invert_region_to_original, invert_to_original, preprocessing

    rng = np.random.default_rng(1)
    shape = (30, 26, 14)
    affine = make_affine((1.3, 0.9, 2.5), shape, orientation, np.zeros(3), rng)
    image = MetaTensor(
        torch.as_tensor(rng.normal(0, 50, shape), dtype=torch.float32)[None],
        affine=torch.as_tensor(affine),
    )
    chain = preprocessing(KITS)
    grid = chain({"image": image})["image"]
    gshape = grid.shape[1:]
    lo = [0, 0, 0] if where == "at the edge" else [s // 4 for s in gshape]
    hi = [s // 2 + 3 for s in gshape]
    prob = torch.zeros(gshape)
    prob[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = torch.rand(
        *[h - l for l, h in zip(lo, hi)], generator=torch.Generator().manual_seed(0)
    )
    full = invert_to_original(prob, grid, chain)
    crop, olo, ohi = invert_region_to_original(prob, grid.affine, affine, shape, lo, hi)
    region = full[olo[0] : ohi[0], olo[1] : ohi[1], olo[2] : ohi[2]]
    torch.testing.assert_close(crop, region, atol=1e-5, rtol=0)
    outside = full.clone()
    outside[olo[0] : ohi[0], olo[1] : ohi[1], olo[2] : ohi[2]] = 0
    assert float(outside.abs().max()) < 1e-6  # nothing of the map falls outside the box
    assert 0 < crop.numel() < full.numel()


def test_session_mask_equals_thresholded_full_inversion():
    from sam3d.inference.grid import invert_to_original

    img, _ = _volume((40, 30, 20), [np.s_[5:12, 6:14, 4:9], np.s_[25:33, 18:26, 10:16]])
    s = ClickSession(BrightComponentModel(), img, KITS, device="cpu", growth=NO_GROWTH)
    mask = s.click((8, 9, 6))
    full = invert_to_original(s.prob_grid, s.grid_image, s.transform) > s.threshold
    assert torch.equal(mask, full) and int(mask.sum()) > 0


class ClickBumpModel(torch.nn.Module):
    """Stand-in whose map depends on every click: a bump of +logit around each positive
    click and of -logit around each negative one, plus a little of the image, so clicks
    grow windows, and undo, reset and negative clicks change them."""

    crop_size = 10

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.clone()

    def decode(self, features, points, point_labels) -> torch.Tensor:
        r = features.shape[-1]
        ax = torch.arange(r, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1)  # r x r x r x 3
        t = 0.1 * features[0, 0] - 2.0
        for p, lab in zip(points[0], point_labels[0]):
            if int(lab) < 0:
                continue
            bump = 8.0 * torch.exp(-((grid - p) ** 2).sum(-1) / 40.0)
            t = t + (bump if int(lab) == 1 else -bump)
        return torch.stack([-t, t])[None]


def test_incremental_stitch_equals_a_full_restitch_exactly():
    """After random clicks, undos and resets, the session's kept map (rewritten only in the
    boxes of the windows each click decodes) equals a new whole-grid stitch of the same
    clicks by a fresh predictor, bit for bit; so does the mask against one built from it."""
    from sam3d.inference.grid import invert_region_to_original
    from sam3d.inference.windows import WindowPredictor

    rng = np.random.default_rng(0)
    img = MetaTensor(torch.as_tensor(rng.normal(0, 50, (44, 36, 30)), dtype=torch.float32)[None])
    growth = WindowGrowth(max_windows=6, max_extent_mm=30)
    s = ClickSession(ClickBumpModel(), img, KITS, device="cpu", growth=growth)
    checked = sizes = 0
    script = ["click", "undo", "near"] * 4  # the same window, other prompts, same labels
    for step in range(45):
        action = (
            script[step]
            if step < len(script)
            else rng.choice(["click", "near", "undo", "reset"], p=[0.45, 0.15, 0.3, 0.1])
        )
        if action == "near" and s.points_vox:
            near = [c + float(rng.uniform(-2, 2)) for c in s.points_vox[-1]]
            s.click([min(max(c, 0.0), n - 1.0) for c, n in zip(near, (44, 36, 30))])
        elif action == "undo" and s._history:
            s.undo()
        elif action == "reset":
            s.reset()
            assert s.mask is None
            continue
        elif action == "click":
            point = [float(rng.uniform(0, n - 1)) for n in (44, 36, 30)]
            s.click(point, positive=bool(rng.random() < 0.75))
        if s.prob_grid is None:
            continue
        fresh = WindowPredictor(s.model, s.grid_image.as_tensor(), s.predictor.roi, growth=growth)
        grid = torch.as_tensor(s._grid_points(s.points_vox), dtype=torch.float32)
        probs = fresh.predict_windows(grid, torch.as_tensor(s.point_labels), s._state.seeds)
        assert list(probs) == s.windows
        full = fresh.stitch(probs)
        assert torch.equal(s.prob_grid, full), f"step {step}: the kept map drifted"
        lo, hi = fresh.windows_box(list(probs))
        crop, a, b = invert_region_to_original(
            full, s.grid_image.affine, s.original_affine, s.original_shape, lo, hi
        )
        mask = torch.zeros(s.original_shape, dtype=torch.bool)
        mask[a[0] : b[0], a[1] : b[1], a[2] : b[2]] = crop > s.threshold
        assert torch.equal(s.mask, mask), f"step {step}: the kept mask drifted"
        checked += 1
        sizes = max(sizes, len(probs))
    assert checked > 15 and sizes > 2  # many states checked, some with grown windows


def test_session_memory_follows_its_formula(tiny):
    """What an open session holds (its tensors) is what session_bytes_estimate says from the
    shapes and window_bytes, after clicks in several windows, an undo and a reset."""
    from sam3d.inference import session_bytes_estimate, window_bytes

    model, dataset = tiny
    img = MetaTensor(
        torch.zeros(1, 70, 60, 24), affine=torch.diag(torch.tensor([0.8, 0.9, 2.5, 1.0]))
    )
    s = ClickSession(model, img, dataset, device="cpu", growth=NO_GROWTH)
    per_window = window_bytes(model)
    r = model.crop_size
    f = s.predictor.features((0, 0, 0))  # Sam3DFeatures: the prompted map and the context
    feats = sum(t.numel() * t.element_size() for t in (f.prompt_map, f.context))
    assert feats > 4 * r**3 and per_window == feats + 4 * r**3  # + one float32 probability
    s.predictor.cache.clear()
    for p in [(5, 5, 3), (60, 50, 20), (30, 30, 12)]:
        s.click(p)
    s.undo()
    s.reset()
    s.click((60, 50, 20), positive=False)
    got = s.resident_bytes()
    n = len(s.predictor.cache)
    assert n == 3
    grid = tuple(s.grid_image.shape[1:])
    assert got["total"] == session_bytes_estimate(img.shape[1:], grid, n, per_window)
    assert got["windows"] == n * per_window

"""Preview pictures: physical aspect ratios, outlines and click markers, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from matplotlib.image import imread

from sam3d.errors import Sam3DError
from sam3d.visualize import overlay_figure, save_overlay_png, save_vessel_preview

YELLOW = np.array([1.0, 0xD0 / 255, 0.0])  # tumour outline (label 2)
CYAN = np.array([0.0, 0xD5 / 255, 1.0])  # organ outline (label 1)
GREEN = np.array([0.0, 1.0, 0.0])  # positive click
RED = np.array([1.0, 0.0, 0.0])  # negative click


def _count(png: np.ndarray, color: np.ndarray, tol: float = 0.12) -> int:
    return int((np.abs(png[..., :3] - color).max(axis=-1) < tol).sum())


def _volume() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((32, 32, 8), 40.0, np.float32)
    mask = np.zeros((32, 32, 8), np.uint8)
    mask[8:24, 8:24, 2:6] = 1
    mask[12:18, 12:18, 3:5] = 2
    return image, mask


@pytest.mark.parametrize(
    ("spacing", "ratios"),
    [((1.0, 1.0, 4.0), (1.0, 1.0, 1.0)), ((1.0, 1.0, 1.0), (1.0, 0.25, 0.25))],
)
def test_panels_have_the_physical_aspect_ratio(spacing, ratios):
    image, mask = _volume()
    fig = overlay_figure(image, mask, spacing_mm=spacing)
    fig.canvas.draw()
    for ax, expected in zip(fig.axes, ratios):
        box = ax.get_window_extent()
        assert box.height / box.width == pytest.approx(expected, rel=0.03)


def test_outlines_and_clicks_are_drawn(tmp_path):
    image, mask = _volume()
    path = save_overlay_png(
        image,
        mask,
        tmp_path / "p.png",
        center_vox=(15, 15, 4),
        points_vox=[(15, 15, 4), (4, 4, 4), (20, 20, 0)],
        point_labels=[1, 0, -1],
        spacing_mm=(1, 1, 4),
    )
    png = imread(path)
    assert _count(png, YELLOW) > 50 and _count(png, CYAN) > 50
    assert _count(png, GREEN) > 10 and _count(png, RED) > 10
    plain = imread(save_overlay_png(image, None, tmp_path / "plain.png", spacing_mm=(1, 1, 4)))
    for color in (YELLOW, CYAN, GREEN, RED):
        assert _count(plain, color) == 0
    assert sorted(os.listdir(tmp_path)) == ["p.png", "plain.png"]  # no temporary files left


def test_clicks_off_the_slice_are_not_drawn(tmp_path):
    image, _ = _volume()
    # centre slice k=4, click on k=0: only the coronal/sagittal panels (j=15, i=15) could show
    # it, and it lies on neither (i=4, j=4), so nothing green appears anywhere.
    path = save_overlay_png(
        image, None, tmp_path / "p.png", center_vox=(15, 15, 4), points_vox=[(4, 4, 0)]
    )
    assert _count(imread(path), GREEN) == 0


def test_bad_arguments_raise_clear_errors(tmp_path):
    image, mask = _volume()
    with pytest.raises(Sam3DError, match="differs from image shape"):
        save_overlay_png(image, mask[:, :, :4], tmp_path / "p.png")
    with pytest.raises(Sam3DError, match="3D array"):
        save_overlay_png(image[:, :, 0], None, tmp_path / "p.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(Sam3DError, match="cannot write"):
        save_overlay_png(image, None, tmp_path / "file" / "p.png")


def test_vessel_preview(tmp_path):
    from sam3d.data.phantoms import make_vessel_phantom

    vp = make_vessel_phantom(0, size=(96, 96))
    png = imread(save_vessel_preview(vp.image, vp.label, tmp_path / "v.png"))
    assert png.shape[1] > png.shape[0]  # two panels side by side
    assert _count(png, np.array([0.0, 1.0, 0.9]), tol=0.15) > 20  # the label overlay
    with pytest.raises(Sam3DError, match="label shape"):
        save_vessel_preview(vp.image, vp.label[:10], tmp_path / "v.png")


def test_comparison_grid_outlines_truth_and_each_models_mask(tmp_path):
    from sam3d.visualize import save_comparison_grid

    img = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    gt = np.zeros((32, 32), bool)
    gt[8:24, 8:24] = True
    near, empty = np.zeros_like(gt), np.zeros_like(gt)
    near[2:14, 2:14] = True  # overlaps the truth, outlines apart
    path = save_comparison_grid(
        [img, img], [gt, gt], {"found": [near, near], "nothing": [empty, empty]},
        tmp_path / "grid.png", ["site B", "site C"], {"found": [1.0, 1.0]}, "test",
    )  # fmt: skip
    png = imread(path)
    assert png.shape[0] > png.shape[1]  # two rows of two panels, taller than wide
    # the truth is outlined in all four panels, a prediction only in the "found" column
    left, right = png[:, : png.shape[1] // 2], png[:, png.shape[1] // 2 :]
    assert _count(left, CYAN) > 30 and _count(right, CYAN) > 30
    assert _count(left, YELLOW) > 30 and _count(right, YELLOW) == 0
    with pytest.raises(Sam3DError, match="one entry per row"):
        save_comparison_grid([img], [gt, gt], {"m": [gt]}, tmp_path / "x.png")
    with pytest.raises(Sam3DError, match="must have one shape"):
        save_comparison_grid([img], [gt], {"m": [gt[:10]]}, tmp_path / "x.png")

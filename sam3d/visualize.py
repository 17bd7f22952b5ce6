"""Preview pictures: three orthogonal slices with mask outlines and clicks; vessel images.

Matplotlib through its object API on the Agg canvas (no pyplot state, no display).
Panels show voxel index space: the axial panel is (i across, j up) at slice k,
the coronal panel (i across, k up) at j, the sagittal panel (j across, k up) at i;
each pixel is drawn with its physical aspect from ``spacing_mm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sam3d.data.io import atomic_write
from sam3d.errors import Sam3DError

# Outline colours per label value (1 organ, 2 tumour, then any further values).
_LABEL_COLORS = ("#00d5ff", "#ffd000", "#ff4df0", "#7dff4d", "#ff8c1a")


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor / MetaTensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _squeeze_3d(a: np.ndarray, what: str) -> np.ndarray:
    """(I, J, K) from (I, J, K) or a channel-first (1, I, J, K)."""
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise Sam3DError(f"{what} must be a 3D array (I, J, K), got shape {tuple(a.shape)}")
    return a


def _atomic_savefig(fig, path: Path, dpi: int) -> Path:
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    except OSError as e:
        raise Sam3DError(f"cannot write the picture {path}: {e.strerror or e}") from e
    return path


def overlay_figure(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    center_vox: Sequence[float] | None = None,
    points_vox: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    window_hu: tuple[float, float] = (-160.0, 240.0),
    title: str | None = None,
):
    """The matplotlib Figure behind :func:`save_overlay_png` (arguments alike)."""
    from matplotlib import colors as matplotlib_colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = _squeeze_3d(_to_numpy(image).astype(np.float32, copy=False), "image")
    if mask is not None:
        mask = _squeeze_3d(_to_numpy(mask), "mask")
        if mask.shape != image.shape:
            raise Sam3DError(f"mask shape {mask.shape} differs from image shape {image.shape}")
        mask = np.rint(mask).astype(np.int64) if mask.dtype.kind == "f" else mask.astype(np.int64)
    sp = [float(s) for s in spacing_mm]
    shape = np.array(image.shape)
    if center_vox is None:
        if mask is not None and mask.any():
            center_vox = np.argwhere(mask > 0).mean(axis=0)
        else:
            center_vox = (shape - 1) / 2
    c = np.clip(np.rint(np.asarray(center_vox, float)).astype(int), 0, shape - 1)
    points = np.asarray(points_vox if points_vox is not None else [], float).reshape(-1, 3)
    labels = (
        np.asarray(point_labels, int).reshape(-1)
        if point_labels is not None
        else np.ones(len(points), int)
    )
    if len(labels) != len(points):
        raise Sam3DError(f"{len(points)} points but {len(labels)} point labels")

    # (name, fixed axis, horizontal axis, vertical axis)
    panels = [("axial", 2, 0, 1), ("coronal", 1, 0, 2), ("sagittal", 0, 1, 2)]
    widths = [shape[h] * sp[h] for _, _, h, _ in panels]
    heights = [shape[v] * sp[v] for _, _, _, v in panels]
    fig_h = 4.0
    fig = Figure(figsize=(fig_h * sum(w / max(heights) for w in widths) + 0.6, fig_h + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": widths})
    vmin, vmax = window_hu
    for ax, (name, fixed, hax, vax) in zip(axes, panels):
        sl = [slice(None)] * 3
        sl[fixed] = c[fixed]
        img2d = image[tuple(sl)]  # axes (hax, vax) in increasing order
        ax.imshow(
            img2d.T,
            cmap="gray",
            vmin=vmin,
            vmax=vmax,
            origin="lower",
            aspect=sp[vax] / sp[hax],
            interpolation="nearest",
        )
        if mask is not None:
            m2d = mask[tuple(sl)]
            for value in [v for v in np.unique(m2d) if v > 0]:
                color = _LABEL_COLORS[(int(value) - 1) % len(_LABEL_COLORS)]
                inside = (m2d == value).T.astype(float)
                if min(inside.shape) < 2:  # a 1-voxel-thick panel has no outline: tint it
                    tint = np.zeros((*inside.shape, 4))
                    tint[..., :3] = matplotlib_colors.to_rgb(color)
                    tint[..., 3] = 0.5 * inside
                    ax.imshow(
                        tint, origin="lower", aspect=sp[vax] / sp[hax], interpolation="nearest"
                    )
                    continue
                ax.contour(inside, levels=[0.5], colors=[color], linewidths=1.2)
        for p, lab in zip(points, labels):
            if lab < 0 or abs(p[fixed] - c[fixed]) > 1.0:
                continue  # padding, or not on (next to) this slice
            if lab > 0:
                ax.plot(p[hax], p[vax], "+", color="#00ff00", markersize=14, markeredgewidth=2.5)
            else:
                ax.plot(p[hax], p[vax], "x", color="#ff0000", markersize=11, markeredgewidth=2.5)
        ax.set_title(f"{name} {'ijk'[fixed]}={c[fixed]}", fontsize=9)
        ax.set_xlabel("ijk"[hax], fontsize=8)
        ax.set_ylabel("ijk"[vax], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(-0.5, shape[hax] - 0.5)
        ax.set_ylim(-0.5, shape[vax] - 0.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_overlay_png(
    image: np.ndarray,
    mask: np.ndarray | None,
    path: str | Path,
    center_vox: Sequence[float] | None = None,
    points_vox: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    window_hu: tuple[float, float] = (-160.0, 240.0),
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Save three orthogonal slices through ``center_vox`` as a PNG, atomically.

    Args:
        image: (I, J, K) intensities in HU (or 1 x I x J x K; numpy or torch).
        mask: (I, J, K) labels or None; each non-zero value is outlined in its own colour.
        path: output .png.
        center_vox: (i, j, k) the slices go through; None: the mask's centroid, else the centre.
        points_vox: clicks (i, j, k); drawn on the panels whose slice they lie on (+-1 voxel).
        point_labels: 1 positive (green +), 0 negative (red x), -1 padding (not drawn).
        spacing_mm: voxel size (si, sj, sk), sets each panel's aspect ratio.
        window_hu: grey-level window (low, high).
    """
    fig = overlay_figure(
        image, mask, center_vox, points_vox, point_labels, spacing_mm, window_hu, title
    )
    return _atomic_savefig(fig, Path(path), dpi)


def save_vessel_preview(
    image: np.ndarray, label: np.ndarray | None, path: str | Path, dpi: int = 100
) -> Path:
    """Save a 2D image (H, W, 3) or (H, W) beside it with its label outlined, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = _to_numpy(image).astype(np.float32, copy=False)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (1, 3, 4)):
        raise Sam3DError(f"image must be (H, W) or (H, W, 3), got shape {tuple(img.shape)}")
    if img.max() > 1.0:
        img = img / 255.0
    fig = Figure(figsize=(8.4, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax in axes:
        ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None)
        ax.set_axis_off()
    axes[0].set_title("image", fontsize=9)
    if label is not None:
        lab = _to_numpy(label)
        if lab.shape != img.shape[:2]:
            raise Sam3DError(f"label shape {lab.shape} differs from image shape {img.shape[:2]}")
        overlay = np.zeros((*lab.shape, 4), dtype=np.float32)
        overlay[lab > 0] = (0.0, 1.0, 0.9, 0.85)
        axes[1].imshow(overlay)
        axes[1].set_title("label", fontsize=9)
    fig.tight_layout()
    return _atomic_savefig(fig, Path(path), dpi)


def save_planar_overlay(
    image: np.ndarray,
    label: np.ndarray | None,
    path: str | Path,
    points_rc: Sequence[Sequence[float]] | None = None,
    point_labels: Sequence[int] | None = None,
    class_names: dict[int, str] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Save a 2D image beside it with each label value outlined in its own colour, atomically.

    Args:
        image: (H, W) grey or (H, W, 3) RGB, in [0, 1] or 0..255.
        label: (H, W) class ids (0 background) or None.
        points_rc: clicks as (row, col) pixel indices; point_labels 1 positive (green +),
            0 negative (red x), -1 padding (not drawn).
        class_names: legend text per class id.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    img = _to_numpy(image).astype(np.float32, copy=False)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise Sam3DError(f"image must be (H, W) or (H, W, 3), got shape {tuple(img.shape)}")
    if img.size and img.max() > 1.0:
        img = img / 255.0
    fig = Figure(figsize=(8.4, 4.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax in axes:
        ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_axis_off()
    axes[0].set_title("image", fontsize=9)
    handles = []
    if label is not None:
        lab = _to_numpy(label).astype(np.int64)
        if lab.shape != img.shape[:2]:
            raise Sam3DError(f"label shape {lab.shape} differs from image shape {img.shape[:2]}")
        for i, value in enumerate(v for v in np.unique(lab) if v != 0):
            color = _LABEL_COLORS[i % len(_LABEL_COLORS)]
            axes[1].contour(lab == value, levels=[0.5], colors=[color], linewidths=1.2)
            name = (class_names or {}).get(int(value), f"label {value}")
            handles.append(Line2D([], [], color=color, label=name))
    if points_rc is not None:
        labels = list(point_labels) if point_labels is not None else [1] * len(points_rc)
        for (r, c), lab_ in zip(points_rc, labels):
            if lab_ >= 0:
                marker, color = ("+", "#00ff00") if lab_ == 1 else ("x", "#ff3030")
                axes[1].plot([c], [r], marker=marker, color=color, markersize=10, mew=2)
    if handles:
        axes[1].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)
    axes[1].set_title("outlines" if title is None else title, fontsize=9)
    fig.tight_layout()
    return _atomic_savefig(fig, Path(path), dpi)


def save_comparison_grid(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    predictions: dict[str, Sequence[np.ndarray]],
    path: str | Path,
    row_names: Sequence[str] | None = None,
    scores: dict[str, Sequence[float]] | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Save a rows x models grid: each row one 2D image, each column one model's mask
    outlined (yellow) over the ground truth (cyan), atomically.

    Args:
        images: per row an (H, W) grey image, any range (scaled to its min..max).
        truths: per row the (H, W) ground-truth mask.
        predictions: model name -> per row its (H, W) mask (the column order is the dict's).
        row_names: a label per row (e.g. the site); scores: model -> per row a number
            printed in the panel's title (e.g. the case's Dice).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, names = len(images), list(predictions)
    if n == 0 or not names:
        raise Sam3DError("save_comparison_grid needs at least one image and one model")
    if len(truths) != n or any(len(v) != n for v in predictions.values()):
        raise Sam3DError("images, truths and every model's predictions need one entry per row")
    fig = Figure(figsize=(2.1 * len(names), 2.2 * n + (0.4 if title else 0)))
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(n, len(names), squeeze=False))
    for r in range(n):
        img = _to_numpy(images[r]).astype(np.float32)
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        gt = _to_numpy(truths[r]) > 0
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            pred = _to_numpy(predictions[name][r]) > 0
            if pred.shape != gt.shape or img.shape != gt.shape:
                raise Sam3DError(
                    f"row {r}: image {img.shape}, truth {gt.shape} and {name} {pred.shape} "
                    "must have one shape"
                )
            if gt.any():
                ax.contour(gt, levels=[0.5], colors=["#00d5ff"], linewidths=1.0)
            if pred.any():
                ax.contour(pred, levels=[0.5], colors=["#ffd000"], linewidths=1.0)
            label = name if r == 0 else ""
            if scores is not None and name in scores:
                label = f"{label}\n{scores[name][r]:.2f}" if label else f"{scores[name][r]:.2f}"
            ax.set_title(label, fontsize=8)
            if c == 0 and row_names is not None:
                ax.set_ylabel(str(row_names[r]), fontsize=9)
    if title:
        fig.suptitle(title + "  (cyan: truth, yellow: prediction)", fontsize=9)
    fig.tight_layout()
    return _atomic_savefig(fig, Path(path), dpi)

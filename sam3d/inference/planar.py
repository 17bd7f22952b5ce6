"""Click segmentation of one 2D image with a promptable planar model: ``sam3d segment-2d``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sam3d.data.io import atomic_write
from sam3d.errors import Sam3DError
from sam3d.inference.segment import check_writable


def read_grey_png(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit grey (or RGB, averaged) image as float32 ``H x W`` in [0, 1].

    RGBA / grey+alpha and 16-bit images are refused with one clear message, as the
    bundle's ``ToUnitGreyd`` does.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise Sam3DError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            mode = im.mode
            if mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                raise Sam3DError(f"{p} has an alpha channel ({mode}); save it as 8-bit grey or RGB")
            if mode.startswith("I") or mode == "F":
                raise Sam3DError(
                    f"{p} is not an 8-bit image (mode {mode}, e.g. a 16-bit PNG); "
                    "convert it to 8-bit grey"
                )
            arr = np.asarray(im.convert("L") if mode not in ("L", "RGB") else im)
    except (UnidentifiedImageError, OSError) as e:
        raise Sam3DError(f"{p} is not a readable image ({type(e).__name__})") from e
    arr = arr.astype(np.float32)
    return (arr.mean(-1) if arr.ndim == 3 else arr) / 255.0


def segment_image_file(
    image: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    clicks_xy: Sequence[Sequence[float]] = (),
    negatives_xy: Sequence[Sequence[float]] = (),
    preview: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    threshold: float = 0.5,
) -> np.ndarray:
    """Segment one structure of a 2D image from clicks and write ``out`` (PNG, 0 / 255).

    Clicks are ``(x, y)`` pixel coordinates (column, row) of the image; at least one
    positive. Every user error (missing or wrong checkpoint, RGBA / 16-bit / unreadable
    image, a click outside the image, an output that cannot be written) raises
    :class:`Sam3DError` before anything is written; outputs are written atomically.
    Returns the mask (bool ``H x W``).
    """
    from sam3d.models.checkpoint import load_trained, read_trained
    from sam3d.models.registry import get_kind, kinds_where, model_kinds

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise Sam3DError(f"the output must be a .png file, got {out}")
    if preview is not None and Path(preview).suffix.lower() != ".png":
        raise Sam3DError(f"the preview must be a .png file, got {preview}")
    for target in (out, preview):
        if target is not None:
            check_writable(Path(target))
    if not clicks_xy:
        raise Sam3DError("give at least one positive --click x,y")
    img = read_grey_png(image)
    h, w = img.shape
    points_xy = np.asarray([*clicks_xy, *negatives_xy], dtype=np.float64).reshape(-1, 2)
    for x, y in points_xy:
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise Sam3DError(
                f"click x={x:g}, y={y:g} is outside {image} ({w} x {h} pixels: "
                f"x in 0..{w - 1}, y in 0..{h - 1})"
            )
    kind = read_trained(checkpoint)["model"]
    clickable = kinds_where(prompt="points2d")
    if kind not in clickable:
        volumetric = get_kind(kind).wing == "volumetric" if kind in model_kinds() else False
        hint = "use `sam3d segment` for NIfTI volumes" if volumetric else "it takes no clicks"
        raise Sam3DError(
            f"{checkpoint} holds a {kind} model; segment-2d needs a promptable 2D model "
            f"({', '.join(clickable)}): {hint}"
        )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_trained(checkpoint, map_location=dev, kind=kind)
    points_rc = torch.as_tensor(points_xy[:, ::-1].copy(), dtype=torch.float32)[None, None]
    labels = torch.tensor([[[1] * len(clicks_xy) + [0] * len(negatives_xy)]], dtype=torch.long)
    with torch.no_grad():
        logits = model(torch.from_numpy(img)[None, None].to(dev), points_rc.to(dev), labels.to(dev))
    mask = (torch.sigmoid(logits[0, 0]) > threshold).cpu().numpy()

    from PIL import Image

    atomic_write(
        out, lambda tmp: Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
    )
    if preview is not None:
        from sam3d.visualize import save_planar_overlay

        try:
            save_planar_overlay(
                img, mask.astype(np.uint8), preview,
                points_rc=points_xy[:, ::-1], point_labels=labels[0, 0].tolist(),
                class_names={1: "segmented"}, title=Path(image).name,
            )  # fmt: skip
        except Sam3DError:
            out.unlink(missing_ok=True)  # no half of the outputs left behind
            raise
    return mask

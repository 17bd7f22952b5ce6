"""One-shot segmentation of a NIfTI file: what ``sam3d segment`` runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from sam3d.data.io import is_nifti_name
from sam3d.errors import Sam3DError
from sam3d.inference.session import ClickSession, load_model_for_inference
from sam3d.inference.windows import WindowGrowth


def segment_file(
    image: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    clicks: Sequence[Sequence[float]] = (),
    negatives: Sequence[Sequence[float]] = (),
    world: bool = False,
    preview: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    growth: WindowGrowth | None = None,
    overlap: float = 0.25,
) -> ClickSession:
    """Segment ``image`` from clicks (automatic mode without any) and write ``out``.

    Clicks are original voxel indices, or RAS mm with ``world``. Every user error
    (missing checkpoint, unreadable or non-3D image, a click outside the image) raises
    :class:`Sam3DError` before anything is written; the mask is written atomically.
    """
    out = Path(out)
    if not is_nifti_name(out):
        raise Sam3DError(f"the output must be a .nii.gz or .nii file, got {out}")
    if preview is not None and Path(preview).suffix.lower() != ".png":
        raise Sam3DError(f"the preview must be a .png file, got {preview}")
    for target in (out, preview):
        if target is not None:
            _check_writable(Path(target))
    if not Path(checkpoint).is_file():
        raise Sam3DError(f"checkpoint not found: {checkpoint}")
    if not Path(image).is_file():
        raise Sam3DError(f"image not found: {image}")
    model, meta = load_model_for_inference(checkpoint, device)
    if "dataset" not in meta:
        raise Sam3DError(f"{checkpoint} has no dataset preset; is it a trained sam3d checkpoint?")
    session = ClickSession(model, image, meta["dataset"], device=device, growth=growth)
    if clicks or negatives:
        points = [*clicks, *negatives]
        labels = [1] * len(clicks) + [0] * len(negatives)
        session.add_clicks(points, labels, world=world)
    else:
        session.segment_all(overlap=overlap)
    session.save(out)
    if preview is not None:
        session.save_preview(preview, title=Path(image).name)
    return session


def _check_writable(path: Path) -> None:
    """Raise :class:`Sam3DError` unless ``path`` can be created (its folder may not exist yet)."""
    if path.is_dir():
        raise Sam3DError(f"cannot write {path}: it is a folder")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise Sam3DError(f"cannot write {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise Sam3DError(f"cannot write {path}: permission denied in {parent}")

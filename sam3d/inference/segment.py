"""One-shot segmentation of a NIfTI file: what ``sam3d segment`` runs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sam3d.data.io import commit_outputs, is_nifti_name, load_image
from sam3d.errors import Sam3DError
from sam3d.inference.session import (
    ClickSession,
    check_automatic_mode,
    load_model_for_inference,
    resolve_dataset,
)
from sam3d.inference.windows import WindowGrowth

# A CT in Hounsfield units has air (about -1000 HU) around the body or in the lungs and
# bowel; an image with (almost) no voxel at or below CT_AIR_HU is not CT in HU, and a CT
# window would saturate it.
CT_AIR_HU = -500.0
CT_MIN_AIR_FRACTION = 0.005
NAME_MAX = 255  # bytes of one file name on Linux, macOS and Windows file systems


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
    dataset: Mapping[str, Any] | str | None = None,
) -> ClickSession:
    """Segment ``image`` from clicks (automatic mode without any, for a checkpoint trained
    for it: :func:`~sam3d.inference.session.check_automatic_mode`) and write ``out``.

    Clicks are original voxel indices, or RAS mm with ``world``. ``dataset`` (a preset
    name, JSON path or dict) replaces the checkpoint's intensity preset. Every user
    error (missing checkpoint, unreadable or non-3D image, a click outside the image, an
    output that cannot be written or would overwrite the input) raises
    :class:`Sam3DError` before anything is written; the mask and the preview are
    written together or not at all.
    """
    out = Path(out)
    if not is_nifti_name(out):
        raise Sam3DError(f"the output must be a .nii.gz or .nii file, got {out}")
    if preview is not None and Path(preview).suffix.lower() != ".png":
        raise Sam3DError(f"the preview must be a .png file, got {preview}")
    targets = [out] + ([Path(preview)] if preview is not None else [])
    for target in targets:
        check_writable(target)
        if same_file(target, Path(image)):
            raise Sam3DError(f"the output {target} is the input image; choose another name")
    if preview is not None and same_file(out, Path(preview)):
        raise Sam3DError(f"--out and --preview are the same file {out}")
    if not Path(checkpoint).is_file():
        raise Sam3DError(f"checkpoint not found: {checkpoint}")
    if not Path(image).is_file():
        raise Sam3DError(f"image not found: {image}")
    preset = resolve_dataset(dataset) if dataset is not None else None
    volume = load_image(image)  # a bad image is refused before a large checkpoint is read
    model, meta = load_model_for_inference(checkpoint, device)
    if not (clicks or negatives):
        check_automatic_mode(meta, checkpoint)
    if preset is None:
        if not isinstance(meta.get("dataset"), Mapping | str):
            raise Sam3DError(
                f"{checkpoint} has no dataset preset; is it a trained sam3d checkpoint? "
                "(--dataset NAME gives one)"
            )
        preset = resolve_dataset(meta["dataset"])
    session = ClickSession(model, volume, preset, device=device, growth=growth, source=image)
    if clicks or negatives:
        points = [*clicks, *negatives]
        labels = [1] * len(clicks) + [0] * len(negatives)
        session.add_clicks(points, labels, world=world)
    else:
        session.segment_all(overlap=overlap)
    writers = {out: lambda tmp: session.save(tmp)}
    if preview is not None:
        writers[Path(preview)] = lambda tmp: session.save_preview(tmp, title=Path(image).name)
    try:
        commit_outputs(writers)
    except OSError as e:
        raise Sam3DError(f"cannot write {out}: {e.strerror or e}") from None
    return session


def intensity_note(session: ClickSession) -> tuple[str, str | None]:
    """What intensity preset a session applies, and a warning if the image does not look
    like that preset's modality (a CT window on an image without air in HU)."""
    ds = session.dataset
    lo, hi = (float(v) for v in ds["window_hu"])
    note = f"intensity preset {ds.get('name', '?')!r}: window {lo:g}..{hi:g} HU"
    img = session.original_image
    vmin, vmax = float(img.min()), float(img.max())
    air = float((img <= CT_AIR_HU).float().mean())
    warning = None
    if str(ds.get("modality", "CT")).upper() == "CT" and air < CT_MIN_AIR_FRACTION:
        warning = (
            f"the image's intensities ({vmin:.4g}..{vmax:.4g}, {100 * air:.2g}% of voxels at "
            f"or below {CT_AIR_HU:g}) do not look like CT in HU, which has air around the "
            f"body; the {lo:g}..{hi:g} HU window of preset {ds.get('name', '?')!r} may "
            "saturate it. Every preset of sam3d (kits, lits, pancreas, colon) is a CT "
            "window: there is no MRI preset, and a model trained on CT is not meant for MRI"
        )
    return note, warning


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links and relative parts)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        return False


def check_writable(path: Path) -> None:
    """Raise :class:`Sam3DError` unless ``path`` can be created (its folder may not exist yet).

    Tries it: a temporary file is created and removed in the nearest existing folder, so
    read-only and virtual file systems (``/proc``) and over-long names are refused before
    any work.
    """
    path = Path(path)
    for part in path.parts:  # before any stat: the OS refuses to look such a name up
        if len(os.fsencode(part)) > NAME_MAX:
            raise Sam3DError(
                f"cannot write {str(path)[:80]}...: a name is {len(os.fsencode(part))} bytes "
                f"long (file systems allow {NAME_MAX})"
            )
    if path.is_dir():
        raise Sam3DError(f"cannot write {path}: it is a folder")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise Sam3DError(f"cannot write {path}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sam3d-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise Sam3DError(f"cannot write {path}: {e.strerror or e} in {parent}") from None

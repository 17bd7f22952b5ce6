"""The one place where images and labels are read from disk, and files are written safely.

Reading goes through MONAI's ``LoadImage`` (NibabelReader for NIfTI), channel
first, in the file's own orientation, and refuses anything that would only
fail later with a confusing traceback: a missing or unreadable file, a
truncated or corrupt NIfTI, an image that is not one 3D volume, a header
without a valid voxel geometry, NaN/Inf voxels, an image/label pair on
different voxel grids. Each ends in one
:class:`~sam3d.errors.Sam3DError` sentence.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sam3d.errors import Sam3DError

if TYPE_CHECKING:
    from monai.data import MetaTensor

AFFINE_TOLERANCE_MM = 1e-3
# Read once at import: os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
NIFTI_SUFFIXES = (".nii.gz", ".nii")  # longest first, for stripping


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place.

    The temporary name keeps the target's suffix (``.nii.gz``, ``.png``) so writers
    that pick a format from the name work. On any error the temporary file is removed
    and nothing is left at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def spacing_from_affine(affine) -> tuple[float, ...]:
    """Voxel size in mm per index axis: the column norms of the affine's linear part."""
    a = np.asarray(affine, dtype=float)
    n = a.shape[0] - 1
    return tuple(float(v) for v in np.linalg.norm(a[:n, :n], axis=0))


def orientation_codes(affine) -> str:
    """Nibabel axis codes of a RAS+ affine, e.g. "RAS", "LPS" (closest for oblique grids)."""
    import nibabel as nib

    a = np.asarray(affine, dtype=float)
    return "".join(nib.orientations.aff2axcodes(a))


def obliquity_deg(affine) -> float:
    """Angle (degrees) between the voxel axes and the nearest axis-aligned orientation."""
    import nibabel as nib

    a = np.asarray(affine, dtype=float)
    rot = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    ornt = nib.orientations.io_orientation(a)
    nearest = np.zeros((3, 3))
    for vox_axis, (world_axis, flip) in enumerate(ornt):
        nearest[int(world_axis), vox_axis] = flip
    cos = (np.trace(nearest.T @ rot) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def is_nifti_name(path: str | os.PathLike) -> bool:
    """True for a ``.nii`` / ``.nii.gz`` file name (any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """The file name without its ``.nii`` / ``.nii.gz`` suffix."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_nifti(path: Path) -> bool:
    return is_nifti_name(path)


def _describe(e: BaseException) -> str:
    if isinstance(e, EOFError) or "end-of-stream" in str(e) or "truncated" in str(e).lower():
        return "the file is truncated"
    if isinstance(e, PermissionError):
        return "permission denied"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "cannot find a suitable reader" in msg:
        return "not a readable image format, or the file is corrupt"
    return msg[:200]


def _check_geometry(path: Path, affine) -> None:
    """Refuse a singular or non-finite voxel-to-world mapping.

    MONAI quietly substitutes an identity affine when a NIfTI header's is singular,
    so the header itself is checked too.
    """
    affines = [np.asarray(affine, dtype=float)]
    if _is_nifti(path):
        import nibabel as nib

        affines.append(np.asarray(nib.load(str(path)).affine, dtype=float))
    for a in affines:
        linear = a[:3, :3]
        if not np.isfinite(a).all() or abs(np.linalg.det(linear)) < 1e-9:
            sizes = ", ".join(f"{v:.3g}" for v in np.linalg.norm(np.nan_to_num(linear), axis=0))
            raise Sam3DError(
                f"{path} has no valid voxel geometry in its header (voxel size {sizes} mm)"
            )


def load_image(path: str | Path, require_3d: bool = True) -> MetaTensor:
    """Read an image as a channel-first MetaTensor in the file's own orientation.

    Args:
        path: a NIfTI (.nii / .nii.gz) or any other format MONAI can read.
        require_3d: refuse anything but one 3D volume (C == 1).

    Returns:
        MetaTensor float32 ``C x H x W x D`` (``C x H x W`` for 2D when allowed) with
        ``.affine`` (RAS+ world mm) and MONAI's metadata.
    """
    path = Path(path)
    if not path.exists():
        raise Sam3DError(f"{path}: no such file")
    if path.is_dir():
        raise Sam3DError(f"{path} is a folder, not an image file")
    if not os.access(path, os.R_OK):
        raise Sam3DError(f"{path}: permission denied")
    from monai.data import NibabelReader  # imported late: a bad path answers at once
    from monai.transforms import LoadImage

    reader = NibabelReader() if _is_nifti(path) else None
    try:
        img = LoadImage(image_only=True, ensure_channel_first=True, reader=reader)(str(path))
    except Exception as e:  # nibabel / zlib / MONAI raise many types for a bad file
        raise Sam3DError(f"cannot read {path} as an image: {_describe(e)}") from e
    shape = tuple(img.shape)
    if require_3d:
        if img.ndim != 4:
            raise Sam3DError(
                f"{path} is a {img.ndim - 1}D image of shape {shape[1:]}; a 3D volume is required"
            )
        if shape[0] != 1:
            raise Sam3DError(
                f"{path} holds {shape[0]} channels or time points (shape {shape[1:]} x "
                f"{shape[0]}); a single 3D volume is required"
            )
    if min(shape) == 0:
        raise Sam3DError(f"{path} is empty (shape {shape[1:]})")
    if img.ndim == 4:
        _check_geometry(path, img.affine)
    finite = img.isfinite()
    if not bool(finite.all()):
        n_bad = int((~finite).sum())
        raise Sam3DError(f"{path} contains {n_bad} NaN or infinite voxels")
    return img


def load_image_label(
    image_path: str | Path, label_path: str | Path, require_3d: bool = True
) -> tuple[MetaTensor, MetaTensor]:
    """Read an image and its label, refusing a pair that does not share one voxel grid.

    Returns:
        (image, label), both MetaTensors ``1 x H x W x D`` with equal shapes and
        affines (within ``AFFINE_TOLERANCE_MM``).
    """
    image = load_image(image_path, require_3d=require_3d)
    label = load_image(label_path, require_3d=require_3d)
    if tuple(image.shape[1:]) != tuple(label.shape[1:]):
        raise Sam3DError(
            f"image {image_path} and label {label_path} have different shapes: "
            f"{tuple(image.shape[1:])} vs {tuple(label.shape[1:])}"
        )
    diff = float(np.abs(np.asarray(image.affine) - np.asarray(label.affine)).max())
    if diff > AFFINE_TOLERANCE_MM:
        raise Sam3DError(
            f"image {image_path} and label {label_path} lie on different voxel grids "
            f"(affines differ by up to {diff:.3g} mm)"
        )
    return image, label

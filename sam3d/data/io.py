"""The one place where images and labels are read from disk, and files are written safely.

Reading goes through MONAI's ``LoadImage`` (NibabelReader for NIfTI), channel
first, in the file's own orientation, and refuses anything that would only
fail later with a confusing traceback: a missing or unreadable file, a
truncated or corrupt NIfTI (a ``.gz`` stream is verified to its CRC and length),
complex or RGB voxels, an image that is not one 3D volume, a header without a
valid voxel geometry (singular, voxel size 0 with no sform, absurd voxel sizes),
NaN/Inf voxels, an image/label pair on different voxel grids, and the other
formats nibabel knows (MGH/MGZ, MINC, PAR/REC, Analyze) as "unsupported, convert
to NIfTI". Each ends in one :class:`~sam3d.errors.Sam3DError` sentence; nibabel's
own log lines about a header are captured, not printed.
:func:`check_grid_size` refuses a resampling whose grid would be too large before
anything is allocated.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sam3d.errors import Sam3DError

# the atomic writers moved to sam3d.files (no I/O package needed to write a file); kept here
from sam3d.files import (  # noqa: F401
    TEMP_MARK,
    atomic_write,
    commit_outputs,
    leftover_temporaries,
)

if TYPE_CHECKING:
    from monai.data import MetaTensor

AFFINE_TOLERANCE_MM = 1e-3
NIFTI_SUFFIXES = (".nii.gz", ".nii")  # longest first, for stripping
# Formats nibabel reads that sam3d does not (the mask is written with the input's NIfTI
# header): named, so they are never called corrupt.
OTHER_FORMATS = {
    ".mgh": "MGH",
    ".mgz": "MGZ (FreeSurfer)",
    ".mnc": "MINC",
    ".mnc.gz": "MINC",
    ".par": "Philips PAR/REC",
    ".rec": "Philips PAR/REC",
    ".hdr": "Analyze",
    ".img": "Analyze",
    ".img.gz": "Analyze",
}
# No scanner makes voxels outside this range (mm); beyond it a header is wrong.
VOXEL_SIZE_RANGE_MM = (1e-2, 50.0)
# The largest grid a volume may be resampled to: 2**29 voxels (2 GiB as float32), above a
# whole-body CT at 1 mm (~500 x 500 x 1800 = 4.5e8).
MAX_GRID_VOXELS = 2**29
_GZIP_CHUNK = 1 << 22


def spacing_from_affine(affine) -> tuple[float, ...]:
    """Voxel size in mm per index axis: :func:`sam3d.data.geometry.spacing_from_affine`
    (imported here late, so that a bad path answers before MONAI is loaded)."""
    from sam3d.data.geometry import spacing_from_affine as spacing

    return spacing(affine)


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


def _other_format(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, fmt in OTHER_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return None


@contextlib.contextmanager
def captured_library_logs() -> Iterator[list[str]]:
    """Collect what nibabel logs or warns (header fixes, oddities) instead of printing it.

    Yields the list the messages are appended to; a refusal is then one line, and an
    accepted file's notes go to the ``sam3d.data`` debug log.
    """
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    # nibabel logs header fixes to "nibabel.global", which has its own stderr handler
    loggers = [logging.getLogger(n) for n in ("nibabel", "nibabel.global")]
    saved = [(lg, list(lg.handlers), lg.propagate) for lg in loggers]
    handler = _Collect()
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate
        for m in messages:
            logging.getLogger("sam3d.data").debug(m)


def verify_gzip(path: str | Path) -> None:
    """Read a ``.gz`` file to its end so that zlib checks the CRC-32 and the length.

    Nibabel stops reading once it has the voxels it needs and never reaches the
    trailer, so a flipped bit in the data would otherwise pass unnoticed.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            while f.read(_GZIP_CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as e:
        text = str(e)
        if isinstance(e, EOFError) or "end-of-stream" in text:
            why = "the file is truncated"
        elif "CRC" in text or "length" in text.lower():
            why = f"its gzip check failed ({text}): the file is corrupt"
        else:
            why = f"it is not a valid gzip stream ({text}): the file is corrupt"
        raise Sam3DError(f"cannot read {path} as an image: {why}") from None


def _raw_nifti_header(path: Path):
    """The header as stored (nibabel's loader silently fixes pixdim 0 to 1 mm)."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as f, captured_library_logs():
        head = f.read(4)
        f.seek(0)
        two = 540 in (int.from_bytes(head, "little"), int.from_bytes(head, "big"))
        cls = nib.Nifti2Header if two else nib.Nifti1Header
        return cls.from_fileobj(f, check=False)


def _check_nifti_header(path: Path) -> None:
    """Refuse voxel types and geometry that MONAI would accept and silently change."""
    try:
        header = _raw_nifti_header(path)
        dtype = header.get_data_dtype()
    except Exception:  # unreadable: the loader reports it
        return
    if dtype.kind == "c":
        raise Sam3DError(
            f"{path} holds complex-valued voxels ({dtype}); save the magnitude as a real image"
        )
    if dtype.kind == "V" or dtype.names:
        raise Sam3DError(f"{path} holds RGB / structured voxels ({dtype}); a grey volume is needed")
    ndim = int(header["dim"][0])
    pixdim = [float(v) for v in header["pixdim"][1 : 1 + min(max(ndim, 0), 3)]]
    if int(header["sform_code"]) == 0 and any(not math.isfinite(v) or v == 0 for v in pixdim):
        raise Sam3DError(
            f"{path} has voxel size {tuple(pixdim)} mm in its header (pixdim) and no sform: "
            "its voxel geometry is unknown; fix the header"
        )


def check_voxel_sizes(path: str | Path, affine) -> None:
    """Refuse voxel sizes no scanner makes (outside ``VOXEL_SIZE_RANGE_MM``)."""
    lo, hi = VOXEL_SIZE_RANGE_MM
    sizes = spacing_from_affine(affine)
    if any(not (lo <= s <= hi) for s in sizes):
        shown = ", ".join(f"{v:.3g}" for v in sizes)
        raise Sam3DError(
            f"{path} has voxel size ({shown}) mm in its header, outside {lo:g}..{hi:g} mm: "
            "the header is wrong"
        )


def resampled_shape(
    shape: Sequence[int], affine, spacing_mm: float | Sequence[float]
) -> tuple[int, ...]:
    """The voxel grid a volume ``shape`` with ``affine`` gets at ``spacing_mm`` (per axis,
    before reorientation): ``ceil(n * voxel size / spacing)``, as MONAI's ``Spacingd``."""
    sizes = spacing_from_affine(affine)[: len(shape)]
    target = [float(spacing_mm)] * len(shape) if np.ndim(spacing_mm) == 0 else spacing_mm
    out = []
    for n, s, t in zip(shape, sizes, [float(v) for v in target]):
        v = n * s / t
        out.append(int(math.ceil(v - 1e-6)) if math.isfinite(v) else 2**63)
    return tuple(max(1, v) for v in out)


def check_grid_size(
    path: str | Path,
    shape: Sequence[int],
    affine,
    spacing_mm: float | Sequence[float],
    max_voxels: int = MAX_GRID_VOXELS,
) -> tuple[int, ...]:
    """Raise :class:`Sam3DError` if resampling to ``spacing_mm`` would exceed ``max_voxels``.

    Computed from the header alone, before any allocation. Returns the grid shape.
    """
    grid = resampled_shape(shape, affine, spacing_mm)
    n = math.prod(grid)
    if n > max_voxels:
        sizes = ", ".join(f"{v:.3g}" for v in spacing_from_affine(affine))
        raise Sam3DError(
            f"{path}: resampling its {tuple(int(v) for v in shape)} voxels of ({sizes}) mm to "
            f"{spacing_mm} mm would make {n:.3g} voxels (limit {max_voxels:.3g}); "
            "check the header's voxel size"
        )
    return grid


def _describe(e: BaseException) -> str:
    if isinstance(e, EOFError) or "end-of-stream" in str(e) or "truncated" in str(e).lower():
        return "the file is truncated"
    if isinstance(e, PermissionError):
        return "permission denied"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "cannot find a suitable reader" in msg:
        return "not an image format sam3d reads (NIfTI .nii / .nii.gz)"
    return msg[:200]


def _check_geometry(path: Path, affine) -> None:
    """Refuse a singular or non-finite voxel-to-world mapping.

    MONAI quietly substitutes an identity affine when a NIfTI header's is singular,
    so the header itself is checked too.
    """
    affines = [np.asarray(affine, dtype=float)]
    if _is_nifti(path):
        import nibabel as nib

        with captured_library_logs():
            affines.append(np.asarray(nib.load(str(path)).affine, dtype=float))
    for a in affines:
        linear = a[:3, :3]
        if not np.isfinite(a).all() or abs(np.linalg.det(linear)) < 1e-9:
            sizes = ", ".join(f"{v:.3g}" for v in np.linalg.norm(np.nan_to_num(linear), axis=0))
            raise Sam3DError(
                f"{path} has no valid voxel geometry in its header (voxel size {sizes} mm)"
            )
        check_voxel_sizes(path, a)
    # MONAI rebuilds the affine from pixdim when the two disagree; the mask is written with
    # the header's own affine, so such a header would be processed on another grid
    if len(affines) == 2 and not np.allclose(affines[0], affines[1], atol=AFFINE_TOLERANCE_MM):
        sizes = [", ".join(f"{v:.3g}" for v in spacing_from_affine(a)) for a in affines]
        raise Sam3DError(
            f"{path} has an inconsistent header: pixdim gives voxel size ({sizes[0]}) mm, "
            f"the sform/qform ({sizes[1]}) mm; fix the header"
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
    other = _other_format(path)
    if other is not None:
        raise Sam3DError(
            f"{path}: unsupported format ({other}); convert it to NIfTI (.nii.gz), e.g. "
            "nibabel.save(nibabel.load(src), 'image.nii.gz') or mri_convert"
        )
    from monai.data import NibabelReader  # imported late: a bad path answers at once
    from monai.transforms import LoadImage

    nifti = _is_nifti(path)
    if nifti:
        if path.name.lower().endswith(".gz"):
            verify_gzip(path)
        _check_nifti_header(path)
    reader = NibabelReader() if nifti else None
    try:
        with captured_library_logs():
            img = LoadImage(image_only=True, ensure_channel_first=True, reader=reader)(str(path))
    except Exception as e:  # nibabel / zlib / MONAI raise many types for a bad file
        why = _describe(e)
        if nifti and "cannot find a suitable reader" in str(e):
            why = "its NIfTI header is invalid (the file is corrupt, or not NIfTI)"
        raise Sam3DError(f"cannot read {path} as an image: {why}") from None
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

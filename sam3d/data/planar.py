"""2D image datasets and transforms shared by the planar bundles.

Datasets are found in ``dataset_dir`` in one of three layouts (first match wins):

1. ``dataset.json`` (MSD style: ``training`` / ``validation`` / ``test`` lists of
   ``{"image": ..., "label": ...}`` relative to the file), e.g. written by
   ``sam3d phantoms vessels``;
2. split folders ``training|train/``, ``validation|val/``, ``test|testing/``, each with
   ``images/`` and ``masks/`` (or ``labels/``);
3. one ``images/`` + ``masks/`` (or ``labels/``) pair, split 60/20/20 by a seeded shuffle.

Images and masks pair by file name stem, ignoring the usual dataset suffixes
(DRIVE ``21_training.tif`` / ``21_manual1.gif``, CHASE_DB1 ``Image_01L.jpg`` /
``Image_01L_1stHO.png``, STARE ``im0001.ppm`` / ``im0001.ah.ppm``, Kvasir-SEG same name).
Missing validation / test lists are carved from the training cases (seeded, logged).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import PILWriter
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type

from sam3d.data.splits import complete_splits
from sam3d.errors import Sam3DError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".ppm", ".bmp")
_SPLIT_FOLDERS = {
    "training": ("training", "train"),
    "validation": ("validation", "val"),
    "test": ("test", "testing"),
}
_MASK_FOLDERS = ("masks", "labels")
# Suffixes that DRIVE / STARE / CHASE_DB1 / Kvasir-SEG / common exports put on stems.
_STEM_SUFFIX = re.compile(
    r"([_.](training|test|manual\d?|1stHO|2ndHO|ah|vk|mask|label|gt|segmentation|seg))+$",
    re.IGNORECASE,
)


def _pair_key(path: Path) -> str:
    stem = path.name
    for ext in IMAGE_EXTENSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    return _STEM_SUFFIX.sub("", stem)


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def pair_image_mask_folders(images_dir: Path, masks_dir: Path) -> list[dict[str, str]]:
    """``[{"image": path, "label": path}, ...]`` for every image with a matching mask.

    Raises :class:`Sam3DError` when an image has no mask or two masks match it.
    """
    masks: dict[str, list[Path]] = {}
    for m in _images_in(masks_dir):
        masks.setdefault(_pair_key(m), []).append(m)
    pairs = []
    for img in _images_in(images_dir):
        found = masks.get(_pair_key(img), [])
        if len(found) != 1:
            what = (
                "no mask"
                if not found
                else f"{len(found)} masks ({', '.join(f.name for f in found)})"
            )
            raise Sam3DError(
                f"image {img} has {what} in {masks_dir}; name masks after their images"
            )
        pairs.append({"image": str(img), "label": str(found[0])})
    if not pairs:
        raise Sam3DError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {images_dir}")
    return pairs


def _mask_folder(folder: Path) -> Path | None:
    return next((folder / m for m in _MASK_FOLDERS if (folder / m).is_dir()), None)


def _mask_folder(folder: Path) -> Path | None:
    return next((folder / m for m in _MASK_FOLDERS if (folder / m).is_dir()), None)


def find_image_mask_dataset(
    dataset_dir: str | Path, seed: int = 0
) -> dict[str, list[dict[str, str]]] | None:
    """The ``training`` / ``validation`` / ``test`` lists of a dataset folder, or None if empty.

    Paths in the lists are absolute. Lists the folder does not give are carved from its
    training cases by :func:`sam3d.data.splits.complete_splits` (validation never from
    test). Raises :class:`Sam3DError` for a folder that holds files but none of the
    layouts in this module's docstring.
    """
    d = Path(dataset_dir)
    if not d.exists() or (d.is_dir() and not any(d.iterdir())):
        return None
    if not d.is_dir():
        raise Sam3DError(f"dataset_dir {d} is not a folder")
    index = d / "dataset.json"
    if index.is_file():
        try:
            meta = json.loads(index.read_text())
        except (OSError, ValueError) as e:
            raise Sam3DError(f"cannot read {index}: {e}") from e
        out = {}
        for split in ("training", "validation", "test"):
            items = meta.get(split) or []
            out[split] = [
                {
                    "image": str((d / it["image"]).resolve()),
                    "label": str((d / it["label"]).resolve()),
                    # a pixel size the index knows (echo phantoms) goes to the surface metrics
                    **({"spacing_mm": it["spacing_mm"]} if "spacing_mm" in it else {}),
                }
                for it in items
            ]
        return complete_splits(out, seed=seed, source=str(index))
    split_dirs = {
        split: next((d / f for f in names if (d / f / "images").is_dir()), None)
        for split, names in _SPLIT_FOLDERS.items()
    }
    if split_dirs["training"] is not None:
        out = {}
        for split, folder in split_dirs.items():
            masks = _mask_folder(folder) if folder is not None else None
            if folder is not None and masks is None:
                raise Sam3DError(f"{folder} has images/ but no masks/ (or labels/) folder")
            out[split] = pair_image_mask_folders(folder / "images", masks) if folder else []
        return complete_splits(out, seed=seed, source=str(d))
    if (d / "images").is_dir():
        masks = _mask_folder(d)
        if masks is None:
            raise Sam3DError(f"{d} has images/ but no masks/ (or labels/) folder")
        pairs = pair_image_mask_folders(d / "images", masks)
        return complete_splits({"training": pairs}, seed=seed, source=str(d))
    raise Sam3DError(
        f"no dataset found in {d}: expected dataset.json, images/ + masks/, or "
        "training/images + training/masks (an empty folder is filled with phantoms)"
    )


def image_datalist(folder: str | Path) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image file in ``folder`` (inference input)."""
    d = Path(folder)
    if not d.is_dir():
        raise Sam3DError(f"input folder not found: {d}")
    items = [{"image": str(p)} for p in _images_in(d)]
    if not items:
        raise Sam3DError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {d}")
    return items


class ToSamRGBd(MapTransform):
    """Channel-first images to 3-channel float pixels in SAM's 0..255 range.

    Grey images are repeated to RGB, an alpha channel is dropped; integer images are
    scaled by their type's maximum (uint8 as is, uint16 / 257), float images in [0, 1]
    are scaled by 255. Shape ``C x H x W`` -> ``3 x H x W`` float32.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            c = img.shape[0]
            if c == 4:
                img = img[:3]
            elif c == 1:
                img = img.repeat(3, *([1] * (img.ndim - 1)))
            elif c != 3:
                raise Sam3DError(f"{key} has {c} channels; expected grey, RGB or RGBA")
            dtype = img.dtype
            img = img.float()
            if not dtype.is_floating_point:
                img = img * (255.0 / torch.iinfo(dtype).max)
            elif img.numel() and float(img.max()) <= 1.0:
                img = img * 255.0
            d[key] = img
        return d


class BinarizeMaskd(MapTransform):
    """Masks (``C x H x W``, any channels, {0,1}, {0,255} or lossy JPEG) to ``1 x H x W`` {0,1}.

    A pixel is foreground where its brightest channel exceeds half the mask's maximum.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            m = d[key].float().amax(dim=0, keepdim=True)
            peak = float(m.max()) if m.numel() else 0.0
            d[key] = (m > peak / 2).float() if peak > 0 else torch.zeros_like(m)
        return d


class PILWriterHW(PILWriter):
    """MONAI's ``PILWriter`` for arrays in ``H x W`` (row, column) order.

    The bundle loads images with ``PILReader(reverse_indexing=False)`` so that SAM sees
    them upright; this writer saves them back without swapping the axes.
    """

    def write(self, filename, verbose: bool = False, **kwargs):  # noqa: D102
        kwargs.setdefault("reverse_indexing", False)
        super().write(filename, verbose=verbose, **kwargs)


# Class colours of the label-map PNGs: background black, then distinct bright colours
LABEL_COLOURS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25),
                 (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]  # fmt: skip


class PaletteWriterHW(PILWriterHW):
    """:class:`PILWriterHW` for class-id maps: a palette PNG whose pixel values are still the
    class ids (``numpy.asarray(Image.open(path))`` gives them back) and which any image
    viewer shows in colour (:data:`LABEL_COLOURS`), not as near-black greys 0-3."""

    def write(self, filename, verbose: bool = False, **kwargs):  # noqa: D102
        from PIL import Image

        super().write(filename, verbose=verbose, **kwargs)
        with Image.open(filename) as im:
            ids = np.asarray(im)
        if ids.ndim != 2 or ids.max(initial=0) >= len(LABEL_COLOURS):
            return  # not a small class-id map: left as written
        out = Image.fromarray(ids.astype(np.uint8), mode="P")
        out.putpalette([v for rgb in LABEL_COLOURS for v in rgb])
        out.save(filename)


def _source(img: Any, key: Hashable) -> str:
    name = img.meta.get("filename_or_obj") if hasattr(img, "meta") else None
    return str(name) if name else str(key)


class ToUnitGreyd(MapTransform):
    """8-bit grey (or RGB, averaged) ``C x H x W`` images to ``1 x H x W`` float32 in [0, 1].

    Refused with a :class:`Sam3DError` naming the file: an alpha channel (RGBA, grey +
    alpha) and any other bit depth than 8 (a 16-bit PNG loads as int32): their scale is
    the user's to choose, not ours to guess.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            c = img.shape[0]
            if c in (2, 4):
                raise Sam3DError(
                    f"{_source(img, key)} has an alpha channel ({c} channels); save it as "
                    "8-bit grey or RGB"
                )
            if c not in (1, 3):
                raise Sam3DError(f"{_source(img, key)} has {c} channels; expected grey or RGB")
            if img.dtype not in (torch.uint8, torch.bool):
                raise Sam3DError(
                    f"{_source(img, key)} is not an 8-bit image (loaded as {img.dtype}, e.g. "
                    "a 16-bit PNG); convert it to 8-bit grey"
                )
            x = img.float()
            x = x.mean(0, keepdim=True) if c == 3 else x
            d[key] = x / (1.0 if img.dtype == torch.bool else 255.0)
        return d


class RandInverseGammad(RandomizableTransform, MapTransform):
    """SAMUS's gamma augmentation on ``[0, 1]`` grey images: with probability ``prob``,
    ``x ** (1 / g)`` with ``g`` drawn from ``{1.0, 1.1, ..., 2.4}`` (``randint(10, 25) /
    10``), then truncated to 8 bits as the reference's ``astype(np.uint8)`` does.
    (MONAI's ``RandAdjustContrastd`` draws the exponent itself uniformly and rescales by
    the image's own range.)"""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.g = 1.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.g = self.R.randint(10, 25) / 10.0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            u = torch.round(torch.as_tensor(d[key]).clamp(0, 1).double() * 255.0)
            y = (torch.floor((u / 255.0).pow(1.0 / self.g) * 255.0) / 255.0).float()
            d[key], *_ = convert_to_dst_type(y, d[key], dtype=y.dtype)
        return d


class RandColorJitterd(RandomizableTransform, MapTransform):
    """TopoLoRA-SAM's colour jitter on ``3 x H x W`` images in 0..255: with probability
    ``prob``, torchvision's ``ColorJitter`` (brightness, contrast, saturation, hue;
    Albumentations' ``A.ColorJitter()`` defaults 0.2 each, p 0.2 in Seglab). Its factors
    come from torch's generator (seeded by ``set_determinism``)."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.2,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.2,
        allow_missing_keys: bool = False,
    ):
        from torchvision.transforms import ColorJitter

        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.jitter = ColorJitter(brightness, contrast, saturation, hue)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key]).float() / 255.0
            y = self.jitter(x.clamp(0, 1)) * 255.0
            d[key], *_ = convert_to_dst_type(y, d[key], dtype=y.dtype)
        return d


class ClassMaskd(MapTransform):
    """A class-id mask (``1 x H x W``; RGB masks with equal channels too) to ``K x H x W``
    float one-hot channels of classes ``1..K`` (background dropped).

    Args:
        num_classes: ``K``, the structures (CAMUS: 3, a binary dataset: 1).
        values: the grey value of each class, background first (e.g. ``[0, 85, 170, 255]``);
            without it ids ``0..K`` are taken as they are, and a binary mask of any two
            values (``0`` / ``255``) is class 1 when ``K == 1``.

    A mask holding other values raises :class:`Sam3DError` with the file and the values.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        values: list[int] | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.num_classes = int(num_classes)
        if values is not None and len(values) != self.num_classes + 1:
            raise Sam3DError(
                f"label_values needs {self.num_classes + 1} values (background first), "
                f"got {list(values)}"
            )
        self.values = None if values is None else [int(v) for v in values]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        k = self.num_classes
        for key in self.key_iterator(d):
            m = d[key]
            if m.shape[0] > 1:
                if not bool((m == m[:1]).all()):
                    raise Sam3DError(f"{_source(m, key)}: a colour mask; save class ids as grey")
                m = m[:1]
            ids = m.long()
            found = sorted(int(v) for v in torch.unique(ids))
            if self.values is not None:
                lut = {v: i for i, v in enumerate(self.values)}
                bad = [v for v in found if v not in lut]
                if not bad:
                    ids = torch.zeros_like(ids)
                    for v, i in lut.items():
                        ids[m.long() == v] = i
            elif all(0 <= v <= k for v in found):
                bad = []
            elif k == 1 and len(found) <= 2 and found[0] == 0:
                bad, ids = [], (ids > 0).long()
            else:
                bad = [v for v in found if not 0 <= v <= k]
            if bad:
                allowed = self.values if self.values is not None else list(range(k + 1))
                raise Sam3DError(
                    f"{_source(m, key)} has class ids {bad} outside {allowed} "
                    f"(num_classes={k}); set label_values to map the mask's grey values"
                )
            classes = torch.arange(1, k + 1, device=ids.device).view(k, 1, 1)
            out = (ids == classes).float()
            d[key] = convert_to_dst_type(out, m)[0] if hasattr(m, "meta") else out
        return d


class SetPixelSpacingd(MapTransform):
    """Put a case's pixel size (``data[spacing_key]``: (row, col) mm) into the affines.

    Surface metrics read the spacing from the MetaTensor affine
    (:func:`sam3d.metrics.spacing_from_meta`); a PNG has none (1 px). Cases without the
    key keep their affine.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spacing_key: str = "spacing_mm",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.spacing_key = spacing_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        spacing = d.get(self.spacing_key)
        if spacing is None:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            if hasattr(img, "affine"):
                affine = img.affine.clone()
                for axis, s in enumerate(torch.as_tensor(spacing, dtype=affine.dtype).flatten()):
                    affine[axis, axis] = s
                img.affine = affine
        return d


def planar_split(
    dataset_dir: str | Path,
    split: str,
    phantom_kind: str,
    n_phantoms: int = 20,
    phantom_size: tuple[int, int] | list[int] = (256, 256),
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The cases of one split of a 2D dataset folder, phantoms written there when it is empty.

    ``phantom_kind`` is a :func:`sam3d.data.phantoms.write_phantom_dataset` kind (``vessels``,
    ``echo``) of ``n_phantoms`` images of ``phantom_size`` (H, W) pixels. An empty split
    (too few training cases to carve one) is an error, never filled from another split.
    """
    from sam3d.data.splits import SPLITS

    if split not in SPLITS:
        raise Sam3DError(f"split must be one of {SPLITS}, got {split!r}")
    found = find_image_mask_dataset(dataset_dir, seed)
    if found is None:
        from sam3d.data.phantoms import write_phantom_dataset

        logger.warning(
            "no dataset in %s: generating %d %s phantoms of %s px there (seed %d)",
            dataset_dir, n_phantoms, phantom_kind, tuple(phantom_size), seed,
        )  # fmt: skip
        write_phantom_dataset(
            phantom_kind, Path(dataset_dir), int(n_phantoms), seed=seed, size=tuple(phantom_size)
        )
        found = find_image_mask_dataset(dataset_dir, seed)
        if found is None:
            raise Sam3DError(f"{dataset_dir}: the phantoms written there are not found back")
    if not found[split]:
        raise Sam3DError(
            f"the {split} split of {dataset_dir} is empty: it has too few training cases "
            f"({len(found['training'])}) to carve one; add cases or list that split"
        )
    return found[split]

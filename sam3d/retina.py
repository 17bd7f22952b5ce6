"""Glue for the retina (TopoLoRA-SAM) bundle: datasets, 2D image transforms, handlers.

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
An empty or missing ``dataset_dir`` is filled with 2D vessel phantoms (logged).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import PILWriter
from monai.engines.utils import IterationEvents
from monai.transforms import MapTransform

from sam3d.errors import Sam3DError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".ppm", ".bmp")
SPLITS = ("training", "validation", "test")
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


def _split_pairs(pairs: list[dict[str, str]], seed: int) -> dict[str, list[dict[str, str]]]:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n = len(pairs)
    n_val = max(1, round(0.2 * n)) if n >= 3 else 0
    n_test = max(1, round(0.2 * n)) if n >= 3 else 0
    n_train = n - n_val - n_test
    pick = [pairs[i] for i in order]
    return {
        "training": pick[:n_train],
        "validation": pick[n_train : n_train + n_val] or pick[:n_train],
        "test": pick[n_train + n_val :] or pick[:n_train],
    }


def find_retina_dataset(
    dataset_dir: str | Path, seed: int = 0
) -> dict[str, list[dict[str, str]]] | None:
    """The ``training`` / ``validation`` / ``test`` lists of a dataset folder, or None if empty.

    Paths in the lists are absolute. Raises :class:`Sam3DError` for a folder that holds
    files but none of the layouts in this module's docstring.
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
        for split in SPLITS:
            items = meta.get(split) or []
            out[split] = [
                {
                    "image": str((d / it["image"]).resolve()),
                    "label": str((d / it["label"]).resolve()),
                }
                for it in items
            ]
        if not out["training"]:
            raise Sam3DError(f"{index} lists no training cases")
        out["validation"] = out["validation"] or out["training"]
        out["test"] = out["test"] or out["validation"]
        return out
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
        if not out["validation"] and not out["test"]:
            split = _split_pairs(out["training"], seed)
            return split
        out["validation"] = out["validation"] or out["test"]
        out["test"] = out["test"] or out["validation"]
        return out
    if (d / "images").is_dir():
        masks = _mask_folder(d)
        if masks is None:
            raise Sam3DError(f"{d} has images/ but no masks/ (or labels/) folder")
        return _split_pairs(pair_image_mask_folders(d / "images", masks), seed)
    raise Sam3DError(
        f"no dataset found in {d}: expected dataset.json, images/ + masks/, or "
        "training/images + training/masks (an empty folder is filled with phantoms)"
    )


def retina_datalist(
    dataset_dir: str | Path,
    split: str = "training",
    n_phantoms: int = 20,
    phantom_size: Sequence[int] = (256, 256),
    seed: int = 0,
) -> list[dict[str, str]]:
    """The cases of one split (``training``, ``validation`` or ``test``) of ``dataset_dir``.

    A missing or empty ``dataset_dir`` is first filled with ``n_phantoms`` 2D vessel
    phantoms of ``phantom_size`` (H, W) pixels.
    """
    if split not in SPLITS:
        raise Sam3DError(f"split must be one of {SPLITS}, got {split!r}")
    found = find_retina_dataset(dataset_dir, seed)
    if found is None:
        from sam3d.data.phantoms import write_phantom_dataset

        logger.warning(
            "no dataset in %s: generating %d vessel phantoms of %s px there (seed %d)",
            dataset_dir, n_phantoms, tuple(phantom_size), seed,
        )  # fmt: skip
        write_phantom_dataset(
            "vessels", Path(dataset_dir), int(n_phantoms), seed=seed, size=tuple(phantom_size)
        )
        found = find_retina_dataset(dataset_dir, seed)
        assert found is not None
    return found[split]


def image_datalist(folder: str | Path) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image file in ``folder`` (inference input)."""
    d = Path(folder)
    if not d.is_dir():
        raise Sam3DError(f"input folder not found: {d}")
    items = [{"image": str(p)} for p in _images_in(d)]
    if not items:
        raise Sam3DError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {d}")
    return items


def load_topolora_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained TopoLoRA-SAM from the bundle's ``models/model.pt``.

    The file is ``{"preset": TopoLoRA settings, "state_dict": ..., "meta": ...}`` (read
    with ``weights_only=True``); returns ``(model in eval mode, meta)``.
    """
    from sam3d.models.topolora import build_topolora_sam

    ckpt = read_retina_checkpoint(path, map_location)
    if not isinstance(ckpt.get("preset"), dict) or "state_dict" not in ckpt:
        raise Sam3DError(f"{path} is not a TopoLoRA-SAM checkpoint of the retina bundle")
    model = build_topolora_sam(**ckpt["preset"])
    load_trained_weights(model, ckpt)
    return model.eval(), dict(ckpt.get("meta") or {})


def read_retina_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read ``models/model.pt`` safely (``weights_only``); :class:`Sam3DError` if unusable."""
    p = Path(path)
    if not p.is_file():
        raise Sam3DError(f"trained checkpoint not found: {p} (train the bundle first)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise Sam3DError(f"cannot read the checkpoint {p} ({type(e).__name__})") from e
    if not isinstance(ckpt, dict):
        raise Sam3DError(f"{p} is not a checkpoint of the retina bundle")
    return ckpt


def load_trained_weights(
    network: torch.nn.Module, checkpoint: str | Path | dict
) -> torch.nn.Module:
    """Load ``model.pt`` (a path or its loaded dict) into ``network``; returns ``network``."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else read_retina_checkpoint(checkpoint)
    state = ckpt.get("state_dict", ckpt)
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise Sam3DError(
            f"the checkpoint does not fit this network ({str(e).splitlines()[0]}); "
            "build the network with the settings it was trained with"
        ) from e
    return network


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


class GradientClipHandler:
    """Clip the gradient norm right before each optimizer step of a ``SupervisedTrainer``.

    Understands MONAI's ``accumulation_steps`` (clips only on the iterations that step)
    and unscales AMP gradients first, so ``max_norm`` is in true gradient units.
    """

    def __init__(self, max_norm: float = 1.0):
        self.max_norm = float(max_norm)

    def attach(self, engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def _will_step(self, engine) -> bool:
        acc = getattr(engine, "accumulation_steps", 1)
        if acc <= 1:
            return True
        length = engine.state.epoch_length
        it = engine.state.iteration - 1
        local = it % length if length is not None else it
        return (local + 1) % acc == 0 or (length is not None and local + 1 == length)

    def __call__(self, engine) -> None:
        if not self._will_step(engine):
            return
        if engine.amp and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        params = [
            p for g in engine.optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


__all__ = [
    "BinarizeMaskd",
    "GradientClipHandler",
    "PILWriterHW",
    "ToSamRGBd",
    "find_retina_dataset",
    "image_datalist",
    "load_topolora_checkpoint",
    "load_trained_weights",
    "read_retina_checkpoint",
    "pair_image_mask_folders",
    "retina_datalist",
]

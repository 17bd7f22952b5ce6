"""MONAI transform chains per dataset preset (the reference recipe, REFERENCE section 1).

A dataset preset (``configs/datasets/<name>.json``) holds the HU window, the global
mean/SD of the z-score, the tumour label, the target spacing and the NSD tolerance.
The training and validation chains are written once, as the ``preprocessing`` lists of
``bundles/kits/train.json``; :func:`train_transforms` and :func:`val_transforms` read
them from there for another preset, for scripts that need the bundle's preprocessing
without running the bundle. :func:`intensity_transforms` (clip to the window, z-score
with the global mean/SD) is the intensity step alone, for click inference; a test checks
it equals the bundle's.

Every spatial step comes before the clicks are drawn, so clicks are voxel indices of the
final tensor. Deterministic steps come first so ``CacheDataset`` caches them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from monai.transforms import (
    Compose,
    NormalizeIntensityd,
    ScaleIntensityRanged,
)

from sam3d.errors import Sam3DError
from sam3d.presets import BUNDLE_DIR, CONFIG_DIR, preset_names, read_preset

__all__ = [
    "DATASET_PRESET_DIR",
    "dataset_preset_names",
    "load_dataset_preset",
    "air_value",
    "above",
    "pre_crop_size",
    "intensity_transforms",
    "train_transforms",
    "val_transforms",
]

DATASET_PRESET_DIR = CONFIG_DIR / "datasets"
_REQUIRED = {"window_hu", "mean", "std", "tumour_label", "nsd_tolerance_mm", "spacing_mm"}
# Below this HU a voxel is air outside the body (the foreground crop's threshold).
BODY_HU = -500.0


def dataset_preset_names() -> list[str]:
    """Names of the shipped dataset presets (``kits``, ``lits``, ``pancreas``, ``colon``)."""
    return preset_names("datasets")


def load_dataset_preset(preset: str | Path | dict) -> dict[str, Any]:
    """A dataset preset as a dict: a shipped name, a JSON file path, or a dict to check."""
    data = dict(preset) if isinstance(preset, dict) else read_preset("datasets", preset)
    missing = _REQUIRED - set(data)
    if missing:
        raise Sam3DError(f"dataset preset {preset!r} lacks {', '.join(sorted(missing))}.")
    return data


def air_value(preset: dict) -> float:
    """The normalised value of air (the window's lower bound after the z-score)."""
    return (float(preset["window_hu"][0]) - float(preset["mean"])) / float(preset["std"])


def above(threshold: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A picklable ``x > threshold`` for ``CropForegroundd(select_fn=...)``."""
    return functools.partial(torch.gt, other=float(threshold))


def pre_crop_size(crop_size: int) -> int:
    """The pos/neg crop before zoom and the final crop (reference: 154 for 128)."""
    return int(round(crop_size * 154 / 128))


def intensity_transforms(preset: dict, key: str = "image") -> list:
    """Clip to the preset's HU window, then z-score with its global mean/SD."""
    lo, hi = (float(v) for v in preset["window_hu"])
    return [
        ScaleIntensityRanged(keys=key, a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True),
        NormalizeIntensityd(
            keys=key, subtrahend=float(preset["mean"]), divisor=float(preset["std"])
        ),
    ]


def _kits_recipe(preset: dict, **overrides: Any) -> Any:
    """The kits bundle's ``train.json`` as a ``ConfigParser``, for another preset.

    The bundle config is the one written recipe; these builders read it rather than
    repeat it, so a script and the bundle always preprocess alike.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_DIR / "kits" / "train.json"))
    parser.update({"dataset_info": dict(preset), **overrides})
    return parser


def train_transforms(
    preset: dict,
    crop_size: int,
    n_pos: int = 10,
    n_neg: int = 20,
    samples_per_volume: int = 1,
    vary_clicks: bool = True,
) -> Compose:
    """The training chain (``train#preprocessing`` of bundles/kits/train.json).

    Load, RAS, the preset's spacing, body crop, window + z-score, tumour mask; then
    pos/neg crops, zoom, crop to ``crop_size``, flips, rot90, intensity shift and
    ``RandSimulateClicksd``.
    """
    parser = _kits_recipe(
        preset,
        crop_size=int(crop_size),
        n_pos_clicks=int(n_pos),
        n_neg_clicks=int(n_neg),
        samples_per_volume=int(samples_per_volume),
        vary_clicks=bool(vary_clicks),
    )
    return parser.get_parsed_content("train#preprocessing")


def val_transforms(preset: dict, seed: int = 0, n_pos: int = 1, n_neg: int = 0) -> Compose:
    """The evaluation chain (``validate#preprocessing``): whole body-cropped volume at the
    preset's spacing, ``n_pos`` / ``n_neg`` clicks seeded per case."""
    parser = _kits_recipe(preset, seed=int(seed))
    parser["validate#clicks#0#n_pos"] = int(n_pos)
    parser["validate#clicks#0#n_neg"] = int(n_neg)
    return parser.get_parsed_content("validate#preprocessing")

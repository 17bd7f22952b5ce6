"""MONAI transform chains per dataset preset (the reference recipe, REFERENCE section 1).

A dataset preset (``configs/datasets/<name>.json``) holds the HU window, the global
mean/SD of the z-score, the tumour label, the target spacing and the NSD tolerance.
The builders here are the ONE written recipe of the kits preprocessing: the bundle's
``train.json`` / ``evaluate.json`` / ``inference.json`` call them
(``"$sam3d.data.pipelines.train_transforms(...)"``), and so do ``sam3d segment``, the
session and the scripts:

- :func:`load_transforms`: load, channel first, RAS, resample to the grid, body crop;
- :func:`intensity_transforms`: clip to the window, z-score with the global mean/SD;
- :func:`train_transforms`: + tumour-vs-rest label, pos/neg crops, zoom, crop, flips,
  rot90, intensity shift, random clicks;
- :func:`val_transforms`: + tumour-vs-rest label, one seeded click per case, the label
  kept to the clicked lesion (what one click can segment);
- :func:`inference_transforms`: a new volume (a path or a MetaTensor) onto the same
  grid with the same intensities, clicks mapped onto it.

Every spatial step comes before the clicks are drawn, so clicks are voxel indices of the
final tensor. Deterministic steps come first so ``CacheDataset`` caches them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LabelToMaskd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from sam3d.data.augment import RandCropAffined
from sam3d.data.clicks import ClickedLesiond, RandSimulateClicksd, SimulateClicksd
from sam3d.data.geometry import ClicksToGridd
from sam3d.data.volume import LoadVolumed
from sam3d.errors import Sam3DError
from sam3d.presets import CONFIG_DIR, preset_names, read_preset

__all__ = [
    "DATASET_PRESET_DIR",
    "dataset_preset_names",
    "load_dataset_preset",
    "air_value",
    "above",
    "pre_crop_size",
    "load_transforms",
    "intensity_transforms",
    "train_transforms",
    "val_transforms",
    "inference_transforms",
    "WindowZScored",
]

DATASET_PRESET_DIR = CONFIG_DIR / "datasets"

# Training augmentation (kits bundle README, "Augmentation"): at least the reference's
# (3DSAM-adapter: zoom p 0.8 in 0.85-1.25, flips p 0.5 per axis, +-30 deg rotation for
# pancreas / colon), plus intensity changes that a second scanner or generator brings.
AUGMENTATION: dict[str, Any] = {
    "zoom_prob": 0.8,
    "zoom_range": (0.85, 1.25),
    "flip_prob": 0.5,
    "rot90_prob": 0.2,
    "rotate_prob": 0.5,
    "rotate_deg": 30.0,  # in the axial plane (about the S axis)
    "shift_hu": 20.0,
    "shift_prob": 0.5,
    "scale": 0.25,
    "scale_prob": 0.5,
    "gamma": (0.7, 1.5),
    "gamma_prob": 0.3,
    "noise_std": 0.1,
    "noise_prob": 0.3,
    "smooth_sigma": (0.5, 1.0),
    "smooth_prob": 0.2,
}
_REQUIRED = {"window_hu", "mean", "std", "tumour_label", "nsd_tolerance_mm", "spacing_mm"}
# Below this HU a voxel is air outside the body (the foreground crop's threshold).
BODY_HU = -500.0


def dataset_preset_names() -> list[str]:
    """Names of the shipped dataset presets (``kits``, ``lits``, ``pancreas``, ``colon``)."""
    return preset_names("datasets")


def load_dataset_preset(
    preset: str | Path | dict, spacing_mm: float | Sequence[float] | None = None
) -> dict[str, Any]:
    """A dataset preset as a dict: a shipped name, a JSON file path, or a dict to check.

    ``spacing_mm`` (one value or three) replaces the preset's grid spacing: the grid the
    model is trained on, saved with the checkpoint, so inference resamples to it too.
    """
    data = dict(preset) if isinstance(preset, dict) else read_preset("datasets", preset)
    missing = _REQUIRED - set(data)
    if missing:
        raise Sam3DError(f"dataset preset {preset!r} lacks {', '.join(sorted(missing))}.")
    if spacing_mm is not None:
        values = [spacing_mm] * 3 if isinstance(spacing_mm, int | float) else list(spacing_mm)
        if len(values) != 3 or min(float(v) for v in values) <= 0:
            raise Sam3DError(f"spacing_mm must be one or three positive values, got {spacing_mm}")
        data["spacing_mm"] = [float(v) for v in values]
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


def load_transforms(
    preset: dict, keys: Sequence[str] = ("image", "label"), body_hu: float | None = BODY_HU
) -> list:
    """Load, channel first, RAS, resample (image bilinear, label nearest), crop to the body."""
    keys = list(keys)
    modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    chain: list = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=list(preset["spacing_mm"]), mode=modes),
    ]
    if body_hu is not None:
        chain.append(CropForegroundd(keys=keys, source_key=keys[0], select_fn=above(body_hu)))
    return chain


def intensity_transforms(preset: dict, key: str = "image") -> list:
    """Clip to the preset's HU window, then z-score with its global mean/SD."""
    lo, hi = (float(v) for v in preset["window_hu"])
    return [
        ScaleIntensityRanged(keys=key, a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True),
        NormalizeIntensityd(
            keys=key, subtrahend=float(preset["mean"]), divisor=float(preset["std"])
        ),
    ]


class WindowZScored(MapTransform):
    """:func:`intensity_transforms` (clip to the HU window, z-score) in place, in float32.

    For a tensor the chain owns (after :class:`~sam3d.data.resample.BoundedSpacingd`): no
    whole-volume temporaries, where MONAI's two transforms make three. The same float32
    operations in the same order as theirs: equal bit for bit.
    """

    def __init__(self, preset: dict, key: str = "image") -> None:
        super().__init__([key])
        self.lo, self.hi = (float(v) for v in preset["window_hu"])
        self.mean, self.std = float(preset["mean"]), float(preset["std"])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.dtype != torch.float32:
                img = img.float()
            # MONAI's operations in MONAI's order, in place: bit-identical results
            span = self.hi - self.lo
            img.sub_(self.lo).div_(span).mul_(span).add_(self.lo).clamp_(self.lo, self.hi)
            img.sub_(self.mean).div_(self.std)
            d[key] = img
        return d


def _tumour_label(preset: dict, key: str = "label") -> list:
    return [
        LabelToMaskd(keys=key, select_labels=[int(preset["tumour_label"])]),
        CastToTyped(keys=key, dtype=torch.uint8),
    ]


# the random transforms of the training chain: ours, and 3DSAM-adapter's (base_dataset.py
# lines 242-248 zoom p 0.8 in 0.85-1.25, lines 272-275 flips and rot90 p 0.5)
# 3DSAM-adapter's augmentation (``dataset/base_dataset.py``, kits): zoom p 0.8 in
# 0.85-1.25, flips and rot90 p 0.5, an intensity shift; no rotation (pancreas and colon
# only), no scale, gamma, noise or blur. Overrides of AUGMENTATION's keys.
REFERENCE_AUGMENTATION: dict[str, Any] = {
    "zoom_prob": 0.8,
    "zoom_range": (0.85, 1.25),
    "flip_prob": 0.5,
    "rot90_prob": 0.5,
    "rotate_prob": 0.0,
    "scale_prob": 0.0,
    "gamma_prob": 0.0,
    "noise_prob": 0.0,
    "smooth_prob": 0.0,
}


def train_transforms(
    preset: dict,
    crop_size: int,
    n_pos: int = 10,
    n_neg: int = 20,
    samples_per_volume: int = 1,
    vary_clicks: bool = True,
    click_training: str = "reference",
    instance_key: str | None = None,
    augmentation: dict | None = None,
) -> Compose:
    """The training chain: cached deterministic part, then random crops/augmentations/clicks.

    ``click_training="reference"``: 3DSAM-adapter's random clicks (``n_pos`` tumour and
    ``n_neg`` other points, counts varied with ``vary_clicks``), crops centred on tumour 2 in
    3 times. ``"interactive"``: one positive click on a tumour voxel and the label kept to
    the clicked lesion (the target is the object under the click), crops always centred on
    tumour; :class:`~sam3d.engine.interactive.InteractiveClickInferer` adds the correction
    clicks. Augmentation (:data:`AUGMENTATION`, with ``augmentation``'s overrides of its keys;
    :data:`REFERENCE_AUGMENTATION` is 3DSAM-adapter's) is the same in both. With ``instance_key``
    (an instance map, e.g. the ``synth`` phantoms' ``instance``) the interactive target is
    the clicked instance, so a lesion touching another is a target alone.
    """
    from sam3d.engine.interactive import click_training_mode

    interactive = click_training_mode(click_training) == "interactive"
    aug = {**AUGMENTATION, **(augmentation or {})}
    unknown = set(aug) - set(AUGMENTATION)
    if unknown:
        raise Sam3DError(
            f"unknown augmentation settings {sorted(unknown)}; use {sorted(AUGMENTATION)}"
        )
    pre = pre_crop_size(crop_size)
    air = air_value(preset)
    inst = [instance_key] if instance_key else []
    spatial = ["image", "label", *inst]
    if interactive:
        clicks: list = [
            RandSimulateClicksd(keys="label", n_pos=1, n_neg=0),
            ClickedLesiond(keys="label", instance_key=instance_key),
        ]
    else:
        clicks = [
            RandSimulateClicksd(keys="label", n_pos=n_pos, n_neg=n_neg, vary_count=vary_clicks)
        ]
    std = float(preset["std"])
    return Compose(
        [
            *load_transforms(preset, keys=spatial),
            *intensity_transforms(preset),
            *_tumour_label(preset),
            SpatialPadd(keys="image", spatial_size=[pre] * 3, value=air),
            SpatialPadd(keys=["label", *inst], spatial_size=[pre] * 3),
            RandCropByPosNegLabeld(
                keys=spatial,
                label_key="label",
                spatial_size=[pre] * 3,
                pos=1 if interactive else 2,
                neg=0 if interactive else 1,
                num_samples=samples_per_volume,
                image_key="image",
                image_threshold=air,
            ),  # fmt: skip
            RandCropAffined(
                keys=spatial,
                crop_size=crop_size,
                zoom_prob=aug["zoom_prob"],
                zoom_range=aug["zoom_range"],
                rotate_prob=aug["rotate_prob"],
                rotate_deg=aug["rotate_deg"],
                flip_prob=aug["flip_prob"],
                rot90_prob=aug["rot90_prob"],
                modes=["bilinear", "nearest", *["nearest"] * len(inst)],
            ),  # fmt: skip
            RandShiftIntensityd(
                keys="image", offsets=aug["shift_hu"] / std, prob=aug["shift_prob"]
            ),
            RandScaleIntensityd(keys="image", factors=aug["scale"], prob=aug["scale_prob"]),
            RandAdjustContrastd(keys="image", gamma=aug["gamma"], prob=aug["gamma_prob"]),
            RandGaussianSmoothd(
                keys="image",
                sigma_x=aug["smooth_sigma"],
                sigma_y=aug["smooth_sigma"],
                sigma_z=aug["smooth_sigma"],
                prob=aug["smooth_prob"],
            ),  # fmt: skip
            RandGaussianNoised(keys="image", std=aug["noise_std"], prob=aug["noise_prob"]),
            *clicks,
            *([DeleteItemsd(keys=inst)] if inst else []),
            EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=True),
        ]
    )


def val_transforms(
    preset: dict,
    seed: int = 0,
    n_pos: int = 1,
    n_neg: int = 0,
    clicked_lesion: bool = True,
    instance_key: str | None = None,
) -> Compose:
    """The evaluation chain: whole body-cropped volume on the grid, seeded clicks per case.

    With ``clicked_lesion`` the label keeps only the lesion under the positive click(s)
    (:class:`~sam3d.data.clicks.ClickedLesiond`), the whole tumour label going to
    ``label_all``: one click is scored on the lesion it was put on. With ``instance_key``
    (a dataset with instance maps, e.g. ``"instance"`` of the ``synth`` phantoms) the
    clicked lesion is its instance, so touching lesions are scored apart; the instance
    map is resampled with the label and dropped after use.
    """
    load_keys = ["image", "label"] + ([instance_key] if instance_key else [])
    chain: list = [
        *load_transforms(preset, keys=load_keys),
        *intensity_transforms(preset),
        *_tumour_label(preset),
        SimulateClicksd(keys="label", n_pos=n_pos, n_neg=n_neg, seed=seed),
    ]
    keys = ["image", "label"]
    if clicked_lesion:
        chain.append(ClickedLesiond(keys="label", all_key="label_all", instance_key=instance_key))
        keys.append("label_all")
    if instance_key:
        chain.append(DeleteItemsd(keys=instance_key))
    chain.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True))
    return Compose(chain)


def inference_transforms(
    preset: dict,
    spacing_mm: float | Sequence[float] | None = None,
    device: str | torch.device | None = None,
    key: str = "image",
    clicks: bool = False,
    world: bool = False,
) -> Compose:
    """A new volume onto the model's grid: load -> device -> RAS -> grid spacing -> intensity.

    Args:
        preset: dataset preset (``window_hu``, ``mean``, ``std``, ``spacing_mm``), as in
            training (the checkpoint's ``dataset``).
        spacing_mm: grid spacing; default the preset's.
        device: where the volume is resampled (the GPU makes resampling cheap).
        key: the image key (a NIfTI path or a channel-first MetaTensor ``1 x I x J x K``).
        clicks: append :class:`~sam3d.data.geometry.ClicksToGridd` (``points`` in
            original voxels, or RAS mm with ``world``, mapped onto the grid).
    """
    from sam3d.data.resample import BoundedSpacingd

    if spacing_mm is None:
        spacing_mm = preset.get("spacing_mm", 1.0)
    pixdim = [float(spacing_mm)] * 3 if np.ndim(spacing_mm) == 0 else [float(v) for v in spacing_mm]
    chain: list = [
        LoadVolumed(key, grid_spacing_mm=pixdim),  # refuses a grid too large, before Spacingd
        EnsureTyped(key, device=device, dtype=torch.float32, track_meta=True),
        Orientationd(key, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        # Spacingd(mode="bilinear")'s grid and record, without its float64 whole-grid spike;
        # then intensity_transforms in place on the new tensor it returns
        BoundedSpacingd(key, pixdim=pixdim),
        WindowZScored(dict(preset), key=key),
    ]
    if clicks:
        chain.append(ClicksToGridd(ref_key=key, world=world))
    return Compose(chain)
